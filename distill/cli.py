"""The ``distill`` command line. Heavy imports (torch and friends) happen inside commands, so ``--help`` is instant.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 3 failed CI gate.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from distill import __version__
from distill.config import config_option
from distill.errors import DistillError, GateFailure, UsageError
from distill.parsing import parse_int_list, parse_names, parse_seeds

# -- one-line usage errors and strict types -------------------------------------------------------------------


class OneLineUsageError(click.UsageError):
    """click's usage errors, printed as one ``error:`` line with the help hint at its end (exit code 2)."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def _one_line(e: click.UsageError) -> OneLineUsageError:
    hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return OneLineUsageError(f"{e.format_message()}{hint}")


@contextmanager
def _usage_errors_on_one_line() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, OneLineUsageError):
        raise
    except click.UsageError as e:
        raise _one_line(e) from None


class OneLineGroup(click.Group):
    """A group whose usage errors (bad option values, missing options, unknown commands) are one line each,
    raised before the command does any work. ``distill`` alone still prints the help."""

    def make_context(self, *args, **kwargs):
        with _usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors_on_one_line():
            return super().invoke(ctx)

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", OneLineGroup)
        return super().group(*args, **kwargs)


class Finite(click.FloatRange):
    """A float option that refuses nan and inf (click's float type takes them, and nan passes any range)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class NonEmptyPath(click.Path):
    """A path option that refuses an empty string (``--out ""`` would otherwise mean the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, (str, os.PathLike)) and not str(value).strip():
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def _non_empty(ctx, param, value):
    if value is not None and not str(value).strip():
        raise click.BadParameter("is empty; give a path or a name", ctx, param)
    return value


def _max_threads() -> int:
    return 4 * (os.cpu_count() or 1)


def _threads(ctx, param, value):
    if value is not None and value > _max_threads():
        raise click.BadParameter(f"{value} is more than 4 threads per CPU core ({_max_threads()} on this machine)",
                                 ctx, param)
    return value


def _explicit(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was set by the user (command line, environment or config file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (click.core.ParameterSource.DEFAULT,)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="distill")
def cli():
    """distill: diffusion teachers in, fast students out.

    \b
    Quick start (a digits teacher in a few minutes on a CPU):
      distill teacher train --data digits --out runs/digits
      distill sample runs/digits --sampler dpmpp_2m --steps 20 --classes 0-9 --seeds 0-99
    """


# distill.samplers.SAMPLERS' names, spelled out so that --help does not import torch (a test keeps them equal).
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "stochastic", "consistency")


def sampling_options(command):
    """The sampler settings shared by ``sample`` and ``eval``."""
    for option in reversed([
        click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None,
                     help="Sampler [default: the model card's (a student's own), else dpmpp_2m]. stochastic: Meng "
                          "et al.'s N-step stochastic sampler for distilled students (a student's own grid)."),
        click.option("--steps", type=click.IntRange(1, 10000), default=None, metavar="N",
                     help="Sampler steps [default: the model card's (a student's own), else 20]."),
        click.option("--spacing", type=click.Choice(["uniform", "karras", "logsnr"]), default=None,
                     help="Timestep spacing [default: the sampler's usual one]."),
        click.option("--eta", type=Finite(0, 1), default=None, help="DDIM eta (0 = deterministic; ddim only)."),
        click.option("--guidance", type=Finite(), default=None, metavar="W",
                     help="Classifier-free guidance weight w: (1 + w) eps(c) - w eps(null) [default: the model "
                          "card's, else 0]."),
    ]):
        command = option(command)
    return command


# export.backends.BACKENDS, spelled out so that --help does not import torch (a test keeps them equal).
BACKEND_NAMES = ("eager", "compile", "onnxruntime", "onnxruntime-trt", "tensorrt")


def backend_options(command):
    """Where the network runs, shared by ``sample`` and ``eval``."""
    for option in reversed([
        click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
                     help="eager (torch), compile (torch.compile: inductor with freezing on a CPU, CUDA graphs on a "
                          "GPU), onnxruntime (CPU/CUDA EP by --device; a model is exported on the fly), "
                          "onnxruntime-trt (TensorRT EP), tensorrt (an engine folder) [default: eager for a model, "
                          "the export's own runtime for an export folder]."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     help="Autocast precision of the eager and compile backends (an export's precision is fixed "
                          "at export)."),
    ]):
        command = option(command)
    return command


@cli.group()
def teacher():
    """Train and inspect diffusion teachers."""


@teacher.command("train")
@config_option("teacher")
# main
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="digits | mnist | folder:PATH | npz:PATH")
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
@click.option("--attn", "attn_res", default=None, metavar="LIST",
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
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast (fast on CPUs with AMX).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=500, metavar="N")
@click.option("--threads", type=click.IntRange(1), default=None, callback=_threads,
              help="torch CPU threads (at most 4 per core).")
