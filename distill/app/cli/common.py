"""What every command shares: one-line usage errors, strict option types, the shared option groups, and the step
from click's parameters to a stage config (whose errors name their flag)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from distill.errors import ConfigError, UsageError


class OneLineUsageError(click.UsageError):
    """click's usage errors, printed as one ``error:`` line with the help hint at its end (exit code 2)."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def _one_line(e: click.UsageError) -> OneLineUsageError:
    hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return OneLineUsageError(f"{e.format_message()}{hint}")


@contextmanager
def usage_errors_on_one_line() -> Iterator[None]:
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
        with usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with usage_errors_on_one_line():
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


def non_empty(ctx, param, value):
    if value is not None and not str(value).strip():
        raise click.BadParameter("is empty; give a path or a name", ctx, param)
    return value


def threads_callback(ctx, param, value):
    """The stage configs' rule (:func:`distill.app.stages.base.check_threads`), checked as the option is parsed."""
    from distill.app.stages.base import check_threads

    try:
        return check_threads(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def explicit(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was set by the user (command line, environment or config file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (click.core.ParameterSource.DEFAULT,)


def flag_of(field: str) -> str:
    """A config field (``round_steps``, ``round_steps[1]``) -> its flag (``--round-steps``)."""
    return "--" + field.split("[")[0].split(".")[0].replace("_", "-")


def build(cls, ctx: click.Context | None = None, **values: Any):
    """A stage config from the command's parameters. A value left at its option's default is left to the config's
    default (so that, say, INT8 options count as given only when given); a value the user set, or one the command
    computed, is passed. An error names the flag."""
    from distill.app.stages.base import build_config

    ctx = ctx or click.get_current_context()
    defaults = {p.name: p.default for p in ctx.command.params}
    given = {}
    for k, v in values.items():
        if k not in cls.model_fields:
            continue
        if k not in defaults or explicit(ctx, k) or v != defaults[k]:
            given[k] = v
    try:
        return build_config(cls, **given)
    except ConfigError as e:  # "--seeds 'a-b': expected ...", "--round-steps: give ..."
        import re

        sep = " " if e.message.startswith("'") else ": "
        # the message names other fields (max_fd, round_steps): on the command line they are flags
        message = e.flag_message or re.sub(
            r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b",
            lambda m: flag_of(m.group(0)) if m.group(0) in cls.model_fields else m.group(0), e.message)
        raise UsageError(f"{flag_of(e.field)}{sep}{message}" if e.field else message) from None


def command_line() -> str:
    return " ".join(["distill", *sys.argv[1:]])


def threads_option():
    return click.option("--threads", type=click.IntRange(1), default=None, callback=threads_callback, metavar="N",
                        help="torch CPU threads (at most 4 per core).")


def precision_options(command):
    """``--precision auto|fp32|bf16`` of the training commands (``--bf16`` stays as its short spelling)."""
    command = click.option("--bf16/--no-bf16", "bf16", default=None, hidden=True,
                           help="The same as --precision bf16 / fp32.")(command)
    return click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
                        help="Training precision. auto: bf16 autocast only where the hardware runs it natively "
                             "(CPUs with avx512_bf16/amx_bf16, GPUs from compute capability 8.0), else fp32; a CPU "
                             "without native bf16 runs it 15-30x slower than fp32.")(command)


def training_precision(precision: str, bf16: bool | None) -> str:
    if bf16 is None:
        return precision
    if explicit(click.get_current_context(), "precision") and precision != ("bf16" if bf16 else "fp32"):
        raise UsageError(f"--{'no-' if not bf16 else ''}bf16 contradicts --precision {precision}; give one")
    return "bf16" if bf16 else "fp32"


# distill.samplers.SAMPLERS' names, spelled out so that --help does not import torch (a test keeps them equal).
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "stochastic", "consistency")
# export.backends.BACKENDS, spelled out so that --help does not import torch (a test keeps them equal).
BACKEND_NAMES = ("eager", "compile", "onnxruntime", "onnxruntime-trt", "tensorrt")


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


def backend_options(command):
    """Where the network runs, shared by ``sample`` and ``eval``."""
    for option in reversed([
        click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
                     help="eager (torch), compile (torch.compile: inductor with freezing on a CPU, CUDA graphs on a "
                          "GPU), onnxruntime (CPU/CUDA EP by --device; a model is exported on the fly), "
                          "onnxruntime-trt (TensorRT EP), tensorrt (an engine folder) [default: eager for a model, "
                          "the export's own runtime for an export folder]."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="fp32",
                     help="Autocast precision of the eager and compile backends (an export's precision is fixed "
                          "at export); auto: bf16 where the hardware runs it natively, else fp32."),
    ]):
        command = option(command)
    return command


class _EchoHandler:
    """Where the ``distill`` logger's lines go (stdout for the commands, stderr for ``distill run``)."""

    err = False


def log_to(stream) -> None:
    """Send the ``distill`` logger's progress lines to ``stream`` (sys.stdout or sys.stderr)."""
    _EchoHandler.err = stream is sys.stderr


def setup_logging() -> None:
    """One handler on the ``distill`` logger that prints each message as a line, through click (so that a test's
    captured streams see it), at INFO."""
    import logging

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(self.format(record), err=_EchoHandler.err)

    logger = logging.getLogger("distill")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "distill_cli", False)]
    handler = Echo()
    handler.distill_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _EchoHandler.err = False
