"""Errors a user can act on: the CLI prints their message as one line and exits with their code."""

from __future__ import annotations


class DistillError(Exception):
    """A failure with a one-line message naming the file or option and the fix."""

    exit_code = 1


class UsageError(DistillError):
    """Bad input: a wrong path, option, shape, config key or file (exit code 2)."""

    exit_code = 2


class GateFailure(DistillError):
    """A CI quality or speed gate failed (exit code 3)."""

    exit_code = 3
