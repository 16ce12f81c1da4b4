"""``distill export onnx``: a model's denoiser (or its whole few-step sampler) as an ONNX artifact folder.

The graph is :class:`~distill.denoiser.DenoiserGraph` (``(x_t, t[, labels][, w]) -> x0``, the parameterization,
guidance and any consistency preconditioning inside) or :class:`~export.fused.FusedSampler`
(``(noise[, labels][, w]) -> image``), exported by the dynamo exporter with a dynamic batch axis, checked by
``onnx.checker`` and for float64, converted to FP16 or INT8 when asked, and checked against torch on inputs taken
from the model's own sampling trajectories at batch 1, 7 and 64 before the folder is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.checkpoint import card_guidance, card_sampling, resolve_model_path
from distill.denoiser import Denoiser, DenoiserGraph
from distill.errors import DistillError, UsageError
from export.artifact import (
    EXPORT_FORMAT,
    GRAPH_FILES,
    check_export_out,
    library_versions,
    sha256,
    staged_dir,
    write_manifest,
)
from export.calibration import calibration_set, fused_inputs, trajectory_inputs
from export.fused import MAX_FUSED_STEPS, FusedSampler
from export.precision import Int8Options, to_fp16, to_int8

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging

PRECISIONS = ("fp32", "fp16", "int8")
PARITY_BATCHES = (1, 7, 64)
# Relative error ||onnx - torch|| / ||torch|| allowed at export (INT8 is judged by sample quality instead).
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}
FUSED_TOLERANCE = 1e-4  # fused graph against the Python sampling loop on the same noise (fp32)
# Pinned inside the range every TensorRT 10/11 parses (export.tensorrt.TENSORRT_OPSETS), and >= 19 for fp16 Q/DQ
# scales; the exporter's own default moves with torch releases.
ONNX_OPSET = 20
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit: larger models keep their weights as external data


@dataclass
class ExportOptions:
    """What ``distill export onnx`` makes (recorded in the manifest)."""

    precision: str = "fp32"
    fused: bool = False
    guided: bool | None = None  # None: a w input when the model takes w or its card guides by default
    sampler: str | None = None  # fused: the card's unless given
    steps: int | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    check_batches: tuple[int, ...] = PARITY_BATCHES

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.precision == "int8":
            self.int8.validate()
            if self.int8.float_steps and not self.fused:
                raise UsageError("--float-steps keeps unrolled steps of a fused graph in float; add --fused")
            if self.fused and (self.int8.calibration != "trajectory" or self.int8.method == "step-percentile"):
                raise UsageError("--fused with --precision int8 calibrates on the graph's own noise inputs, and each "
                                 "unrolled step gets its own ranges; drop --calibration random / --calib-method "
                                 "step-percentile (they apply to the per-step graph)")
        if (self.sampler or self.steps) and not self.fused:
            raise UsageError("--sampler/--steps choose the fused graph's sampler; add --fused or drop them")


def graph_signature(den: Denoiser, guided: bool | None, source: str) -> tuple[bool, bool]:
    """``(labels, guided)``: which inputs the graph takes besides the state and time."""
    labels = bool(den.num_classes)
    if guided and getattr(den, "kind", "denoiser") == "sampler" and not den.guidance_input:
        raise UsageError(f"--guided: not every student of the chain {source} takes w; drop --guided")
    if guided is None:
        guided = labels and (den.guidance_input or card_guidance(den.metadata) != 0)
    if guided and not labels:
        raise UsageError(f"--guided: {source} is unconditional, so it takes no guidance weight; drop --guided")
    if guided and not den.guidance_input and den.null_label is None:
        raise UsageError(f"--guided: {source} has no null class for classifier-free guidance; drop --guided")
    return labels, guided


def fused_sampling(den: Denoiser, opts: ExportOptions, source: str) -> tuple[str, list[float]]:
    """The fused graph's sampler and exact ``k + 1`` times (the card's unless overridden), k at most 8."""
    from distill.samplers import DEFAULT_SPACING, check_sampler_options, make_timesteps

    check_sampler_options(opts.sampler)
    sampler, steps, spacing, times = card_sampling(den.metadata, opts.sampler, opts.steps)
    if steps > MAX_FUSED_STEPS:
        raise UsageError(f"--fused: {source} samples in {steps} steps; a fused graph unrolls at most "
                         f"{MAX_FUSED_STEPS} (pass --steps 8 or fewer, or export the per-step graph)")
    if times is None:
        times = make_timesteps(den.schedule, steps, spacing or DEFAULT_SPACING[sampler]).tolist()
    return sampler, [float(t) for t in times]


def onnx_export(module: torch.nn.Module, example: tuple, input_names: list[str], output: str, path: Path) -> dict:
    """The dynamo exporter with a dynamic batch axis on every input; weights go to external data past 2 GB."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    start = time.perf_counter()
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
            program = torch.onnx.export(module, example, dynamic_shapes=[{0: batch}] * len(example),
                                        input_names=input_names, output_names=[output], dynamo=True, verbose=False,
                                        opset_version=ONNX_OPSET)
    finally:
        registry.setLevel(level)
    program.save(str(path), external_data=None)  # None: external data exactly when the model passes 2 GB
    return {"exporter": f"torch.onnx.export(dynamo=True, opset_version={ONNX_OPSET})",
            "export_seconds": round(time.perf_counter() - start, 2)}


