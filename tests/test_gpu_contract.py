"""Contract tests of the TensorRT builder and runner against ``tests/fake_tensorrt.py``: they prove which calls are
made, that every status TensorRT returns is checked, and that each failure is one line; never TensorRT's numerics
(TensorRT cannot be installed on the machines this suite runs on)."""

import json
import shutil
from pathlib import Path

import fake_tensorrt
import pytest
import torch

from distill.denoiser import Cond
from distill.errors import DistillError, UsageError

pytestmark = pytest.mark.contract


class _CpuCuda:
    """The runner's CUDA calls on the CPU (the fake engine reads host memory at the addresses it is given)."""

    def device(self, index):
        return torch.device("cpu")

    def guard(self, index):
        import contextlib

        return contextlib.nullcontext()

    def stream(self, index):
        return type("Stream", (), {"cuda_stream": 0, "wait_stream": lambda self, other: None})()

    def current(self, dev):
        return self.stream(0)

    def keep_until_done(self, tensor, stream):
        """Nothing to keep alive: on the CPU every call has finished when it returns."""


@pytest.fixture()
def fake_trt(monkeypatch):
    import sys

    import export.backends.tensorrt_backend as rt
    import export.tensorrt as builder

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    for module in (rt, builder):
        monkeypatch.setattr(module, "cuda_gpu", lambda device="cuda": ("Fake GPU", "9.0"))
    monkeypatch.setattr(rt, "cuda_index", lambda device: 0)
    monkeypatch.setattr(rt, "CUDA", _CpuCuda())
    fake_tensorrt.FAIL.clear()
    fake_tensorrt.INPUT_DTYPES.clear()
    fake_tensorrt.CALLS.clear()
    yield fake_tensorrt
    fake_tensorrt.FAIL.clear()
    fake_tensorrt.INPUT_DTYPES.clear()


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, teacher_file):
    from export.onnx import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("trt") / "fp32"
    export_onnx(str(teacher_file), out, ExportOptions(check_batches=(1,)), log=lambda *a: None)
    return out


def _build(source, out, **opts):
    from export.tensorrt import BuildOptions, build_engine

    return build_engine(source, out, BuildOptions(**opts), log=lambda *a: None)


def test_the_build_makes_a_checked_strongly_typed_engine_folder(fake_trt, onnx_export, tmp_path):
    m = _build(onnx_export, tmp_path / "eng", max_batch=8, opt_batch=4, tf32=False)
    t = m["tensorrt"]
    assert t["version"] == "10.16.0" and t["gpu"] == "Fake GPU" and t["compute_capability"] == "9.0"
    assert t["tf32"] is False and t["trtexec"].endswith("--noTF32") and not t["timing_cache_reused"]
    assert set(m["files"]) == {"model.engine", "timing.cache"}
    assert (tmp_path / "eng/timing.cache").read_bytes() == b"fake-gpu:timings"
    # the second build reads the first one's cache; one made on another GPU is replaced, not a crash
    m = _build(onnx_export, tmp_path / "eng", max_batch=8, timing_cache=tmp_path / "eng/timing.cache")
    assert m["tensorrt"]["timing_cache_reused"] and m["tensorrt"]["tf32"] is True
    (tmp_path / "other.cache").write_bytes(b"another-gpu:timings")
    notes = []
    from export.tensorrt import BuildOptions, build_engine

    m = build_engine(onnx_export, tmp_path / "eng2", BuildOptions(max_batch=8, timing_cache=tmp_path / "other.cache"),
                     log=notes.append)
    assert m["tensorrt"]["timing_cache_replaced"] and any("another GPU" in n for n in notes)
    assert (tmp_path / "other.cache").read_bytes() == b"fake-gpu:timings"


def test_the_trtexec_line_is_shell_quoted(onnx_export, tmp_path):
    import shlex

    from export.tensorrt import BuildOptions, prepare_build

    m = prepare_build(onnx_export, tmp_path / "an engine dir", BuildOptions(max_batch=8))
    words = shlex.split(m["tensorrt"]["trtexec"])
    assert words[0] == "trtexec" and words[2].endswith("an engine dir/model.engine")


