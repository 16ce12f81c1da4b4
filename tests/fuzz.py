"""Hypothesis strategies shared by the generated-input suites (test_fuzz_recipes.py, test_fuzz_cli.py): values for
a typed config field (mostly well-typed, sometimes junk of any type), and the outcome check every generated
invocation must meet: it works, or it ends with exactly one ``error:`` line and exit code 2 (1 for what the
machine lacks), never a traceback."""

from __future__ import annotations

import math
import os
import types
import typing
from typing import Any, Literal, get_args, get_origin

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic (CI reruns the same cases), no example database written into the checkout, no per-example deadline
# (the first example pays for imports); capsys/monkeypatch are reset by hand per example.
# DISTILL_FUZZ_EXAMPLES: fewer (while working on the suite) or more (a longer hunt) than the 500 per run
FUZZ = settings(max_examples=int(os.environ.get("DISTILL_FUZZ_EXAMPLES", 500)), deadline=None, database=None,
                derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# plain YAML scalars and small containers of any type: what a user might type in the wrong place
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.sampled_from(["", " ", "-1", "1e999", "nan", "a,b", "0-", "~", "[]"]),
                 st.lists(st.integers(-3, 40), max_size=3), st.dictionaries(st.sampled_from(["a", "b"]),
                                                                             st.integers(0, 3), max_size=2))


def yaml_safe(value: Any) -> Any:
    """NaN and infinities as YAML writes them (safe_dump handles them; keep floats finite in JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def typed(annotation: Any, refs: st.SearchStrategy) -> st.SearchStrategy:
    """Well-typed values for a field annotation (a string field draws from ``refs``: names and files)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(st.none(), *(typed(a, refs) for a in args if a is not type(None)))
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            return st.tuples(*(typed(a, refs) for a in args)).map(list)
        return st.lists(typed(inner, refs), max_size=4)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-2, 300)
    if annotation is float:
        return st.floats(-1.0, 100.0, allow_nan=False)
    if annotation is str:
        return refs
    return JUNK


def field_value(annotation: Any, refs: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a well-typed value, one time in five junk."""
    return st.one_of(typed(annotation, refs), typed(annotation, refs), typed(annotation, refs),
                     typed(annotation, refs), JUNK)


def config_fields(cls, refs: st.SearchStrategy, skip: tuple[str, ...] = ()) -> st.SearchStrategy:
    """A random subset of a pydantic config class's fields, each with a generated value."""
    fields = {name: f.annotation for name, f in cls.model_fields.items() if name not in skip}
    if not fields:
        return st.just({})
    names = st.lists(st.sampled_from(sorted(fields)), max_size=min(5, len(fields)), unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries(
        {n: field_value(fields[n], refs).map(yaml_safe) for n in chosen}))


def check_outcome(code: int, out: str, err: str, works_marker: str | None = None) -> str:
    """One generated invocation's outcome: ``"ok"`` or ``"error"``; anything else fails the test."""
    assert "Traceback" not in err and "Traceback" not in out, err
    if code == 0:
        if works_marker is not None:
            assert works_marker in out, out
        return "ok"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # 2: a usage or config mistake; 1: what the machine lacks (TensorRT, a GPU library), named in the line
    assert code in (1, 2), f"exit code {code}, stderr: {err!r}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"want exactly one error line: {err!r}"
    assert "\n" not in errors[0].strip()
    return "error"
