"""``distill progressive`` and ``distill consistency``: students from a teacher."""

from __future__ import annotations

from pathlib import Path

import click

from distill.app.cli.common import (
    Finite,
    NonEmptyPath,
    build,
    command_line,
    non_empty,
    precision_options,
    threads_option,
    training_precision,
)
from distill.config import config_option
from distill.errors import UsageError

MISSING_TEACHER = ("missing TEACHER: give a model file, run directory or shipped name (e.g. mnist), or 'teacher:' in "
                   "the --config file")


def student_options(command):
    """The options every distillation command has: its data, guidance, prediction and optimization."""
    for option in reversed([
        click.argument("teacher", metavar="TEACHER", required=False, callback=non_empty),
        click.option("--data", default=None, metavar="SPEC", help="Training images [default: the teacher's data]."),
        click.option("--guidance-lr-scale", type=Finite(min=0, min_open=True), default=30.0, metavar="X",
                     help="The new (zero-initialised) w embedding's learning rate, as a multiple of --lr."),
        click.option("--guidance", type=Finite(), default=None, metavar="W",
                     help="Without --guidance-range: the fixed guidance weight distilled into the student "
                          "[default: the teacher card's]."),
        click.option("--prediction", type=click.Choice(["v", "x0"]), default=None,
                     help="What the student predicts [default: the teacher's; v for an eps teacher]."),
        click.option("--label-dropout", type=Finite(0, 1), default=0.0,
                     help="Probability of distilling an example with the null class."),
        click.option("--batch-size", type=click.IntRange(1, 65536), default=128, metavar="B"),
        click.option("--warmup", type=click.IntRange(0, 10**9), default=0, metavar="N", help="Warmup steps."),
        click.option("--grad-clip", type=Finite(0), default=1.0),
        precision_options,
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0),
        click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=100, metavar="N"),
        threads_option(),
    ]):
        command = option(command)
    return command


@click.command("progressive")
@config_option("progressive")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory: one sub-folder per stage (guidance/, steps-32/, ... steps-1/).")
@click.option("--start-steps", type=click.IntRange(2, 1 << 20), default=64, metavar="N",
              help="The teacher's DDIM step count where it has converged; round 1 distills it into N/2 steps.")
@click.option("--first-map", type=click.Choice(["ddim", "dpmpp_2m"]), default="ddim", show_default=True,
              help="What round 1 copies: two of the teacher's DDIM steps, or its DPM-Solver++(2M) sampler on "
                   "the --start-steps grid (trajectories from prior noise; a better map than the converged ODE, "
                   "e.g. --start-steps 16).")
@click.option("--target-steps", type=click.IntRange(1, 1 << 19), default=1, metavar="N",
              help="Halve until the student samples in N steps.")
@click.option("--round-steps", default="1000", metavar="LIST",
              help="Optimizer steps per round, in round order (the last value repeats), e.g. 200,400,800.")
@click.option("--guidance-range", default=None, metavar="LO,HI",
              help="Guidance distillation first: a student taking w as an input, for every w in [LO, HI].")
@click.option("--guidance-steps", type=click.IntRange(1, 10**9), default=1000, metavar="N",
              help="Optimizer steps of the guidance stage.")
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-4,
              help="Adam learning rate, decayed linearly to 0 within each round.")
@student_options
def progressive(teacher, out, precision, bf16, **params):
    """Progressive distillation (Salimans & Ho 2022): halve the teacher's step count round by round.

    Each round trains a student (starting as the previous round's model) so that one of its DDIM steps equals two
    of its teacher's. With --guidance-range, a first stage (Meng et al. 2023) makes a student that takes the
    guidance weight w as an input, and every round draws w per example: one few-step student for the whole
    range, one network evaluation per step. Every stage writes a model file with a student card (method,
    parent, parameterization, schedule, its sampler and exact timesteps), which distill sample and distill eval
    use by default. Run the same command again to continue an interrupted run.

    \b
    Example:
      distill progressive mnist --out runs/mnist-pd --start-steps 64 --target-steps 1
      distill progressive --config recipes/mnist-students.yaml
      distill sample runs/mnist-pd/steps-4 --seeds 0-99
    """
    from distill.app.stages.train import ProgressiveConfig, run_progressive
    from distill.preflight import check_output_dir

    if teacher is None:
        raise UsageError(MISSING_TEACHER)
    check_output_dir(out, "--out")
    if params.get("round_steps") is not None and not str(params["round_steps"]).replace(",", "").strip():
        raise UsageError("--round-steps is empty; give one step count or one per round, e.g. 200,400,800")
    cfg = build(ProgressiveConfig, teacher=teacher, precision=training_precision(precision, bf16), **params)
    result = run_progressive(cfg, out, command=command_line())
    click.echo(f"students: {', '.join(result.record['students'])}")


