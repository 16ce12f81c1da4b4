"""Checks a command runs before any work: the device exists, the output location can be written.

They turn what would fail minutes later (after sampling thousands of images) into one line at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.errors import UsageError


def check_device(device: str, option: str = "--device") -> str:
    """``device`` if this machine has it (cpu, cuda, cuda:N, mps, xpu), else a :class:`UsageError` naming ``option``."""
    import torch

    if not str(device).strip():
        raise UsageError(f"{option} is empty; use cpu, cuda or cuda:N")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{option} {device}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{option} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{option} {device}: Apple's MPS backend is not available here; use --device cpu")
        return device
    if dev.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise UsageError(f"{option} {device}: no Intel XPU is available here; use --device cpu")
        return device
    raise UsageError(f"{option} {device}: device type '{dev.type}' is not supported; use cpu, cuda or cuda:N")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: Path, option: str) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written (read-only, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder; choose another {option}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is a file, so the folder cannot be created; choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK) or not _can_create_in(base):
        raise UsageError(f"{option} {path}: {base} is not writable (read-only or no permission); "
                         f"choose another {option}")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``: a probe, because ``os.access`` says yes to root on a read-only
    mount or a pseudo file system (/proc, /sys)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".distill-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that is a folder or whose folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is a file, not a folder; choose another {option}")
    check_output_dir(parent, option)
