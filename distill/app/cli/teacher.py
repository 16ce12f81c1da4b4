"""``distill teacher train|publish``."""

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
    precision_options,
    threads_option,
    training_precision,
)
from distill.config import config_option


@click.group(cls=OneLineGroup)
def teacher():
    """Train and inspect diffusion teachers."""


@teacher.command("train")
@config_option("teacher")
# main
@click.option("--data", required=True, metavar="SPEC", help="digits | mnist | folder:PATH | npz:PATH")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory (model.safetensors, train_state.safetensors, metrics.jsonl).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--image-size", type=click.IntRange(4, 1024), default=None, metavar="PX",
              help="Resize folder images to PX x PX.")
@click.option("--unconditional", is_flag=True, help="Ignore class labels (no CFG).")
# diffusion
@click.option("--schedule", type=click.Choice(["cosine", "linear", "scaled_linear", "squaredcos_cap_v2"]),
              default="cosine", help="Noise schedule (the last three are DDPM tables with T = 1000).")
@click.option("--prediction", type=click.Choice(["v", "eps", "x0"]), default="v", help="What the network predicts.")
# architecture
@click.option("--channels", type=click.IntRange(4, 1024), default=32, metavar="C", help="UNet base width.")
@click.option("--channel-mult", default=None, metavar="LIST",
              help="Width multipliers per level, e.g. 1,2,2 [default: 1,2 for <= 16 px, else 1,2,2].")
@click.option("--num-res-blocks", type=click.IntRange(1, 8), default=2, metavar="N")
@click.option("--attn", default=None, metavar="LIST",
              help="Resolutions with self-attention, e.g. 8 [default: the lowest resolution].")
@click.option("--dropout", type=Finite(0, 0.9), default=0.1)
# hyperparameters
@click.option("--steps", type=click.IntRange(1, 10**9), default=4000, metavar="N", help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=128, metavar="B")
@click.option("--lr", type=Finite(min=0, min_open=True), default=2e-4)
@click.option("--warmup", type=click.IntRange(0, 10**9), default=200, metavar="N")
@click.option("--lr-decay", type=click.Choice(["constant", "linear", "cosine"]), default="constant")
@click.option("--grad-clip", type=Finite(0), default=1.0)
@click.option("--ema-decay", type=Finite(0, 1, max_open=True), default=0.999)
@click.option("--label-dropout", type=Finite(0, 1), default=0.1,
              help="Probability of training on the null class (classifier-free guidance).")
# performance and I/O
@precision_options
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=500, metavar="N")
@threads_option()
def teacher_train(out, resume, precision, bf16, **params):
    """Train a diffusion teacher (a native UNet) on an image dataset.

    \b
    Example:
      distill teacher train --data digits --out runs/digits --steps 4000
      distill teacher train --data mnist --out runs/mnist --resume
      distill teacher train --config recipes/mnist-teacher.yaml
    """
    from distill.app.stages.train import TeacherConfig, run_teacher
    from distill.errors import UsageError
    from distill.preflight import check_output_dir
    from distill.training import STATE_FILE

    check_output_dir(out, "--out")
    cfg = build(TeacherConfig, precision=training_precision(precision, bf16), **params)
    if (out / STATE_FILE).exists() and not resume:
        raise UsageError(f"{out}: already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not (out / STATE_FILE).exists():
        raise UsageError(f"{out / STATE_FILE}: nothing to resume; drop --resume to start a new run")
    result = run_teacher(cfg, out, command=command_line())
    click.echo(f"wrote {result.outputs['model']}")


@teacher.command("publish")
@click.argument("run", metavar="RUN", callback=non_empty)
@click.argument("dest", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="DEST")
@click.option("--guidance", type=Finite(), default=0.0, metavar="W", help="The default guidance weight to record.")
@click.option("--data", "data_spec", default=None, metavar="SPEC", help="Training data, if the run lacks it.")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None,
              help="The default sampler to record [default: the card's own]; a distilled student's must walk its "
                   "grid (ddim, ddpm or stochastic).")
def teacher_publish(run, dest, guidance, data_spec, sampler):
    """Copy a run's model file to DEST with its default guidance, sampler and data recorded (for shipping a model).

    \b
    Example (the shipped MNIST teacher):
      distill teacher publish runs/mnist-teacher distill/weights/mnist.safetensors --guidance 0 --data mnist
      distill teacher publish runs/mnist-students/steps-4 distill/weights/mnist-4step.safetensors --sampler stochastic
    """
    from distill.preflight import check_output_file
    from distill.teacher import publish

    check_output_file(dest, "DEST")
    click.echo(f"wrote {publish(run, dest, guidance=guidance, data_spec=data_spec, sampler=sampler)}")