@click.command("consistency")
@config_option("consistency")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory (model.safetensors with the student card, train_state.safetensors, metrics.jsonl).")
@click.option("--mode", type=click.Choice(["cd", "ct"]), default="cd",
              help="cd: consistency distillation (teacher ODE steps give the targets); ct: consistency training (no "
                   "teacher evaluations; initialised from TEACHER unless --from-scratch).")
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
@click.option("--noise-sampling", type=click.Choice(["uniform", "lognormal", "ect"]), default=None,
              help="How the pair's noise levels are drawn: uniform or lognormal (-1.1, 2.0) over the "
                   "discretization, or ect (continuous pairs, ECT's shrinking gap) [cd: uniform; ct: ect from the "
                   "teacher, lognormal with --from-scratch, --scales or --curriculum].")
@click.option("--ect-q", type=Finite(min=1, min_open=True), default=2.0, metavar="Q",
              help="ect: the pair's gap shrinks by Q at each of 8 stages of the run.")
@click.option("--from-scratch", is_flag=True, help="ct: the teacher's architecture with fresh weights.")
@click.option("--sigma-data", type=Finite(min=0, min_open=True), default=0.5, metavar="S",
              help="sigma_data of the boundary-condition scalings.")
@click.option("--dropout", type=Finite(0, 0.9), default=0.0,
              help="The student's dropout (the same masks in online and target evaluations).")
@click.option("--guidance-range", default=None, metavar="LO,HI",
              help="cd: a student taking w as an input, distilled from the guided teacher for every w in [LO, HI].")
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-4, help="Adam learning rate (constant).")
@click.option("--ema-decay", type=Finite(0, 1, max_open=True), default=0.999,
              help="EMA of the weights saved as the model (0: the trained weights).")
@click.option("--search-samples", type=click.IntRange(0, 10**6), default=500, metavar="N",
              help="Validation samples for the search of the multistep sampling times (0: no search).")
@click.option("--max-steps", type=click.IntRange(1, 16), default=3, metavar="K",
              help="Search sampling times for 2 .. K steps.")
@click.option("--sample-steps", type=click.IntRange(1, 16), default=2, metavar="K",
              help="The card's default step count (distill sample/eval use it).")
@student_options
def consistency(teacher, out, precision, bf16, **params):
    """Consistency distillation or consistency training (Song et al. 2023; Song & Dhariwal 2023).

    The student is TEACHER's network behind the boundary condition f(x, sigma_min) = x, trained so that two
    adjacent points of one trajectory map to the same clean image: with --mode cd the lower point is one ODE step
    of the teacher from the upper one; with --mode ct both are the same training image noised with the same noise
    (no teacher evaluations). It samples in 1, 2 or 3 steps (the consistency sampler); after training, the
    intermediate times are searched on validation samples and written into the student card, which distill sample
    and distill eval use. Run the same command again to continue an interrupted run.

    \b
    Example:
      distill consistency mnist --out runs/mnist-cd --mode cd --steps 1000
      distill consistency --config recipes/mnist-cd.yaml
      distill sample runs/mnist-cd --seeds 0-99 --steps 1
    """
    from distill.app.stages.train import ConsistencyConfig, run_consistency
    from distill.preflight import check_output_dir

    if teacher is None:
        raise UsageError(MISSING_TEACHER)
    check_output_dir(out, "--out")
    cfg = build(ConsistencyConfig, teacher=teacher, precision=training_precision(precision, bf16), **params)
    result = run_consistency(cfg, out, command=command_line())
    click.echo(f"student: {result.outputs['model']}")


@click.command("dmd")
@config_option("dmd")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Run directory (model.safetensors with the student card, train_state.safetensors, metrics.jsonl).")
@click.option("--init", default=None, metavar="MODEL",
              help="The one-step generator's starting point: a progressive or consistency student (or any model "
                   "on the teacher's schedule) [default: the teacher].")
@click.option("--data", default=None, metavar="SPEC", help="Real images [default: the teacher's data].")
@click.option("--steps", type=click.IntRange(1, 10**9), default=1000, metavar="N", help="Generator updates.")
@click.option("--gen-steps", type=click.IntRange(1, 8), default=1, metavar="K",
              help="The generator's sampling steps: 1 (one-step DMD2) or 2-4 (multistep: trained at each of K "
                   "grid times on inputs from its own earlier steps, sampled with re-noising).")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=32, metavar="B")
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-5, help="The generator's learning rate.")
@click.option("--fake-lr", type=Finite(min=0, min_open=True), default=None,
              help="The fake score's learning rate [--lr].")
