"""Run directories: one writer at a time (a lock), and no debris from a killed write.

A training run (and later a recipe stage) owns its directory while it runs. The lock is an advisory ``flock`` on
``DIR/.lock``, released by the kernel when the process dies however it dies, so a crashed run never leaves a stale
lock. Temp files of :func:`distill.checkpoint.atomic_write` (``.NAME.<random>.tmp``) left by a killed process are
removed by the next run, under the lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill.errors import UsageError

LOCK_FILE = ".lock"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the duration of the block; a second holder gets a one-line UsageError."""
    import fcntl

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"{out}: cannot create the run directory ({e.strerror}); choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UsageError(f"{out}: another distill run (pid {holder}) is writing here; wait for it to finish, "
                             "stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temp files a killed :func:`~distill.checkpoint.atomic_write` left in ``out`` (call under the lock)."""
    stale = [p for p in Path(out).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