def check_graph(path: Path) -> dict:
    """``onnx.checker`` on the file (so external data works), no float64 anywhere, and the graph's I/O."""
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    dtypes = {i.data_type for i in model.graph.initializer} | {v.type.tensor_type.elem_type for v in values}
    if onnx.TensorProto.DOUBLE in dtypes:
        raise DistillError(f"{path}: the exported graph holds float64 tensors; the denoiser's forward must keep its "
                           "time math in float32 (a bug in the model adapter, please report)")

    def io(v) -> dict:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": dims}

    return {"opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(model.graph.node), "inputs": [io(v) for v in model.graph.input],
            "outputs": [io(v) for v in model.graph.output],
            "external_data": any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)}


def ort_session(path: Path, providers: list | None = None, threads: int | None = None):
    """An ONNX Runtime session of ``path`` on ``providers`` (names, or ``(name, options)`` pairs; default: CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Explicit: ONNX Runtime's own default (0) measured 1.5x slower for the INT8 graph on a 2-core machine.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def denoiser_parity(graph: DenoiserGraph, session, rows: Callable[[int], dict[str, np.ndarray]],
                    batches: tuple[int, ...]) -> dict:
    """Relative error of the ONNX graph against torch fp32 at each batch size, on trajectory inputs."""
    out = {}
    for b in batches:
        feed = rows(b)
        with torch.no_grad():
            ref = graph(*[torch.from_numpy(feed[n]) for n in graph.input_names]).numpy().astype(np.float64)
        got = session.run(None, feed)[0]
        out[f"b{b}"] = {"rel_err": rel_err(got, ref), "finite": bool(np.isfinite(got).all())}
    return out


def fused_parity(fused: FusedSampler, session, batches: tuple[int, ...], guidance: float) -> dict:
    """The fused graph against the Python sampling loop (``distill.samplers.generate``) on the same seeds."""
    from distill.denoiser import Cond
    from distill.samplers import generate

    den = fused.denoiser
    out = {}
    for b in batches:
        seeds = list(range(b))
        inputs = fused.example_inputs(b)
        labels = inputs[1] if fused.labels else None
        w = inputs[2] if fused.guided else (guidance if fused.labels else 0.0)
        ref = generate(den, fused.shape, seeds, sampler=fused.sampler, steps=fused.steps,
                       timesteps=fused.times, cond=Cond(labels, w))
        if fused.decoder is not None:
            with torch.no_grad():
                ref = fused.decoder(ref)
        ref = ref.numpy().astype(np.float64)
        feed = {n: v.numpy() for n, v in zip(fused.input_names, inputs)}
        got = session.run(None, feed)[0]
        out[f"b{b}"] = {"rel_err": rel_err(got, ref), "finite": bool(np.isfinite(got).all())}
    return out


# fp32 graphs traced before: (model sha256, graph kind, signature, sampler, timesteps, shape) -> the ONNX file's
# bytes and its export record. The dynamo exporter is deterministic (the same bytes for the same module) and slow
# (about 10 s for the 8x8 test model, 15-20 s for the MNIST one on a 2-core EPYC), and a model is often exported
# more than once (fp32 then INT8, a recipe's INT8 export rerun with other calibration settings, a killed run
# resumed). Kept in this process (the most recent few) and under $DISTILL_CACHE/onnx-graphs (the most recent
# _GRAPH_FILES), keyed there also by the code that shapes a graph (the torch, onnxscript and onnx versions and the
# source of the distill and export packages), so a changed model class or exporter never reuses an old trace.
# Only single-file graphs.
_FP32_GRAPHS: dict[tuple, tuple[bytes, dict]] = {}
_GRAPH_MEMO_SIZE, _GRAPH_MEMO_BYTES, _GRAPH_FILES = 4, 256 * 2**20, 16
IN_PROCESS = "this process"


@functools.cache
def _code_fingerprint() -> str:
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for lib in ("torch", "onnxscript", "onnx"):
        try:
            h.update(f"{lib}={version(lib)};".encode())
        except PackageNotFoundError:
            h.update(f"{lib}=?;".encode())
    root = Path(__file__).resolve().parents[1]
    for package in ("distill", "export"):
        for src in sorted((root / package).rglob("*.py")):
            h.update(src.relative_to(root).as_posix().encode() + b"\0" + src.read_bytes())
    return h.hexdigest()


def _graph_file(key: tuple) -> Path:
    from distill.rundir import cache_dir

    name = hashlib.sha256(f"{key!r}|{_code_fingerprint()}".encode()).hexdigest()[:32]
    return cache_dir() / "onnx-graphs" / f"{name}.onnx"


def recall_graph(key: tuple) -> tuple[bytes, dict, str] | None:
    """The graph of ``key`` traced earlier, its record and where it was kept; None when it must be traced."""
    if key in _FP32_GRAPHS:
        return (*_FP32_GRAPHS[key], IN_PROCESS)
    path = _graph_file(key)
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        graph = path.read_bytes()
    except (OSError, ValueError):
        return None
    if record.get("graph_sha256") != hashlib.sha256(graph).hexdigest():  # a damaged or foreign file: trace again
        return None
    os.utime(path)  # recently used: kept longest
    return graph, record["export"], str(path)


def remember_graph(key: tuple, path: Path, record: dict) -> None:
    """Keep a traced fp32 graph for later exports of the same model (in this process and on disk)."""
    if record.get("external_data") or path.stat().st_size > _GRAPH_MEMO_BYTES:
        return
    graph = path.read_bytes()
    _FP32_GRAPHS.pop(key, None)
    _FP32_GRAPHS[key] = (graph, dict(record))
    while len(_FP32_GRAPHS) > _GRAPH_MEMO_SIZE:
        _FP32_GRAPHS.pop(next(iter(_FP32_GRAPHS)))
    from distill.checkpoint import atomic_write

    target = _graph_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(graph))  # the graph first: the record commits it
        atomic_write(target.with_suffix(".json"), lambda tmp: Path(tmp).write_text(
            json.dumps({"key": repr(key), "graph_sha256": hashlib.sha256(graph).hexdigest(), "export": record})))
        kept = sorted(target.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[_GRAPH_FILES:]:
            old.with_suffix(".json").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    except (OSError, UsageError) as e:  # an unwritable cache only costs the next export a trace
        LOG.debug(f"not keeping the traced graph in {target.parent}: {e}")


def export_onnx(model: str, out: Path, opts: ExportOptions, *, command: str = "", log=LOG.info) -> dict:
    """Export ``model`` (a model file, run directory or shipped name) to the folder ``out``; returns the manifest.

    Every check runs before ``out`` is touched: a failed export leaves an earlier artifact there intact."""
    import onnx

    from distill.checkpoint import load_denoiser

    opts.validate()
    check_export_out(out)
    from distill.chain import CHAIN_FILE, chain_dir, is_chain, load_chain

    if is_chain(model):  # a chain of students: one graph holding every member
        if not opts.fused:
            raise UsageError(f"{model} is a chain of students, which has no per-step graph; add --fused to export "
                             "it as one graph")
        path, den = chain_dir(model) / CHAIN_FILE, load_chain(model).float()
    else:
        path, den = resolve_model_path(model), load_denoiser(model).float()
    labels, guided = graph_signature(den, opts.guided, model)
    shape = tuple(den.image_shape)
    manifest: dict = {"format": EXPORT_FORMAT, "graph": GRAPH_FILES["onnx"], "precision": opts.precision,
                      "source": {"model": str(model), "path": str(path), "sha256": sha256(path)},
                      "metadata": den.metadata, "image_shape": list(shape), "labels": labels, "guided": guided,
                      "num_classes": den.num_classes, "null_label": den.null_label,
                      "command": command}
    if opts.fused:
        sampler, times = fused_sampling(den, opts, model)
        if times[-1] != 0.0:
            raise UsageError(f"{model}: its grid ends on training timestep 0 (set_alpha_to_one false), not clean "
                             "data; a fused graph ends on clean data: export the per-step graph (drop --fused)")
        decoder = None
        if den.latent and opts.precision != "fp32":
            raise UsageError(f"--fused --precision {opts.precision}: a latent model's fused graph holds its decoder, "
                             "which would be converted without the decoder's range checks; export --fused at fp32, "
                             f"or the per-step graph at {opts.precision} (decoder.onnx is then kept safe)")
        if den.latent:  # a latent model's fused graph decodes too: noise in, images out
            from distill.latent import Decoder, load_autoencoder

            decoder = Decoder(load_autoencoder(den.latent, str(model))).eval()
        module = FusedSampler(den, sampler, times, shape, labels, guided, decoder=decoder).eval()
        example = module.example_inputs(2)
        output = "image"
        manifest.update({"kind": "sampler", "sampler": sampler, "steps": len(times) - 1, "timesteps": times,
                         "noise_slots": module.slots, "decodes": decoder is not None})
    else:
        module = DenoiserGraph(den, labels=labels, guided=guided).eval()
        example = module.example_inputs(2, shape)
        output = "x0"
        manifest["kind"] = "denoiser"
    manifest["target"] = opts.int8.target if opts.precision == "int8" else "any"
    with staged_dir(out) as stage:
        fp32 = stage / ("model.onnx" if opts.precision == "fp32" else "fp32.onnx")
        key = (manifest["source"]["sha256"], manifest["kind"], labels, guided, manifest.get("sampler"),
               tuple(manifest.get("timesteps", ())), shape)
        earlier = recall_graph(key)
        if earlier:  # the same graph traced before (an fp32 and an INT8 export, a rerun)
            graph, record, where = earlier
            log(f"exporting {model} ({manifest['kind']} graph): the fp32 graph traced earlier "
                f"({'in this process' if where == IN_PROCESS else 'kept in ' + where})")
            fp32.write_bytes(graph)
            manifest["export"] = {**record, "export_seconds": 0.0, "trace_reused_from": where}
        else:
            log(f"exporting {model} ({manifest['kind']} graph, inputs {', '.join(module.input_names)}) ...")
            manifest["export"] = onnx_export(module, example, module.input_names, output, fp32)
            manifest["export"].update(check_graph(fp32))
            remember_graph(key, fp32, manifest["export"])
        final = stage / "model.onnx"
        if opts.precision == "fp16":
            log("converting to fp16 (explicit casts; normalizations, softmax and the conditioning path in fp32) ...")
            half, info = to_fp16(onnx.load(str(fp32)), image_input=module.input_names[0])
            onnx.save(half, str(final))
            manifest["fp16"] = info
        elif opts.precision == "int8":
            i8 = opts.int8
            n = i8.trajectories(opts.fused)
            log(f"calibrating on {i8.calibration} inputs ({n} trajectories' worth, {i8.method}) and "
                f"quantizing for {i8.target} ...")
            calib = fused_inputs(module, n) if opts.fused else \
                calibration_set(den, i8.calibration, n, labels=labels, guided=guided)
            start = time.perf_counter()
            manifest["int8"] = to_int8(fp32, final, calib, i8, stage)
            manifest["int8"]["seconds"] = round(time.perf_counter() - start, 1)
        for extra in stage.glob("augmented*"):
            extra.unlink()
        if fp32 != final:
            fp32.unlink()
        manifest["graph_info"] = check_graph(final)
        log("checking against torch ...")
        session = ort_session(final)
        if opts.fused:
            parity = fused_parity(module, session, opts.check_batches, card_guidance(den.metadata))
            bound = FUSED_TOLERANCE if opts.precision == "fp32" else TOLERANCE.get(opts.precision)
        else:
            need = max(opts.check_batches)
            from distill.samplers import nfe

            sampler, steps, spacing, _ = card_sampling(den.metadata)
            trajectories = max(4, math.ceil(need / nfe(sampler, steps, den.schedule, spacing)))
            rows = trajectory_inputs(den, trajectories, labels=labels, guided=guided, seed=4_000_000)
            parity = denoiser_parity(module, session, rows.spread, opts.check_batches)
            bound = TOLERANCE.get(opts.precision)
        manifest["parity"] = {"against": "python sampling loop (same noise)" if opts.fused else "torch fp32",
                              "inputs": "fused_noise(seeds 0..B-1)" if opts.fused else
                              "recorded along the model's own sampling trajectories (seeds 4,000,000+)",
                              "tolerance": bound, "batches": parity,
                              "max_rel_err": max(v["rel_err"] for v in parity.values())}
        bad = [k for k, v in parity.items() if not v["finite"] or (bound is not None and v["rel_err"] > bound)]
        if bad:
            raise DistillError(f"{model}: the {opts.precision} ONNX graph disagrees with torch at {', '.join(bad)} "
                               f"(max relative error {manifest['parity']['max_rel_err']:.2e}, bound {bound}); "
                               "nothing was written to " + str(out))
        if den.latent:  # the decoder beside the graph: the folder holds every network a deployment needs
            from export.decoder import export_decoder

            manifest["decoder"] = export_decoder(den, stage, opts.precision, log=log)
        manifest["files"] = {p.name: sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}
        manifest["versions"] = library_versions()
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_manifest(stage, manifest)
    return manifest
