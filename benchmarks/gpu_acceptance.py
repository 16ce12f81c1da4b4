"""One command that checks the GPU half of distill on an NVIDIA machine, within about 9 minutes:

    python -m benchmarks.gpu_acceptance --out runs/gpu-accept            # on the GPU machine
    python -m benchmarks.gpu_acceptance --out /tmp/accept --dry-run      # anywhere: the plan, its plumbing checked

Writes ``OUT/accept.json`` (every check: PASS, FAIL or SKIP with the reason; a SKIP is never a pass) and
``OUT/summary.md``. Needs torch with CUDA and onnxruntime; onnxruntime-gpu (CUDA and TensorRT execution providers)
and TensorRT only for the checks that use them (see the README for installing onnxruntime-gpu from a wheel).

Checks, on the shipped 4-step student (``--model``):
1. environment: GPU, driver, compute capability, library versions, ONNX Runtime's providers, TensorRT;
2. exports made on this machine's CPU: fp32, fp16, INT8 for TensorRT, the fused 4-step graph;
3. parity on the GPU at batch 1, 7, 64, 256 on the model's own trajectory inputs: torch fp32 with TF32 off and on
   against torch on the CPU; each graph through ONNX Runtime's CUDA provider (TF32 off and on) against torch and
   against ONNX Runtime on the CPU; the fused graph against the CPU's;
4. the FP16 graph's time path on the device: the time embedding's Sin/Cos inputs against fp32's;
5. provider truth: which providers each ONNX Runtime session really got;
6. ``distill sample`` and ``distill eval`` on ``--device cuda`` through every available backend, images and FD
   against the CPU run;
7. latency with CUDA events at batch 1 and 64: torch eager, ``torch.compile(mode="reduce-overhead")`` (CUDA graphs)
   fp16 and bf16, ONNX Runtime CUDA, and a whole 4-step sample against 4 network evaluations;
8. ``distill bench speed`` and ``bench quality`` on ``benchmarks/grids/mnist-gpu.yaml``;
9. where ``import tensorrt`` works: FP32/FP16/INT8/fused engines, their I/O names and dtypes, parity, an
   out-of-profile shape refused, the timing cache reused, a tampered manifest refused, layer precisions from the
   engine inspector.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUDGET_S = 9 * 60
BATCHES = (1, 7, 64, 256)
GRID = "mnist-gpu"
PARITY_BOUNDS = {"fp32": 1e-4, "fp32-tf32": 1e-2, "fp16": 1e-2, "int8": 5e-2, "fused": 1e-3}


@dataclass
class Check:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Any], dict]
    plan: str
    seconds: float = 60.0  # what it is expected to take on an H100/H200 (the deadline skips what does not fit)


@dataclass
class Context:
    out: Path
    model: str
    device: str
    dry_run: bool
    start: float = field(default_factory=time.perf_counter)
    exports: dict[str, Path] = field(default_factory=dict)
    engines: dict[str, Path] = field(default_factory=dict)

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.start)


# -- what this machine has ---------------------------------------------------------------------------------------

def capabilities() -> dict[str, str | None]:
    """Each requirement -> None when met, else why not."""
    out: dict[str, str | None] = {}
    try:
        import torch

        out["cuda"] = None if torch.cuda.is_available() else "no CUDA GPU visible to torch"
    except ImportError:
        out["cuda"] = "torch is not installed"
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["ort-cuda"] = None if "CUDAExecutionProvider" in providers else \
            f"onnxruntime has no CUDA provider ({', '.join(providers)}): install onnxruntime-gpu (README)"
        out["ort-trt"] = None if "TensorrtExecutionProvider" in providers else \
            "onnxruntime has no TensorRT provider (onnxruntime-gpu with TensorRT's libraries)"
    except ImportError:
        out["ort-cuda"] = out["ort-trt"] = "onnxruntime is not installed"
    try:
        import tensorrt  # noqa: F401

        out["tensorrt"] = None
    except ImportError:
        out["tensorrt"] = "TensorRT is not installed (NVIDIA's package index)"
    for name in ("ort-cuda", "ort-trt", "tensorrt"):
        if out["cuda"] and not out[name]:
            out[name] = out["cuda"]
    return out


def environment(ctx: Context) -> dict:
    import platform

    import torch

    from benchmarks.bench.speed import machine_info

    info = machine_info(ctx.device)
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    info["torch_cuda"] = torch.version.cuda
    info["capabilities"] = {k: ("yes" if v is None else v) for k, v in capabilities().items()}
    info["python"] = platform.python_version()
    return {"status": "PASS", "result": info}


# -- exports -------------------------------------------------------------------------------------------------------

EXPORTS = {"fp32": {}, "fp16": {"precision": "fp16"}, "int8-tensorrt": {"precision": "int8", "target": "tensorrt"},
           "fused-fp32": {"fused": True}}


def export_options(spec: dict):
    from export.onnx import ExportOptions
    from export.precision import Int8Options

    opts = ExportOptions(precision=spec.get("precision", "fp32"), fused=spec.get("fused", False),
                         int8=Int8Options(target=spec.get("target", "cpu")))
    opts.validate()
    return opts


def make_exports(ctx: Context) -> dict:
    from export.artifact import read_manifest
    from export.onnx import export_onnx

    result = {}
    for name, spec in EXPORTS.items():
        folder = ctx.out / "exports" / name
        if not (folder / "manifest.json").is_file():
            export_onnx(ctx.model, folder, export_options(spec), command="python -m benchmarks.gpu_acceptance",
                        log=lambda *a: None)
        m = read_manifest(folder)
        ctx.exports[name] = folder
        result[name] = {"parity_at_export": m["parity"]["max_rel_err"], "precision": m["precision"]}
    return {"status": "PASS", "result": result}


# -- parity ----------------------------------------------------------------------------------------------------

def _trajectory_feed(ctx: Context, batch: int) -> dict[str, np.ndarray]:
    from distill.checkpoint import load_denoiser
    from export.calibration import trajectory_inputs

    if not hasattr(ctx, "_rows"):
        den = load_denoiser(ctx.model).float()
        ctx._rows = trajectory_inputs(den, 64, labels=den.num_classes > 0, guided=False, seed=4_000_000)
    return ctx._rows.spread(batch)


def _cuda_session(path: Path, tf32: bool):
    from export.backends.ort_backend import device_index
    from export.onnx import ort_session

    return ort_session(path, [("CUDAExecutionProvider", {"device_id": str(device_index("cuda")),
                                                         "use_tf32": "1" if tf32 else "0"}),
                              "CPUExecutionProvider"])


def parity(ctx: Context) -> dict:
    import torch

    from distill.checkpoint import load_denoiser
    from distill.denoiser import DenoiserGraph
    from export.onnx import ort_session, rel_err

    den = load_denoiser(ctx.model).float()
    graph = DenoiserGraph(den, labels=den.num_classes > 0).eval()
    gpu_graph = DenoiserGraph(load_denoiser(ctx.model, ctx.device).float(), labels=den.num_classes > 0).eval()
    rows, failures = [], []
    caps = capabilities()
    sessions = {}
    for b in BATCHES:
        feed = _trajectory_feed(ctx, b)
        with torch.no_grad():
            cpu = graph(*[torch.from_numpy(feed[n]) for n in graph.input_names]).numpy().astype(np.float64)
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                got = gpu_graph(*[torch.from_numpy(feed[n]).to(ctx.device) for n in graph.input_names])
                err = rel_err(got.cpu().numpy(), cpu)
                key = "fp32-tf32" if tf32 else "fp32"
                rows.append({"path": f"torch cuda {key}", "batch": b, "against": "torch cpu", "rel_err": err,
                             "bound": PARITY_BOUNDS[key]})
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if caps["ort-cuda"]:
            continue
        for name in ("fp32", "fp16", "int8-tensorrt"):
            path = ctx.exports[name] / "model.onnx"
            cpu_ort = sessions.setdefault((name, "cpu"), ort_session(path)).run(None, feed)[0]
            for tf32 in (False, True):
                s = sessions.setdefault((name, tf32), _cuda_session(path, tf32))
                got = s.run(None, feed)[0]
                precision = name.split("-")[0]
                bound = PARITY_BOUNDS["fp32-tf32" if precision == "fp32" and tf32 else precision]
                rows.append({"path": f"onnxruntime cuda {name}{' tf32' if tf32 else ''}", "batch": b,
                             "against": "torch cpu", "rel_err": rel_err(got, cpu), "bound": bound,
                             "providers": s.get_providers()[0]})
                rows.append({"path": f"onnxruntime cuda {name}{' tf32' if tf32 else ''}", "batch": b,
                             "against": "onnxruntime cpu", "rel_err": rel_err(got, cpu_ort.astype(np.float64)),
                             "bound": bound})
    if not caps["ort-cuda"]:
        from export.artifact import read_manifest
        from export.fused import fused_noise

        m = read_manifest(ctx.exports["fused-fp32"])
        path = Path(m["path"])
        cpu_session, gpu_session = ort_session(path), _cuda_session(path, False)
        names = [i.name for i in cpu_session.get_inputs()]
        for b in BATCHES:
            feed = {"noise": fused_noise(list(range(b)), tuple(m["image_shape"]), m["noise_slots"]).numpy(),
                    "labels": (np.arange(b) % max(m.get("num_classes") or 1, 1)).astype(np.int64),
                    "w": np.zeros(b, np.float32)}
            feed = {k: v for k, v in feed.items() if k in names}
            ref = cpu_session.run(None, feed)[0].astype(np.float64)
            rows.append({"path": "onnxruntime cuda fused-fp32", "batch": b, "against": "onnxruntime cpu",
                         "rel_err": rel_err(gpu_session.run(None, feed)[0], ref), "bound": PARITY_BOUNDS["fused"]})
    for r in rows:
        r["pass"] = bool(np.isfinite(r["rel_err"]) and r["rel_err"] <= r["bound"])
        if not r["pass"]:
            failures.append(f"{r['path']} b{r['batch']} vs {r['against']}: {r['rel_err']:.2e} > {r['bound']}")
    skipped = [f"onnxruntime CUDA rows: {caps['ort-cuda']}"] if caps["ort-cuda"] else []
    return {"status": "FAIL" if failures else "PASS", "result": {"rows": rows, "failures": failures,
                                                                  "skipped": skipped}}


def fp16_time_path(ctx: Context) -> dict:
    """The time embedding's Sin/Cos inputs of the FP16 graph on the CUDA provider against the fp32 graph's."""
    import onnx

    from export.precision import _float_types

    def phases(path: Path, feed) -> list[np.ndarray]:
        model = onnx.load(str(path))
        types = _float_types(model)
        names = sorted({n.input[0] for n in model.graph.node if n.op_type in ("Sin", "Cos")})
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, 1), None) for n in names)
        tmp = ctx.out / f"phase-{path.parent.name}.onnx"
        onnx.save(model, str(tmp))
        try:
            return names, _cuda_session(tmp, False).run(names, feed)
        finally:
            tmp.unlink()

    feed = _trajectory_feed(ctx, 256)
    (names16, got), (names32, ref) = (phases(ctx.exports[k] / "model.onnx", feed) for k in ("fp16", "fp32"))
    if names16 != names32 or not names32:
        return {"status": "FAIL", "reason": f"the graphs' Sin/Cos inputs differ ({names16} against {names32})"}
    err = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(got, ref))
    return {"status": "PASS" if err <= 1e-3 else "FAIL", "result": {"max_phase_error_rad": err, "bound": 1e-3}}


def provider_truth(ctx: Context) -> dict:
    from export.artifact import read_manifest
    from export.backends.ort_backend import OrtBackend

    caps, result, failures = capabilities(), {}, []
    for backend, need in (("onnxruntime", "ort-cuda"), ("onnxruntime-trt", "ort-trt")):
        if caps[need]:
            result[backend] = f"SKIP: {caps[need]}"
            continue
        try:
            b = OrtBackend(read_manifest(ctx.exports["fp32"]), device=ctx.device,
                           tensorrt_ep=backend == "onnxruntime-trt")
            result[backend] = b.providers
        except Exception as e:  # noqa: BLE001  (the refusal is the finding)
            result[backend] = f"refused: {e}"
            failures.append(backend)
    return {"status": "FAIL" if failures else "PASS", "result": result}


# -- the CLI on the GPU --------------------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from distill.app.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


def sample_commands(ctx: Context) -> dict[str, list[str]]:
    caps = capabilities()
    seeds = "0-63"
    base = ["sample", ctx.model, "--seeds", seeds]
    out = {"cpu eager": [*base, "--out", str(ctx.out / "samples/cpu"), "--device", "cpu"]}
    for backend, need in (("eager", "cuda"), ("compile", "cuda"), ("onnxruntime", "ort-cuda"),
                          ("onnxruntime-trt", "ort-trt"), ("tensorrt", "tensorrt")):
        source = str(ctx.engines.get("fp32", ctx.out / "engines/fp32")) if backend == "tensorrt" else ctx.model
        out[f"cuda {backend}"] = ["sample", source, "--seeds", seeds, "--out", str(ctx.out / f"samples/{backend}"),
                                  "--device", ctx.device, "--backend", backend] + (
            [] if caps[need] is None else ["#SKIP", caps[need]])
    return out


def sample_eval(ctx: Context) -> dict:
    rows, failures = [], []
    for name, args in sample_commands(ctx).items():
        if "#SKIP" in args:
            rows.append({"path": name, "status": "SKIP", "reason": args[-1]})
            continue
        if name == "cuda tensorrt" and "fp32" not in ctx.engines:
            rows.append({"path": name, "status": "SKIP", "reason": "no engine was built (the TensorRT check)"})
            continue
        r = cli(*args)
        row = {"path": name, "command": "distill " + shlex.join(args), "returncode": r.returncode}
        if r.returncode:
            row.update(status="FAIL", reason=(r.stderr.strip().splitlines() or ["?"])[-1])
        else:
            folder = Path(args[args.index("--out") + 1])
            images = np.load(folder / "samples.npz")["images"].astype(int)
            if name == "cpu eager":
                ctx._cpu_images = images
                row["status"] = "PASS"
            elif getattr(ctx, "_cpu_images", None) is None:
                row.update(status="FAIL", reason="no CPU reference (the CPU sample failed)")
            else:
                diff = np.abs(images - ctx._cpu_images)
                row.update(max_uint8_diff=int(diff.max()), pixels_off=float((diff > 0).mean()),
                           status="PASS" if diff.max() <= 2 else "FAIL")
        rows.append(row)
        if row["status"] == "FAIL":
            failures.append(name)
    evals = {}
    for device in ("cpu", ctx.device):
        r = cli("eval", ctx.model, "--seeds", "0-999", "--device", device, "--metrics", "fd,acc", "--out",
                str(ctx.out / f"eval-{device.replace(':', '')}.json"))
        evals[device] = json.loads((ctx.out / f"eval-{device.replace(':', '')}.json").read_text()) \
            if r.returncode == 0 else {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    fd = {d: e.get("fd") for d, e in evals.items()}
    ok = all(v is not None for v in fd.values()) and abs(fd[ctx.device] - fd["cpu"]) <= 0.02 * fd["cpu"] + 1e-3
    if not ok:
        failures.append("eval")
    return {"status": "FAIL" if failures else "PASS", "result": {"samples": rows, "eval_fd": fd,
                                                                  "failures": failures}}


# -- latency ---------------------------------------------------------------------------------------------------

def latency(ctx: Context) -> dict:

    from distill.checkpoint import load_denoiser
    from export.artifact import read_manifest
    from export.backends.ort_backend import OrtBackend
    from export.backends.torch_backend import TorchBackend

    caps = capabilities()
    rows = []
    den = load_denoiser(ctx.model, ctx.device)
    shape = (den.net.config.in_channels, den.net.config.image_size, den.net.config.image_size)
    paths = [("torch eager fp32", lambda: TorchBackend(den, "eager", "fp32", ctx.device)),
             ("torch.compile reduce-overhead fp16", lambda: TorchBackend(den, "compile", "fp16", ctx.device)),
             ("torch.compile reduce-overhead bf16", lambda: TorchBackend(den, "compile", "bf16", ctx.device))]
    if not caps["ort-cuda"]:
        paths.append(("onnxruntime cuda fp32", lambda: OrtBackend(read_manifest(ctx.exports["fp32"]),
                                                                  device=ctx.device)))
    for name, make in paths:
        rows += _latency_rows(name, make(), shape, den.num_classes, ctx.device, den.metadata)
    return {"status": "PASS", "result": {"rows": rows, "skipped": [caps["ort-cuda"]] if caps["ort-cuda"] else []}}


def _latency_rows(name: str, backend, shape: tuple, num_classes: int, device: str, meta: dict) -> list[dict]:
    import torch

    from benchmarks.bench.speed import time_calls
    from distill.checkpoint import card_sampling
    from distill.denoiser import Cond
    from distill.samplers import generate, nfe

    sampler, steps, spacing, times = card_sampling(meta)  # the card's own sampler and grid (4 steps)
    evals = nfe(sampler, steps, backend.schedule, spacing)

    rows = []
    for b in (1, 64):
        x = torch.randn(b, *shape, device=device)
        t = torch.full((b,), 0.5, device=device)
        cond = Cond(torch.arange(b, device=device) % max(num_classes, 1))
        seeds = list(range(b))
        def one_eval(x=x, t=t, cond=cond):
            return backend(x, t, cond)

        def whole_sample(seeds=seeds, cond=cond):
            return generate(backend, shape, seeds, sampler=sampler, steps=steps, spacing=spacing, timesteps=times,
                            cond=cond, device=device)

        with torch.no_grad():
            # CUDA-event timing on a GPU (the benchmarks' own timer)
            one = time_calls(one_eval, repeats=50, warmup=10, device=device)
            whole = time_calls(whole_sample, repeats=10, warmup=3, device=device)
        rows.append({"path": name, "batch": b, "eval_ms": one["median_ms"], "sample_ms": whole["median_ms"],
                     "evaluations": evals, "sample_over_evals": whole["median_ms"] / (evals * one["median_ms"])})
    return rows


# -- bench -------------------------------------------------------------------------------------------------------

def bench_commands(ctx: Context) -> list[list[str]]:
    caps = capabilities()
    grid = ["--grid", GRID] if caps["ort-cuda"] is None else \
        ["--models", "mnist-4step,mnist-1step", "--backends", "eager,compile", "--precisions", "fp32,fp16,bf16"]
    out = str(ctx.out / "bench")
    return [["bench", "speed", *grid, "--device", ctx.device, "--out", out, "--rounds", "1", "--repeats", "20",
             "--max-seconds", "3"],
            ["bench", "quality", *grid, "--device", ctx.device, "--out", out, "--samples", "1000"],
            ["bench", "report", out]]


def bench(ctx: Context) -> dict:
    rows = []
    for args in bench_commands(ctx):
        r = cli(*args, timeout=max(30.0, ctx.left() - 20))
        rows.append({"command": "distill " + shlex.join(args), "returncode": r.returncode,
                     "last_line": (r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or [""])[-1]})
        if r.returncode:
            break
    return {"status": "PASS" if all(r["returncode"] == 0 for r in rows) else "FAIL", "result": rows}


# -- TensorRT ---------------------------------------------------------------------------------------------------

def tensorrt_block(ctx: Context) -> dict:
    import shutil

    import tensorrt as trt
    import torch

    from distill.errors import UsageError
    from export.artifact import read_manifest
    from export.backends import load_backend
    from export.onnx import ort_session, rel_err
    from export.tensorrt import BuildOptions, build_engine

    rows, failures = {}, []
    for name, export in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8-tensorrt"), ("fused", "fused-fp32")):
        folder = ctx.out / "engines" / name
        first = build_engine(ctx.exports[export], folder, BuildOptions(max_batch=256, tf32=False),
                             log=lambda *a: None)
        again = build_engine(ctx.exports[export], ctx.out / "engines" / f"{name}-again",
                             BuildOptions(max_batch=256, tf32=False,
                                          timing_cache=folder / "timing.cache"), log=lambda *a: None)
        ctx.engines[name] = folder
        backend = load_backend(folder, "tensorrt", device=ctx.device)
        engine = backend.engine
        io = {engine.get_tensor_name(i): str(engine.get_tensor_dtype(engine.get_tensor_name(i)))
              for i in range(engine.num_io_tensors)}
        row = {"io": io, "build_s": first["tensorrt"]["build_seconds"], "rebuild_s": again["tensorrt"]["build_seconds"],
               "timing_cache_reused": again["tensorrt"]["timing_cache_reused"]}
        if name != "fused":
            errs = {}
            session = ort_session(ctx.exports[export] / "model.onnx")
            for b in BATCHES:
                feed = _trajectory_feed(ctx, b)
                ref = session.run(None, feed)[0].astype(np.float64)
                got = backend._run([torch.from_numpy(feed[n]) for n in backend.input_names]).cpu().numpy()
                errs[f"b{b}"] = rel_err(got, ref)
            row["rel_err_vs_onnxruntime_cpu"] = errs
            bound = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}[name]
            if max(errs.values()) > bound:
                failures.append(f"{name} parity {max(errs.values()):.2e} > {bound}")
            lo, _, hi = engine.get_tensor_profile_shape("x_t", 0)
            row["out_of_profile_refused"] = not backend.context.set_input_shape("x_t", (hi[0] + 1, *hi[1:]))
            if not row["out_of_profile_refused"]:
                failures.append(f"{name}: a batch past the profile was accepted")
        try:
            inspector = engine.create_engine_inspector()
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
            layers = info.get("Layers", [])
            precisions = {}
            for layer in layers:
                for t in (layer.get("Outputs") or []) if isinstance(layer, dict) else []:
                    fmt = t.get("Format/Datatype", "?")
                    precisions[fmt] = precisions.get(fmt, 0) + 1
            row["layer_output_formats"] = precisions
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            row["layer_output_formats"] = f"inspector failed: {e}"
        rows[name] = row
        del backend
    tampered = ctx.out / "engines" / "tampered"
    shutil.rmtree(tampered, ignore_errors=True)
    shutil.copytree(ctx.engines["fp32"], tampered)
    m = json.loads((tampered / "manifest.json").read_text())
    m["files"]["model.engine"] = "0" * 64
    (tampered / "manifest.json").write_text(json.dumps(m))
    try:
        load_backend(tampered, "tensorrt", device=ctx.device)
        failures.append("a tampered manifest was accepted")
        rows["tampered_manifest"] = "accepted"
    except UsageError as e:
        rows["tampered_manifest"] = f"refused: {e}"
    del read_manifest
    return {"status": "FAIL" if failures else "PASS", "result": {"engines": rows, "failures": failures}}


CHECKS = [
    Check("environment", (), environment, "GPU, driver, compute capability, libraries, ONNX Runtime providers", 5),
    Check("exports", (), make_exports, "distill export onnx: fp32, fp16, int8 --int8-target tensorrt, --fused", 120),
    Check("parity", ("cuda",), parity, "torch cuda fp32 (TF32 off/on) vs torch cpu; ONNX Runtime CUDA fp32/fp16/"
          "int8 (TF32 off/on) vs torch and ONNX Runtime cpu; fused graph cuda vs cpu; batch 1/7/64/256", 60),
    Check("fp16-time-path", ("ort-cuda",), fp16_time_path, "the FP16 graph's Sin/Cos inputs on the CUDA provider "
          "against fp32's", 10),
    Check("providers", (), provider_truth, "the providers each ONNX Runtime session really got", 10),
    Check("tensorrt", ("cuda", "tensorrt"), tensorrt_block, "TensorRT engines (fp32, fp16, int8, fused): I/O, "
          "parity, out-of-profile refusal, timing cache reuse, tampered manifest, layer precisions", 150),
    Check("sample-eval", ("cuda",), sample_eval, "distill sample (64 seeds) on cpu and through every cuda backend; "
          "distill eval (1,000 samples) cpu against cuda", 90),
    Check("latency", ("cuda",), latency, "CUDA-event latency at batch 1 and 64 (eager, compile fp16/bf16, ONNX "
          "Runtime CUDA), a 4-step sample against 4 evaluations", 60),
    Check("bench", ("cuda",), bench, f"distill bench speed / quality / report on benchmarks/grids/{GRID}.yaml", 150),
]


_PARSE = """
import json, sys, warnings
import click
from distill.app.cli import cli

