"""Errors a user can act on: the CLI prints their message as one line and exits with their code."""

from __future__ import annotations


class DistillError(Exception):
    """A failure with a one-line message naming the file or option and the fix."""

    exit_code = 1


class UsageError(DistillError):
    """Bad input: a wrong path, option, shape, config key or file (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A stage config field with a bad value (exit code 2). ``field`` is the config field's name; the CLI shows it
    as its flag (``--start-steps``), a recipe as its key path (``recipe.yaml: stages[1].start_steps``)."""

    def __init__(self, field: str, message: str, flag_message: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        # flag_message: the same message naming command-line flags, where a library check wrote it that way
        self.field, self.message, self.flag_message = field, message, flag_message


class TrainingDiverged(DistillError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint (exit code 1)."""

    exit_code = 1


class GateFailure(DistillError):
    """A CI quality or speed gate failed (exit code 3)."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run saves exactly as on Ctrl-C (exit code 143 = 128 + 15)."""

    exit_code = 143
