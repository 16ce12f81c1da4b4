"""What the hardware runs natively, for precision ``auto`` and for manifests.

bf16 pays off only where the hardware has bf16 dot products: on a CPU the ``avx512_bf16`` or ``amx_bf16`` flags,
on an NVIDIA GPU compute capability 8.0 (Ampere) or newer. Elsewhere bf16 is emulated (a CPU without them converts
to fp32 around every kernel: typically 15-30x slower than plain fp32), so precision ``auto`` picks fp32 there and
a forced ``bf16`` warns.

Import-light: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

from distill.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")
# The CPU flags that pick kernels (recorded in manifests and benchmark rows), in the order they are listed.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "fma", "f16c")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # either one: native bf16 dot products
MIN_BF16_CAPABILITY = (8, 0)  # NVIDIA Ampere

_NO_NATIVE_CPU = "this CPU has no native bf16: no avx512_bf16/amx_bf16"
SLOW_BF16_WARNING = ("bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16) is typically 15-30x slower than "
                     "fp32 here; use precision auto or fp32")


@functools.lru_cache(maxsize=1)
def _cpu_description() -> tuple[str | None, frozenset[str]]:
    """The CPU's model name and flags: from ``/proc/cpuinfo``, else from ``lscpu``; (None, empty) if neither."""
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if model is None and key in ("model name", "hardware", "processor") and not value.strip().isdigit():
                model = value.strip() or None
            elif flags is None and key in ("flags", "features"):
                flags = frozenset(value.split())
            if model is not None and flags is not None:
                break
    except OSError:
        pass  # no /proc/cpuinfo (not Linux): lscpu below, or unknown
    if model is None or flags is None:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if model is None and key == "model name":
                model = value.strip() or None
            elif flags is None and key == "flags":
                flags = frozenset(value.split())
    return model, flags or frozenset()


def cpu_flags() -> frozenset[str]:
    """The flags of this machine's CPU (``/proc/cpuinfo``, else ``lscpu``); empty where neither is readable."""
    return _cpu_description()[1]


def _cuda_bf16(device: str) -> tuple[bool, str]:
    """Whether the CUDA ``device`` runs bf16 natively, and what it is (for a reason line)."""
    import torch

    if not torch.cuda.is_available():
        return False, f"{device}: no CUDA device is available"
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    with torch.cuda.device(index):
        try:
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 has no including_emulation (and did not count emulation)
            supported = torch.cuda.is_bf16_supported()
    return bool(supported) and (major, minor) >= MIN_BF16_CAPABILITY, name


def _bf16_support(device: str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and a short phrase saying why (for the reason line)."""
    kind = device.split(":", 1)[0].strip().lower()
    if kind == "cpu":
        have = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
        return (True, f"this CPU runs bf16 natively: {'/'.join(have)}") if have else (False, _NO_NATIVE_CPU)
    if kind == "cuda":
        native, name = _cuda_bf16(device)
        if native:
            return True, f"{name} runs bf16 natively"
        if "compute capability" in name:
            return False, (f"{name} has no native bf16: it needs compute capability "
                           f"{MIN_BF16_CAPABILITY[0]}.{MIN_BF16_CAPABILITY[1]} or newer")
        return False, name
    return False, f"no native bf16 check for device {device!r}"


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` runs bf16 natively: a CPU with ``avx512_bf16`` or ``amx_bf16``; a CUDA GPU for which
    ``torch.cuda.is_bf16_supported()`` holds (without emulation) at compute capability 8.0 or newer. Any other
    device: False (``auto`` then means fp32)."""
    return _bf16_support(device)[0]


def resolve_precision(precision: str, device: str = "cpu") -> tuple[str, str]:
    """The precision to run (``fp32`` or ``bf16``) for ``precision`` (``auto``, ``fp32`` or ``bf16``) on
    ``device``, and a one-line reason for the log and the manifest. ``auto`` is bf16 only where the hardware runs
    it natively (:func:`native_bf16`); a forced ``bf16`` where it does not is honoured, with a warning."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: unknown; use auto (bf16 where the hardware runs it natively), "
                         "fp32 or bf16")
    if precision == "fp32":
        return "fp32", "fp32 (requested)"
    native, why = _bf16_support(device)
    if precision == "auto":
        return ("bf16" if native else "fp32"), f"auto: {'bf16' if native else 'fp32'} ({why})"
    if not native:
        on_cpu = device.split(":", 1)[0].strip().lower() == "cpu"
        warnings.warn(SLOW_BF16_WARNING if on_cpu else f"bf16 on {device}: {why}; use precision auto or fp32",
                      stacklevel=2)
        return "bf16", f"bf16 (requested, though {why})"
    return "bf16", f"bf16 (requested; {why})"


def cpu_info() -> dict[str, Any]:
    """This machine's CPU for manifests and benchmark rows: ``cpu`` (the model name), ``cpu_flags`` (those of
    :data:`CPU_FLAGS` it has, in that order), ``native_bf16``, ``cpu_count`` (logical CPUs) and ``threads``
    (torch's intra-op threads)."""
    import torch

    flags = cpu_flags()
    return {"cpu": _cpu_description()[0] or platform.processor() or platform.machine(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "native_bf16": native_bf16("cpu"),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