def parse(group, args, parent=None):
    ctx = group.make_context(group.name or "distill", list(args), parent=parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = [*ctx.protected_args, *ctx.args]
    name, cmd, rest = group.resolve_command(ctx, rest)
    if isinstance(cmd, click.Group):
        parse(cmd, rest, ctx)
    else:
        cmd.make_context(name, rest, parent=ctx)

for args in json.load(sys.stdin):
    try:
        parse(cli, args)
    except click.ClickException as e:
        sys.exit("the command 'distill " + " ".join(args) + "' does not parse: " + e.format_message())
"""


def dry_run_checks(ctx: Context) -> list[str]:
    """The plumbing a dry run checks without a GPU: the model, export options, the grid and every CLI command the
    run would issue (parsed by distill's own command line)."""
    from benchmarks.bench.grid import load_grid
    from export.backends import source_metadata

    done = [f"model {ctx.model}: {source_metadata(ctx.model)['card'].get('method', '?')} card"]
    for name, spec in EXPORTS.items():
        export_options(spec)
        done.append(f"export {name}: options valid")
    done.append(f"grid {GRID}: {len(load_grid(GRID).configs)} configurations")
    commands = [a for a in sample_commands(ctx).values() if "#SKIP" not in a] + bench_commands(ctx) + [
        ["eval", ctx.model, "--seeds", "0-999", "--device", "cpu", "--metrics", "fd,acc", "--out",
         str(ctx.out / "eval-cpu.json")]]
    (ctx.out / "bench").mkdir(parents=True, exist_ok=True)  # bench report's folder (bench speed makes it)
    # distill's command line parses each one in a child process (this script drives the CLI as a user does)
    r = subprocess.run([sys.executable, "-c", _PARSE], input=json.dumps(commands), capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise SystemExit(f"gpu_acceptance: {(r.stderr.strip().splitlines() or ['the parse check failed'])[-1]}")
    done += ["parses: distill " + shlex.join(args) for args in commands]
    return done


def run(ctx: Context) -> dict:
    caps = capabilities() if not ctx.dry_run else {k: (v or None) for k, v in capabilities().items()}
    results = []
    for check in CHECKS:
        missing = [f"{n}: {caps[n]}" for n in check.needs if caps.get(n)]
        entry: dict[str, Any] = {"name": check.name, "plan": check.plan}
        if ctx.dry_run:
            entry.update(status="DRY-RUN", would_skip=missing or None)
            print(f"[plan] {check.name}: {check.plan}" + (f"  (would SKIP: {'; '.join(missing)})" if missing else ""))
        elif missing:
            entry.update(status="SKIP", reason="; ".join(missing))
        elif ctx.left() < check.seconds:
            entry.update(status="SKIP", reason=f"out of time ({ctx.left():.0f} s left of {BUDGET_S} s, the check "
                                               f"takes about {check.seconds:.0f} s)")
        else:
            start = time.perf_counter()
            try:
                entry.update(check.run(ctx))
            except Exception as e:  # noqa: BLE001  (a failed check is a result, the others still run)
                entry.update(status="FAIL", reason=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=8))
            entry["seconds"] = round(time.perf_counter() - start, 1)
            print(f"[{entry['status']}] {check.name} ({entry['seconds']} s)"
                  + (f": {entry.get('reason')}" if entry.get("reason") else ""), flush=True)
        results.append(entry)
    record = {"dry_run": ctx.dry_run, "model": ctx.model, "device": ctx.device, "budget_s": BUDGET_S,
              "seconds": round(time.perf_counter() - ctx.start, 1), "capabilities": caps, "checks": results,
              "counts": {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP", "DRY-RUN")}}
    if ctx.dry_run:
        record["plumbing"] = dry_run_checks(ctx)
    return record


def summary(record: dict) -> str:
    lines = [f"# GPU acceptance{' (dry run)' if record['dry_run'] else ''}: {record['model']} on {record['device']}",
             "", f"{record['seconds']} s of a {record['budget_s']} s budget. Counts: "
             + ", ".join(f"{k} {v}" for k, v in record["counts"].items() if v), "",
             "| check | status | seconds | note |", "|---|---|---|---|"]
    for c in record["checks"]:
        note = c.get("reason") or (", ".join(c["would_skip"]) if c.get("would_skip") else "") or c["plan"]
        lines.append(f"| {c['name']} | {c['status']} | {c.get('seconds', '')} | {note} |")
    env = next((c for c in record["checks"] if c["name"] == "environment" and c.get("result")), None)
    if env:
        e = env["result"]
        lines += ["", f"Machine: {e.get('gpu', 'no GPU')} (compute {e.get('compute_capability')}, driver "
                      f"{e.get('driver')}, CUDA {e.get('torch_cuda')}); {e.get('cpu')}; ONNX Runtime providers "
                      f"{', '.join(e.get('onnxruntime_providers', []))}."]
    for c in record["checks"]:
        rows = (c.get("result") or {}).get("rows") if isinstance(c.get("result"), dict) else None
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {c['name']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                lines.append("| " + " | ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                               for k in cols) + " |")
    if record.get("plumbing"):
        lines += ["", "## Plumbing checked", ""] + [f"- {p}" for p in record["plumbing"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="mnist-4step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check its plumbing; run nothing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.out, args.model, args.device, args.dry_run)
    record = run(ctx)
    (args.out / "accept.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.out / "summary.md").write_text(summary(record))
    print(f"wrote {args.out / 'accept.json'} and summary.md: "
          + ", ".join(f"{k} {v}" for k, v in record["counts"].items() if v))
    return 1 if record["counts"]["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