@pytest.mark.parametrize("fail, needle", [
    ("parse", r"could not parse the ONNX graph: In node 3 \(importConv\): UNSUPPORTED_NODE"),
    ("profile", "refused the optimization profile"),
    ("build", "failed to build the engine"),
])
def test_build_failures_are_one_line_and_write_nothing(fake_trt, onnx_export, tmp_path, fail, needle):
    fake_trt.FAIL.add(fail)
    with pytest.raises(DistillError, match=needle) as e:
        _build(onnx_export, tmp_path / "eng", max_batch=8)
    assert "\n" not in str(e.value) and not (tmp_path / "eng").exists()


@pytest.fixture()
def engine(fake_trt, onnx_export, tmp_path):
    _build(onnx_export, tmp_path / "eng", min_batch=2, opt_batch=4, max_batch=4)
    return tmp_path / "eng"


def _backend(engine):
    from export.backends import load_backend

    return load_backend(engine, "tensorrt", device="cuda")


def test_the_runner_binds_by_name_and_splits_batches_past_the_profile(engine, fake_trt):
    b = _backend(engine)
    assert b.batch_range == (2, 4) and b.input_names == ["x_t", "t", "labels"]
    x = torch.randn(10, 1, 8, 8)  # 10 = 4 + 4 + 2: three engine runs
    with torch.no_grad():
        out = b(x, torch.full((10,), 0.5), Cond(torch.arange(10) % 10))
    assert torch.equal(out, 0.5 * x) and fake_trt.CALLS.count("execute") == 3
    with pytest.raises(UsageError, match="batch 1 is below the engine's profile"):
        b(x[:1], 0.5, Cond(torch.arange(1)))
    with pytest.raises(UsageError, match="leaves a last run of 1 below"):
        b(x[:9], 0.5, Cond(torch.arange(9)))


def test_the_runner_casts_inputs_to_the_engine_dtypes(fake_trt, onnx_export, tmp_path):
    fake_trt.INPUT_DTYPES.update({"x_t": "float16", "labels": "int32"})
    _build(onnx_export, tmp_path / "eng", max_batch=4)
    b = _backend(tmp_path / "eng")
    assert b.dtypes["x_t"] == torch.float16 and b.dtypes["labels"] == torch.int32
    x = torch.randn(3, 1, 8, 8)
    out = b(x, 0.5, Cond(torch.arange(3)))
    assert out.dtype == torch.float32 and torch.equal(out, 0.5 * x.half().float())


@pytest.mark.parametrize("fail, error, needle", [
    ("context", DistillError, "could not create an execution context"),
    ("deserialize", UsageError, "refused to deserialize the engine"),
    ("shape", UsageError, "refused the shape"),
    ("address", DistillError, "refused the address of input 'x_t'"),
    ("execute", DistillError, "failed to run the engine"),
])
def test_every_runtime_status_is_checked(engine, fake_trt, fail, error, needle):
    fake_trt.FAIL.add(fail)
    with pytest.raises(error, match=needle) as e:
        b = _backend(engine)
        b(torch.randn(2, 1, 8, 8), 0.5, Cond(torch.arange(2)))
    assert "\n" not in str(e.value) and "model.engine" in str(e.value)


def _edit_manifest(folder, **changes):
    """Change manifest fields and record the folder's files again, as a writer that made them would (a read checks
    every file against the manifest's sha256)."""
    from distill.checkpoint import file_sha256

    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    m["files"] = {name: file_sha256(folder / name) for name in m.get("files", {}) if (folder / name).is_file()}
    path.write_text(json.dumps(m))


def test_a_tampered_or_foreign_engine_is_refused(engine, fake_trt, tmp_path):
    shutil.copytree(engine, tmp_path / "tampered")
    with open(tmp_path / "tampered/model.engine", "ab") as f:
        f.write(b" ")
    with pytest.raises(UsageError, match="bytes differ from those .*manifest.json recorded"):
        _backend(tmp_path / "tampered")
    shutil.copytree(engine, tmp_path / "old")
    m = json.loads((engine / "manifest.json").read_text())
    _edit_manifest(tmp_path / "old", tensorrt={**m["tensorrt"], "version": "10.1.0"})
    with pytest.raises(UsageError, match="built with TensorRT 10.1.0, this machine has 10.16.0"):
        _backend(tmp_path / "old")
    shutil.copytree(engine, tmp_path / "guided")  # the manifest says w; the engine has no such input
    _edit_manifest(tmp_path / "guided", guided=True)
    with pytest.raises(UsageError, match="are not the graph's"):
        _backend(tmp_path / "guided")


