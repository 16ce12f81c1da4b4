"""Parsing of command-line values (torch-free, so the CLI can import it at start-up)."""

from __future__ import annotations

import functools

from distill.errors import UsageError

# The longest list one option may expand to (``--seeds 0-999999`` is a million samples). Ranges are counted
# before they are expanded, so ``--seeds 0-10000000000`` is refused at once instead of filling the memory.
MAX_LIST = 1_000_000
# Seeds seed torch generators and are stored as int64 in ``samples.npz``: 0 <= seed < 2**63.
SEED_MAX = 2**63 - 1


def parse_int_list(text: str, option: str, allow_empty: bool = False, lo: int | None = None,
                   hi: int | None = None, max_count: int = MAX_LIST, bounds: str | None = None) -> list[int]:
    """``"0-3,7,9-10"`` -> ``[0, 1, 2, 3, 7, 9, 10]``; ``option`` names the flag in the error message.

    Values outside ``[lo, hi]`` and lists longer than ``max_count`` are refused before anything is expanded."""
    bounds = bounds or (f"values must lie in {lo}-{hi}" if lo is not None and hi is not None else
                        f"values must be >= {lo}" if lo is not None else f"values must be <= {hi}")
    spans: list[tuple[int, int]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-") and lo is not None and lo >= 0:
            raise UsageError(f"{option} {text!r}: negative numbers are not allowed; {bounds}")
        try:
            first, sep, last = part.partition("-")
            a = int(first)
            b = int(last) if sep else a
        except ValueError:
            raise UsageError(f"{option} {text!r}: expected integers and ranges like 0-63 or 1,2,5-9") from None
        if b < a:
            raise UsageError(f"{option} {text!r}: range {part} runs backwards; write it as {b}-{a}")
        if (lo is not None and a < lo) or (hi is not None and b > hi):
            raise UsageError(f"{option} {text!r}: out of range; {bounds}")
        spans.append((a, b))
    count = sum(b - a + 1 for a, b in spans)
    if count > max_count:
        raise UsageError(f"{option} {text!r}: {count:,} values, more than the {max_count:,} one run takes; "
                         "split the work into several runs")
    if not count and not allow_empty:
        raise UsageError(f"{option} is empty: give integers and ranges like 0-63")
    out: list[int] = []
    for a, b in spans:
        out.extend(range(a, b + 1))
    return out


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """Per-sample seeds: 0 <= seed < 2**63, at most :data:`MAX_LIST` of them."""
    return parse_int_list(text, option, lo=0, hi=SEED_MAX, bounds="seeds must satisfy 0 <= seed < 2**63")


def parse_names(text: str, option: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """``"fd, kid,FD"`` -> ``("fd", "kid")``: a comma-separated list of names from ``choices``, in order, once each."""
    names: list[str] = []
    for part in str(text).split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in choices:
            raise UsageError(f"{option}: unknown {part.strip()}; choose from {', '.join(choices)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError(f"{option} is empty: give one or more of {', '.join(choices)}")
    return tuple(names)


def parse_float_pair(text: str, option: str) -> tuple[float, float]:
    """``"0,4"`` -> ``(0.0, 4.0)``: two finite numbers, the first not above the second."""
    import math

    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected two numbers LO,HI, e.g. 0,4") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UsageError(f"{option} {text!r}: expected two finite numbers LO,HI with LO <= HI, e.g. 0,4")
    return lo, hi



class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


@functools.lru_cache(maxsize=1)
def _strict_loader():
    """``yaml.SafeLoader`` with a mapping constructor that refuses a key given twice (built once, on first use)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """safe_load's loader; a mapping that gives one key twice raises :class:`_DuplicateKey`."""

    def mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden by explicit keys
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the constructor below says so
                continue
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def load_yaml(text: str, source: str):
    """``yaml.safe_load`` that refuses a mapping with the same key twice (``steps: 10`` then ``steps: 20``) in one
    :class:`UsageError` naming ``source``, the key and both lines, instead of keeping the last. Syntax errors stay
    ``yaml.YAMLError`` for the caller to word."""
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise UsageError(f"{source}: line {e.line}: key {e.key!r} is given twice (first on line {e.first}); keep "
                         "one") from None
