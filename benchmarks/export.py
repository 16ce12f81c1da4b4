"""Export and deployment backends: parity, INT8 quality, and CPU speed per network evaluation, in one run.

    python -m benchmarks.export                      # the shipped 4-step student, 2,500 samples per quality row
    python -m benchmarks.export --samples 500 --repeats 10 --out /tmp/export

1. Exports of ``--model`` (``distill export onnx``) into ``--workdir``: FP32, FP16, the fused few-step sampler, and
   INT8 for the CPU (trajectory, random and step-percentile calibration) and for TensorRT (trajectory).
2. Parity, from each export's own check: FP32 and FP16 against torch at batch 1, 7, 64 on trajectory inputs; the
   fused graph against the Python sampling loop on the same noise.
3. Quality: domain FD and class accuracy of ``--samples`` samples (seeds 0 ..., against real half A) of torch FP32
   and each INT8 graph (run on ONNX Runtime's CPU provider), with the FD ratio to FP32.
4. Speed per network evaluation at batch 1 and 64 (median, p10, p90 of ``--repeats`` timed calls after warm-up, one
   backend alive at a time so that no idle thread pool competes): torch eager fp32 and bf16 autocast,
   torch.compile (inductor, freezing) fp32 and bf16, ONNX Runtime fp32 / fp16 / INT8 (both targets). Also a whole
   4-step sample: the fused graph against the Python loop over the per-step graph. Each path's achieved GFLOP/s is
   set against this CPU's measured matrix peak (a large fp32 and bf16 torch matmul, an int8 ONNX Runtime MatMul).

Writes ``<out>.csv`` (every row), ``<out>.json`` (rows, goals, machine) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench.speed import isolated, machine_info, time_calls
from benchmarks.evaluate import evaluate, write_json
from benchmarks.metrics import Quality
from distill.checkpoint import atomic_write, load_denoiser
from distill.data import load_dataset
from distill.denoiser import Cond, DenoiserGraph
from export.artifact import read_manifest
from export.backends import load_backend
from export.calibration import trajectory_inputs
from export.onnx import ExportOptions, export_onnx, ort_session
from export.precision import Int8Options

EXPORTS = {
    "fp32": ExportOptions(),
    "fp16": ExportOptions(precision="fp16"),
    "fused-fp32": ExportOptions(fused=True),
    "int8-cpu-trajectory": ExportOptions(precision="int8", int8=Int8Options(target="cpu", calibration="trajectory")),
    "int8-cpu-random": ExportOptions(precision="int8", int8=Int8Options(target="cpu", calibration="random")),
    "int8-cpu-step-percentile": ExportOptions(precision="int8", int8=Int8Options(
        target="cpu", calibration="trajectory", method="step-percentile")),
    "int8-tensorrt-trajectory": ExportOptions(precision="int8", int8=Int8Options(target="tensorrt")),
    "fused-int8-cpu": ExportOptions(fused=True, precision="int8", int8=Int8Options(target="cpu")),
    "fused-int8-cpu-minmax": ExportOptions(fused=True, precision="int8", int8=Int8Options(target="cpu",
                                                                                          method="minmax")),
    "fused-int8-cpu-last-float": ExportOptions(fused=True, precision="int8", int8=Int8Options(
        target="cpu", float_steps=(4,))),
}
# Model Optimizer's graphs, made in their own environment by benchmarks/modelopt_int8.py, scored when present.
MODELOPT = ("modelopt-int8", "modelopt-int8-fp32")
BATCHES = (1, 64)
INT8_FD_BOUND = 1.05  # the INT8 student's FD at most 5 % above its FP32 FD


def make_exports(model: str, workdir: Path, names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        folder = workdir / name
        if (folder / "manifest.json").is_file() and read_manifest(folder)["source"]["model"] == model:
            out[name] = read_manifest(folder)
            continue
        print(f"export {name} ...", flush=True)
        out[name] = export_onnx(model, folder, EXPORTS[name], command="python -m benchmarks.export",
                                log=lambda *a: None)
        out[name]["path"] = str(folder / "model.onnx")
    return out


def parity_rows(manifests: dict[str, dict]) -> list[dict]:
    rows = []
    for name, m in manifests.items():
        p = m["parity"]
        for batch, v in p["batches"].items():
            rows.append({"section": "parity", "config": name, "batch": int(batch[1:]), "against": p["against"],
                         "rel_err": v["rel_err"], "bound": p["tolerance"],
                         "pass": bool(v["finite"] and (p["tolerance"] is None or v["rel_err"] <= p["tolerance"]))})
    return rows


def quality_rows(model: str, workdir: Path, names: list[str], samples: int, batch: int) -> list[dict]:
    quality = Quality(load_dataset("mnist"), ref="A", metrics=("fd", "acc"), progress=False)
    seeds = list(range(samples))
    rows = []
    configs = [("torch-fp32", lambda: load_backend(model))] + [
        (n, lambda n=n: load_backend(workdir / n)) for n in names if "int8" in n] + [
        (n, lambda n=n: load_backend(workdir / n)) for n in MODELOPT if (workdir / n / "manifest.json").is_file()]
    for name, make in configs:
        backend = make()
        start = time.perf_counter()
        r = evaluate(name, data_spec="mnist", quality=quality, denoiser=backend, seeds=seeds, batch_size=batch,
                     progress=False)
        i8 = getattr(backend, "manifest", {}).get("int8") or {}
        how = "torch fp32" if name == "torch-fp32" else (
            f"{i8.get('quantizer', '')}; high precision {i8.get('high_precision_dtype', 'fp32')}"
            if name.startswith("modelopt") else
            f"{i8.get('target')} target, {i8.get('calibration')} calibration ({i8.get('method_used')}, "
            f"{i8.get('calibration_set', {}).get('trajectories', i8.get('samples'))} trajectories), "
            f"{'per-step ranges (fused)' if i8.get('calibration_set', {}).get('fused') else 'one range per tensor'}"
            + (f", steps {i8.get('float_steps')} in float" if i8.get("float_steps") else ""))
        rows.append({"section": "quality", "config": name, "how": how, "n_fake": samples, "fd": r["fd"],
                     "acc": r.get("acc"), "sample_seconds": round(time.perf_counter() - start, 1)})
        print(f"quality {name}: FD {r['fd']:.4g}", flush=True)
        del backend
        gc.collect()
    ref = rows[0]["fd"]
    for r in rows:
        r["fd_ratio"] = r["fd"] / ref
    return rows


def timed(fn, repeats: int, warmup: int = 3) -> dict:
    return time_calls(fn, repeats=repeats, warmup=warmup)


def network_flops(den) -> int:
    """FLOPs of one network evaluation at batch 1 (torch's counter: 2 per multiply-add in conv / matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    graph = DenoiserGraph(den, labels=den.num_classes > 0).eval()
    inputs = graph.example_inputs(1, den.image_shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(*inputs)
    return counter.get_total_flops()


def matrix_peaks(repeats: int) -> dict:
    """This CPU's measured matrix throughput (GFLOP/s; int8: GOP/s) at the benchmark's thread count."""
    import onnx
    from onnx import TensorProto, helper

    out = {}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = timed(lambda a=a, b=b: a @ b, repeats)["median_ms"]
        out[f"torch_{name}_gflops"] = 2 * n**3 / t / 1e6
    # int8: ONNX Runtime's MatMulInteger (u8 x s8 -> s32), the kernel family its QLinear ops use
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    path = Path("/tmp/distill-int8-peak.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    session = ort_session(path, threads=torch.get_num_threads())
    feed = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8), "b": np.random.randint(-127, 127, (n, n),
                                                                                           dtype=np.int8)}
    t = timed(lambda: session.run(None, feed), repeats)["median_ms"]
    out["ort_int8_gops"] = 2 * n**3 / t / 1e6
    return out


def _speed_one(source: str, backend: str, precision: str, label: str, repeats: int, flops: int, threads: int,
               model: str) -> list[dict]:
    torch.set_num_threads(threads)
    den = load_denoiser(model)
    calib = trajectory_inputs(den, 16, labels=den.num_classes > 0, guided=False, seed=5_000_000)
    f = load_backend(source, backend, precision=precision)
    rows = []
    for b in BATCHES:
        feed = calib.spread(b)
        x, t = torch.from_numpy(feed["x_t"]), torch.from_numpy(feed["t"])
        cond = Cond(torch.from_numpy(feed["labels"])) if "labels" in feed else None
        start = time.perf_counter()
        f(x, t, cond)  # first call: compiles where the backend compiles
        first = time.perf_counter() - start
        r = timed(lambda x=x, t=t, cond=cond: f(x, t, cond), repeats)
        rows.append({"section": "speed", "config": label, "backend": label.rsplit(" ", 1)[0] if "onnxruntime" not in
                     label else "onnxruntime", "precision": precision, "batch": b, **r,
                     "first_call_s": round(first, 2), "gflops": flops * b / r["median_ms"] / 1e6})
    return rows


def speed_rows(model: str, workdir: Path, repeats: int, flops: int) -> list[dict]:
    """Per network evaluation, each path in its own process (see :func:`isolated`)."""
    threads = torch.get_num_threads()
    paths = [(model, "eager", "fp32", "torch eager fp32"), (model, "eager", "bf16", "torch eager bf16"),
             (model, "compile", "fp32", "torch.compile (freezing) fp32"),
             (model, "compile", "bf16", "torch.compile (freezing) bf16"),
             (str(workdir / "fp32"), None, "fp32", "onnxruntime fp32"),
             (str(workdir / "fp16"), None, "fp32", "onnxruntime fp16"),
             (str(workdir / "int8-cpu-trajectory"), None, "fp32", "onnxruntime cpu int8"),
             (str(workdir / "int8-tensorrt-trajectory"), None, "fp32", "onnxruntime tensorrt int8")]
    rows = []
    for source, backend, precision, label in paths:
        got = isolated(_speed_one, source, backend, precision, label, repeats, flops, threads, model)
        for r in got:
            if label.startswith("onnxruntime"):
                r["precision"] = label.split(" ", 1)[1]
            print(f"speed {label} b{r['batch']}: {r['median_ms']:.2f} ms", flush=True)
        rows += got
    return rows


def op_profile(path: Path, feed: dict[str, np.ndarray], runs: int = 10) -> dict[str, float]:
    """ONNX Runtime's own profile of ``runs`` calls: milliseconds per call spent in each op type (top 10 + rest)."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, torch.get_num_threads()
    options.profile_file_prefix = "/tmp/distill-ort-profile"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    file = session.end_profiling()
    events = json.loads(Path(file).read_text())
    os.remove(file)
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1000 / runs
    top = dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:10])
    top["(other)"] = sum(per_op.values()) - sum(top.values())
    return {k: round(v, 2) for k, v in top.items()}


def _sample_one(source: str, backend: str | None, precision: str, fused: bool, repeats: int, threads: int,
                timing: dict) -> list[dict]:
    from distill.samplers import generate

    torch.set_num_threads(threads)
    f = load_backend(source, backend, precision=precision)
    rows = []
    for b in BATCHES:
        seeds, cond = list(range(b)), Cond(torch.arange(b) % 10)
        if fused:
            r = timed(lambda s=seeds, c=cond: f.sample(s, c), repeats)
        else:
            r = timed(lambda s=seeds, c=cond: generate(f, f.image_shape, s, cond=c, **timing), repeats)
        rows.append({"section": "sample", "batch": b, "steps": timing["steps"], **r,
                     "images_per_s": b / r["median_ms"] * 1000})
    return rows


def sample_rows(model: str, workdir: Path, repeats: int) -> list[dict]:
    """A whole few-step sample: the fused graph (one call) against the Python loop over the per-step graph, each
    in its own process."""
    m = read_manifest(workdir / "fused-fp32")
    timing = {"sampler": m["sampler"], "steps": m["steps"], "timesteps": m["timesteps"]}
    configs = [("onnxruntime fp32 fused graph (one call)", workdir / "fused-fp32", None, "fp32", True),
               ("onnxruntime fp32 python loop over the per-step graph", workdir / "fp32", None, "fp32", False),
               ("onnxruntime cpu int8 fused graph (one call)", workdir / "fused-int8-cpu", None, "fp32", True),
               ("onnxruntime cpu int8 fused graph, last step float", workdir / "fused-int8-cpu-last-float", None,
                "fp32", True),
               ("onnxruntime cpu int8 python loop over the per-step graph", workdir / "int8-cpu-trajectory", None,
                "fp32", False),
               ("torch.compile (freezing) bf16 python loop", model, "compile", "bf16", False),
               ("torch eager fp32 python loop", model, "eager", "fp32", False)]
    rows = []
    for name, source, backend, precision, fused in configs:
        for r in isolated(_sample_one, str(source), backend, precision, fused, repeats, torch.get_num_threads(),
                          timing):
            r["config"] = name
            rows.append(r)
            print(f"sample {name} b{r['batch']}: {r['median_ms']:.1f} ms", flush=True)
    return rows


def goals(rows: pd.DataFrame) -> list[dict]:
    speed = rows[rows.section == "speed"]
    out = []

    def ms(config: str, b: int) -> float | None:
        v = speed[(speed.config == config) & (speed.batch == b)].median_ms
        return float(v.iloc[0]) if len(v) else None

    exported = speed[speed.backend == "onnxruntime"]
    for b in BATCHES:
        base = ms("torch.compile (freezing) bf16", b)
        best = exported[exported.batch == b].sort_values("median_ms").iloc[0]
        out.append({"goal": f"best exported path >= 2x torch.compile+bf16 at batch {b}",
                    "value": f"{best.config}: {base / best.median_ms:.2f}x ({best.median_ms:.2f} vs {base:.2f} ms)",
                    "met": bool(base / best.median_ms >= 2)})
    fp32, int8 = ms("onnxruntime fp32", 64), ms("onnxruntime cpu int8", 64)
    if fp32 and int8:
        out.append({"goal": "CPU INT8 graph >= 1.5x the FP32 graph at batch 64",
                    "value": f"{fp32 / int8:.2f}x ({int8:.1f} vs {fp32:.1f} ms)", "met": bool(fp32 / int8 >= 1.5)})
    q = rows[rows.section == "quality"].set_index("config")
    for name in ("int8-cpu-trajectory", "fused-int8-cpu", "fused-int8-cpu-minmax", "fused-int8-cpu-last-float"):
        if name in q.index:
            ratio = float(q.loc[name, "fd_ratio"])
            out.append({"goal": f"INT8 FD <= 1.05x FP32 FD ({name})", "value": f"{ratio:.3f}x",
                        "met": ratio <= INT8_FD_BOUND})
    if {"int8-cpu-trajectory", "int8-cpu-random"} <= set(q.index):
        traj, rand = float(q.loc["int8-cpu-trajectory", "fd"]), float(q.loc["int8-cpu-random", "fd"])
        out.append({"goal": "trajectory calibration better than random-input calibration (FD)",
                    "value": f"{traj:.4g} vs {rand:.4g}", "met": traj < rand})
    par = rows[rows.section == "parity"]
    out.append({"goal": "parity: FP32 <= 1e-5, FP16 <= 1e-2 (batch 1/7/64), fused = loop <= 1e-4",
                "value": ", ".join(f"{c} {g.rel_err.max():.1e}" for c, g in par[par.bound.notna()].groupby("config")),
                "met": bool(par[par.bound.notna()]["pass"].all())})
    return out


def limits(meta: dict) -> list[str]:
    """What bounds the CPU INT8 graph at batch 64, from its op profile and the measured int8 peak."""
    prof = (meta.get("op_profile_b64_ms") or {}).get("int8-cpu-trajectory")
    if not prof:
        return []
    total = sum(prof.values())
    conv = prof.get("QLinearConv", 0.0) + prof.get("QLinearMatMul", 0.0)
    work = meta["flops_per_image"] * 64 / 1e9
    return [f"The INT8 graph at batch 64 (ONNX Runtime's profile): its quantized convolutions and matmuls take "
            f"{conv:.1f} ms of {total:.1f} ms ({100 * conv / total:.0f} %; the whole network is {work:.1f} GFLOP, "
            f"{work / total * 1e3:.0f} GOP/s overall against the int8 matrix peak of "
            f"{meta['peaks']['ort_int8_gops']:.0f} measured in the same run). "
            f"The other {total - conv:.1f} ms ({100 * (total - conv) / total:.0f} %) are "
            "float ops the quantizer leaves alone, mostly memory-bound: GroupNorm (InstanceNormalization), SiLU, the "
            "residual adds and scales, and the NCHW/NHWC Transposes ONNX Runtime puts around each QLinearConv "
            "(its int8 convolution is NHWC; GroupNorm blocks the transposes from cancelling), and the float "
            "convolutions left out of INT8. torch.compile fuses the elementwise ops into its bf16 kernels, which "
            "is why it wins at batch 64 on this CPU."]


def markdown(df: pd.DataFrame, meta: dict, goal_rows: list[dict]) -> str:
    def table(frame: pd.DataFrame, cols: list[str]) -> str:
        frame = frame[[c for c in cols if c in frame]]
        head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"

        def cell(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        return head + "\n".join("| " + " | ".join(cell(v) for v in r) + " |" for r in frame.itertuples(index=False))

    peaks = meta["peaks"]
    lines = [f"# Export and backends: {meta['model']} on {meta['machine']['cpu']} ({meta['threads']} threads)", "",
             f"Reproduce: `{meta['command']}`", "", "## Goals", "",
             table(pd.DataFrame(goal_rows), ["goal", "value", "met"]), "",
             "## Parity (relative error against torch fp32, or the Python loop for the fused graph)", "",
             table(df[df.section == "parity"], ["config", "batch", "against", "rel_err", "bound", "pass"]), "",
             f"## Quality ({meta['samples']} samples, domain FD against real half A; INT8 on ONNX Runtime CPU)", "",
             table(df[df.section == "quality"], ["config", "how", "fd", "fd_ratio", "acc", "sample_seconds"]), "",
             "## Speed per network evaluation (ms)", "",
             table(df[df.section == "speed"], ["config", "batch", "median_ms", "p10_ms", "p90_ms", "gflops",
                                               "first_call_s"]), "",
             f"One evaluation is {meta['flops_per_image'] / 1e6:.1f} MFLOP per image. Measured matrix peaks here: "
             f"fp32 {peaks['torch_fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['torch_bf16_gflops']:.0f} GFLOP/s "
             f"(torch matmul 2048²), int8 {peaks['ort_int8_gops']:.0f} GOP/s (ONNX Runtime MatMulInteger 2048²).", "",
             "## A whole sample (ms)", "",
             table(df[df.section == "sample"], ["config", "batch", "steps", "median_ms", "p10_ms", "p90_ms",
                                                "images_per_s"]), ""]
    lines += [f"- {n}" for n in limits(meta)] + [""]
    prof = meta.get("op_profile_b64_ms") or {}
    if prof:
        lines += ["## Where the time goes at batch 64 (ONNX Runtime's profile, ms per call by op type)", ""]
        for name, ops in prof.items():
            lines.append(f"- {name}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in ops.items()))
        lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist-4step")
    parser.add_argument("--samples", type=int, default=2500, help="Samples per quality row.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed calls per speed row.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/exports"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export"))
    parser.add_argument("--skip", default="", help="Comma-separated sections to skip: quality, speed, sample.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite <out>.md from <out>.json.")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        df = pd.DataFrame(saved["rows"])
        text = markdown(df, saved["meta"], goals(df))
        atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
        return df
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    names = list(EXPORTS)
    manifests = make_exports(args.model, args.workdir, names)
    rows = parity_rows(manifests)
    if "quality" not in skip:
        rows += quality_rows(args.model, args.workdir, names, args.samples, batch=250)
    den = load_denoiser(args.model)
    flops = network_flops(den)
    peaks = matrix_peaks(10)
    if "speed" not in skip:
        rows += speed_rows(args.model, args.workdir, args.repeats, flops)
    if "sample" not in skip:
        rows += sample_rows(args.model, args.workdir, args.repeats)
    feed = trajectory_inputs(den, 16, labels=den.num_classes > 0, guided=False, seed=5_000_000).spread(64)
    profiles = {n: isolated(op_profile, Path(manifests[n]["path"]), feed) for n in ("fp32", "int8-cpu-trajectory")}
    df = pd.DataFrame(rows)
    goal_rows = goals(df)
    meta = {"model": args.model, "samples": args.samples, "repeats": args.repeats, "threads": args.threads,
            "flops_per_image": flops, "peaks": peaks, "op_profile_b64_ms": profiles,
            "machine": {"cpu": machine_info()["cpu"], "torch": torch.__version__,
                        **manifests["fp32"]["versions"]},
            "command": "python -m benchmarks.export" + (f" --samples {args.samples}" if args.samples != 2500 else ""),
            "exports": {n: {k: m.get(k) for k in ("precision", "target", "kind", "int8", "fp16")}
                        for n, m in manifests.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))
    write_json(args.out.with_suffix(".json"), {"meta": meta, "goals": goal_rows, "rows": rows})
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(df, meta, goal_rows)))
    print(json.dumps(goal_rows, indent=1))
    return df


if __name__ == "__main__":
    main()
