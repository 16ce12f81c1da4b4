"""Fixtures shared by the test modules."""

import os
import sys
from typing import NamedTuple

import pytest

# inductor compiles in the test's own process: starting its pool of compile workers (fresh interpreters importing
# torch) costs more than the tests' tiny graphs take to compile
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Two workers on two cores: the subprocesses a test starts (distill commands, recipes) run one torch thread too,
# unless the test gives its own count. A second thread beside the other worker's oversubscribes the cores, and
# spinning OpenMP threads then cost a third more CPU time (measured on the 2-core EPYC: a micro recipe 27 s user
# time at one thread against 39 s at two, beside a busy worker)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


class CliRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


# The slowest modules first: the suite runs on two workers, one module at a time each, in this order (pyproject:
# -n 2 --dist loadfile --no-loadscope-reorder); starting the long ones first keeps one worker from running a long
# module alone at the end
SLOW_MODULES = ("test_fuzz_recipes", "test_recipe_kills", "test_fuzz_cli", "test_kill_matrix", "test_export",
                "test_recipes", "test_diffusers", "test_metrics", "test_core_math", "test_run_safety", "test_bench",
                "test_export_ready", "test_train_cli", "test_progressive", "test_consistency", "test_data_model")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.stem
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """Two workers on two cores: one torch thread each (a test's own thread settings still apply)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)
    else:
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_distill_cache(tmp_path_factory):
    """Point ``$DISTILL_CACHE`` (reference features, the exported FID network) at a folder of this test session,
    so no test reads or writes the user's cache; subprocesses inherit it. A test that sets its own still can."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_CACHE", str(tmp_path_factory.mktemp("distill-cache")))
        yield


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """The environment of a module's ``distill`` subprocesses: a cache of their own, a fixed hash seed."""
    return {**os.environ, "DISTILL_CACHE": str(tmp_path_factory.mktemp("cache")), "PYTHONHASHSEED": "0"}


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
