"""NVIDIA Model Optimizer's ONNX INT8 PTQ on our FP32 export, for comparison with ours (``benchmarks/export.py``).

``nvidia-modelopt[onnx]`` pulls onnxruntime-gpu (and a CUDA torch), which clashes with the CPU onnxruntime, so it
lives in its own environment; the two halves talk through files:

    python -m benchmarks.modelopt_int8 dump --export runs/exports/fp32 --calib /tmp/calib.npz
    /tmp/mo/bin/python -m benchmarks.modelopt_int8 quantize --export runs/exports/fp32 --calib /tmp/calib.npz \\
        --out runs/exports/modelopt-int8 [--fp32-elsewhere] [--our-excludes]
    python -m benchmarks.export ...   # scores runs/exports/modelopt-* beside ours when present

``dump`` writes the same trajectory calibration set our INT8 export uses (64 trajectories of the model's own
sampler); ``quantize`` runs ``modelopt.onnx.quantization.quantize`` on it with the CPU execution provider and writes
an export folder (the FP32 export's manifest, marked int8 / modelopt) that every backend can load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def dump(export: Path, calib: Path, samples: int) -> None:
    from distill.checkpoint import load_denoiser
    from export.artifact import read_manifest
    from export.calibration import trajectory_inputs

    m = read_manifest(export)
    den = load_denoiser(m["source"]["model"])
    c = trajectory_inputs(den, samples, labels=m["labels"], guided=m["guided"])
    np.savez(calib, **c.inputs)
    print(f"wrote {calib}: {len(c)} inputs")


def quantize(export: Path, calib: Path, out: Path, fp32_elsewhere: bool, our_excludes: bool) -> None:
    import onnx
    from modelopt.onnx.quantization import quantize as mo_quantize

    manifest = json.loads((export / "manifest.json").read_text())
    data = dict(np.load(calib))
    excludes = None
    if our_excludes:
        import fnmatch

        patterns = ("time_mlp.", "guidance_mlp.", ".emb.", "conv_in.", "conv_out.", ".skip.")
        model = onnx.load(str(export / "model.onnx"))
        inits = {i.name for i in model.graph.initializer}
        excludes = [n.name for n in model.graph.node if any(
            fnmatch.fnmatch(i, f"*{p}*") for i in n.input if i in inits for p in patterns)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    mo_quantize(onnx_path=str(export / "model.onnx"), quantize_mode="int8", calibration_data=data,
                calibration_eps=["cpu"], output_path=str(tmp / "model.onnx"), nodes_to_exclude=excludes,
                high_precision_dtype="fp32" if fp32_elsewhere else "fp16", log_level="WARNING")
    seconds = time.perf_counter() - start
    quantized = onnx.load(str(tmp / "model.onnx"))
    qnodes = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    import modelopt

    manifest.update({"precision": "int8", "target": "tensorrt", "int8": {
        "quantizer": f"modelopt.onnx.quantization.quantize (nvidia-modelopt {modelopt.__version__})",
        "calibration_eps": ["cpu"], "calibration_inputs": int(len(next(iter(data.values())))),
        "high_precision_dtype": "fp32" if fp32_elsewhere else "fp16", "nodes_to_exclude": excludes,
        "QuantizeLinear_nodes": qnodes, "seconds": round(seconds, 1)}})
    manifest.pop("parity", None)
    manifest["files"] = {"model.onnx": None}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}: {qnodes} QuantizeLinear nodes, {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dump", "quantize"])
    parser.add_argument("--export", type=Path, default=Path("runs/exports/fp32"))
    parser.add_argument("--calib", type=Path, default=Path("/tmp/distill-calib.npz"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/exports/modelopt-int8"))
    parser.add_argument("--fp32-elsewhere", action="store_true", help="high_precision_dtype fp32 (default fp16)")
    parser.add_argument("--our-excludes", action="store_true", help="exclude the layers our export excludes")
    args = parser.parse_args()
    if args.what == "dump":
        dump(args.export, args.calib, args.samples)
    else:
        quantize(args.export, args.calib, args.out, args.fp32_elsewhere, args.our_excludes)


if __name__ == "__main__":
    main()
