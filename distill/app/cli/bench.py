"""``distill bench speed|quality|report|pick``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distill.app.cli.common import Finite, NonEmptyPath, OneLineGroup, build, command_line, threads_option
from distill.errors import GateFailure, UsageError


@click.group("bench", cls=OneLineGroup)
def bench():
    """Speed against quality over a grid of models x steps x backends x precisions x batch sizes.

    \b
    Example (the shipped grid of the MNIST teacher and students):
      distill bench speed --grid mnist-cpu --out runs/bench
      distill bench quality --grid mnist-cpu --out runs/bench
      distill bench report runs/bench
      distill bench pick runs/bench --max-ratio 1.5 --batch 64
    """


# the grid dimensions of benchmarks.bench.grid, spelled out so that --help does not import torch
BENCH_BACKEND_NAMES = ("eager", "compile", "onnxruntime", "onnxruntime-fused")
BENCH_PRECISION_NAMES = ("fp32", "bf16", "fp16", "int8")


def grid_options(command):
    """The grid of ``bench speed`` and ``bench quality``: a YAML file, or lists on the command line."""
    for option in reversed([
        click.option("--grid", default=None, metavar="FILE",
                     help="Grid YAML (models with their samplers/steps, backends, precisions, batches) or the name "
                          "of a shipped one under benchmarks/grids/ (mnist-cpu). Replaces the list options."),
        click.option("--models", default=None, metavar="M[,M...]",
                     help="Models: shipped names, model files or run folders."),
        click.option("--samplers", default=None, metavar="S[,S...]", help="Samplers [default: each model card's]."),
        click.option("--steps", default=None, metavar="N[,N...]", help="Step counts [default: each model card's]."),
        click.option("--guidance", default=None, metavar="W[,W...]",
                     help="Guidance weights [default: each model card's]."),
        click.option("--backends", default="eager", show_default=True, metavar="B[,B...]",
                     help=f"Of {', '.join(BENCH_BACKEND_NAMES)} (onnxruntime-fused: the whole k-step sampler as "
                          "one graph, k <= 8)."),
        click.option("--precisions", default="fp32", show_default=True, metavar="P[,P...]",
                     help=f"Of {', '.join(BENCH_PRECISION_NAMES)}; combinations a backend cannot run are left out "
                          "and listed."),
        click.option("--batches", default="1,64", show_default=True, metavar="N[,N...]", help="Batch sizes."),
        click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), default=Path("runs/bench"),
                     help="Benchmark folder: results (speed.jsonl, quality.jsonl), cached samples and exports. A "
                          "re-run skips what is already there."),
        click.option("--exports", type=NonEmptyPath(file_okay=False), default=None,
                     help="Folder of the ONNX exports the onnxruntime configurations run (made once, keyed by the "
                          "model's content hash) [default: OUT/exports]."),
        click.option("--use-exports", default=None, metavar="DIR[,DIR...]",
                     help="ONNX export folders (distill export onnx) to run for the onnxruntime configurations they "
                          "match (same model file, precision, graph kind), instead of exporting again."),
        click.option("--device", default="cpu", help="cpu or cuda[:N]."),
        click.option("--force", is_flag=True, help="Measure again what the folder already holds."),
    ]):
        command = option(command)
    return command


def grid_config(cls, grid, models, samplers, steps, guidance, **params):
    """The config of a bench command: the command line's lists apply to every model."""
    if grid:
        given = [n for n, v in (("--models", models), ("--samplers", samplers), ("--steps", steps),
                                ("--guidance", guidance)) if v]
        if given:
            raise UsageError(f"--grid {grid} with {', '.join(given)}: the grid file names the models; drop one")
        return build(cls, grid=grid, **params)
    if not models:
        raise UsageError("no grid: pass --grid FILE (e.g. --grid mnist-cpu) or --models M[,M...]")
    extra = {k: v for k, v in (("samplers", samplers), ("steps", steps), ("guidance", guidance)) if v}
    entries = [{"model": m.strip(), **extra} for m in models.split(",") if m.strip()]
    return build(cls, models=entries, **params)


@bench.command("speed")
@grid_options
@click.option("--repeats", type=click.IntRange(3, 100000), default=20,
              help="Timed calls per measurement (after warm-up), shared among the passes.")
@click.option("--max-seconds", type=Finite(0.1), default=20.0,
              help="Stop a measurement's repeats after this long (at least 3 calls), shared among the passes.")
@click.option("--rounds", type=click.IntRange(1, 100), default=3,
              help="Passes over the grid, minutes apart; a configuration's statistics pool the calls of all "
                   "passes, so a burst of load on a shared machine moves them little.")
@threads_option()
def bench_speed(out, grid, models, samplers, steps, guidance, **params):
    """Latency of every configuration: a whole sample (all steps) and one network evaluation, median / p10 / p90
    after warm-up, images/s, peak memory, and the machine. Each model x backend x precision runs in its own
    process, in --rounds passes over the grid whose timed calls are pooled; results append to OUT/speed.jsonl
    (passes to OUT/speed_rounds.jsonl) and a re-run skips what is finished.

    \b
    Example:
      distill bench speed --models mnist-4step --backends eager,compile,onnxruntime --precisions fp32,bf16,int8
    """
    from distill.app.cli.common import log_to
    from distill.app.stages.bench import SpeedConfig, run_bench_speed

    log_to(sys.stderr)  # progress on stderr, the results on stdout
    cfg = grid_config(SpeedConfig, grid, models, samplers, steps, guidance, **params)
    result = run_bench_speed(cfg, out)
    for config, rate in result.record["images_per_s"].items():
        click.echo(f"{config}: {rate:.4g} images/s")


