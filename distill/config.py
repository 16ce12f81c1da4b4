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


def read_section(path: Path, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a YAML file, with a one-line error for every way it can be wrong."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass an existing YAML file to --config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(section), dict):
        raise UsageError(f"{path}: needs a '{section}:' mapping of options for this command")
    return doc[section]


def config_option(section: str):
    """A ``--config FILE`` option whose ``section`` becomes the command's option defaults (flags still win)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        values = read_section(Path(value), section)
        names = {}  # flag spelling (underscores) -> parameter name
        for p in ctx.command.params:
            if isinstance(p, click.Option) and p.name != "config":
                for flag in p.opts:
                    names[flag.lstrip("-").replace("-", "_")] = p.name
        defaults = {}
        for key, v in values.items():
            name = names.get(str(key).replace("-", "_"))
            if name is None:
                known = ", ".join(sorted(n.replace("_", "-") for n in names))
                raise UsageError(f"{value}: unknown key '{key}' in '{section}:'; known keys: {known}")
            defaults[name] = ",".join(map(str, v)) if isinstance(v, list) else v
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option("--config", type=click.Path(dir_okay=False), default=None, metavar="FILE", is_eager=True,
                        expose_value=False, callback=callback,
                        help=f"YAML file whose '{section}:' mapping sets this command's options (flags override).")
