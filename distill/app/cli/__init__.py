"""The ``distill`` command line: thin commands over the stage functions of :mod:`distill.app.stages`, split by
command family. Heavy imports (torch and friends) happen inside commands, so ``--help`` is instant.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 3 failed CI gate.
"""

from __future__ import annotations

import sys
import warnings

import click

from distill import __version__
from distill.app.cli.bench import bench
from distill.app.cli.common import OneLineGroup, setup_logging
from distill.app.cli.export import export_
from distill.app.cli.generate import card, eval_, inspect_, sample
from distill.app.cli.run import run
from distill.app.cli.students import chain, consistency, dmd, progressive
from distill.app.cli.teacher import teacher
from distill.errors import DistillError


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="distill")
def cli():
    """distill: diffusion teachers in, fast students out.

    \b
    Quick start:
      distill run recipes/quickstart.yaml          # shipped teacher and students -> exports -> benchmark -> gates
      distill teacher train --data digits --out runs/digits
      distill sample runs/digits --sampler dpmpp_2m --steps 20 --classes 0-9 --seeds 0-99
    """


for command in (run, teacher, progressive, consistency, dmd, chain, export_, sample, eval_, inspect_, card, bench):
    cli.add_command(command)


def _interrupted(e: BaseException) -> None:
    """Ctrl-C exits 130 (128 + SIGINT) and SIGTERM 143, after the command has saved what it checkpoints."""
    code = getattr(e, "exit_code", 130)
    click.echo("terminated" if code == 143 else "interrupted", err=True, nl=False)
    click.echo(" (progress saved where the command checkpoints)", err=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _name_factories(args: list[str]) -> None:
    """A ``factory:MODULE:FUNCTION`` the user typed (an argument, or an option value such as ``--set
    teacher=factory:...``) may run in this command (distill.factory's trust rule)."""
    prefix = "factory:"  # distill.factory.PREFIX (that module imports torch: only imported when one is given)
    for arg in args:
        for part in (arg, arg.partition("=")[2]):
            if part.startswith(prefix):
                from distill.factory import is_well_formed, name_factory

                if is_well_formed(part):  # a malformed spec is reported where it is used, in one line
                    name_factory(part)


def main() -> None:
    """Console entry point: user mistakes end with one line and their exit code, no traceback; warnings are one
    line each."""
    setup_logging()
    _name_factories(sys.argv[1:])
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
    except OSError as e:  # a full or read-only disk met where no command's own check stood: still one line
        from distill.checkpoint import os_error_line

        line = os_error_line(e)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        sys.exit(line.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)
