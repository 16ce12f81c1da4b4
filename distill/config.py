"""YAML option files for CLI commands: ``distill teacher train --config recipes/mnist-teacher.yaml``.

A recipe file holds one mapping per stage (``teacher:``, later ``distill:``, ``export:`` ...); a command reads its
own section and uses it as the defaults of its options, so flags given on the command line still win.
Keys are option names with dashes or underscores (``batch-size`` or ``batch_size``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distill.errors import UsageError
from distill.parsing import load_yaml


def read_section(path: Path, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a YAML file, with a one-line error for every way it can be wrong."""
    import yaml

    if not str(path).strip():
        raise UsageError("--config is empty; pass the path of a YAML file")
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
        doc = load_yaml(text, str(path))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass an existing YAML file to --config") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; pass a YAML file to --config") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e}); pass a readable YAML file to --config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}; fix the syntax") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a config; fix the file") from None
    if doc is None:
        raise UsageError(f"{path}: is empty; it needs a '{section}:' mapping of options for this command")
    if not isinstance(doc, dict) or not isinstance(doc.get(section), dict):
        raise UsageError(f"{path}: needs a '{section}:' mapping of options for this command")
    return doc[section]


def config_option(section: str):
    """A ``--config FILE`` option whose ``section`` becomes the command's option defaults (flags still win)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        if not str(value).strip():
            raise UsageError("--config is empty; pass the path of a YAML file")
        values = read_section(Path(value), section)
        names = {}  # flag spelling (underscores) -> parameter name
        for p in ctx.command.params:
            if isinstance(p, click.Option) and p.name != "config":
                for flag in p.opts:
                    names[flag.lstrip("-").replace("-", "_")] = p.name
            elif isinstance(p, click.Argument):  # an argument by its name, e.g. 'teacher:'
                names[p.name] = p.name
        params = {p.name: p for p in ctx.command.params}
        defaults, given = {}, {}
        for key, v in values.items():
            name = names.get(str(key).replace("-", "_"))
            if name is None:
                known = ", ".join(sorted(n.replace("_", "-") for n in names))
                raise UsageError(f"{value}: unknown key '{key}' in '{section}:'; known keys: {known}")
            if name in given:  # batch-size and batch_size, or --lr's other spelling
                raise UsageError(f"{value}: keys '{given[name]}' and '{key}' in '{section}:' set the same option; "
                                 "keep one")
            given[name] = key
            if v is None:
                raise UsageError(f"{value}: key '{key}' in '{section}:' has no value; give one or remove the key")
            if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(i, (dict, list)) for i in v)):
                raise UsageError(f"{value}: key '{key}' in '{section}:' must be a value or a flat list, "
                                 f"not {type(v).__name__} {v!r}")
            v = ",".join(map(str, v)) if isinstance(v, list) else v
            try:  # check the value now, so that the message names the file and the key
                params[name].type_cast_value(ctx, v)
            except click.BadParameter as e:
                raise UsageError(f"{value}: key '{key}' in '{section}:': {e.message}") from None
            defaults[name] = v
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option("--config", type=click.Path(dir_okay=False), default=None, metavar="FILE", is_eager=True,
                        expose_value=False, callback=callback,
                        help=f"YAML file whose '{section}:' mapping sets this command's options (flags override).")
