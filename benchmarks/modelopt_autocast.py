"""NVIDIA Model Optimizer's ONNX AutoCast (FP32 -> FP16 mixed precision) against our FP16 converter
(``export.precision.to_fp16``: onnxconverter-common, then :func:`export.precision.fp32_kept_path`).

Model Optimizer lives outside the main environment (``nvidia-modelopt[onnx]`` pulls onnxruntime-gpu and a CUDA
torch): its wheel and the pure-python pieces AutoCast imports go into a target folder that is put in front of the
main environment's packages for the ``convert`` half only; the three halves talk through files in ``--work``:

    pip install --no-deps --target /tmp/mo nvidia-modelopt==0.47.0 onnx-graphsurgeon polygraphy nvidia-ml-py \\
        onnxslim lief
    python -m benchmarks.modelopt_autocast dump --export /tmp/w/fp32 --work /tmp/w/autocast
    PYTHONPATH=/tmp/mo:. python -m benchmarks.modelopt_autocast convert --export /tmp/w/fp32 --work /tmp/w/autocast
    python -m benchmarks.modelopt_autocast score --export /tmp/w/fp32 --work /tmp/w/autocast
        # -> benchmarks/results/fp16_autocast.{json,md}

``dump`` (main env) converts with ours (``work/ours``), and writes our fp32 node list (``work/kept.json``) and
AutoCast's calibration batch (``work/calib/calib.npz``: x_t ~ N(0, 1) in the graph's image shape, t ~ U(0, 1),
labels 0..9). ``convert`` (Model Optimizer) runs ``convert_to_mixed_precision`` twice with the CPU provider and
``keep_io_types=True``: ``default`` (its own magnitude rules: data_max 512, init_max fp16 max, on the calibration
batch) and ``excludes`` (besides those, our fp32 node list as anchored name regexes and our fp32 op types).
``score`` (main env) checks each graph with :func:`export.precision.fp16_violations` against our fp32 node list,
counts casts and fp16 weights, and measures the relative error against the torch model at batch 64 on trajectory
inputs (where ONNX Runtime fails on a graph as written, once more with its ``value_info`` dropped).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

AUTOCAST_OPS = ("InstanceNormalization", "Softmax", "Sin", "Cos", "Pow", "Sqrt", "Exp", "ReduceMean")
VARIANTS = ("default", "excludes")
PARITY_SEED = 4_000_000  # trajectory seeds apart from evaluation, consistency and calibration's
_F16 = 10  # onnx.TensorProto.FLOAT16


def _write_graph(folder: Path, model, info: dict) -> None:
    import onnx

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "model.onnx"))
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def dump(export: Path, work: Path, batch: int, seed: int) -> None:
    import onnx

    from export.precision import to_fp16

    work.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(export / "model.onnx"))
    start = time.perf_counter()
    half, info = to_fp16(model, "x_t")
    seconds = time.perf_counter() - start
    (work / "kept.json").write_text(json.dumps(info["fp32_nodes"], indent=1))
    _write_graph(work / "ours", half, {"converter": info["converter"], "seconds": round(seconds, 2),
                                        "fp32_ops": info["fp32_ops"], "cleaned": info["cleaned"]})
    rng = np.random.default_rng(seed)
    names = [i.name for i in model.graph.input]
    image = [d.dim_value for d in model.graph.input[names.index("x_t")].type.tensor_type.shape.dim[1:]]
    data = {"x_t": rng.standard_normal((batch, *image)).astype(np.float32),
            "t": rng.uniform(0, 1, batch).astype(np.float32),
            "labels": (np.arange(batch) % 10).astype(np.int64)}
    if sorted(data) != sorted(names):
        raise SystemExit(f"the graph's inputs are {names}; this benchmark feeds x_t, t, labels")
    (work / "calib").mkdir(exist_ok=True)
    np.savez(work / "calib" / "calib.npz", **data)
    print(f"wrote {work}/ours ({seconds:.1f} s, {len(info['fp32_nodes'])} fp32 nodes), kept.json, calib/calib.npz")


def convert(export: Path, work: Path) -> None:
    import modelopt
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    kept = json.loads((work / "kept.json").read_text())
    names = [n.name for n in onnx.load(str(export / "model.onnx"), load_external_data=False).graph.node]
    # nodes_to_exclude are regexes applied with re.match: a bare name is a prefix (node_Mul_1 catches node_Mul_12)
    anchored = [f"^{re.escape(k)}$" for k in kept]
    unanchored_hits = sum(any(re.match(k, n) for k in kept) for n in names)
    for variant in VARIANTS:
        opts = {"low_precision_type": "fp16", "keep_io_types": True, "providers": ["cpu"],
                "calibration_data": str(work / "calib")}
        if variant == "excludes":
            opts.update(nodes_to_exclude=anchored, op_types_to_exclude=list(AUTOCAST_OPS))
        start = time.perf_counter()
        model = convert_to_mixed_precision(onnx_path=str(export / "model.onnx"), **opts)
        seconds = time.perf_counter() - start
        record = {k: v for k, v in opts.items() if k != "nodes_to_exclude"}
        if variant == "excludes":
            record.update(nodes_to_exclude=f"{len(anchored)} anchored names (kept.json)",
                          unanchored_names_would_match=unanchored_hits)
        _write_graph(work / f"autocast-{variant}", model, {
            "converter": f"modelopt.onnx.autocast.convert_to_mixed_precision (nvidia-modelopt {modelopt.__version__})",
            "options": record, "seconds": round(seconds, 2)})
        print(f"wrote {work}/autocast-{variant} ({seconds:.1f} s)")


def graph_stats(path: Path, kept: list[str]) -> dict:
    import onnx

    from export.precision import _float_types, fp16_violations

    model = onnx.load(str(path))
    g = model.graph
    names = {n.name for n in g.node}
    types = _float_types(model)
    bad = fp16_violations(model, "x_t", kept)
    compute = [n for n in g.node if n.op_type not in ("Cast", "Constant")]
    return {
        "nodes": len(g.node), "casts": sum(n.op_type == "Cast" for n in g.node),
        "fp16_initializers": sum(i.data_type == _F16 for i in g.initializer),
        "initializers": len(g.initializer),
        "fp16_compute_nodes": sum(any(types.get(o) == _F16 for o in n.output) for n in compute),
        "compute_nodes": len(compute),
        "kept_names_present": sum(k in names for k in kept),
        "kept_nodes_fp16": sorted(n.name for n in compute if n.name in set(kept)
                                  and any(types.get(o) == _F16 for o in n.output)),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "violations": len(bad),
        "violations_by_kind": {
            "round_trip": sum("round trip" in b for b in bad),
            "kept_reads_fp16_weight": sum("reads the fp16 weight" in b for b in bad),
            "fp16_on_conditioning_path": sum("conditioning path" in b for b in bad)},
        "first_violations": bad[:5],
    }


def score(export: Path, work: Path, out: Path, trajectories: int, batch: int) -> None:
    import onnxruntime
    import torch

    from benchmarks.evaluate import write_json
    from distill.checkpoint import atomic_write, load_denoiser
    from distill.denoiser import DenoiserGraph
    from export.artifact import read_manifest
    from export.calibration import trajectory_inputs
    from export.onnx import ort_session, rel_err

    m = read_manifest(export)
    kept = json.loads((work / "kept.json").read_text())
    den = load_denoiser(m["source"]["model"]).float()
    g = DenoiserGraph(den, labels=m["labels"], guided=m["guided"]).eval()
    feed = trajectory_inputs(den, trajectories, labels=m["labels"], guided=m["guided"], seed=PARITY_SEED).spread(batch)
    with torch.no_grad():
        ref = g(*[torch.from_numpy(feed[n]) for n in g.input_names]).numpy().astype(np.float64)

    def run(path: Path) -> dict:
        try:
            session = ort_session(path)
        except Exception as e:  # noqa: BLE001 - a graph ONNX Runtime refuses is a result
            return {"ort_cpu_loads": False, "ort_cpu_runs": False, "ort_error": str(e).splitlines()[0][:300]}
        try:
            got = session.run(None, feed)[0]
        except Exception as e:  # noqa: BLE001
            return {"ort_cpu_loads": True, "ort_cpu_runs": False, "ort_error": str(e).splitlines()[0][:300]}
        return {"ort_cpu_loads": True, "ort_cpu_runs": True, "rel_err": rel_err(got, ref),
                "finite": bool(np.isfinite(got).all())}

    def parity(path: Path) -> dict:
        """ONNX Runtime on the graph as written; where it fails, once more with the graph's ``value_info`` (the
        converter's recorded intermediate shapes) dropped, which ONNX Runtime then infers itself."""
        out = run(path)
        if not out["ort_cpu_runs"]:
            import onnx

            model = onnx.load(str(path))
            model.graph.ClearField("value_info")
            with tempfile.TemporaryDirectory() as tmp:
                onnx.save(model, f"{tmp}/model.onnx")
                out["value_info_dropped"] = run(Path(tmp) / "model.onnx")
        return out

    rows = [{"graph": "fp32 export", "converter": "-", "seconds": None, **parity(export / "model.onnx")}]
    for name in ("ours", *[f"autocast-{v}" for v in VARIANTS]):
        folder = work / name
        if not (folder / "model.onnx").exists():
            print(f"skipping {name}: no {folder}/model.onnx (run dump / convert)")
            continue
        info = json.loads((folder / "info.json").read_text())
        rows.append({"graph": name, "converter": info["converter"], "seconds": info["seconds"],
                     "options": info.get("options"), **graph_stats(folder / "model.onnx", kept),
                     **parity(folder / "model.onnx")})
        print({k: v for k, v in rows[-1].items() if k not in ("first_violations", "kept_nodes_fp16")})
    meta = {"model": m["source"]["model"], "export": str(export), "fp32_nodes": len(kept),
            "parity": f"{trajectories} trajectories (seed {PARITY_SEED}), batch {batch}",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})

    def cell(r, k, fmt="{}"):
        return fmt.format(r[k]) if r.get(k) is not None else "-"

    lines = [f"# FP16: Model Optimizer AutoCast vs ours ({meta['model']})", "",
             f"Violations: `export.precision.fp16_violations(model, 'x_t', kept)` with our {len(kept)}-node fp32 "
             "list (round trips fp32 -> fp16 -> fp32 / kept node reading an fp16 weight / fp16 on the conditioning "
             f"path). Relative error ||onnx - torch|| / ||torch|| on {meta['parity']}, ONNX Runtime "
             f"{meta['onnxruntime']} CPU.", "",
             "| graph | violations (trip / weight / cond.) | kept names present | kept nodes in fp16 | Cast nodes | "
             "fp16 initializers | fp16 compute nodes | rel. err. | ONNX Runtime CPU | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = r.get("violations_by_kind")
        viol = f"{r['violations']} ({kinds['round_trip']} / {kinds['kept_reads_fp16_weight']} / " \
               f"{kinds['fp16_on_conditioning_path']})" if kinds else "-"
        present = f"{r['kept_names_present']}/{len(kept)}" if "kept_names_present" in r else "-"
        computed = f"{r['fp16_compute_nodes']}/{r['compute_nodes']}" if "compute_nodes" in r else "-"
        fp16_kept = len(r["kept_nodes_fp16"]) if "kept_nodes_fp16" in r else "-"
        ort = "loads, runs" if r["ort_cpu_runs"] else ("loads, run fails" if r["ort_cpu_loads"] else "fails")
        err = cell(r, "rel_err", "{:.2e}")
        if "value_info_dropped" in r:
            again = r["value_info_dropped"]
            err = f"{again['rel_err']:.2e} (value_info dropped)" if again["ort_cpu_runs"] else "-"
            ort += "; without value_info " + ("runs" if again["ort_cpu_runs"] else "fails")
        lines.append(f"| {r['graph']} | {viol} | {present} | {fp16_kept} | {cell(r, 'casts')} | "
                     f"{cell(r, 'fp16_initializers')} | {computed} | {err} | "
                     f"{ort} | {cell(r, 'seconds')} |")
    errors = [f"- {r['graph']}: `{r['ort_error']}`" for r in rows if r.get("ort_error")]
    if errors:
        lines += ["", "ONNX Runtime errors (graph as written):", "", *errors]
    lines += ["", "First violations:", ""]
    for r in rows:
        for b in r.get("first_violations", [])[:3]:
            lines.append(f"- {r['graph']}: `{b}`")
    lines += ["", "Converters:", ""]
    lines += [f"- {r['graph']}: {r['converter']}" + (f"; options {json.dumps(r['options'])}" if r.get("options")
                                                      else "") for r in rows[1:]]
    lines += ["", "Reproduce: see `python -m benchmarks.modelopt_autocast --help` (dump, convert in Model "
              "Optimizer's environment, score).", ""]
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines)))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dump", "convert", "score"])
    parser.add_argument("--export", type=Path, default=Path("runs/exports/fp32"), help="the FP32 export folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill-autocast"), help="files between the halves")
    parser.add_argument("--calib-batch", type=int, default=8, help="AutoCast's calibration batch (dump)")
    parser.add_argument("--calib-seed", type=int, default=0)
    parser.add_argument("--trajectories", type=int, default=16, help="parity trajectories (score)")
    parser.add_argument("--batch", type=int, default=64, help="parity batch (score)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fp16_autocast"))
    args = parser.parse_args()
    if args.what == "dump":
        dump(args.export, args.work, args.calib_batch, args.calib_seed)
    elif args.what == "convert":
        convert(args.export, args.work)
    else:
        score(args.export, args.work, args.out, args.trajectories, args.batch)


if __name__ == "__main__":
    main()
