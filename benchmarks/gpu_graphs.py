"""The graphs of the GPU path before and after their fixes, on ONNX Runtime's CPU provider: parity, graph rules and
sample quality of the shipped 4-step student's FP16 and INT8 exports.

    python -m benchmarks.gpu_graphs                          # 2,500 samples per quality row (about 25 min on 2 cores)
    python -m benchmarks.gpu_graphs --samples 500 --out /tmp/gpu_graphs

Graphs (made in ``--workdir``, reused when present):
- ``fp16-before``: onnxconverter-common's converter alone on the FP32 graph (what ``distill export onnx --precision
  fp16`` wrote before: kept nodes reading fp16-rounded weights, fp32 -> fp16 -> fp32 round trips, one in front of the
  time embedding's Sin/Cos);
- ``fp16``: ``distill export onnx --precision fp16`` now (the kept path fp32, :func:`export.precision.to_fp16`);
- ``int8-tensorrt-before``: ONNX Runtime's static quantizer with the settings the TensorRT target used before (Q/DQ
  on layer outputs and on attention's matmuls, fp32 elsewhere);
- ``int8-tensorrt``: ``--int8-target tensorrt`` now (Q/DQ on weighted layers' inputs only, fp16 elsewhere);
- ``int8-cpu``: ``--int8-target cpu`` (unchanged), for reference.
Each row: relative error against torch fp32 at batch 1, 7, 64, 256 on the model's own trajectory inputs; the
time-embedding phase error (the Sin/Cos inputs against fp32); the FP16 and Q/DQ rule findings; domain FD and class
accuracy of ``--samples`` samples (seeds 0 ..., against real half A) with the ratio to torch fp32.

Writes ``<out>.json``, ``<out>.csv`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench.report import md_table
from benchmarks.bench.speed import machine_info
from benchmarks.evaluate import evaluate, write_json
from benchmarks.metrics import Quality
from distill.checkpoint import load_denoiser
from distill.data import load_dataset
from distill.denoiser import DenoiserGraph
from export.artifact import read_manifest, sha256, write_manifest
from export.backends import load_backend
from export.calibration import calibration_set, trajectory_inputs
from export.onnx import ExportOptions, export_onnx, ort_session, rel_err
from export.precision import (
    FP16_KEEP_OPS,
    QUANTIZED_OPS,
    Int8Options,
    _Reader,
    conditioning_nodes,
    fp16_violations,
    qdq_placement,
    qdq_violations,
    weight_qdq_nodes,
)

BATCHES = (1, 7, 64, 256)
CURRENT = {
    "fp32": ExportOptions(),
    "fp16": ExportOptions(precision="fp16"),
    "int8-tensorrt": ExportOptions(precision="int8", int8=Int8Options(target="tensorrt")),
    "int8-cpu": ExportOptions(precision="int8", int8=Int8Options(target="cpu")),
}


def _like(folder: Path, fp32: Path, precision: str, record: dict) -> None:
    """An export folder for a graph made here (``folder/model.onnx``): the fp32 export's manifest, marked."""
    m = read_manifest(fp32)
    m.pop("path", None)
    m.update({"precision": precision, "target": "tensorrt" if precision == "int8" else "any", **record,
              "command": "python -m benchmarks.gpu_graphs (the earlier graph, reproduced)"})
    m["files"] = {"model.onnx": sha256(folder / "model.onnx")}
    write_manifest(folder, m)


def fp16_before(fp32: Path, folder: Path) -> None:
    import warnings

    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(fp32 / "model.onnx"))
    ops = sorted(set(FP16_KEEP_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=ops,
                                                node_block_list=conditioning_nodes(model, "x_t"))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(folder / "model.onnx"))
    _like(folder, fp32, "fp16", {"fp16": {"converter": "onnxconverter_common alone (before)"}})


