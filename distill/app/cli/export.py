"""``distill export onnx|tensorrt|diffusers``."""

from __future__ import annotations

from pathlib import Path

import click

from distill.app.cli.common import (
    SAMPLER_NAMES,
    Finite,
    NonEmptyPath,
    OneLineGroup,
    build,
    command_line,
    non_empty,
    threads_option,
)


@click.group("export", cls=OneLineGroup)
def export_():
    """Ship a model: ONNX (FP32, FP16, INT8 Q/DQ; per step or a fused few-step sampler), TensorRT engines and
    diffusers pipeline directories.

    \b
    Example:
      distill export onnx mnist-4step --out exports/mnist-4step
      distill export onnx mnist-4step --out exports/mnist-4step-int8 --precision int8
      distill export onnx mnist-4step --out exports/mnist-4step-fused --fused
      distill export tensorrt exports/mnist-4step --out engines/mnist-4step
      distill export diffusers mnist-4step --out exports/mnist-4step-diffusers
    """


@export_.command("onnx")
@click.argument("model", metavar="MODEL", callback=non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="The artifact folder (model.onnx + manifest.json); an earlier export there is replaced whole.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              help="fp16: explicit casts, norms/softmax/conditioning path kept fp32; int8: Q/DQ, calibrated.")
@click.option("--fused", is_flag=True, help="One graph for the whole few-step sampler (noise -> image, k <= 8).")
@click.option("--guided/--unguided", default=None,
              help="Add the guidance weight input w [default: when the model takes w or its card guides].")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None, help="--fused: the sampler [card's].")
@click.option("--steps", type=click.IntRange(1, 8), default=None, metavar="K", help="--fused: steps [card's].")
# INT8
@click.option("--int8-target", type=click.Choice(["cpu", "tensorrt"]), default="cpu",
              help="cpu: U8S8 Q/DQ for ONNX Runtime on x86; tensorrt: symmetric S8 Q/DQ TensorRT builds.")
@click.option("--calibration", type=click.Choice(["trajectory", "random"]), default="trajectory",
              help="trajectory: inputs captured along the model's own sampling (every step, classes, w); random: "
                   "standard normal x_t and uniform t (the naive baseline).")
@click.option("--calib-method", type=click.Choice(["auto", "minmax", "moving-average", "entropy", "percentile",
                                                   "step-percentile"]),
              default="auto", help="How activation ranges are set. auto: moving-average (ranges averaged over "
                                   "calibration batches) for --fused, minmax otherwise, each measured best; "
                                   "step-percentile: per-step amax, then a percentile over steps (Model Optimizer's "
                                   "diffusion calibrator).")
@click.option("--calib-samples", type=click.IntRange(1, 100000), default=None, metavar="N",
              help="Calibration trajectories (random calibration: as many inputs as they would give) [default: 256 "
                   "for --fused, 64 otherwise].")
@click.option("--percentile", type=Finite(0, 100, min_open=True), default=99.999, help="For --calib-method "
              "percentile: the percentile of |activation|.")
@click.option("--step-percentile", type=Finite(0, 100), default=50.0,
              help="For --calib-method step-percentile: the percentile over the per-step amax values.")
@click.option("--exclude", default=None, metavar="LIST", show_default="time_mlp.,guidance_mlp.,.emb.,conv_in.,"
              "conv_out.,.skip.", help="Layers kept in float: substrings (or globs) of weight or node names; "
                                      "'none' quantizes every Conv/Gemm/MatMul.")
@click.option("--float-steps", default=None, metavar="LIST",
              help="--fused INT8: unrolled steps (1 = first) kept entirely in float, e.g. 4 for the last of four.")
@threads_option()
def export_onnx_(model, out, **params):
    """Export MODEL's denoiser, (x_t, t[, labels][, w]) -> x0, or with --fused its whole sampler, as ONNX with a
    dynamic batch axis, checked against torch at batch 1, 7 and 64 before anything is written.

    \b
    Example:
      distill export onnx mnist-4step --out exports/mnist-4step-int8 --precision int8 --calib-samples 64
      distill sample exports/mnist-4step-int8 --seeds 0-63
    """
    from distill.app.stages.export import ExportConfig, run_export

    cfg = build(ExportConfig, model=model, **params)
    result = run_export(cfg, out, command=command_line())
    r = result.record
    p = r["parity"]
    click.echo(f"wrote {out} ({r['precision']} {r['kind']} graph); max relative error against "
               f"{p['against']}: {p['max_rel_err']:.2e}" + (f" (bound {p['tolerance']:g})" if p["tolerance"] else ""))