def teacher_train(data_spec, out, resume, image_size, unconditional, schedule, prediction, channels,
                  channel_mult, num_res_blocks, attn_res, dropout, steps, batch_size, lr, warmup, lr_decay,
                  grad_clip, ema_decay, label_dropout, bf16, seed, ckpt_every, threads):
    """Train a diffusion teacher (a native UNet) on an image dataset.

    \b
    Example:
      distill teacher train --data digits --out runs/digits --steps 4000
      distill teacher train --data mnist --out runs/mnist --bf16 --resume
      distill teacher train --config recipes/mnist-teacher.yaml
    """
    from distill.preflight import check_output_dir

    check_output_dir(out, "--out")
    if channel_mult:
        widest = channels * max(parse_int_list(channel_mult, "--channel-mult", allow_empty=True, lo=1) or [1])
        if widest > 8192:
            raise UsageError(f"--channel-mult {channel_mult}: the widest level would have {widest} channels "
                             f"(--channels {channels} x multiplier); keep it at most 8192")
    from distill.teacher import build_teacher, train_teacher

    if threads:
        import torch

        torch.set_num_threads(threads)
    run = build_teacher(
        data_spec=data_spec, image_size=image_size, unconditional=unconditional, schedule=schedule,
        prediction=prediction, channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        attn_res=attn_res, dropout=dropout, label_dropout=label_dropout,
        train=dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, lr_decay=lr_decay,
                   grad_clip=grad_clip, ema_decay=ema_decay, bf16=bf16, seed=seed, ckpt_every=ckpt_every),
    )
    train_teacher(run, out, resume=resume, command=" ".join(["distill", *sys.argv[1:]]))
    click.echo(f"wrote {out / 'model.safetensors'}")


@teacher.command("publish")
@click.argument("run", metavar="RUN", callback=_non_empty)
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


@cli.command("progressive")
@config_option("progressive")
@click.argument("teacher", metavar="TEACHER", required=False, callback=_non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory: one sub-folder per stage (guidance/, steps-32/, ... steps-1/).")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Training images [default: the teacher's training data].")
@click.option("--start-steps", type=click.IntRange(2, 1 << 20), default=64, metavar="N",
              help="The teacher's DDIM step count where it has converged; round 1 distills it into N/2 steps.")
@click.option("--target-steps", type=click.IntRange(1, 1 << 19), default=1, metavar="N",
              help="Halve until the student samples in N steps.")
@click.option("--round-steps", default="1000", metavar="LIST",
              help="Optimizer steps per round, in round order (the last value repeats), e.g. 200,400,800.")
@click.option("--guidance-range", default=None, metavar="LO,HI",
              help="Guidance distillation first: a student taking w as an input, for every w in [LO, HI].")
@click.option("--guidance-steps", type=click.IntRange(1, 10**9), default=1000, metavar="N",
              help="Optimizer steps of the guidance stage.")
@click.option("--guidance-lr-scale", type=Finite(min=0, min_open=True), default=30.0, metavar="X",
              help="The guidance stage's learning rate for the new (zero-initialised) w embedding, as a multiple of "
                   "--lr.")
@click.option("--guidance", type=Finite(), default=None, metavar="W",
              help="Without --guidance-range: the fixed guidance weight distilled into the student [default: the "
                   "teacher card's].")
@click.option("--prediction", type=click.Choice(["v", "x0"]), default=None,
              help="What the student predicts [default: the teacher's; v for an eps teacher].")
@click.option("--label-dropout", type=Finite(0, 1), default=0.0,
              help="Probability of distilling an example with the null class.")
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-4, help="Adam learning rate, decayed "
              "linearly to 0 within each round.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=128, metavar="B")
@click.option("--warmup", type=click.IntRange(0, 10**9), default=0, metavar="N", help="Warmup steps per round.")
@click.option("--grad-clip", type=Finite(0), default=1.0)
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast (fast on CPUs with AMX).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=100, metavar="N")
@click.option("--threads", type=click.IntRange(1), default=None, callback=_threads,
              help="torch CPU threads (at most 4 per core).")