def int8_tensorrt_before(model: str, fp32: Path, folder: Path, samples: int = 64) -> None:
    """The TensorRT target's graph as ``export.precision.to_int8`` made it before (same calibration set)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from export.precision import DEFAULT_EXCLUDE, excluded_nodes

    m = read_manifest(fp32)
    den = load_denoiser(model).float()
    calib = calibration_set(den, "trajectory", samples, labels=m["labels"], guided=m["guided"])
    folder.mkdir(parents=True, exist_ok=True)
    exclude = excluded_nodes(onnx.load(str(fp32 / "model.onnx")), DEFAULT_EXCLUDE)
    quantize_static(str(fp32 / "model.onnx"), str(folder / "model.onnx"), _Reader(calib),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=exclude,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"QuantizeBias": False, "DedicatedQDQPair": False,
                                   "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
                                   "WeightSymmetric": True, "ActivationSymmetric": True, "AddQDQPairToWeight": True})
    for extra in folder.glob("augmented*"):
        extra.unlink()
    _like(folder, fp32, "int8", {"int8": {"target": "tensorrt", "high_precision": "fp32",
                                          "quantizer": "onnxruntime quantize_static (settings before)"}})


def make_graphs(model: str, workdir: Path) -> dict[str, Path]:
    out = {}
    for name, opts in CURRENT.items():
        folder = workdir / name
        if not (folder / "manifest.json").is_file():
            print(f"export {name} ...", flush=True)
            export_onnx(model, folder, opts, command="python -m benchmarks.gpu_graphs", log=lambda *a: None)
        out[name] = folder
    for name, make in (("fp16-before", lambda f: fp16_before(workdir / "fp32", f)),
                       ("int8-tensorrt-before", lambda f: int8_tensorrt_before(model, workdir / "fp32", f))):
        folder = workdir / name
        if not (folder / "manifest.json").is_file():
            print(f"make {name} ...", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
        out[name] = folder
    return out


def phase_error(path: Path, ref_path: Path, feed: dict) -> float | None:
    """Largest absolute difference of the Sin/Cos inputs (the time embedding's phase, in radians) against the
    fp32 graph's, on the same inputs (None when the graph has no Sin/Cos)."""
    import onnx

    def sin_inputs(p):
        from export.precision import _float_types

        model = onnx.load(str(p))
        types = _float_types(model)
        phase = sorted({n.input[0] for n in model.graph.node if n.op_type in ("Sin", "Cos")})
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
                                  for n in phase)
        tmp = Path(p).with_suffix(".phase.onnx")
        onnx.save(model, str(tmp))
        try:
            outs = ort_session(tmp).run(phase, feed)
        finally:
            tmp.unlink()
        return [o.astype(np.float64) for o in outs]

    got, ref = sin_inputs(path), sin_inputs(ref_path)
    if not ref:
        return None
    return float(max(np.abs(g - r).max() for g, r in zip(got, ref)))


