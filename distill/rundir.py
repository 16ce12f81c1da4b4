"""Run directories: one writer at a time (a lock), and no debris from a killed write; the cache folder.

A training run (and later a recipe stage) owns its directory while it runs. The lock is an advisory ``flock`` on
``DIR/.lock``, released by the kernel when the process dies however it dies, so a crashed run never leaves a stale
lock. Temp files of :func:`distill.checkpoint.atomic_write` (``.NAME.<random>.tmp``) left by a killed process are
removed by the next run, under the lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill.errors import UsageError

LOCK_FILE = ".lock"


def cache_dir() -> Path:
    """Where what is computed once is kept (reference features, the exported FID network, traced ONNX graphs):
    ``$DISTILL_CACHE``, by default ``~/.cache/distill``."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


@contextmanager
def _exclusive(lock: Path, busy, cannot_open=None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (holding this process's pid) for the block; when another
    process holds it, raise ``busy(pid)``, when the file cannot be created ``cannot_open(error)`` (UsageErrors; an
    OSError as it is without ``cannot_open``). The kernel releases the lock however the process dies."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if cannot_open is None:
            raise
        raise cannot_open(e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(_holder(fd)) from None
        with contextlib.suppress(OSError):  # the holder's pid, for the busy message; the lock holds without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the duration of the block; a second holder gets a one-line UsageError."""
    out = Path(out)

    def cannot_open(e: OSError) -> UsageError:
        return UsageError(f"{out}: cannot create the run directory ({e.strerror}); choose a writable --out")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_open(e) from None
    with _exclusive(out / LOCK_FILE, lambda pid: _held(out, pid), cannot_open):
        yield


def _held(out: Path, holder: str) -> UsageError:
    return UsageError(f"{out}: another distill run (pid {holder}) is writing here; wait for it to finish, stop it, "
                      "or choose another --out")


def refuse_if_locked(out: Path) -> None:
    """Fail fast, before a run loads its data and models, when another process holds ``out``'s lock (the run
    still takes the lock itself before it writes; this creates nothing)."""
    import fcntl

    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has run here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(Path(out), _holder(fd)) from None
    finally:
        os.close(fd)


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temp files a killed :func:`~distill.checkpoint.atomic_write` left in ``out`` (call under the lock)."""
    stale = [p for p in Path(out).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def staged_dir(out: Path):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (an older artifact there is kept
    until the new one is complete), on failure it is removed and ``out`` is untouched.

    One writer at a time: the block holds ``.NAME.lock`` beside ``out`` (a second process writing the same folder
    gets one line instead of trampling it). A process killed between the two renames of the swap leaves the old
    artifact as ``.NAME.old``: the next writer puts it back first, and removes staging folders killed writers
    left."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def busy(pid: str) -> UsageError:
        return UsageError(f"{out}: another distill process (pid {pid}) is writing it; wait for it to finish, stop it, "
                          "or choose another --out")

    with _exclusive(out.parent / f".{out.name}.lock", busy):
        old = out.with_name(f".{out.name}.old")
        if old.is_dir() and not out.exists():
            old.rename(out)  # a swap a kill interrupted: the previous artifact is still the good one
        for stale in out.parent.glob(f".{out.name}.*.stage"):
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stage", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact gets a folder's usual permissions
        try:
            yield stage
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            from distill.checkpoint import FIXABLE_OS_ERRORS, fix_hint

            if e.errno not in FIXABLE_OS_ERRORS:
                raise
            kept = f"; the previous {out} is kept" if out.exists() else ""
            raise UsageError(f"{out}: cannot write it ({FIXABLE_OS_ERRORS[e.errno]}){kept}; "
                             f"{fix_hint(e.errno)}") from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
