"""A real full disk and a real read-only destination (a small tmpfs, mounted for the test; skipped where this
process may not mount), for every command that writes: each ends with one ``error:`` line naming the output and
exit code 2, and the previous good output is intact byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

TINY = ["--data", "digits", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--batch-size", "16",
        "--warmup", "0", "--attn", "", "--ckpt-every", "2"]


def _mount(point: Path, options: str) -> bool:
    point.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                          capture_output=True).returncode == 0


@pytest.fixture
def disk(tmp_path):
    """A 64 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    point = tmp_path / "disk"
    if shutil.which("mount") is None or not _mount(point, "size=64m"):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "filler" and not p.name.startswith(".")}


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):  # until the disk is full
        while True:
            f.write(b"\0" * (1 << 16))


def _remount_read_only(disk: Path) -> None:
    if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot remount the tmpfs read-only here")


# (first command, making the good output; the same command again, writing over it)
COMMANDS = {
    "teacher train": (["teacher", "train", *TINY, "--steps", "2", "--out", "{d}/t"],
                      ["teacher", "train", *TINY, "--steps", "4", "--out", "{d}/t", "--resume"]),
    "sample": (["sample", "{d}/t", "--seeds", "0-3", "--steps", "2", "--out", "{d}/s"],
               ["sample", "{d}/t", "--seeds", "0-7", "--steps", "2", "--out", "{d}/s"]),
    "export onnx": (["export", "onnx", "{d}/t", "--out", "{d}/e"], ["export", "onnx", "{d}/t", "--out", "{d}/e"]),
    "eval": (["eval", "{d}/t", "--seeds", "0-49", "--steps", "2", "--metrics", "acc", "--out", "{d}/eval.json"],
             ["eval", "{d}/t", "--seeds", "0-49", "--steps", "3", "--metrics", "acc", "--out", "{d}/eval.json"]),
    "card": (["card", "{d}/t/model.safetensors", "--dest", "{d}/cards"],
             ["card", "{d}/t/model.safetensors", "--dest", "{d}/cards"]),
    "progressive": (["progressive", "{d}/t", "--start-steps", "4", "--target-steps", "2", "--round-steps", "2",
                     "--batch-size", "8", "--ckpt-every", "1", "--out", "{d}/pd"],
                    ["progressive", "{d}/t", "--start-steps", "4", "--target-steps", "2", "--round-steps", "2",
                     "--batch-size", "8", "--ckpt-every", "1", "--out", "{d}/pd2"]),
}


def _args(template: list[str], disk: Path) -> list[str]:
    return [a.replace("{d}", str(disk)) for a in template]


def _good_outputs(disk: Path, distill_main) -> None:
    for first, _ in COMMANDS.values():
        r = distill_main(*_args(first, disk))
        assert r.returncode == 0, (first, r.stderr)


def _one_line(r, *needles) -> str:
    lines = r.stderr.strip().rpartition("\r")[2].strip().splitlines()
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and lines[-1].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def test_a_full_disk_is_one_line_for_every_command_and_keeps_the_previous_output(disk, distill_main):
    _good_outputs(disk, distill_main)
    before = _digests(disk)
    _fill(disk)
    for name, (_, again) in COMMANDS.items():
        _one_line(distill_main(*_args(again, disk)), "no space left")
        assert _digests(disk) == before, name
    (disk / "filler").unlink()  # space again: the same command now works, from the output it kept
    r = distill_main(*_args(COMMANDS["teacher train"][1], disk))
    assert r.returncode == 0, r.stderr


def test_a_read_only_destination_is_one_line_for_every_command_and_keeps_the_previous_output(disk, distill_main):
    _good_outputs(disk, distill_main)
    before = _digests(disk)
    _remount_read_only(disk)
    for name, (_, again) in COMMANDS.items():
        _one_line(distill_main(*_args(again, disk)))
        assert _digests(disk) == before, name
