"""Export and backends on a tiny 8x8 digits teacher: ONNX artifacts, FP16, INT8 with trajectory calibration, the
fused sampler graph, TensorRT preparation, every backend behind one protocol, and distill inspect."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.checkpoint import MODEL_FORMAT, load_denoiser, model_metadata, save_model
from distill.denoiser import Cond
from distill.errors import UsageError
from distill.samplers import generate


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, teacher_file):
    from export.onnx import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("exports") / "fp32"
    export_onnx(str(teacher_file), out, ExportOptions(), log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def int8_cpu_export(tmp_path_factory, teacher_file):
    """``distill export onnx --precision int8`` (CPU target, 4 calibration trajectories), run once through the CLI
    for the tests that check an INT8 artifact; returns ``(returncode, folder)``."""
    from distill.cli import main

    out = tmp_path_factory.mktemp("int8") / "cpu"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["distill", "export", "onnx", str(teacher_file), "--out", str(out), "--precision",
                                 "int8", "--calib-samples", "4"])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out


@pytest.fixture(scope="module")
def guided_student(tmp_path_factory, teacher_file):
    """The tiny teacher with a w input (a guidance student's shape), a random w embedding and a 3-step card."""
    from distill.models.unet import with_guidance_embedding

    den = load_denoiser(teacher_file)
    net = with_guidance_embedding(den.net)
    torch.manual_seed(0)
    for p in net.guidance_mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    student = den.with_net(net)
    student.guidance_input = True
    meta = {"format": MODEL_FORMAT, **model_metadata(student), "data": den.metadata.get("data"),
            "card": {"method": "guidance", "sampler": "ddim", "steps": 3, "spacing": "uniform",
                     "timesteps": [1.0, 2 / 3, 1 / 3, 0.0], "guidance": 1.0, "guidance_range": [0.0, 2.0]}}
    path = tmp_path_factory.mktemp("guided") / "model.safetensors"
    save_model(path, net, meta)
    return path


def _images(npz):
    return np.load(npz)["images"].astype(int)


def test_fp32_export_writes_a_checked_artifact_that_samples_like_torch(fp32_export, teacher_file, tmp_path,
                                                                       distill_main):
    import onnx

    from export.artifact import read_manifest, sha256

    m = read_manifest(fp32_export)
    assert m["kind"] == "denoiser" and m["precision"] == "fp32" and m["labels"] and not m["guided"]
    assert [i["name"] for i in m["graph_info"]["inputs"]] == ["x_t", "t", "labels"]
    assert all(i["shape"][0] == "batch" for i in m["graph_info"]["inputs"])  # a dynamic batch axis
    assert set(m["parity"]["batches"]) == {"b1", "b7", "b64"} and m["parity"]["max_rel_err"] <= 1e-5
    assert m["files"]["model.onnx"] == sha256(fp32_export / "model.onnx")
    onnx.checker.check_model(str(fp32_export / "model.onnx"))
    # the export samples what the torch model samples, through every sampler's own loop
    for args in ([], ["--sampler", "heun", "--steps", "3"]):
        assert distill_main("sample", teacher_file, "--out", tmp_path / "torch", "--seeds", "0-7", *args).returncode \
            == 0
        assert distill_main("sample", fp32_export, "--out", tmp_path / "onnx", "--seeds", "0-7", *args).returncode == 0
        assert np.abs(_images(tmp_path / "torch/samples.npz") - _images(tmp_path / "onnx/samples.npz")).max() <= 1


def test_fp16_keeps_norms_and_the_conditioning_path_in_fp32(tmp_path, teacher_file):
    import onnx

    from export.onnx import ExportOptions, export_onnx

    m = export_onnx(str(teacher_file), tmp_path / "fp16", ExportOptions(precision="fp16"), log=lambda *a: None)
    assert m["parity"]["max_rel_err"] <= 1e-2 and m["parity"]["tolerance"] == 1e-2
    model = onnx.load(str(tmp_path / "fp16/model.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} >= {onnx.TensorProto.FLOAT}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    kept = set(m["fp16"]["fp32_nodes"])
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {"Sin", "Cos", "InstanceNormalization"} <= {ops[k] for k in kept if k in ops}
    # the time embedding's first linear layer only sees t: fp32
    assert any(n.op_type == "Gemm" and n.name in kept for n in model.graph.node)


def test_the_fused_graph_equals_the_python_sampling_loop(tmp_path, teacher_file, distill_main):
    from export.artifact import read_manifest

    out = tmp_path / "fused"
    r = distill_main("export", "onnx", teacher_file, "--out", out, "--fused", "--sampler", "stochastic",
                     "--steps", "2")
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    assert m["kind"] == "sampler" and m["noise_slots"] == 1 and m["steps"] == 2  # fresh noise on 1 of 2 steps
    assert m["parity"]["max_rel_err"] <= 1e-4
    assert distill_main("sample", out, "--out", tmp_path / "a", "--seeds", "0-9").returncode == 0
    assert distill_main("sample", teacher_file, "--out", tmp_path / "b", "--seeds", "0-9", "--sampler",
                        "stochastic", "--steps", "2").returncode == 0
    assert np.abs(_images(tmp_path / "a/samples.npz") - _images(tmp_path / "b/samples.npz")).max() <= 1
    r = distill_main("sample", out, "--out", tmp_path / "c", "--steps", "4")
    assert r.returncode == 2 and "fixed at export" in r.stderr


def test_a_guided_w_input_student_exports_w_and_its_fused_graph(tmp_path, guided_student):
    from export.backends import load_backend
    from export.onnx import ExportOptions, export_onnx

    m = export_onnx(str(guided_student), tmp_path / "g", ExportOptions(), log=lambda *a: None)
    assert m["guided"] and [i["name"] for i in m["graph_info"]["inputs"]] == ["x_t", "t", "labels", "w"]
    # one unrolled step shows the w input inside a fused graph (a fused trace costs ~9 s per step here; the
    # unrolling itself is the other fused tests' subject)
    fused = export_onnx(str(guided_student), tmp_path / "gf", ExportOptions(fused=True, steps=1),
                        log=lambda *a: None)
    assert [i["name"] for i in fused["graph_info"]["inputs"]] == ["noise", "labels", "w"]
    assert fused["noise_slots"] == 0 and fused["steps"] == 1 and fused["parity"]["max_rel_err"] <= 1e-4
    den, ort_backend = load_denoiser(guided_student), load_backend(tmp_path / "g")
    x, t = torch.randn(5, 1, 8, 8), torch.linspace(0.1, 0.9, 5)
    cond = Cond(torch.arange(5), torch.linspace(0, 2, 5))
    with torch.no_grad():
        assert torch.allclose(ort_backend(x, t, cond), den(x, t, cond), atol=1e-4)


def test_int8_quantizes_with_trajectory_calibration_and_keeps_the_excluded_layers(tmp_path, teacher_file,
                                                                                   int8_cpu_export):
    import onnx

    from export.artifact import read_manifest
    from export.onnx import ExportOptions, export_onnx
    from export.precision import Int8Options
    from export.tensorrt import qdq_violations

    code, cpu_dir = int8_cpu_export  # the CLI's --precision int8 --calib-samples 4 (target cpu)
    assert code == 0
    made = {"cpu": read_manifest(cpu_dir)}
    opts = ExportOptions(precision="int8", int8=Int8Options(target="tensorrt", samples=4))
    made["tensorrt"] = export_onnx(str(teacher_file), tmp_path / "tensorrt", opts, log=lambda *a: None)
    # the fp32 graph of the same model and signature is traced once per process, then reused (same bytes)
    assert made["tensorrt"]["export"].get("trace_reused_from") == "this process"
    assert made["tensorrt"]["export"]["nodes"] == made["cpu"]["export"]["nodes"]
    m = made["cpu"]["int8"]
    assert m["calibration_set"]["source"] == "trajectory" and m["calibration_inputs"] == 4 * 20  # 4 x 20 steps
    assert m["method"] == "auto" and m["method_used"] == "minmax"  # the per-step graph's measured best
    assert m["QuantizeLinear_nodes"] > 0 and made["cpu"]["parity"]["max_rel_err"] < 0.2
    model = onnx.load(str(cpu_dir / "model.onnx"))
    by_name = {n.name: n for n in model.graph.node}
    for name in m["excluded_nodes"]:  # conv_in, conv_out, skips and embeddings stay float convolutions / gemms
        assert by_name[name].op_type in ("Conv", "Gemm", "MatMul")
    weights = {i for n in m["excluded_nodes"] for i in by_name[n].input}
    assert any("conv_in" in w for w in weights) and any("conv_out" in w for w in weights)
    # the CPU graph (U8 activations) breaks TensorRT's rules; the TensorRT one keeps them
    assert any("UINT8" in v or "zero point" in v for v in qdq_violations(model))
    trt = onnx.load(str(tmp_path / "tensorrt/model.onnx"))
    assert qdq_violations(trt) == []
    # TensorRT's placement: Q/DQ only on weighted layers' inputs, attention unquantized, fp16 elsewhere
    from export.precision import fp16_violations, qdq_placement

    t = made["tensorrt"]["int8"]
    assert qdq_placement(trt) == [] and t["high_precision"] == "fp16" and m["high_precision"] == "fp32"
    assert fp16_violations(trt, "x_t", t["fp16"]["fp32_nodes"]) == []
    assert t["activation_quantizers"] < m["activation_quantizers"]
    inits = {i.name: i.data_type for i in trt.graph.initializer}
    q_scales = {inits.get(n.input[1]) for n in trt.graph.node if n.op_type == "QuantizeLinear"}
    assert q_scales == {onnx.TensorProto.FLOAT16}
    try:  # NVIDIA's linter (ONNX Runtime underneath) finds nothing in it
        import onnx_graphsurgeon  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        return
    from export.tensorrt import polygraphy_lint

    assert polygraphy_lint(tmp_path / "tensorrt/model.onnx")["passed"]


def test_a_traced_graph_is_kept_for_the_next_process_and_a_damaged_one_is_traced_again(tmp_path, teacher_file,
                                                                                        fp32_export, monkeypatch):
    from distill.rundir import cache_dir
    from export import onnx as eo

    class Traced(Exception):
        """Raised where the exporter would trace."""

    def trace(*args):
        raise Traced

    monkeypatch.setattr(eo, "_FP32_GRAPHS", {})  # as in a fresh process
    m = eo.export_onnx(str(teacher_file), tmp_path / "again", eo.ExportOptions(), log=lambda *a: None)
    kept = Path(m["export"]["trace_reused_from"])
    assert kept.parent == cache_dir() / "onnx-graphs" and kept.with_suffix(".json").is_file()
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (fp32_export / "model.onnx").read_bytes()
    assert m["export"]["nodes"] == json.loads((fp32_export / "manifest.json").read_text())["export"]["nodes"]
    monkeypatch.setattr(eo, "onnx_export", trace)  # from here on a trace would raise
    good = kept.read_bytes()
    try:
        kept.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # damaged: never used, traced again
        monkeypatch.setattr(eo, "_FP32_GRAPHS", {})
        with pytest.raises(Traced):
            eo.export_onnx(str(teacher_file), tmp_path / "damaged", eo.ExportOptions(), log=lambda *a: None)
    finally:
        kept.write_bytes(good)
    monkeypatch.setattr(eo, "_code_fingerprint", lambda: "another version of the model code or the exporter")
    with pytest.raises(Traced):
        eo.export_onnx(str(teacher_file), tmp_path / "changed", eo.ExportOptions(), log=lambda *a: None)
    assert not (tmp_path / "damaged").exists() and not (tmp_path / "changed").exists()


def test_a_fused_int8_graph_gets_ranges_per_unrolled_step(tmp_path, teacher_file):
    """Two unrolled steps (a fused trace costs about 9 s per step here): both quantized, then the second kept float
    (the fp32 trace is reused for the second INT8 export and the plain one)."""
    import onnx
    from onnx import numpy_helper

    from export.onnx import ExportOptions, export_onnx
    from export.precision import Int8Options, unrolled_step_of_nodes

    opts = ExportOptions(fused=True, steps=2, precision="int8", int8=Int8Options(samples=8), check_batches=(1, 7))
    m = export_onnx(str(teacher_file), tmp_path / "f", opts, log=lambda *a: None)
    assert m["kind"] == "sampler" and m["int8"]["calibration_set"]["fused"] and m["int8"]["calibration_inputs"] == 8
    assert m["int8"]["method_used"] in ("minmax", "moving-average", "percentile")  # the fused graph's measured best
    assert m["parity"]["max_rel_err"] < 0.2  # judged by quality, like every INT8 graph
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["manifest.json", "model.onnx"]
    model = onnx.load(str(tmp_path / "f/model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # the same weight is used by both unrolled steps, but its input activation is quantized with two scales
    scales = [float(inits[n.input[1]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1]
    assert len(scales) >= 2 and len(set(scales)) > len(scales) // 2
    plain = export_onnx(str(teacher_file), tmp_path / "p", ExportOptions(fused=True, steps=2, check_batches=(1,)),
                        log=lambda *a: None)
    assert plain["noise_slots"] == 0 and plain["export"]["trace_reused_from"] == "this process"
    step_of = unrolled_step_of_nodes(onnx.load(str(tmp_path / "p/model.onnx")))
    per_step = np.bincount(list(step_of.values()))[1:]
    assert len(per_step) == 2 and len(set(per_step.tolist())) == 1  # the same network, twice
    # --float-steps 2: every quantizable node of the second unrolled step stays float
    opts = ExportOptions(fused=True, steps=2, precision="int8", check_batches=(1,),
                         int8=Int8Options(samples=8, float_steps=(2,), method=m["int8"]["method_used"]))
    kept = export_onnx(str(teacher_file), tmp_path / "k", opts, log=lambda *a: None)
    assert {n for n, k in step_of.items() if k == 2} <= set(kept["int8"]["excluded_nodes"])
    assert not {n for n, k in step_of.items() if k == 1} <= set(kept["int8"]["excluded_nodes"])


def test_step_percentile_calibration_uses_per_step_ranges(tmp_path, teacher_file, fp32_export):
    from export.calibration import CalibrationSet, trajectory_inputs
    from export.precision import step_ranges

    den = load_denoiser(teacher_file)
    # a copy of the module's fp32 per-step export of the same teacher (ONNX Runtime's calibrator writes a
    # shape-inferred file next to the model it reads: the shared artifact stays untouched)
    onnx_path = shutil.copy(fp32_export / "model.onnx", tmp_path / "model.onnx")
    full = trajectory_inputs(den, 2, labels=True, guided=False)
    # four of the card's 20 steps (first, last and two between): the ranges are still per step, one calibrator each
    keep = np.isin(full.step, [0, 6, 13, 19])
    calib = CalibrationSet(full.rows(keep), full.step[keep], full.info)
    assert len(np.unique(calib.step)) == 4
    lo = step_ranges(onnx_path, calib, 0.0, tmp_path)
    hi = step_ranges(onnx_path, calib, 100.0, tmp_path)
    assert lo.keys() == hi.keys() and lo
    name = next(iter(hi))
    assert 0 < float(lo[name][0]["rmax"]) <= float(hi[name][0]["rmax"])  # min over steps <= max over steps
    assert float(hi[name][0]["rmin"]) == -float(hi[name][0]["rmax"])  # symmetric


def test_trajectory_calibration_is_stratified_over_steps_classes_and_w(guided_student):
    from export.calibration import random_inputs, trajectory_inputs

    den = load_denoiser(guided_student)
    calib = trajectory_inputs(den, 20, labels=True, guided=True)
    assert len(calib) == 60 and np.bincount(calib.step).tolist() == [20, 20, 20]
    for k, t in enumerate([1.0, 2 / 3, 1 / 3]):  # the card's own timesteps, each step once per trajectory
        assert np.allclose(calib.inputs["t"][calib.step == k], t, atol=1e-6)
    first = calib.step == 0
    assert sorted(calib.inputs["labels"][first].tolist()) == sorted(list(range(10)) * 2)
    w = calib.inputs["w"][first]
    assert 0 < w.min() < 0.2 and 1.8 < w.max() < 2.0  # spread over the card's guidance range [0, 2]
    for c in range(10):  # every class meets low and high w
        ws = w[calib.inputs["labels"][first] == c]
        assert ws.max() - ws.min() > 0.5
    rnd = random_inputs(den, 30, labels=True, guided=True)
    assert rnd.inputs["x_t"].shape == (30, 1, 8, 8) and (rnd.step == -1).all()


def test_every_backend_runs_the_same_samplers(teacher_file, fp32_export):
    from export.backends import Backend, load_backend

    den = load_denoiser(teacher_file)
    kwargs = dict(sampler="dpmpp_2m", steps=4, cond=Cond(torch.arange(6) % 10))
    ref = generate(den, (1, 8, 8), range(6), **kwargs)
    backends = [load_backend(teacher_file, "eager"), load_backend(fp32_export),
                load_backend(teacher_file, "onnxruntime"), load_backend(teacher_file, "eager", precision="bf16")]
    for b in backends:
        assert isinstance(b, Backend)
        got = generate(b, b.image_shape, range(6), **kwargs)
        assert (got - ref).abs().max() < (0.1 if b.precision == "bf16" else 1e-4), b.name


@pytest.mark.slow
def test_the_compile_backend_matches_eager(teacher_file):
    from export.backends import load_backend

    torch._dynamo.reset()
    eager, compiled = load_backend(teacher_file, "eager"), load_backend(teacher_file, "compile")
    x, t, cond = torch.randn(4, 1, 8, 8), torch.linspace(0.2, 0.8, 4), Cond(torch.arange(4), 1.5)
    assert torch.allclose(compiled(x, t, cond), eager(x, t, cond), atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("args,needle", [
    (["--backend", "tensorrt"], "build an engine first"),
    (["--precision", "bf16", "--backend", "onnxruntime"], "export the model first"),
])
def test_backend_mistakes_are_one_line(tmp_path, teacher_file, distill_main, args, needle):
    r = distill_main("sample", teacher_file, "--out", tmp_path / "s", *args)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args,needle", [
    (["--fused"], "unrolls at most 8"),
    (["--calib-method", "entropy"], "applies to precision int8"),
    (["--steps", "3"], "add --fused"),
    (["--precision", "int8", "--fused", "--steps", "2", "--calibration", "random"], "own noise inputs"),
    (["--precision", "int8", "--float-steps", "2"], "add --fused"),
])
def test_export_mistakes_are_one_line_and_write_nothing(tmp_path, teacher_file, distill_main, args, needle):
    r = distill_main("export", "onnx", teacher_file, "--out", tmp_path / "e", *args)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_an_export_never_replaces_a_folder_that_is_not_an_export(tmp_path, teacher_file, distill_main):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("keep me")
    r = distill_main("export", "onnx", teacher_file, "--out", tmp_path / "e")
    assert r.returncode == 2 and "not an export" in r.stderr
    assert (tmp_path / "e" / "notes.txt").read_text() == "keep me"


def test_tensorrt_build_is_prepared_and_checked_without_tensorrt(tmp_path, fp32_export, distill_main):
    from export.backends.tensorrt_backend import check_engine_compatible
    from export.tensorrt import BuildOptions, optimization_profile, prepare_build

    r = distill_main("export", "tensorrt", fp32_export, "--out", tmp_path / "eng", "--dry-run", "--max-batch", "32")
    assert r.returncode == 0
    cmd = r.stdout.strip()
    assert cmd.startswith("trtexec --onnx=") and "--stronglyTyped" in cmd and "--fp16" not in cmd
    assert "--minShapes=x_t:1x1x8x8,t:1,labels:1" in cmd and "--maxShapes=x_t:32x1x8x8,t:32,labels:32" in cmd
    assert not (tmp_path / "eng").exists()  # a dry run writes nothing
    m = prepare_build(fp32_export, tmp_path / "eng", BuildOptions(opt_batch=8, max_batch=16))
    assert m["tensorrt"]["profile"]["x_t"] == {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [16, 1, 8, 8]}
    fused = {"kind": "sampler", "image_shape": [1, 8, 8], "noise_slots": 2, "labels": True, "guided": True}
    prof = optimization_profile(fused, BuildOptions(min_batch=2, opt_batch=4, max_batch=8))
    assert prof["noise"]["max"] == [8, 3, 1, 8, 8] and prof["w"]["min"] == [2]
    with pytest.raises(UsageError, match="need 1 <= min <= opt <= max"):
        BuildOptions(min_batch=8, opt_batch=4).validate()
    built = {"tensorrt": {"version": "10.16.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
             "path": "e/model.engine"}
    check_engine_compatible(built, "10.16.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(UsageError, match="built with TensorRT 10.16.0, this machine has 11.1.0; rebuild"):
        check_engine_compatible(built, "11.1.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(UsageError, match="built for NVIDIA H100 80GB HBM3 .* this GPU is NVIDIA A100"):
        check_engine_compatible(built, "10.16.0", "NVIDIA A100-SXM4-80GB", "8.0")


def test_tensorrt_missing_is_one_line_and_cpu_int8_graphs_are_refused(tmp_path, fp32_export, int8_cpu_export,
                                                                       distill_main):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the not-installed message cannot be checked")
    except ImportError:
        pass
    r = distill_main("export", "tensorrt", fp32_export, "--out", tmp_path / "eng")
    assert r.returncode == 1 and "TensorRT is not installed" in r.stderr and r.stderr.count("\n") == 1
    code, i8 = int8_cpu_export  # distill export onnx --precision int8 (CPU target), through the CLI
    assert code == 0
    r = distill_main("export", "tensorrt", i8, "--out", tmp_path / "eng", "--dry-run")
    assert r.returncode == 2 and "--int8-target tensorrt" in r.stderr


def _has_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs TensorRT and an NVIDIA GPU (TensorRT cannot be "
                                                    "installed on the CPU machines this suite runs on)")
def test_a_tensorrt_engine_builds_and_matches_onnx(tmp_path, fp32_export, teacher_file):
    from export.backends import load_backend
    from export.tensorrt import BuildOptions, build_engine

    build_engine(fp32_export, tmp_path / "eng", BuildOptions(max_batch=16), log=lambda *a: None)
    trt_backend, den = load_backend(tmp_path / "eng"), load_denoiser(teacher_file)
    x, t, cond = torch.randn(4, 1, 8, 8), torch.linspace(0.2, 0.8, 4), Cond(torch.arange(4))
    with torch.no_grad():
        assert torch.allclose(trt_backend(x, t, cond).cpu(), den(x, t, cond), atol=1e-3)


def test_inspect_describes_models_exports_and_bare_onnx(tmp_path, teacher_file, fp32_export, distill_main):
    r = distill_main("inspect", teacher_file)
    assert r.returncode == 0 and "kind: model" in r.stdout and "parameters:" in r.stdout
    r = distill_main("inspect", fp32_export, "--json")
    d = json.loads(r.stdout)
    assert d["precision"] == "fp32" and d["graph"]["inputs"][0].startswith("x_t: float32[batch")
    assert d["parity"]["max_rel_err"] <= 1e-5
    shutil.copy(fp32_export / "model.onnx", tmp_path / "bare.onnx")
    r = distill_main("inspect", tmp_path / "bare.onnx")
    assert r.returncode == 0 and "no manifest" in r.stdout
    r = distill_main("inspect", tmp_path / "nothing.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    # a model file without its diffusion config is refused, as every other command refuses it
    from safetensors.torch import load_file, save_file

    from distill.checkpoint import read_metadata

    meta = {k: json.dumps(v) for k, v in read_metadata(teacher_file).items()
            if k != "diffusion"}
    save_file(load_file(teacher_file), tmp_path / "partial.safetensors", metadata=meta)
    for command in ("inspect", "sample"):
        r = distill_main(command, tmp_path / "partial.safetensors")
        assert r.returncode == 2 and "incomplete metadata" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_backend_names_match_the_cli():
    from distill.app.cli.common import BACKEND_NAMES
    from export.backends import BACKENDS

    assert BACKEND_NAMES == BACKENDS
