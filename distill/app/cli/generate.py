"""``distill sample``, ``distill eval`` and ``distill inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from distill.app.cli.common import NonEmptyPath, backend_options, build, non_empty, sampling_options


def _precision(precision: str, bf16: bool) -> str:
    """``--bf16`` is the short spelling of ``--precision bf16``."""
    return "bf16" if bf16 and precision == "fp32" else precision


@click.command("sample")
@click.argument("model", metavar="CHECKPOINT", callback=non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Output folder [default: CHECKPOINT's folder / samples, or ./samples for a shipped model].")
@sampling_options
@click.option("--classes", default=None, metavar="LIST",
              help="Class labels, cycled over the seeds, e.g. 0-9 [default: all classes of a conditional model].")
@click.option("--seeds", default="0-63", metavar="LIST",
              help="Per-sample seeds, e.g. 0-63 or 1,5,9 (0 <= seed < 2**63, at most 1,000,000 of them).")
@click.option("--batch-size", type=click.IntRange(1), default=256, metavar="B")
@click.option("--device", default="cpu", help="torch device (cpu, cuda, cuda:1).")
@click.option("--bf16/--no-bf16", default=False, help="Run the network under bf16 autocast (= --precision bf16).")
@backend_options
def sample(model, out, bf16, precision, **params):
    """Generate images from a model checkpoint or an export folder: a PNG grid and an .npz of the samples.

    \b
    Examples:
      distill sample runs/digits --sampler heun --steps 10 --guidance 1 --classes 0-9 --seeds 0-99
      distill sample mnist-4step --backend compile --precision bf16
      distill sample exports/mnist-4step-int8 --seeds 0-63
    """
    from distill.app.stages.generate import SampleConfig, run_sample
    from distill.preflight import check_output_dir

    cfg = build(SampleConfig, model=model, precision=_precision(precision, bf16), **params)
    path = Path(model)
    out = out or ((path if path.is_dir() else path.parent) if path.exists() else Path(".")) / "samples"
    check_output_dir(out, "--out")
    result = run_sample(cfg, out)
    click.echo(f"wrote {result.outputs['grid']} and {result.outputs['samples']}")


@click.command("eval")
@click.argument("source", metavar="SOURCE", callback=non_empty)
@click.option("--data", default=None, metavar="SPEC",
              help="Real data to compare against [default: the model's training data].")
@click.option("--ref", type=click.Choice(["A", "B", "all"]), default="A",
              help="Which fixed half of the real data is the reference (B vs A is the real-vs-real floor).")
@click.option("--metrics", default=None, metavar="LIST", show_default="fd,kid,is,acc,fid",
              help="Any of fd, kid, is, acc (domain classifier) and fid, kid_inception (InceptionV3). acc is "
                   "skipped for unlabelled images unless asked for.")
@sampling_options
@click.option("--classes", default=None, metavar="LIST", help="Class labels cycled over the seeds [default: all].")
@click.option("--seeds", default="0-2499", metavar="LIST",
              help="Per-sample seeds (one sample each; 0 <= seed < 2**63, at most 1,000,000).")
@click.option("--batch-size", type=click.IntRange(1), default=250, metavar="B")
@click.option("--bf16/--no-bf16", default=False, help="Sample with the network under bf16 autocast.")
@click.option("--inception-backend", type=click.Choice(["onnxruntime", "torch", "torch-bf16"]),
              default="onnxruntime", help="How the FID network runs: onnxruntime (fp32 on the CPU, exact), torch "
              "(fp32, any device) or torch-bf16 (bf16 weights, any device; FID within ~0.3 % of fp32; on a 2-core "
              "AVX512-BF16 CPU about as fast as onnxruntime). References are cached per backend and precision.")
@click.option("--device", default="cpu", help="torch device (cpu, cuda, cuda:1).")
@backend_options
@click.option("--out", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write the full result (metrics, settings, extractors, sample counts) as JSON.")
def eval_(source, bf16, precision, out, **params):
    """Measure sample quality: FD/KID/IS/class accuracy (domain classifier) and FID (InceptionV3).

    SOURCE is a model (a .safetensors file, a run directory or a shipped name such as mnist) or an export folder
    (distill export), which is sampled once per seed, or images: a .npz (e.g. from distill sample), npz:PATH,
    folder:PATH, or real:B (the other fixed half of the real data: real:B against --ref A is the real-vs-real
    floor).

    \b
    Examples:
      distill eval mnist --sampler heun --steps 10
      distill eval runs/mnist/samples/samples.npz --data mnist
      distill eval real:B --data mnist --metrics fd,fid
    """
    from benchmarks.evaluate import summary_line
    from distill.app.stages.generate import EvalConfig, run_eval
    from distill.preflight import check_output_file

    cfg = build(EvalConfig, source=source, precision=_precision(precision, bf16), **params)
    if out:
        check_output_file(out, "--out")
    result = run_eval(cfg, out)
    click.echo(summary_line(result.record))
    if out:
        click.echo(f"wrote {out}")


@click.command("inspect")
@click.argument("path", metavar="FILE", callback=non_empty)
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_(path, as_json):
    """Describe an artifact without running it: a model (card, network, schedule), an ONNX export (inputs,
    precision, calibration, parity) or a TensorRT engine (version, GPU, profile).

    \b
    Example:
      distill inspect mnist-4step
      distill inspect exports/mnist-4step-int8
    """
    import json

    from export.inspect import describe, format_description

    d = describe(path)
    click.echo(json.dumps(d, indent=2, default=str) if as_json else format_description(d))


@click.command("card")
@click.argument("models", metavar="MODEL...", nargs=-1, required=True)
@click.option("--bench", type=NonEmptyPath(exists=True), default=None, metavar="TABLE",
              help="A benchmark folder or report CSV/Parquet whose rows of each model go into its card (quality and "
                   "latency per backend and precision, with the machine they were measured on).")
@click.option("--dest", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Folder for the cards: DIR/MODEL.md (the name's last part, without .safetensors).")
@click.option("--notes-dir", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Hand-written notes appended to each card, from DIR/MODEL.md when it exists.")
def card(models, bench, dest, notes_dir):
    """Generate model cards (MODEL_CARD-style Markdown) for model files outside a recipe run, e.g. the shipped
    models, from their metadata and a benchmark table. A recipe run writes its own (distill run).

    \b
    Example (the shipped models' cards):
      distill card mnist mnist-4step mnist-4step-guided mnist-1step mnist-cd --bench
        benchmarks/results/bench_cpu.csv --dest distill/weights --notes-dir distill/weights/notes
    """
    from distill.app.cards import shipped_card
    from distill.app.gates import table_machine
    from distill.checkpoint import atomic_write
    from distill.preflight import check_output_dir

    table = machine = None
    if bench:
        from benchmarks.bench.report import load_table

        table, machine = load_table(Path(bench)), table_machine(Path(bench))
    again = "distill card " + " ".join(models) + (f" --bench {bench}" if bench else "") + f" --dest {dest}" + \
        (f" --notes-dir {notes_dir}" if notes_dir else "")
    cards = {}  # every card made before anything is written: a bad model leaves --dest as it was
    for model in models:
        name = Path(model).name.removesuffix(".safetensors")
        note_file = notes_dir / f"{name}.md" if notes_dir else None
        notes = note_file.read_text() if note_file and note_file.is_file() else None
        cards[name] = shipped_card(model, table=table, machine=machine, notes=notes, regenerate=f"`{again}`")
    check_output_dir(dest, "--dest")
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in cards.items():
        atomic_write(dest / f"{name}.md", lambda tmp, t=text: Path(tmp).write_text(t))
        click.echo(f"wrote {dest / f'{name}.md'}")