def progressive(teacher, out, data_spec, start_steps, target_steps, round_steps, guidance_range,
                guidance_steps, guidance_lr_scale, guidance, prediction, label_dropout, lr, batch_size, warmup,
                grad_clip, bf16, seed, ckpt_every, threads):
    """Progressive distillation (Salimans & Ho 2022): halve the teacher's step count round by round.

    Each round trains a student (starting as the previous round's model) so that one of its DDIM steps equals two
    of its teacher's. With --guidance-range, a first stage (Meng et al. 2023) makes a student that takes the
    guidance weight w as an input, and every round draws w per example: one few-step student for the whole
    range, one network evaluation per step. Every stage writes a model file with a student card (method,
    parent, parameterization, schedule, its sampler and exact timesteps), which distill sample and distill eval
    use by default. Run the same command again to continue an interrupted run.

    \b
    Example:
      distill progressive mnist --out runs/mnist-pd --start-steps 64 --target-steps 1 --bf16
      distill progressive --config recipes/mnist-students.yaml
      distill sample runs/mnist-pd/steps-4 --seeds 0-99
    """
    if teacher is None:
        raise UsageError("missing TEACHER: give a model file, run directory or shipped name (e.g. mnist), or "
                         "'teacher:' in the --config file")
    from distill.preflight import check_output_dir

    check_output_dir(out, "--out")
    rounds = tuple(parse_int_list(round_steps, "--round-steps", lo=1, max_count=64))
    if not rounds:
        raise UsageError("--round-steps is empty; give one step count or one per round, e.g. 200,400,800")
    from distill.parsing import parse_float_pair

    grange = parse_float_pair(guidance_range, "--guidance-range") if guidance_range is not None else None
    from distill.distillation import ProgressiveOptions, distill_progressive

    if threads:
        import torch

        torch.set_num_threads(threads)
    opts = ProgressiveOptions(start_steps=start_steps, target_steps=target_steps, round_steps=rounds,
                              guidance_range=grange, guidance_steps=guidance_steps,
                              guidance_lr_scale=guidance_lr_scale, guidance=guidance,
                              prediction=prediction, label_dropout=label_dropout, lr=lr, batch_size=batch_size,
                              warmup=warmup, grad_clip=grad_clip, bf16=bf16, seed=seed, ckpt_every=ckpt_every)
    paths = distill_progressive(teacher, out, opts, data_spec=data_spec,
                                command=" ".join(["distill", *sys.argv[1:]]), log=click.echo)
    click.echo(f"students: {', '.join(str(p) for p in paths)}")


@cli.command("consistency")
@config_option("consistency")
@click.argument("teacher", metavar="TEACHER", required=False, callback=_non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory (model.safetensors with the student card, train_state.safetensors, metrics.jsonl).")
@click.option("--mode", type=click.Choice(["cd", "ct"]), default="cd",
              help="cd: consistency distillation (teacher ODE steps give the targets); ct: consistency training (no "
                   "teacher evaluations; initialised from TEACHER unless --from-scratch).")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Training images [default: the teacher's training data].")
@click.option("--steps", type=click.IntRange(1, 10**9), default=2000, metavar="N", help="Optimizer steps.")
@click.option("--scales", type=click.IntRange(2, 1 << 20), default=None, metavar="N",
              help="A fixed discretization of N noise levels [cd: 18].")
@click.option("--curriculum", default=None, metavar="S0,S1",
              help="The doubling curriculum N(k) = min(S0 2^(k/K'), S1) + 1 of improved CT [ct: 10,1280].")
@click.option("--solver", type=click.Choice(["ddim", "euler", "heun"]), default="heun",
              help="cd: the teacher's ODE step between adjacent noise levels (euler is the DDIM step on the "
                   "VE-equivalent state).")
@click.option("--target-decay", type=Finite(0, 1, max_open=True), default=0.0, metavar="MU",
              help="The target network's EMA decay (0: the stop-gradient copy of the current weights).")
@click.option("--metric", type=click.Choice(["l2", "pseudo_huber"]), default="pseudo_huber",
              help="Distance between online and target outputs (pseudo-Huber: c = 0.00054 sqrt(d)).")
@click.option("--weighting", type=click.Choice(["uniform", "inverse_gap"]), default=None,
              help="Per-pair weight: 1, or 1 / (sigma_{n+1} - sigma_n) [cd: uniform; ct: inverse_gap].")
@click.option("--noise-sampling", type=click.Choice(["uniform", "lognormal"]), default=None,
              help="How the pair's noise level is drawn [cd: uniform; ct: lognormal (-1.1, 2.0)].")
@click.option("--from-scratch", is_flag=True, help="ct: the teacher's architecture with fresh weights.")
@click.option("--sigma-data", type=Finite(min=0, min_open=True), default=0.5, metavar="S",
              help="sigma_data of the boundary-condition scalings.")
@click.option("--dropout", type=Finite(0, 0.9), default=0.0,
              help="The student's dropout (the same masks in online and target evaluations).")
@click.option("--guidance-range", default=None, metavar="LO,HI",
              help="cd: a student taking w as an input, distilled from the guided teacher for every w in [LO, HI].")
@click.option("--guidance-lr-scale", type=Finite(min=0, min_open=True), default=30.0, metavar="X",
              help="The new w embedding's learning rate, as a multiple of --lr.")
@click.option("--guidance", type=Finite(), default=None, metavar="W",
              help="cd without --guidance-range: the fixed guidance weight distilled in [default: the teacher "
                   "card's].")
@click.option("--prediction", type=click.Choice(["v", "x0"]), default=None,
              help="What the student's network predicts [default: the teacher's; v for an eps teacher].")
@click.option("--label-dropout", type=Finite(0, 1), default=0.0,
              help="Probability of training an example with the null class.")
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-4, help="Adam learning rate (constant).")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=128, metavar="B")
@click.option("--warmup", type=click.IntRange(0, 10**9), default=0, metavar="N")
@click.option("--grad-clip", type=Finite(0), default=1.0)
@click.option("--ema-decay", type=Finite(0, 1, max_open=True), default=0.999,
              help="EMA of the weights saved as the model (0: the trained weights).")
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast (fast on CPUs with AMX).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=100, metavar="N")
@click.option("--search-samples", type=click.IntRange(0, 10**6), default=500, metavar="N",
              help="Validation samples for the search of the multistep sampling times (0: no search).")
