"""``distill run RECIPE``: a recipe's stages into one run folder, with one cache, a manifest, cards and gates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from distill.app.cli.common import NonEmptyPath


@click.command("run")
@click.argument("recipe", metavar="RECIPE")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Run folder [default: runs/NAME, NAME the recipe's name].")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe value, e.g. --set stages.cd.steps=200 (list entries by name; repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and the plan (each stage's equivalent "
                                              "command, and whether it is cached); run and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON (stages, outputs, metrics, "
                                                      "gates) on stdout; progress goes to stderr.")
@click.option("--progress/--no-progress", default=True, help="Progress bars of the training stages.")
def run(recipe, out, overrides, dry_run, as_json, progress):
    """Run RECIPE: teacher -> students -> exports -> benchmark -> report, model cards and gates, into one folder.

    Every stage is validated before any runs. A finished run run again is a no-op; a changed stage reruns with
    everything downstream of it; a killed run resumes inside the stage where it stopped. Exit code 3 when a gate
    fails (one line per failed gate), 2 for a malformed recipe.

    \b
    Example:
      distill run recipes/quickstart.yaml
      distill run recipes/digits-ci.yaml --set stages.cd.steps=200 --dry-run
    """
    from distill.app.cli.common import log_to
    from distill.app.recipe import load_recipe

    log_to(sys.stderr)
    r = load_recipe(Path(recipe), tuple(overrides), out=out)
    out = Path(out) if out is not None else Path("runs") / r.name
    if dry_run:
        from distill.app.runner import plan, resolved_yaml

        rows = plan(r, out)
        if as_json:
            click.echo(json.dumps({"recipe": r.raw, "out": str(out), "plan": rows}, indent=2))
            return
        click.echo(f"# resolved recipe ({r.source}{', ' + ', '.join(overrides) if overrides else ''})")
        click.echo(resolved_yaml(r).rstrip())
        click.echo(f"# plan: {len(rows)} stages into {out}")
        for i, row in enumerate(rows, 1):
            click.echo(f"[{i}/{len(rows)}] {row['name']} ({row['kind']}, {row['status']})")
            for c in row["commands"]:
                click.echo(f"    {c}")
        return
    from distill.app.runner import run_recipe

    summary = run_recipe(r, out, progress=progress and not as_json)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2, default=str))
    else:
        ran = sum(s["status"] == "ran" for s in summary.stages.values())
        click.echo(f"{out}: {len(summary.stages)} stages ({ran} ran, {len(summary.stages) - ran} cached); "
                   f"manifest {out / 'manifest.json'}; {len(summary.cards)} model cards")
        for g in summary.gates:
            if g.passed:
                click.echo(g.line())
    failed = [g for g in summary.gates if not g.passed]
    for g in failed:
        click.echo(g.line(), err=True)
    if failed:
        sys.exit(3)