def test_a_fused_engine_is_not_called_per_step(fake_trt, onnx_export, tmp_path):
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    src = tmp_path / "fused"
    shutil.copytree(onnx_export, src)
    graph = helper.make_graph([helper.make_node("Identity", ["noise"], ["image"])], "fused",
                              [helper.make_tensor_value_info("noise", TP.FLOAT, ["batch", 3, 1, 8, 8]),
                               helper.make_tensor_value_info("labels", TP.INT64, ["batch"])],
                              [helper.make_tensor_value_info("image", TP.FLOAT, ["batch", 1, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(src / "model.onnx"))
    _edit_manifest(src, kind="sampler", steps=2, noise_slots=2, sampler="ddim", timesteps=[1.0, 0.5, 0.0])
    _build(src, tmp_path / "eng", max_batch=4)
    b = _backend(tmp_path / "eng")
    with pytest.raises(UsageError, match="fused 2-step sampler engine; it draws whole samples"):
        b(torch.randn(2, 1, 8, 8), 0.5, Cond(torch.arange(2)))
    images = b.sample([0, 1, 2], Cond(torch.arange(3)))
    from export.fused import fused_noise

    assert torch.equal(images, 0.5 * fused_noise([0, 1, 2], (1, 8, 8), 2)[:, 0])


def test_graphs_tensorrt_cannot_parse_are_refused_before_a_build(onnx_export, tmp_path):
    import onnx

    from export.tensorrt import BuildOptions, prepare_build, tensorrt_graph_problems

    assert tensorrt_graph_problems(onnx.load(str(onnx_export / "model.onnx"))) == []
    src = tmp_path / "bad"
    shutil.copytree(onnx_export, src)
    model = onnx.load(str(src / "model.onnx"))
    model.graph.node[0].op_type = "MatMulInteger"
    model.opset_import[0].version = 25
    onnx.save(model, str(src / "model.onnx"))
    _edit_manifest(src)
    problems = tensorrt_graph_problems(model)
    assert any("opset 25 is outside 9-20" in p for p in problems)
    assert any("MatMulInteger" in p for p in problems)
    with pytest.raises(UsageError, match="TensorRT cannot parse this graph"):
        prepare_build(src, tmp_path / "eng", BuildOptions())


def test_exported_graphs_pass_polygraphy_lint(onnx_export, tmp_path):
    """``polygraphy check lint`` (it runs the graph on ONNX Runtime) finds nothing in the fp32 export and fails a
    truncated file (the FP16 and TensorRT INT8 graphs are linted where their tests make them)."""
    pytest.importorskip("polygraphy")
    pytest.importorskip("onnx_graphsurgeon")
    from export.tensorrt import polygraphy_lint

    lint = polygraphy_lint(onnx_export / "model.onnx")
    assert lint["passed"] and not lint["failing"], lint
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((onnx_export / "model.onnx").read_bytes()[:5000])
    assert not polygraphy_lint(broken)["passed"]


# -- ONNX Runtime on a GPU (what is checkable on the CPU build) ------------------------------------------------


def test_gpu_sessions_get_the_device_index_and_tensorrt_ep_caches_and_profiles(onnx_export, monkeypatch, tmp_path):
    from export.artifact import read_manifest
    from export.backends.ort_backend import CPU_EP, CUDA_EP, TRT_EP, provider_options

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    m = read_manifest(onnx_export)
    opts = dict((p if isinstance(p, tuple) else (p, None)) for p in
                provider_options([TRT_EP, CUDA_EP, CPU_EP], m, "cuda:1"))
    assert opts[CUDA_EP] == {"device_id": "1", "use_tf32": "0"} and opts[CPU_EP] is None
    trt = opts[TRT_EP]
    assert trt["device_id"] == "1" and trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"].startswith(str(tmp_path / "cache" / "ort-trt"))
    assert Path(trt["trt_engine_cache_path"]).is_dir()  # the EP makes one folder level only
    assert trt["trt_profile_min_shapes"] == "x_t:1x1x8x8,t:1,labels:1"
    assert trt["trt_profile_max_shapes"] == "x_t:256x1x8x8,t:256,labels:256"


def test_a_provider_onnx_runtime_silently_dropped_is_refused(onnx_export, monkeypatch):
    """This CPU build has no CUDA provider: a session asked for it falls back to the CPU without a word; the
    backend says so in one line instead of returning CPU results as CUDA ones."""
    import export.backends.ort_backend as ob
    from export.artifact import read_manifest

    monkeypatch.setattr(ob, "providers_for", lambda device, tensorrt_ep=False:
                        ([ob.TRT_EP] if tensorrt_ep else []) + [ob.CUDA_EP, ob.CPU_EP])
    monkeypatch.setattr(ob, "provider_options", lambda providers, manifest, device: [ob.CPU_EP])
    with pytest.raises(DistillError, match="did not enable TensorrtExecutionProvider, CUDAExecutionProvider") as e:
        ob.OrtBackend(read_manifest(onnx_export), device="cpu", tensorrt_ep=True)
    assert "\n" not in str(e.value)


def test_iobinding_calls_equal_plain_calls(onnx_export):
    """The IOBinding path a GPU takes (inputs and output bound in place), run here on the CPU provider."""
    from export.artifact import read_manifest
    from export.backends.ort_backend import OrtBackend

    m = read_manifest(onnx_export)
    plain, bound = OrtBackend(m), OrtBackend(m, iobinding=True)
    assert bound.iobinding and not plain.iobinding
    x, t, cond = torch.randn(5, 1, 8, 8), torch.linspace(0.1, 0.9, 5), Cond(torch.arange(5))
    assert torch.equal(bound(x, t, cond), plain(x, t, cond))


# -- the GPU acceptance run ------------------------------------------------------------------------------------


def test_the_gpu_acceptance_dry_run_checks_its_plumbing_on_a_cpu(tmp_path):
    from benchmarks import gpu_acceptance

    assert gpu_acceptance.main(["--out", str(tmp_path), "--dry-run"]) == 0
    record = json.loads((tmp_path / "accept.json").read_text())
    assert record["dry_run"] and record["counts"]["DRY-RUN"] == len(gpu_acceptance.CHECKS)
    checks = {c["name"]: c for c in record["checks"]}
    assert "cuda" in " ".join(checks["parity"]["would_skip"])  # no GPU here: it says what it would skip
    assert any(p.startswith("parses: distill bench speed") for p in record["plumbing"])
    assert any(p.startswith("grid mnist-gpu:") for p in record["plumbing"])
    assert "(dry run)" in (tmp_path / "summary.md").read_text()


def test_the_gpu_acceptance_run_records_skips_as_skips_and_failures_as_failures(tmp_path, monkeypatch):
    from benchmarks import gpu_acceptance as ga

    def boom(ctx):
        raise RuntimeError("the check broke")

    monkeypatch.setattr(ga, "CHECKS", [
        ga.Check("fine", (), lambda ctx: {"status": "PASS", "result": {"rows": [{"a": 1.5}]}}, "a check", 1),
        ga.Check("needs-gpu", ("cuda",), boom, "a GPU check", 1),
        ga.Check("broken", (), boom, "a broken check", 1),
        ga.Check("too-long", (), boom, "a long check", 10 * ga.BUDGET_S)])
    monkeypatch.setattr(ga, "capabilities", lambda: {"cuda": "no CUDA GPU visible to torch"})
    assert ga.main(["--out", str(tmp_path), "--device", "cuda"]) == 1
    record = json.loads((tmp_path / "accept.json").read_text())
    status = {c["name"]: (c["status"], c.get("reason", "")) for c in record["checks"]}
    assert status["fine"][0] == "PASS" and status["needs-gpu"] == ("SKIP", "cuda: no CUDA GPU visible to torch")
    assert status["broken"] == ("FAIL", "RuntimeError: the check broke") and status["too-long"][0] == "SKIP"
    assert "out of time" in status["too-long"][1]
    assert record["counts"] == {"PASS": 1, "FAIL": 1, "SKIP": 2, "DRY-RUN": 0}


def test_an_exception_inside_tensorrt_is_one_line_naming_the_engine(engine, fake_trt, monkeypatch):
    b = _backend(engine)

    def raises(stream):
        raise RuntimeError("[TRT] [E] 1: [defaultAllocator.cpp::allocate::31]\nCuda Runtime (out of memory)")

    monkeypatch.setattr(b.context, "execute_async_v3", raises)
    with pytest.raises(DistillError, match=r"model.engine: TensorRT failed while running the engine: \[TRT\]") as e:
        b(torch.randn(2, 1, 8, 8), 0.5, Cond(torch.arange(2)))
    assert "\n" not in str(e.value)
