"""The one cache under change and under SIGKILL: a changed stage reruns with what is downstream of it and nothing
else, and a run killed at five moments, one in each stage, then run again, ends as an uninterrupted run (same
models, graphs and metrics), never taking a half-written artifact for complete. A recipe smaller than digits-ci
(every kind of stage, an eager-only benchmark), since these rerun stages many times."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_recipes import ROOT, final_state, run_cli, write

# A smaller recipe still for what reruns a stage many times (the kill matrix, a changed stage): every kind of stage,
# eager-only benchmark (no ONNX export inside it), two speed passes
MICRO = {
    "name": "micro", "threads": 1,
    "teacher": {"data": "digits", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn": [],
                "steps": 40, "batch_size": 16, "lr": 2e-3, "warmup": 0, "ckpt_every": 10},
    "stages": [{"name": "pd", "kind": "progressive", "start_steps": 4, "target_steps": 2, "round_steps": [8],
                "batch_size": 8, "ckpt_every": 4},
               {"name": "cd", "kind": "consistency", "steps": 10, "batch_size": 8, "ckpt_every": 5,
                "search_samples": 20, "max_steps": 2}],
    "exports": [{"name": "pd-fp32", "model": "pd"}],
    "benchmark": {"models": [{"model": "teacher", "samplers": ["ddim"], "steps": [4]}, "pd", "cd"],
                  "backends": ["eager"], "precisions": ["fp32"], "batches": [2], "samples": 20, "repeats": 3,
                  "rounds": 2, "max_seconds": 0.2, "report_batch": 2},
    "gates": [{"kind": "parity", "export": "pd-fp32"}, {"kind": "quality", "model": "pd", "max_ratio": 1000}],
}



@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, cache_env):
    """The micro recipe run once, uninterrupted."""
    folder = tmp_path_factory.mktemp("micro")
    recipe = write(folder, MICRO)
    out = folder / "run"
    p = run_cli("run", recipe, "--out", out, "--no-progress", env=cache_env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return recipe, out


def test_a_changed_stage_reruns_with_what_is_downstream_of_it(micro_run, cache_env, tmp_path):
    recipe, out = micro_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    p = run_cli("run", recipe, "--out", copy, "--json", "--set", "stages.cd.steps=8", env=cache_env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    status = {n: s["status"] for n, s in json.loads(p.stdout)["stages"].items()}
    # the benchmark reads cd; the other student and its export do not
    assert status == {"teacher": "cached", "pd": "cached", "cd": "ran", "pd-fp32": "cached", "bench": "ran"}, status
    assert "removing" in p.stderr  # the changed stage's old folder goes first


KILL_POINTS = [  # what must exist, then SIGKILL: spread over the stages
    "teacher/train_state.safetensors",  # mid-training (the first of four checkpoints)
    "pd/steps-2/train_state.safetensors",  # mid-round
    "cd/train_state.safetensors",  # mid-training, before the timestep search
    "pd-fp32/stage.json",  # an export just complete, the next stage not started
    "bench/speed_rounds.jsonl",  # the benchmark's quality measured, between its two speed passes
]


def test_sigkill_at_five_moments_then_the_same_command_ends_as_an_uninterrupted_run(micro_run, cache_env):
    """The killed run goes into the same folder as the uninterrupted one (moved aside meanwhile): model files record
    the command that made them, paths included."""
    recipe, out = micro_run
    reference = out.with_name("uninterrupted")
    shutil.move(out, reference)
    try:
        cmd = [sys.executable, "-m", "distill.cli", "run", str(recipe), "--out", str(out), "--no-progress"]
        for point in KILL_POINTS:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=cache_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 600
            while not (out / point).exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode in (-9, 0), proc.stderr.read()[-2000:]
        p = subprocess.run(cmd, cwd=ROOT, env=cache_env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "resuming" in p.stderr or "cached" in p.stderr
        assert final_state(out) == final_state(reference)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(reference, out)
