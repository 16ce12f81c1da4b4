"""Runtime backends behind one protocol, so every sampler, ``distill sample`` / ``eval`` and the benchmarks take any.

A backend is a denoiser: ``backend(x_t, t, cond) -> x0_hat`` (torch tensors in and out), with ``schedule`` (what
the samplers need), ``name``, ``device``, ``precision`` and the model's ``metadata`` (its card), ``image_shape``,
``num_classes`` and ``guidance_input``. A fused sampler artifact is a backend of ``kind == "sampler"``: it has no
per-step call, and :meth:`sample` draws whole images instead.

=============  =================================================================  ==============================
name           what runs                                                          source
=============  =================================================================  ==============================
eager          the torch module; fp32, or bf16 / fp16 autocast                    a model
compile        ``torch.compile(fullgraph=True)``; CPU: inductor with freezing;     a model
               GPU: ``mode="reduce-overhead"`` (CUDA graphs); fp32 / bf16 / fp16
onnxruntime    ONNX Runtime: CPU, CUDA or TensorRT execution provider, by device  an ONNX export (a model is
               (``onnxruntime-trt`` asks for the TensorRT EP)                     exported to fp32 on the fly)
tensorrt       a native TensorRT engine (``distill export tensorrt``)            an engine folder
=============  =================================================================  ==============================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from distill.denoiser import Cond, batch_times
from distill.errors import UsageError
from distill.schedules import Schedule

BACKENDS = ("eager", "compile", "onnxruntime", "onnxruntime-trt", "tensorrt")
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    precision: str
    schedule: Schedule
    metadata: dict[str, Any]
    image_shape: tuple[int, ...]
    num_classes: int
    guidance_input: bool

    def __call__(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor: ...


def graph_inputs(x_t: Tensor, t: Tensor | float, cond: Cond | None, *, labels: bool, guided: bool,
                 null_label: int | None, source: str) -> list[Tensor]:
    """A denoiser call as the inputs of a graph with fixed inputs ``(x_t, t[, labels][, w])``."""
    cond = cond if cond is not None else Cond()
    inputs = [x_t, batch_times(t, x_t)]
    if labels:
        if cond.labels is not None:
            inputs.append(cond.labels.to(device=x_t.device, dtype=torch.int64))
        elif null_label is not None:  # unconditional sampling of a CFG model: the null class
            inputs.append(torch.full((x_t.shape[0],), null_label, dtype=torch.int64, device=x_t.device))
        else:
            raise UsageError(f"{source} needs class labels (it has no null class); pass --classes")
    if guided:
        inputs.append(batch_times(cond.guidance if cond.labels is not None else 0.0, x_t))
    elif cond.guided:
        raise UsageError(f"{source} was exported without the guidance input w; drop --guidance (or pass "
                         "--guidance 0), or export again with --guided")
    return inputs


def input_shapes(manifest: dict[str, Any], batch: int) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape at ``batch``, from the export manifest."""
    shape = tuple(manifest["image_shape"])
    if manifest.get("kind") == "sampler":
        out = {"noise": (batch, 1 + manifest["noise_slots"], *shape)}
    else:
        out = {"x_t": (batch, *shape), "t": (batch,)}
    if manifest["labels"]:
        out["labels"] = (batch,)
    if manifest["guided"]:
        out["w"] = (batch,)
    return out


