"""A run's provenance: package versions, the git revision, the machine, and content hashes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write
from distill.checkpoint import file_sha256 as file_digest

PACKAGES = ("distill", "torch", "numpy", "accelerate", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
            "onnxconverter-common", "tensorrt", "diffusers", "pydantic", "torchmetrics", "pandas")


# Files of a stage folder that are not its content: the run's completion record and the card generated from it
# (hidden files, such as locks and temp files, are left out too).
DERIVED = ("stage.json", "MODEL_CARD.md")


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass  # not installed: left out of the record
    return out


def git_revision(where: Path | None = None) -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or None outside a git checkout."""
    where = where or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model and its kernel-relevant flags, threads, GPU and driver (the benchmark's own record)."""
    from benchmarks.bench.speed import machine_info

    return machine_info(device)


def path_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, hidden files left out)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or rel.name in DERIVED:
            continue
        h.update(f"{rel}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
