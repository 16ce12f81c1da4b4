"""Parsing of command-line values (torch-free, so the CLI can import it at start-up)."""

from __future__ import annotations

from distill.errors import UsageError


def parse_int_list(text: str, option: str, allow_empty: bool = False) -> list[int]:
    """``"0-3,7,9-10"`` -> ``[0, 1, 2, 3, 7, 9, 10]``; ``option`` names the flag in the error message."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected integers and ranges like 0-63 or 1,2,5-9") from None
    if not out and not allow_empty:
        raise UsageError(f"{option} is empty: give integers and ranges like 0-63")
    return out
