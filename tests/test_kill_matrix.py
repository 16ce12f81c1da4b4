"""SIGKILL at several moments of an export and of the benchmark, outside a recipe (the recipe runner's own kills are
in test_recipe_kills.py, training's in test_run_safety.py and the methods' tests): after each kill the destination
holds either nothing or the previous complete artifact, never a half-written one; the same command again ends with
the result an uninterrupted run gives (the same bytes, the same rows)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kill_when(cmd: list[str], ready, env: dict, timeout: float = 300) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds (or when it ends by itself first)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode in (-9, 0), err.decode()[-2000:]


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _export_bytes(folder: Path) -> dict[str, str]:
    """The export's files by sha256, as its manifest recorded them (read_manifest checks the bytes against it)."""
    from export.artifact import read_manifest

    manifest = read_manifest(folder)
    return {k: v for k, v in manifest["files"].items() if k.endswith(".onnx")}


def test_an_int8_export_killed_at_three_moments_ends_as_an_uninterrupted_one(teacher_file, tmp_path, cache_env):
    base = [sys.executable, "-m", "distill.cli", "export", "onnx", str(teacher_file), "--precision", "int8",
            "--calib-samples", "4"]
    reference = tmp_path / "reference"
    _run([*base, "--out", str(reference)], cache_env)
    want = _export_bytes(reference)
    out = tmp_path / "e"
    cmd = [*base, "--out", str(out)]

    def staged(name: str | None = None):
        return lambda: any((s / name).exists() if name else True for s in tmp_path.glob(".e.*.stage"))

    _kill_when(cmd, staged(), cache_env)  # the staging folder just made
    assert not out.exists()
    _kill_when(cmd, staged("fp32.onnx"), cache_env)  # the float graph written, calibration under way
    assert not out.exists()
    _run(cmd, cache_env)
    assert _export_bytes(out) == want
    # exported again over the good one, killed mid-way: the good one stays, whole
    _kill_when(cmd, staged("fp32.onnx"), cache_env)
    assert _export_bytes(out) == want
    _run(cmd, cache_env)
    assert _export_bytes(out) == want
    assert not list(tmp_path.glob(".e.*.stage")) and not (tmp_path / ".e.old").exists()


def _quality_rows(folder: Path) -> list[dict]:
    from benchmarks.bench.speed import read_jsonl

    keep = ("quality_id", "fd", "n_fake")
    return sorted(({k: r[k] for k in keep} for r in read_jsonl(folder / "quality.jsonl")), key=json.dumps)


def test_bench_quality_killed_twice_ends_with_the_rows_of_an_uninterrupted_run(teacher_file, tmp_path, cache_env):
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "distill.cli", "bench", "quality", "--models", str(teacher_file),
                "--samplers", "ddim", "--steps", "2,4", "--backends", "eager", "--precisions", "fp32",
                "--samples", "60", "--data", "digits", "--metrics", "fd", "--batch-size", "20", "--out", str(out)]

    reference = tmp_path / "reference"
    _run(cmd(reference), cache_env)
    want = _quality_rows(reference)
    assert len(want) == 2
    out = tmp_path / "b"
    rows = out / "quality.jsonl"
    # the first class's samples written, its row not yet
    _kill_when(cmd(out), lambda: (out / "samples").is_dir() and any((out / "samples").glob("*.npz")), cache_env)
    # again: one row written, the second class under way
    _kill_when(cmd(out), lambda: rows.is_file() and rows.stat().st_size > 0, cache_env)
    p = _run(cmd(out), cache_env)
    assert _quality_rows(out) == want
    assert re.search(r"\b[12] already measured", p.stderr), p.stderr[-1500:]  # the killed runs' rows were kept