@click.option("--head-lr", type=Finite(min=0, min_open=True), default=None,
              help="The discriminator head's learning rate [--fake-lr].")
@click.option("--fake-updates", type=click.IntRange(1, 100), default=4, metavar="K",
              help="Fake-score / discriminator updates per generator update (two time-scale rule).")
@click.option("--gan-weight", type=Finite(0), default=3e-3, help="The GAN term in the generator's loss (0: none).")
@click.option("--disc-weight", type=Finite(0), default=1e-2, help="The GAN loss in the discriminator's update.")
@click.option("--t-min", type=Finite(0, 1, min_open=True), default=0.02, help="Lowest noise level (t) matched.")
@click.option("--t-max", type=Finite(0, 1, min_open=True), default=0.98, help="Highest noise level (t) matched.")
@click.option("--guidance", type=Finite(), default=None, metavar="W",
              help="The teacher's classifier-free guidance weight, baked into the generator [the teacher card's].")
@click.option("--label-dropout", type=Finite(0, 1), default=0.1,
              help="Null-class probability in the fake score's diffusion loss.")
@click.option("--ema-decay", type=Finite(0, 1, max_open=True), default=0.999,
              help="EMA of the generator saved as the model (0: the trained weights).")
@click.option("--warmup", type=click.IntRange(0, 10**9), default=0, metavar="N", help="Warmup steps.")
@click.option("--grad-clip", type=Finite(0), default=1.0)
@precision_options
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--ckpt-every", type=click.IntRange(1, 10**9), default=100, metavar="N")
@threads_option()
@click.argument("teacher", metavar="TEACHER", required=False, callback=non_empty)
def dmd(teacher, out, precision, bf16, **params):
    """Distribution matching distillation (DMD2, Yin et al. 2024): a one-step generator trained so that its
    samples' distribution matches TEACHER's.

    The generator starts from --init (a one-step progressive or consistency student, or the teacher). Each step
    first updates a fake score (a copy of the teacher trained with the diffusion loss on the generator's samples)
    and a small discriminator head on the teacher's bottleneck features, --fake-updates times; then the generator
    follows the difference of the fake and the real (teacher's) score on its noised samples, plus a GAN term.
    --gen-steps K trains a K-step generator instead (sampled with re-noising; trained at each step on inputs
    from its own earlier steps). Run the same command again to continue an interrupted run.

    \b
    Example:
      distill dmd mnist --init mnist-1step --out runs/mnist-dmd --steps 1000
      distill sample runs/mnist-dmd --seeds 0-99
    """
    from distill.app.stages.train import DMDConfig, run_dmd
    from distill.preflight import check_output_dir

    if teacher is None:
        raise UsageError(MISSING_TEACHER)
    check_output_dir(out, "--out")
    cfg = build(DMDConfig, teacher=teacher, precision=training_precision(precision, bf16), **params)
    result = run_dmd(cfg, out, command=command_line())
    click.echo(f"student: {result.outputs['model']}")


@click.command("chain")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Chain folder (chain.json with the card and the search table, members/ with the model files).")
@click.option("--times", default=None, metavar="LIST",
              help="The re-noise level t of each model after the first, e.g. 0.5 [searched].")
@click.option("--levels", default=None, metavar="LIST", help="Candidate re-noise levels the search tries "
              "[0.2,0.3,...,0.9].")
@click.option("--search-seeds", type=click.IntRange(50, 100_000), default=400, metavar="N",
              help="Samples per candidate level (FD against the real half B; half A stays for distill eval).")
@click.option("--data", default=None, metavar="SPEC", help="Real images the search scores against [the first "
              "model's data].")
@threads_option()
def chain(models, out, **params):
    """Hybrid few-step sampling: one step of each MODEL in turn (one network evaluation each), the clean estimate
    re-noised between steps to a given (--times) or searched level.

    The first model reads at the top of its own one-step grid; each later one at the level, below the previous,
    whose chain scores the lowest FD. A model may appear more than once. The folder samples and evaluates like a
    model and exports as one graph.

    \b
    Example:
      distill chain mnist-1step mnist-ct --out runs/chain-2step
      distill eval runs/chain-2step --seeds 0-2499
      distill export onnx runs/chain-2step --fused --out exports/chain-2step
    """
    from distill.app.stages.chain import ChainConfig, run_chain
    from distill.preflight import check_output_dir

    check_output_dir(out, "--out")
    params = {k: v for k, v in params.items() if v is not None}
    cfg = build(ChainConfig, models=list(models), **params)
    result = run_chain(cfg, out, command=command_line())
    click.echo(f"chain: {result.outputs['chain']} ({result.record['summary']})")