@click.option("--max-steps", type=click.IntRange(1, 16), default=3, metavar="K",
              help="Search sampling times for 2 .. K steps.")
@click.option("--sample-steps", type=click.IntRange(1, 16), default=2, metavar="K",
              help="The card's default step count (distill sample/eval use it).")
@click.option("--threads", type=click.IntRange(1), default=None, callback=_threads,
              help="torch CPU threads (at most 4 per core).")
def consistency(teacher, out, mode, data_spec, steps, scales, curriculum, solver, target_decay, metric, weighting,
                noise_sampling, from_scratch, sigma_data, dropout, guidance_range, guidance_lr_scale, guidance,
                prediction, label_dropout, lr, batch_size, warmup, grad_clip, ema_decay, bf16, seed, ckpt_every,
                search_samples, max_steps, sample_steps, threads):
    """Consistency distillation or consistency training (Song et al. 2023; Song & Dhariwal 2023).

    The student is TEACHER's network behind the boundary condition f(x, sigma_min) = x, trained so that two
    adjacent points of one trajectory map to the same clean image: with --mode cd the lower point is one ODE step
    of the teacher from the upper one; with --mode ct both are the same training image noised with the same noise
    (no teacher evaluations). It samples in 1, 2 or 3 steps (the consistency sampler); after training, the
    intermediate times are searched on validation samples and written into the student card, which distill sample
    and distill eval use. Run the same command again to continue an interrupted run.

    \b
    Example:
      distill consistency mnist --out runs/mnist-cd --mode cd --steps 1000 --bf16
      distill consistency --config recipes/mnist-cd.yaml
      distill sample runs/mnist-cd --seeds 0-99 --steps 1
    """
    if teacher is None:
        raise UsageError("missing TEACHER: give a model file, run directory or shipped name (e.g. mnist), or "
                         "'teacher:' in the --config file")
    from distill.parsing import parse_float_pair
    from distill.preflight import check_output_dir

    check_output_dir(out, "--out")
    grange = parse_float_pair(guidance_range, "--guidance-range") if guidance_range is not None else None
    curr = None
    if curriculum is not None:
        curr = tuple(parse_int_list(curriculum, "--curriculum", lo=1, max_count=2))
        if len(curr) != 2:
            raise UsageError(f"--curriculum {curriculum}: give two numbers S0,S1, e.g. 10,1280")
    from distill.consistency import ConsistencyOptions, distill_consistency

    if threads:
        import torch

        torch.set_num_threads(threads)
    opts = ConsistencyOptions(mode=mode, steps=steps, scales=scales, curriculum=curr, solver=solver,
                              target_decay=target_decay, metric=metric, weighting=weighting,
                              noise_sampling=noise_sampling, from_scratch=from_scratch, sigma_data=sigma_data,
                              dropout=dropout, guidance_range=grange, guidance_lr_scale=guidance_lr_scale,
                              guidance=guidance, prediction=prediction, label_dropout=label_dropout, lr=lr,
                              batch_size=batch_size, warmup=warmup, grad_clip=grad_clip, ema_decay=ema_decay,
                              bf16=bf16, seed=seed, ckpt_every=ckpt_every, search_samples=search_samples,
                              max_steps=max_steps, sample_steps=sample_steps)
    path = distill_consistency(teacher, out, opts, data_spec=data_spec,
                               command=" ".join(["distill", *sys.argv[1:]]), log=click.echo)
    click.echo(f"student: {path}")


@cli.group("export")
def export_():
    """Ship a model: ONNX (FP32, FP16, INT8 Q/DQ; per step or a fused few-step sampler) and TensorRT engines.

    \b
    Example:
      distill export onnx mnist-4step --out exports/mnist-4step
      distill export onnx mnist-4step --out exports/mnist-4step-int8 --precision int8
      distill export onnx mnist-4step --out exports/mnist-4step-fused --fused
      distill export tensorrt exports/mnist-4step --out engines/mnist-4step
    """


