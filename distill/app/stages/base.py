"""What every stage shares: a typed config in, a :class:`StageResult` out.

A stage is a function ``run_X(config, out) -> StageResult``. Its config is a frozen pydantic model, validated when
it is built (no side effects; an error names the field), so the command line, a recipe and a Python caller get the
same checks and messages. A field's name is its command-line flag with dashes turned into underscores, which is how
the CLI maps an error to ``--flag`` and a recipe to its key path.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.errors import ConfigError, UsageError

log = logging.getLogger("distill")

# Fields that change how a stage runs but not what it produces: left out of the cache key.
RUN_ONLY_FIELDS = frozenset({"threads", "ckpt_every", "force"})


def _type_name(err: dict[str, Any]) -> str:
    kind = err["type"]
    names = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
             "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
             "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "model_attributes_type": "a mapping", "literal_error": "one of "
             + str((err.get("ctx") or {}).get("expected", "")),
             "finite_number": "a finite number"}
    return names.get(kind, "")


def describe_error(err: dict[str, Any]) -> tuple[tuple, str]:
    """``(loc, message)`` of one pydantic error, in this project's words."""
    loc, kind, value = tuple(err.get("loc", ())), err["type"], err.get("input")
    expected = _type_name(err)
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "missing":
        return loc, "missing; give a value"
    if expected:
        return loc, f"expected {expected}, got {value!r}"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return loc, msg[0].lower() + msg[1:] if msg else msg


def field_path(loc: tuple) -> str:
    """``("stages", 1, "start_step")`` -> ``stages[1].start_step``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def build_config(cls: type[BaseModel], **values: Any):
    """``cls(**values)``, with the first validation problem raised as :class:`ConfigError` naming its field."""
    try:
        return cls(**values)
    except ValidationError as e:
        loc, msg = describe_error(e.errors()[0])
        raise ConfigError(field_path(loc) or getattr(cls, "kind", "") or cls.__name__, msg) from None


def options_error(e: UsageError, cls: type[BaseModel]) -> ConfigError:
    """A library check's message names command-line flags (``--start-steps 3 must be --target-steps ...``): the
    same error naming config fields instead (the first one as the error's field), so that a recipe can point at its
    keys; the command line turns them back into flags."""

    def field(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return name if name in cls.model_fields else m.group(0)

    text = str(e)
    m = re.match(r"--([a-z0-9-]+)[: ]\s*(.*)", text)
    if m and m.group(1).replace("-", "_") in cls.model_fields:
        return ConfigError(m.group(1).replace("-", "_"), re.sub(r"--([a-z0-9-]+)", field, m.group(2)), m.group(2))
    # a message about several flags (--min-batch/--opt-batch/--max-batch: ...) or none: no one field to name
    return ConfigError("", re.sub(r"--([a-z0-9-]+)", field, text), text)


class StageConfig(BaseModel):
    """Base of every stage's config: frozen, unknown fields refused, validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())

    kind: ClassVar[str] = ""  # the recipe's name for the stage
    cli: ClassVar[str] = ""  # the equivalent command, e.g. "progressive" or "export onnx"
    positional: ClassVar[tuple[str, ...]] = ()  # fields given as command-line arguments, in order
    flags: ClassVar[dict[str, str]] = {}  # field -> flag, where the flag is not --field-with-dashes
    negative_flags: ClassVar[dict[str, str]] = {}  # field -> the flag that sets it false, where not --no-FLAG
    inputs: ClassVar[tuple[str, ...]] = ()  # fields naming files or folders this stage reads (hashed for the cache)

    @classmethod
    def build(cls, **values: Any):
        """Validate ``values`` into a config; the first problem raises :class:`ConfigError` naming its field."""
        return build_config(cls, **values)

    @classmethod
    def flag(cls, name: str) -> str:
        return cls.flags.get(name, "--" + name.replace("_", "-"))

    def check_options(self):
        """Run the library's own check of the options this config stands for (``self.options().validate()``), its
        error naming the field; returns ``self`` (for a model validator)."""
        try:
            self.options().validate()
        except UsageError as e:
            raise options_error(e, type(self)) from None
        return self

    def cache_record(self) -> dict[str, Any]:
        """The settings that decide what the stage produces (its cache key is their hash with the inputs')."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUN_ONLY_FIELDS}

    def command(self, out: Path | str | None = None, skip: tuple[str, ...] = ()) -> str:
        """The equivalent ``distill`` command line: the positional fields, ``--out``, then every field (but
        ``skip``) that differs from its default."""
        parts = ["distill", *self.cli.split()]
        data = self.model_dump(mode="json")
        parts += [str(data[p]) for p in self.positional if data.get(p) is not None]
        if out is not None:
            parts += ["--out", str(out)]
        defaults = {k: f.get_default(call_default_factory=True) for k, f in type(self).model_fields.items()}
        for name, value in data.items():
            if name in self.positional or name in skip or value is None or value == _json(defaults.get(name)):
                continue
            flag = self.flag(name)
            if isinstance(value, bool):
                parts.append(flag if value else self.negative_flags.get(name, "--no-" + flag[2:]))
            else:
                parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        return " ".join(shlex.quote(p) for p in parts)


def as_list(value: Any) -> Any:
    """``"150,200"`` or ``150`` -> ``[150, 200]`` / ``[150]`` (the command line's and a recipe's spellings)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return value


def name_list(value: Any, choices: tuple[str, ...]) -> list[str]:
    """A list of names from ``choices`` (a comma-separated string or a list), in order, once each; an empty list or
    an unknown name is refused with the valid ones."""
    from distill.errors import UsageError
    from distill.parsing import parse_names

    try:
        return list(parse_names(",".join(map(str, as_list(value) or [])), "", choices))
    except UsageError as e:
        raise ValueError(str(e).lstrip(": ").replace("is empty: ", "empty: ")) from None


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None


@dataclass
class StageResult:
    """What a stage made: named artifact paths (files or folders) and a metrics record (JSON-ready)."""

    outputs: dict[str, Path] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads and restore the previous count afterwards (no stage leaves a global
    setting behind for the next one)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_threads(threads: int | None) -> int | None:
    """At most 4 threads per CPU core (more only slows a run down)."""
    import os

    most = 4 * (os.cpu_count() or 1)
    if threads is not None and not 1 <= threads <= most:
        raise ValueError(f"{threads}: give 1 to {most} (at most 4 threads per CPU core on this machine)")
    return threads
