"""Fixtures shared by the test modules."""

import sys
from typing import NamedTuple

import pytest


class CliRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session", autouse=True)
def _session_distill_cache(tmp_path_factory):
    """Point ``$DISTILL_CACHE`` (reference features, the exported FID network) at a folder of this test session,
    so no test reads or writes the user's cache; subprocesses inherit it. A test that sets its own still can."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_CACHE", str(tmp_path_factory.mktemp("distill-cache")))
        yield


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


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A tiny class-conditional digits teacher (8x8, cosine, v-prediction), trained for a few steps."""
    from distill.teacher import build_teacher, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    run = build_teacher(data_spec="digits", image_size=None, unconditional=False, schedule="cosine",
                        prediction="v", channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="",
                        dropout=0.1, label_dropout=0.2,
                        train=dict(steps=30, batch_size=16, warmup=0, lr=2e-3, ckpt_every=100))
    train_teacher(run, out, progress=False)
    return out / "model.safetensors"