@export_.command("onnx")
@click.argument("model", metavar="MODEL", callback=_non_empty)
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
@click.option("--threads", type=click.IntRange(1), default=None, callback=_threads, metavar="N")
def export_onnx_(model, out, precision, fused, guided, sampler, steps, int8_target, calibration, calib_method,
                 calib_samples, percentile, step_percentile, exclude, float_steps, threads):
    """Export MODEL's denoiser, (x_t, t[, labels][, w]) -> x0, or with --fused its whole sampler, as ONNX with a
    dynamic batch axis, checked against torch at batch 1, 7 and 64 before anything is written.

    \b
    Example:
      distill export onnx mnist-4step --out exports/mnist-4step-int8 --precision int8 --calib-samples 64
      distill sample exports/mnist-4step-int8 --seeds 0-63
    """
    from export.precision import DEFAULT_EXCLUDE, Int8Options

    if exclude is None:
        patterns = DEFAULT_EXCLUDE
    elif exclude.strip().lower() == "none":
        patterns = ()
    else:
        patterns = tuple(p.strip() for p in exclude.split(",") if p.strip())
    ctx = click.get_current_context()
    int8_given = [n for n in ("int8_target", "calibration", "calib_method", "calib_samples", "percentile",
                              "step_percentile", "exclude", "float_steps") if _explicit(ctx, n)]
    if int8_given and precision != "int8":
        flag = "--" + int8_given[0].replace("_", "-")
        raise UsageError(f"{flag} applies to --precision int8; add --precision int8 or drop {flag}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from export.onnx import ExportOptions, export_onnx

    opts = ExportOptions(precision=precision, fused=fused, guided=guided, sampler=sampler, steps=steps,
                         int8=Int8Options(target=int8_target, calibration=calibration, method=calib_method,
                                          samples=calib_samples, percentile=percentile,
                                          step_percentile=step_percentile, exclude=patterns,
                                          float_steps=tuple(parse_int_list(float_steps, "--float-steps", lo=1))
                                          if float_steps else ()))
    manifest = export_onnx(model, out, opts, command=" ".join(["distill", *sys.argv[1:]]), log=click.echo)
    p = manifest["parity"]
    click.echo(f"wrote {out} ({manifest['precision']} {manifest['kind']} graph); max relative error against "
               f"{p['against']}: {p['max_rel_err']:.2e}" + (f" (bound {p['tolerance']:g})" if p["tolerance"] else ""))


@export_.command("tensorrt")
@click.argument("source", metavar="EXPORT", callback=_non_empty)
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="The engine folder (model.engine + manifest.json + timing.cache).")
@click.option("--min-batch", type=click.IntRange(1), default=1, metavar="B")
@click.option("--opt-batch", type=click.IntRange(1), default=None, metavar="B",
              help="The batch TensorRT tunes for [default: 64, within the min/max range].")
@click.option("--max-batch", type=click.IntRange(1), default=256, metavar="B")
@click.option("--workspace", type=click.IntRange(1), default=4 << 30, metavar="BYTES")
@click.option("--timing-cache", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="A persistent timing cache shared across builds [default: DIR/timing.cache].")
@click.option("--dry-run", is_flag=True, help="Check the export and print the equivalent trtexec command; build "
                                              "nothing (works without TensorRT).")
def export_tensorrt_(source, out, min_batch, opt_batch, max_batch, workspace, timing_cache, dry_run):
    """Build a strongly typed TensorRT engine from an ONNX export folder (its precision comes from the graph),
    with an optimization profile over the batch range. Needs TensorRT and an NVIDIA GPU.

    \b
    Example:
      distill export onnx mnist-4step --out exports/m4-int8-trt --precision int8 --int8-target tensorrt
      distill export tensorrt exports/m4-int8-trt --out engines/m4-int8 --max-batch 256
    """
    from export.tensorrt import BuildOptions, build_engine, prepare_build

    opts = BuildOptions(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace=workspace,
                        timing_cache=timing_cache)
    if dry_run:
        manifest = prepare_build(Path(source), out, opts)
        click.echo(manifest["tensorrt"]["trtexec"])
        return
    manifest = build_engine(Path(source), out, opts, command=" ".join(["distill", *sys.argv[1:]]), log=click.echo)
    t = manifest["tensorrt"]
    click.echo(f"wrote {out} (TensorRT {t['version']}, {t['gpu']}, compute capability {t['compute_capability']})")


@cli.command("inspect")
@click.argument("path", metavar="FILE", callback=_non_empty)
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


@cli.group("bench")
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
        click.option("--grid", "grid_file", default=None, metavar="FILE",
                     help="Grid YAML (models with their samplers/steps, backends, precisions, batches) or the name "
                          "of a shipped one under benchmarks/grids/ (mnist-cpu). Replaces the list options."),
        click.option("--models", default=None, metavar="M[,M...]",
                     help="Models: shipped names, model files or run folders."),
        click.option("--samplers", default=None, metavar="S[,S...]",
                     help="Samplers [default: each model card's]."),
        click.option("--steps", "steps_", default=None, metavar="N[,N...]",
                     help="Step counts [default: each model card's]."),
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
        click.option("--exports", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
                     help="Folder of the ONNX exports the onnxruntime configurations run (made once, keyed by the "
                          "model's content hash) [default: OUT/exports]."),
        click.option("--device", default="cpu", help="cpu or cuda[:N]."),
        click.option("--force", is_flag=True, help="Measure again what the folder already holds."),
    ]):
        command = option(command)
    return command


