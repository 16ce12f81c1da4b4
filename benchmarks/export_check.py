"""Is the denoiser exportable? The shipped teacher's denoiser, with and without classifier-free guidance, on its
cosine schedule and on a discrete DDPM table: ``torch.export`` with a dynamic batch, ONNX through the dynamo
exporter (checker-clean, no float64), ONNX Runtime against torch at batch 1, 7 and 64, and ``torch.compile``
with ``fullgraph=True`` (a graph break raises).

    python -m benchmarks.export_check            # -> benchmarks/results/export_check.{json,md}

The network weights are the shipped teacher's in both cases; the discrete schedule only swaps the time math
(index arithmetic on a float32 table buffer), which is what this checks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.evaluate import write_json
from distill.checkpoint import atomic_write, load_denoiser
from distill.denoiser import DenoiserGraph
from distill.schedules import CosineSchedule, DiscreteSchedule

BATCHES = (1, 7, 64)
TOLERANCE = 1e-5  # relative error ||onnx - torch|| / ||torch||


def check(den, name: str, guided: bool, workdir: Path, inductor: bool) -> dict:
    import onnx
    import onnxruntime as ort

    graph = DenoiserGraph(den, labels=True, guided=guided).eval()
    shape = (den.net.config.in_channels, den.net.config.image_size, den.net.config.image_size)
    example = graph.example_inputs(7, shape)
    dynamic = [{0: torch.export.Dim("batch", min=1, max=4096)}] * len(example)
    row: dict = {"schedule": name, "guided": guided, "inputs": graph.input_names}
    start = time.perf_counter()
    torch.export.export(graph, example, dynamic_shapes=dynamic)
    row["torch_export_s"] = round(time.perf_counter() - start, 2)
    path = workdir / f"{name}-{'guided' if guided else 'plain'}.onnx"
    start = time.perf_counter()
    torch.onnx.export(graph, example, dynamic_shapes=dynamic, input_names=graph.input_names, output_names=["x0"],
                      dynamo=True, verbose=False).save(str(path))
    row["onnx_export_s"] = round(time.perf_counter() - start, 2)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    dtypes = {i.data_type for i in model.graph.initializer} | {v.type.tensor_type.elem_type for v in values}
    row["float64_in_graph"] = onnx.TensorProto.DOUBLE in dtypes
    row["onnx_nodes"] = len(model.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch._dynamo.reset()
    compiled = torch.compile(graph, fullgraph=True, backend="inductor" if inductor else "eager")
    row["compile_backend"] = "inductor" if inductor else "eager"
    for b in BATCHES:
        inputs = graph.example_inputs(b, shape)
        with torch.no_grad():
            ref = graph(*inputs).numpy()
            start = time.perf_counter()
            got = compiled(*inputs).numpy()
            if b == BATCHES[0]:
                row["compile_first_call_s"] = round(time.perf_counter() - start, 2)
        out = session.run(None, {n: v.numpy() for n, v in zip(graph.input_names, inputs)})[0]
        row[f"ort_rel_err_b{b}"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        row[f"compiled_rel_err_b{b}"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    row["pass"] = (not row["float64_in_graph"]) and all(row[f"ort_rel_err_b{b}"] <= TOLERANCE for b in BATCHES)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_check"))
    parser.add_argument("--inductor", action="store_true", help="Compile with inductor (slow on 2 cores), not eager.")
    args = parser.parse_args()
    den = load_denoiser(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, schedule in (("cosine", CosineSchedule()), ("discrete-linear", DiscreteSchedule("linear"))):
            den.schedule = schedule
            for guided in (False, True):
                rows.append(check(den, name, guided, Path(tmp), args.inductor))
                print(rows[-1])
    meta = {"model": args.model, "torch": torch.__version__, "tolerance": TOLERANCE, "batches": list(BATCHES)}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = [f"# Export check: {args.model} denoiser", "",
             f"torch {torch.__version__}; ONNX via the dynamo exporter, ONNX Runtime CPU; relative error = "
             f"||onnx - torch|| / ||torch|| (bound {TOLERANCE:g}); `torch.export` with a dynamic batch; "
             "`torch.compile(fullgraph=True)`.", "",
             "| schedule | guided | inputs | float64 | ORT rel. err. b1 / b7 / b64 | compiled (backend) | pass |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = " / ".join(f"{r[f'ort_rel_err_b{b}']:.1e}" for b in BATCHES)
        comp = f"{max(r[f'compiled_rel_err_b{b}'] for b in BATCHES):.1e} ({r['compile_backend']})"
        lines.append(f"| {r['schedule']} | {r['guided']} | {', '.join(r['inputs'])} | {r['float64_in_graph']} | "
                     f"{errs} | {comp} | {r['pass']} |")
    lines += ["", "Reproduce: `python -m benchmarks.export_check" + (" --inductor" if args.inductor else "") + "`", ""]
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines)))


if __name__ == "__main__":
    main()