def load_backend(source: str | Path, backend: str | None = None, *, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None):
    """Open ``source`` (a model file, run directory or shipped name; or an export folder) on ``backend``
    (default: eager for a model, the artifact's own runtime for an export)."""
    from export.artifact import is_artifact, read_manifest

    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    from distill.chain import is_chain

    if is_chain(source):  # a chain of students: sampled in torch, one member per step
        if backend not in (None, "eager"):
            raise UsageError(f"--backend {backend}: {source} is a chain of students, sampled eagerly; for another "
                             "runtime export it as one graph (distill export onnx CHAIN --fused --out DIR)")
        if precision not in ("fp32", "bf16"):
            raise UsageError(f"--precision {precision}: a chain samples in fp32 or bf16; export it for others")
        from distill.chain import load_chain

        return load_chain(source, device, precision)
    if is_artifact(source):
        manifest = read_manifest(source)
        kind = "tensorrt" if manifest["graph"].endswith(".engine") else "onnxruntime"
        backend = backend or kind
        if precision not in ("fp32", manifest["precision"]):
            raise UsageError(f"--precision {precision}: {source} is a {manifest['precision']} export; its precision "
                             "is fixed at export (drop --precision)")
        if kind == "tensorrt":
            if backend != "tensorrt":
                raise UsageError(f"--backend {backend}: {source} is a TensorRT engine; use --backend tensorrt")
            from export.backends.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(manifest, device=device)
        if backend not in ("onnxruntime", "onnxruntime-trt"):
            raise UsageError(f"--backend {backend}: {source} is an ONNX export; use --backend onnxruntime (or "
                             "onnxruntime-trt), or pass the model file for eager / compile")
        from export.backends.ort_backend import OrtBackend

        return OrtBackend(manifest, device=device, tensorrt_ep=backend == "onnxruntime-trt", threads=threads)
    backend = backend or "eager"
    if backend in ("eager", "compile"):
        if precision not in TORCH_PRECISIONS:
            raise UsageError(f"--precision {precision}: the {backend} backend runs {', '.join(TORCH_PRECISIONS)}; "
                             "int8 needs an export (distill export onnx --precision int8)")
        from distill.checkpoint import load_denoiser
        from export.backends.torch_backend import TorchBackend

        return TorchBackend(load_denoiser(source, device), backend, precision, device)
    if backend == "tensorrt":
        raise UsageError(f"--backend tensorrt: {source} is a model; build an engine first (distill export onnx, "
                         "then distill export tensorrt) and pass its folder")
    if precision != "fp32":
        raise UsageError(f"--precision {precision} with --backend {backend}: export the model first (distill export "
                         f"onnx {source} --precision {precision} --out DIR) and pass DIR")
    from export.backends.ort_backend import OrtBackend

    return OrtBackend.from_model(str(source), device=device, tensorrt_ep=backend == "onnxruntime-trt",
                                 threads=threads)


def source_metadata(source: str | Path) -> dict[str, Any]:
    """A model's or an export's metadata (card, network config, schedule, data) without loading weights."""
    from distill.chain import is_chain, read_chain
    from distill.checkpoint import read_metadata, resolve_model_path
    from export.artifact import is_artifact, read_manifest

    if is_chain(source):
        return read_chain(source)["metadata"]
    if is_artifact(source):
        return read_manifest(source)["metadata"]
    return read_metadata(resolve_model_path(source))


def export_attributes(backend, manifest: dict[str, Any], device: str) -> None:
    """Set what every export backend exposes (the :class:`Backend` protocol's attributes and the graph's inputs)
    from the export's ``manifest`` and the model metadata it carries."""
    from distill.schedules import schedule_from_config

    meta = manifest["metadata"]
    backend.manifest, backend.metadata, backend.kind = manifest, meta, manifest.get("kind", "denoiser")
    backend.precision, backend.device = manifest["precision"], device
    backend.schedule = schedule_from_config(meta["diffusion"]["schedule"])
    config = meta["model"]["config"]
    backend.image_shape = tuple(manifest["image_shape"])
    # recorded at export (a conditional diffusers UNet's rows, a factory network's classes); older manifests: the
    # native UNet's config, whose null class is num_classes
    backend.num_classes = int(manifest.get("num_classes", config.get("num_classes") or 0))
    backend.null_label = manifest["null_label"] if "null_label" in manifest else \
        (backend.num_classes if backend.num_classes else None)
    backend.guidance_input = bool(config.get("guidance_embed"))
    backend.labels, backend.guided = manifest["labels"], manifest["guided"]
    backend.decodes_itself = bool(manifest.get("decodes"))  # a latent model's fused graph ends in the decode