@bench.command("quality")
@grid_options
@click.option("--samples", type=click.IntRange(2, 1_000_000), default=2500,
              help="Samples per configuration (seeds 0 ... N-1, the same for every configuration).")
@click.option("--data", default=None, help="Real data to compare against [default: the first model's training data].")
@click.option("--metrics", default="fd,kid,acc", help="Of fd, kid, is, acc, fid, kid_inception.")
@click.option("--batch-size", type=click.IntRange(1), default=250, help="Sampling batch size (results do not "
              "depend on it).")
def bench_quality(out, grid, models, samplers, steps, guidance, **params):
    """Quality of every configuration (FD / KID / class accuracy; FID with --metrics), from the same per-sample
    seeds everywhere. Configurations with the same numerics share one measurement; samples are cached in OUT,
    so a re-run costs nothing. Shard over processes or GPUs with accelerate:
    accelerate launch --multi_gpu --num_processes N -m distill.cli bench quality ...

    \b
    Example:
      distill bench quality --models mnist-4step --backends onnxruntime --precisions fp32,int8 --samples 1000
    """
    from distill.app.cli.common import log_to
    from distill.app.stages.bench import QualityConfig, run_bench_quality

    log_to(sys.stderr)  # progress on stderr, the results on stdout
    cfg = grid_config(QualityConfig, grid, models, samplers, steps, guidance, **params)
    result = run_bench_quality(cfg, out)
    for qid, values in result.record["quality"].items():
        click.echo(f"{qid}: " + " ".join(f"{m}={v:.4g}" for m, v in values.items() if v is not None))


@bench.command("report")
@click.argument("results", type=NonEmptyPath(exists=True, file_okay=False), default="runs/bench", required=False)
@click.option("--dest", type=NonEmptyPath(file_okay=False), default=None,
              help="Folder for the report files [default: RESULTS].")
@click.option("--name", default="report", help="Report file name stem: NAME.csv, .parquet, .md, .json, .png, .html.")
@click.option("--compare", type=NonEmptyPath(exists=True, file_okay=False), default=None,
              help="A second run of the same speed grid: the report states how far the medians moved.")
@click.option("--batch", type=click.IntRange(1), default=64, help="Batch size of the headline ratio.")
@click.option("--bound", type=Finite(1.0), default=1.5,
              help="Headline quality bound: FD <= BOUND x the teacher's best.")
@click.option("--command", "command_text", default=None, help="The reproduce command written into the report "
              "[default: this command].")
def bench_report(command_text, **params):
    """Tables (CSV, Parquet, Markdown) and the Pareto plot (PNG, interactive HTML) of a benchmark folder.

    \b
    Example:
      distill bench report runs/bench --dest benchmarks/results --name bench_cpu
    """
    from distill.app.stages.bench import ReportConfig, run_bench_report

    result = run_bench_report(build(ReportConfig, **params), command=command_text or command_line())
    for f in result.outputs.values():
        click.echo(f)
    head = result.record["headline"]
    if "student" in head:
        s = head["student"]
        click.echo(f"best student within {head['bound']}x the teacher's best FD at batch {head['batch']}: "
                   f"{s['config']} {s['images_per_s']:.4g} images/s = {s['speedup']:.1f}x the teacher's best "
                   "setting in eager fp32")


@bench.command("pick")
@click.argument("results", type=NonEmptyPath(exists=True, path_type=Path), default=Path("runs/bench"), required=False)
@click.option("--batch", type=click.IntRange(1), default=64, help="Batch size the pick is for.")
@click.option("--max-fd", type=Finite(0), default=None, help="Largest acceptable FD.")
@click.option("--max-fid", type=Finite(0), default=None, help="Largest acceptable FID (needs quality with fid).")
@click.option("--max-ratio", type=Finite(0), default=None, help="Largest acceptable FD / the teacher's best FD.")
@click.option("--students-only", is_flag=True, help="Pick among students only (not the teacher at fewer steps).")
@click.option("--json", "as_json", is_flag=True, help="Print the pick as JSON.")
def bench_pick(results, as_json, **params):
    """The fastest configuration (images/s at --batch) that meets the quality bound, with its numbers and the
    commands that reproduce it. Exit code 3 when nothing meets it (a CI gate, the same code as a recipe's
    'pick' gate). Says so when the table was measured on another machine than this one.

    \b
    Example:
      distill bench pick runs/bench --max-ratio 1.5 --batch 64
    """
    import json

    from benchmarks.bench.report import load_table
    from distill.app.gates import PickGate, check_gate, machine_note, table_machine

    gate = build(PickGate, **params)
    note = machine_note(table_machine(results))
    if note:
        click.echo(f"warning: {note}", err=True)
    result = check_gate(gate, table=load_table(results))
    if not result.passed:
        raise GateFailure(f"nothing in {results} meets {result.bound}")
    picked = result.pick
    if as_json:
        click.echo(json.dumps(picked, indent=2))
        return
    click.echo(f"pick ({result.bound}): {picked['config']}")
    click.echo(f"  {picked['images_per_s']:.4g} images/s, {picked['sample_ms']:.4g} ms per batch, FD "
               f"{picked['fd']:.4g}" + (f" ({picked['fd_ratio']:.2f}x the teacher's best)"
                                        if picked["fd_ratio"] is not None else ""))
    click.echo(f"  speed:   {picked['speed_command']}")
    if picked["quality_command"]:
        click.echo(f"  quality: {picked['quality_command']}")
