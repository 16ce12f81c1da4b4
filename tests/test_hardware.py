"""Precision ``auto``: bf16 only where the hardware runs it natively; the CPU described for manifests."""

import sys
import warnings

import pytest

from distill import hardware
from distill.errors import UsageError


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU flags the hardware checks see."""

    def set_flags(*names):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))

    return set_flags


def test_auto_is_bf16_on_a_cpu_with_native_bf16(flags):
    flags("avx2", "avx512f", "amx_tile", "amx_bf16")
    assert hardware.native_bf16("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision, reason = hardware.resolve_precision("auto")
        assert hardware.resolve_precision("bf16", "cpu")[0] == "bf16"
    assert precision == "bf16" and reason.startswith("auto: bf16") and "amx_bf16" in reason
    flags("avx2", "avx512_bf16")
    assert hardware.resolve_precision("auto", "cpu")[0] == "bf16"


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_says_why(flags):
    flags("avx2", "avx512f", "avx512_vnni", "fma", "f16c")
    assert not hardware.native_bf16()
    precision, reason = hardware.resolve_precision("auto", "cpu")
    assert precision == "fp32"
    assert reason == "auto: fp32 (this CPU has no native bf16: no avx512_bf16/amx_bf16)"
    assert "\n" not in reason
    assert hardware.resolve_precision("fp32") == ("fp32", "fp32 (requested)")


def test_forced_bf16_on_a_cpu_without_native_bf16_warns_and_is_honoured(flags):
    flags("avx2")
    with pytest.warns(UserWarning, match=r"15-30x slower than fp32 here; use precision auto or fp32") as record:
        precision, reason = hardware.resolve_precision("bf16")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert precision == "bf16" and "no native bf16" in reason


@pytest.mark.parametrize("name", ["fp16", "BF16", "", "int8"])
def test_an_unknown_precision_is_a_usage_error_naming_it(name):
    with pytest.raises(UsageError, match=f"precision '{name}'") as e:
        hardware.resolve_precision(name)
    assert "auto" in str(e.value) and "fp32" in str(e.value) and "\n" not in str(e.value)


def test_other_devices_resolve_auto_to_fp32(flags, monkeypatch):
    flags("amx_bf16")
    assert hardware.resolve_precision("auto", "mps")[0] == "fp32"
    import torch

    if not torch.cuda.is_available():
        precision, reason = hardware.resolve_precision("auto", "cuda")
        assert precision == "fp32" and "no CUDA device" in reason
        assert not hardware.native_bf16("cuda:0")


def test_the_flag_reader_falls_back_to_lscpu(monkeypatch):
    import subprocess
    from pathlib import Path

    def no_procfs(self, *args, **kwargs):
        raise OSError(f"{self}: no procfs")

    hardware._cpu_description.cache_clear()
    monkeypatch.setattr(Path, "read_text", no_procfs)
    out = "Architecture: x86_64\nModel name:   Some CPU\nFlags:   fpu avx2 amx_bf16 amx_tile\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, out, ""))
    try:
        assert hardware.cpu_flags() >= {"avx2", "amx_bf16"} and hardware.native_bf16()
        info = hardware.cpu_info()
        assert info["cpu"] == "Some CPU" and info["cpu_flags"] == ["avx2", "amx_bf16", "amx_tile"]
    finally:
        hardware._cpu_description.cache_clear()


def test_cpu_info_names_the_model_flags_and_threads():
    info = hardware.cpu_info()
    assert info["cpu"] and info["cpu_count"] >= 1 and info["threads"] >= 1
    assert set(info["cpu_flags"]) <= set(hardware.CPU_FLAGS)
    assert info["native_bf16"] == hardware.native_bf16("cpu")


def test_the_module_imports_without_torch():
    import subprocess

    code = "import sys, distill.hardware; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