@export_.command("tensorrt")
@click.argument("source", metavar="EXPORT", callback=non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="The engine folder (model.engine + manifest.json + timing.cache).")
@click.option("--min-batch", type=click.IntRange(1), default=1, metavar="B")
@click.option("--opt-batch", type=click.IntRange(1), default=None, metavar="B",
              help="The batch TensorRT tunes for [default: 64, within the min/max range].")
@click.option("--max-batch", type=click.IntRange(1), default=256, metavar="B")
@click.option("--workspace", type=click.IntRange(1), default=4 << 30, metavar="BYTES")
@click.option("--timing-cache", type=NonEmptyPath(dir_okay=False), default=None, metavar="FILE",
              help="A persistent timing cache shared across builds [default: DIR/timing.cache].")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="Let the graph's FP32 layers run in TF32 (TensorRT's default; recorded in the manifest). "
                   "--no-tf32 keeps FP32 engines close to fp32.")
@click.option("--dry-run", is_flag=True, help="Check the export and print the equivalent trtexec command; build "
                                              "nothing (works without TensorRT).")
def export_tensorrt_(source, out, **params):
    """Build a strongly typed TensorRT engine from an ONNX export folder (its precision comes from the graph),
    with an optimization profile over the batch range. Needs TensorRT and an NVIDIA GPU.

    \b
    Example:
      distill export onnx mnist-4step --out exports/m4-int8-trt --precision int8 --int8-target tensorrt
      distill export tensorrt exports/m4-int8-trt --out engines/m4-int8 --max-batch 256
    """
    from distill.app.stages.export import TensorRTConfig, run_tensorrt

    cfg = build(TensorRTConfig, source=source, **params)
    result = run_tensorrt(cfg, out, command=command_line())
    r = result.record
    if not r["built"]:
        click.echo(r["trtexec"])
        return
    click.echo(f"wrote {out} (TensorRT {r['version']}, {r['gpu']}, compute capability {r['compute_capability']})")


@export_.command("diffusers")
@click.argument("model", metavar="MODEL", callback=non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="The pipeline directory (model_index.json, unet/, scheduler/, distill_export.json); an earlier "
                   "export there is replaced whole.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="Steps of the exported grid [card's: a student's own]; a consistency student's other searched "
                   "step counts are recorded too.")
@threads_option()
def export_diffusers_(model, out, **params):
    """Export MODEL as a diffusers pipeline directory: DDIMPipeline on the student's own grid for progressive and
    guidance students (and teachers), ConsistencyModelPipeline for consistency students. The pipeline is run
    against distill's sampler on the same per-sample generators before anything is written (bound 1e-4).

    \b
    A plain diffusers UNet2DModel on diffusers' own trailing grid loads with stock diffusers; any other student
    is a DistilledUNet: import export.diffusers_pipeline before DiffusionPipeline.from_pretrained(DIR).

    \b
    Example:
      distill export diffusers runs/pd/steps-2 --out exports/pd-diffusers
      python -c "import export.diffusers_pipeline, diffusers; p = diffusers.DiffusionPipeline.from_pretrained(
        'exports/pd-diffusers'); p(batch_size=4, num_inference_steps=2)"
    """
    from distill.app.stages.export import DiffusersExportConfig, run_diffusers_export

    cfg = build(DiffusersExportConfig, model=model, **params)
    r = run_diffusers_export(cfg, out, command=command_line()).record
    call = ", ".join(f"{k}={v}" for k, v in r["call"].items() if v is not None)
    click.echo(f"wrote {out} ({r['pipeline']} with a {r['unet']} and a {r['scheduler']}; call it with {call}); max "
               f"relative error against distill's sampler: {r['parity']['max_rel_err']:.2e} (bound "
               f"{r['parity']['tolerance']:g})")