def _grid(grid_file, models, samplers, steps, guidance, backends, precisions, batches):
    from benchmarks.bench.grid import cli_grid, load_grid

    if grid_file:
        given = [n for n, v in (("--models", models), ("--samplers", samplers), ("--steps", steps),
                                ("--guidance", guidance)) if v]
        if given:
            raise UsageError(f"--grid {grid_file} with {', '.join(given)}: the grid file names the models; drop one")
        return load_grid(grid_file)
    if not models:
        raise UsageError("no grid: pass --grid FILE (e.g. --grid mnist-cpu) or --models M[,M...]")
    names = [m.strip() for m in models.split(",") if m.strip()]
    sampler_list = list(parse_names(samplers, "--samplers", SAMPLER_NAMES)) if samplers else None
    step_list = parse_int_list(steps, "--steps", lo=1, hi=10000) if steps else None
    try:
        w_list = [float(w) for w in guidance.split(",") if w.strip()] if guidance else None
    except ValueError:
        raise UsageError(f"--guidance {guidance!r}: expected numbers like 0,1.5") from None
    return cli_grid(names, sampler_list, step_list, w_list,
                    list(parse_names(backends, "--backends", BENCH_BACKEND_NAMES)),
                    list(parse_names(precisions, "--precisions", BENCH_PRECISION_NAMES)),
                    parse_int_list(batches, "--batches", lo=1, hi=65536))


def _log_skipped(grid) -> None:
    for point, why in grid.skipped:
        click.echo(f"left out {point}: {why}", err=True)


@bench.command("speed")
@grid_options
@click.option("--repeats", type=click.IntRange(3, 100000), default=20,
              help="Timed calls per measurement (after warm-up), shared among the passes.")
@click.option("--max-seconds", type=Finite(0.1), default=20.0,
              help="Stop a measurement's repeats after this long (at least 3 calls), shared among the passes.")
@click.option("--rounds", type=click.IntRange(1, 100), default=3,
              help="Passes over the grid, minutes apart; a configuration's statistics pool the calls of all "
                   "passes, so a burst of load on a shared machine moves them little.")
@click.option("--threads", type=click.IntRange(1), default=None, callback=_threads,
              help="CPU threads [default: torch's].")
def bench_speed(grid_file, models, samplers, steps_, guidance, backends, precisions, batches, out, exports, device,
                force, repeats, max_seconds, rounds, threads):
    """Latency of every configuration: a whole sample (all steps) and one network evaluation, median / p10 / p90
    after warm-up, images/s, peak memory, and the machine. Each model x backend x precision runs in its own
    process, in --rounds passes over the grid whose timed calls are pooled; results append to OUT/speed.jsonl
    (passes to OUT/speed_rounds.jsonl) and a re-run skips what is finished.

    \b
    Example:
      distill bench speed --models mnist-4step --backends eager,compile,onnxruntime --precisions fp32,bf16,int8
    """
    from benchmarks.bench.speed import run_speed
    from distill.preflight import check_device

    grid = _grid(grid_file, models, samplers, steps_, guidance, backends, precisions, batches)
    check_device(device)
    _log_skipped(grid)
    rows = run_speed(grid, out, device=device, threads=threads, repeats=repeats, max_seconds=max_seconds,
                     rounds=rounds, force=force, exports=exports, log=lambda m: click.echo(m, err=True))
    for r in rows:
        click.echo(f"{r['config']}: {r['images_per_s']:.4g} images/s, sample {r['sample_ms']:.4g} ms"
                   + (f", eval {r['eval_ms']:.4g} ms" if r.get("eval_ms") is not None else ""))


@bench.command("quality")
@grid_options
@click.option("--samples", type=click.IntRange(2, 1_000_000), default=2500,
              help="Samples per configuration (seeds 0 ... N-1, the same for every configuration).")
@click.option("--data", "data_spec", default=None,
              help="Real data to compare against [default: the first model's training data].")
@click.option("--metrics", "metric_list", default="fd,kid,acc", help="Of fd, kid, is, acc, fid, kid_inception.")
@click.option("--batch-size", type=click.IntRange(1), default=250, help="Sampling batch size (results do not "
              "depend on it).")
def bench_quality(grid_file, models, samplers, steps_, guidance, backends, precisions, batches, out, exports, device,
                  force, samples, data_spec, metric_list, batch_size):
    """Quality of every configuration (FD / KID / class accuracy; FID with --metrics), from the same per-sample
    seeds everywhere. Configurations with the same numerics share one measurement; samples are cached in OUT,
    so a re-run costs nothing. Shard over processes or GPUs with accelerate:
    accelerate launch --multi_gpu --num_processes N -m distill.cli bench quality ...

    \b
    Example:
      distill bench quality --models mnist-4step --backends onnxruntime --precisions fp32,int8 --samples 1000
    """
    from benchmarks.bench.quality import run_quality
    from benchmarks.evaluate import default_data
    from benchmarks.metrics import METRICS
    from distill.parsing import parse_names
    from distill.preflight import check_device

    grid = _grid(grid_file, models, samplers, steps_, guidance, backends, precisions, batches)
    check_device(device)
    metrics = parse_names(metric_list, "--metrics", METRICS)
    data_spec = data_spec or default_data(grid.configs[0].model)
    if data_spec is None:
        raise UsageError(f"{grid.configs[0].model}: cannot tell which real data to compare against; pass --data")
    _log_skipped(grid)
    rows = run_quality(grid, out, samples=samples, data_spec=data_spec, metrics=metrics, device=device,
                       batch_size=batch_size, force=force, exports=exports, log=lambda m: click.echo(m, err=True))
    for r in rows:
        click.echo(f"{r['quality_id']}: " + " ".join(f"{m}={r[m]:.4g}" for m in metrics if r.get(m) is not None))


