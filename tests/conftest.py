"""Fixtures shared by the test modules."""

import sys
from typing import NamedTuple

import pytest


class CliRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def distill_main(monkeypatch, capsys):
    """Run the ``distill`` console entry point in this process (no interpreter start-up per call); returns
    ``(returncode, stdout, stderr)``."""
    from distill.cli import main

    def run(*args) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return run