def graph_rows(model: str, graphs: dict[str, Path]) -> list[dict]:
    import onnx

    den = load_denoiser(model).float()
    m32 = read_manifest(graphs["fp32"])
    g = DenoiserGraph(den, labels=m32["labels"], guided=m32["guided"]).eval()
    rows_in = trajectory_inputs(den, 64, labels=m32["labels"], guided=m32["guided"], seed=4_000_000)
    rows = []
    for name, folder in graphs.items():
        path = folder / "model.onnx"
        graph = onnx.load(str(path))
        session = ort_session(path)
        row = {"config": name}
        for b in BATCHES:
            feed = rows_in.spread(b)
            with torch.no_grad():
                ref = g(*[torch.from_numpy(feed[n]) for n in g.input_names]).numpy().astype(np.float64)
            row[f"rel_err_b{b}"] = rel_err(session.run(None, feed)[0], ref)
        row["phase_err_rad"] = phase_error(path, graphs["fp32"] / "model.onnx", rows_in.spread(256))
        m = read_manifest(folder)
        kept = (m.get("fp16") or (m.get("int8") or {}).get("fp16") or {}).get("fp32_nodes")
        if kept is None and name != "fp32":  # the 'before' graphs: the nodes the manifest said were kept
            kept = read_manifest(graphs["fp16"])["fp16"]["fp32_nodes"]
        f16 = fp16_violations(graph, "x_t", kept or []) if name != "fp32" and "cpu" not in name else []
        row.update({"fp16_round_trips": sum("round trip" in v for v in f16),
                    "fp16_weights_in_kept": sum("reads the fp16 weight" in v for v in f16),
                    "fp16_on_time_path": sum("conditioning path" in v for v in f16)})
        if "int8" in name:
            from export.precision import _float_types

            types = _float_types(graph)
            weight_q = weight_qdq_nodes(graph)
            placement = qdq_placement(graph)
            row.update({"qdq_rule_violations": len(qdq_violations(graph, folder)),
                        "activation_quantizers": sum(n.op_type == "QuantizeLinear" and n.name not in weight_q
                                                     for n in graph.graph.node),
                        "output_quantizers": sum("not a weighted layer's input" in v for v in placement),
                        "attention_quantized": sum("attention" in v for v in placement),
                        "fp16_compute_nodes": sum(1 for n in graph.graph.node if n.op_type in QUANTIZED_OPS
                                                  and types.get(n.input[0]) == onnx.TensorProto.FLOAT16)})
        rows.append(row)
        print(f"graph {name}: rel_err b64 {row['rel_err_b64']:.3g}, phase {row['phase_err_rad']}", flush=True)
    return rows


def quality_rows(model: str, graphs: dict[str, Path], samples: int, batch: int) -> list[dict]:
    quality = Quality(load_dataset("mnist"), ref="A", metrics=("fd", "acc"), progress=False)
    seeds = list(range(samples))
    rows = []
    for name, make in [("torch-fp32", lambda: load_backend(model))] + [
            (n, lambda n=n: load_backend(graphs[n])) for n in graphs if n != "fp32"]:
        start = time.perf_counter()
        r = evaluate(name, data_spec="mnist", quality=quality, denoiser=make(), seeds=seeds, batch_size=batch,
                     progress=False)
        rows.append({"config": name, "fd": r["fd"], "acc": r.get("acc"),
                     "sample_seconds": round(time.perf_counter() - start, 1)})
        print(f"quality {name}: FD {r['fd']:.4g}", flush=True)
    for r in rows:
        r["fd_ratio"] = r["fd"] / rows[0]["fd"]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-4step")
    ap.add_argument("--samples", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--workdir", type=Path, default=Path("runs/gpu_graphs"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_graphs"))
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    graphs = make_graphs(args.model, args.workdir)
    g_rows = graph_rows(args.model, graphs)
    q_rows = [] if args.skip_quality else quality_rows(args.model, graphs, args.samples, args.batch)
    machine = machine_info()
    record = {"model": args.model, "samples": args.samples, "machine": machine, "graphs": g_rows,
              "quality": q_rows, "command": "python -m benchmarks.gpu_graphs"
              + ("" if args.samples == 2500 else f" --samples {args.samples}")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), record)
    table = pd.DataFrame(g_rows)
    if q_rows:
        table = table.merge(pd.DataFrame(q_rows), on="config", how="outer")
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    lines = [f"# FP16 and INT8 graphs of the GPU path, before and after: {args.model}", "",
             f"Machine: {machine.get('cpu')} ({machine.get('threads')} threads), ONNX Runtime CPU provider. "
             f"Reproduce: `{record['command']}`", "",
             "## Parity and graph rules", "",
             "Relative error against torch fp32 on the model's own trajectory inputs; phase error: largest |Sin/Cos "
             "input - fp32's| (radians, batch 256).", "",
             md_table(pd.DataFrame(g_rows), list(pd.DataFrame(g_rows).columns)), ""]
    if q_rows:
        lines += [f"## Quality ({args.samples} samples, domain FD against real half A)", "",
                  md_table(pd.DataFrame(q_rows), list(q_rows[0])), ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(json.dumps({"wrote": str(args.out.with_suffix(".md"))}))


if __name__ == "__main__":
    main()