@bench.command("report")
@click.argument("results", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path), default=Path("runs/bench"),
                required=False)
@click.option("--dest", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Folder for the report files [default: RESULTS].")
@click.option("--name", default="report", help="Report file name stem: NAME.csv, .parquet, .md, .json, .png, .html.")
@click.option("--compare", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path), default=None,
              help="A second run of the same speed grid: the report states how far the medians moved.")
@click.option("--batch", type=click.IntRange(1), default=64, help="Batch size of the headline ratio.")
@click.option("--bound", type=Finite(1.0), default=1.5,
              help="Headline quality bound: FD <= BOUND x the teacher's best.")
@click.option("--command", "command_text", default=None, help="The reproduce command written into the report "
              "[default: this command].")
def bench_report(results, dest, name, compare, batch, bound, command_text):
    """Tables (CSV, Parquet, Markdown) and the Pareto plot (PNG, interactive HTML) of a benchmark folder.

    \b
    Example:
      distill bench report runs/bench --dest benchmarks/results --name bench_cpu
    """
    from benchmarks.bench.report import write_report

    command_text = command_text or "distill " + " ".join(sys.argv[1:])
    summary = write_report(results, dest or results, name, command=command_text, compare=compare, batch=batch,
                           bound=bound)
    head = summary["headline"]
    for f in summary["files"]:
        click.echo(f)
    if "student" in head:
        s = head["student"]
        click.echo(f"best student within {bound}x the teacher's best FD at batch {batch}: {s['config']} "
                   f"{s['images_per_s']:.4g} images/s = {s['speedup']:.1f}x the teacher's best setting in eager fp32")


@bench.command("pick")
@click.argument("results", type=NonEmptyPath(exists=True, path_type=Path), default=Path("runs/bench"), required=False)
@click.option("--batch", type=click.IntRange(1), default=64, help="Batch size the pick is for.")
@click.option("--max-fd", type=Finite(0), default=None, help="Largest acceptable FD.")
@click.option("--max-fid", type=Finite(0), default=None, help="Largest acceptable FID (needs quality with fid).")
@click.option("--max-ratio", type=Finite(0), default=None, help="Largest acceptable FD / the teacher's best FD.")
@click.option("--students-only", is_flag=True, help="Pick among students only (not the teacher at fewer steps).")
@click.option("--json", "as_json", is_flag=True, help="Print the pick as JSON.")
def bench_pick(results, batch, max_fd, max_fid, max_ratio, students_only, as_json):
    """The fastest configuration (images/s at --batch) that meets the quality bound, with its numbers and the
    commands that reproduce it. Exit code 3 when nothing meets it (a CI gate).

    \b
    Example:
      distill bench pick runs/bench --max-ratio 1.5 --batch 64
    """
    import json

    from benchmarks.bench.report import load_table, pick

    if max_fd is None and max_fid is None and max_ratio is None:
        raise UsageError("no quality bound: pass --max-fd, --max-fid or --max-ratio")
    df = load_table(results)
    if max_fid is not None and ("fid" not in df or df["fid"].isna().all()):
        raise UsageError(f"--max-fid: {results} has no FID; run distill bench quality --metrics fd,kid,acc,fid, or "
                         "use --max-fd / --max-ratio")
    if max_ratio is not None and df["fd_ratio"].isna().all():
        raise UsageError(f"--max-ratio: {results} has no teacher quality to take the ratio to; add the teacher to "
                         "the grid, or use --max-fd")
    if not (df["batch"] == batch).any():
        have = ", ".join(str(b) for b in sorted(df["batch"].unique()))
        raise UsageError(f"--batch {batch}: {results} has batch sizes {have}")
    row = pick(df, batch, max_fd=max_fd, max_fid=max_fid, max_ratio=max_ratio, students_only=students_only)
    bound = ", ".join(f"{k} <= {v:g}" for k, v in (("FD", max_fd), ("FID", max_fid), ("FD ratio", max_ratio))
                      if v is not None)
    if row is None:
        raise GateFailure(f"nothing in {results} meets {bound} at batch {batch}")
    keys = ["config", "model", "sampler", "steps", "guidance", "backend", "precision", "batch", "images_per_s",
            "sample_ms", "eval_ms", "peak_rss_mb", "fd", "fd_ratio", "fid", "kid", "acc", "speed_command",
            "quality_command"]
    picked = {k: (None if isinstance(row.get(k), float) and row.get(k) != row.get(k) else row.get(k)) for k in keys}
    picked = {k: (v.item() if hasattr(v, "item") else v) for k, v in picked.items()}
    if as_json:
        click.echo(json.dumps(picked, indent=2))
        return
    click.echo(f"pick ({bound}, batch {batch}): {picked['config']}")
    click.echo(f"  {picked['images_per_s']:.4g} images/s, {picked['sample_ms']:.4g} ms per batch, FD "
               f"{picked['fd']:.4g}" + (f" ({picked['fd_ratio']:.2f}x the teacher's best)"
                                        if picked["fd_ratio"] is not None else ""))
    click.echo(f"  speed:   {picked['speed_command']}")
    if picked["quality_command"]:
        click.echo(f"  quality: {picked['quality_command']}")


@cli.command("sample")
@click.argument("checkpoint", metavar="CHECKPOINT", callback=_non_empty)
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
def sample(checkpoint, out, sampler, steps, spacing, eta, guidance, classes, seeds, batch_size, device, bf16,
           backend, precision):
    """Generate images from a model checkpoint or an export folder: a PNG grid and an .npz of the samples.

    \b
    Examples:
      distill sample runs/digits --sampler heun --steps 10 --guidance 1 --classes 0-9 --seeds 0-99
      distill sample mnist-4step --backend compile --precision bf16
      distill sample exports/mnist-4step-int8 --seeds 0-63
    """
    seed_list = parse_seeds(seeds)
    class_list = parse_int_list(classes, "--classes", lo=0) if classes is not None else None
    _check_sampling(sampler, eta)
    from distill.preflight import check_device, check_output_dir

    check_device(device)
    path = Path(checkpoint)
    out = out or ((path if path.is_dir() else path.parent) if path.exists() else Path(".")) / "samples"
    check_output_dir(out, "--out")
    from distill.sampling import sample_to_files

    grid, npz = sample_to_files(checkpoint, out, sampler=sampler, steps=steps, spacing=spacing, eta=eta,
                                guidance=guidance, classes=class_list, seeds=seed_list, batch_size=batch_size,
                                device=device, bf16=bf16, backend=backend, precision=precision)
    click.echo(f"wrote {grid} and {npz}")


@cli.command("eval")
@click.argument("source", metavar="SOURCE", callback=_non_empty)
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Real data to compare against [default: the model's training data].")
@click.option("--ref", type=click.Choice(["A", "B", "all"]), default="A",
              help="Which fixed half of the real data is the reference (B vs A is the real-vs-real floor).")
@click.option("--metrics", "metric_list", default=None, metavar="LIST", show_default="fd,kid,is,acc,fid",
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
def eval_(source, data_spec, ref, metric_list, sampler, steps, spacing, eta, guidance, classes, seeds, batch_size,
          bf16, inception_backend, device, backend, precision, out):
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
    from benchmarks.evaluate import is_image_source

    ctx = click.get_current_context()
    if is_image_source(source):  # nothing is sampled: a sampling option would be silently ignored
        given = [n for n in ("sampler", "steps", "spacing", "eta", "guidance", "classes", "seeds", "batch_size",
                             "bf16", "backend", "precision") if _explicit(ctx, n)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag}: SOURCE {source} is a set of images, so nothing is sampled; drop {flag} "
                             "(sampling options apply when SOURCE is a model)")
    from benchmarks.metrics import METRICS

    metric_names = parse_names(metric_list, "--metrics", METRICS) if metric_list is not None else None
    seed_list = parse_seeds(seeds)
    class_list = parse_int_list(classes, "--classes", lo=0) if classes is not None else None
    _check_sampling(sampler, eta)
    from distill.preflight import check_device, check_output_file

    check_device(device)
    if out:
        check_output_file(out, "--out")
    from benchmarks.evaluate import evaluate, summary_line, write_json

    result = evaluate(source, data_spec=data_spec, ref=ref, metrics=metric_names,
                      sampler=sampler, steps=steps, spacing=spacing, eta=eta, guidance=guidance, seeds=seed_list,
                      classes=class_list, batch_size=batch_size, bf16=bf16, device=device,
                      inception_backend=inception_backend, backend=backend, precision=precision)
    if out:
        write_json(out, result)
    click.echo(summary_line(result))
    if out:
        click.echo(f"wrote {out}")


def _check_sampling(sampler: str, eta: float | None) -> None:
    from distill.samplers import check_sampler_options  # imports torch: called once the command runs

    check_sampler_options(sampler, eta)


def _interrupted(e: BaseException) -> None:
    """Ctrl-C exits 130 (128 + SIGINT) and SIGTERM 143, after the command has saved what it checkpoints."""
    code = getattr(e, "exit_code", 130)
    click.echo("terminated" if code == 143 else "interrupted", err=True, nl=False)
    click.echo(" (progress saved where the command checkpoints)", err=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    """Console entry point: user mistakes end with one line and their exit code, no traceback; warnings are one
    line each."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            cli.main(standalone_mode=False)
        if "torch" in sys.modules:  # a command that ran under accelerate launch / torchrun: its processes part
            from distill.training import close_process_group

            close_process_group()
    except click.exceptions.Abort as e:
        # click turns KeyboardInterrupt (and our SIGTERM handler's Terminated) into Abort.
        if isinstance(e.__cause__, KeyboardInterrupt):
            _interrupted(e.__cause__)
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DistillError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)


if __name__ == "__main__":
    main()
