"""Quality of a model (sampled with a given sampler, step count, guidance and seeds) or of a set of images:
the logic of ``distill eval``, also used by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.metrics import DEFAULT_METRICS, Quality
from distill.errors import UsageError


def load_images(spec: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``npz:PATH`` / ``PATH.npz`` (``distill sample`` output or any images array) or ``folder:PATH`` -> uint8."""
    from distill.data import load_dataset

    if spec.endswith(".npz") and not spec.startswith("npz:"):
        spec = f"npz:{spec}"
    data = load_dataset(spec)
    images = ((data.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = data.labels.numpy() if data.labels is not None else None
    return images, labels, {"images": spec, "count": len(images)}


def is_image_source(source: str) -> bool:
    return source.startswith(("npz:", "folder:", "real:")) or source.endswith(".npz")


def default_data(source: str) -> str | None:
    """The dataset a model was trained on, from its metadata (``None`` for images or older files)."""
    if is_image_source(source):
        return None
    from export.backends import source_metadata

    data = source_metadata(source).get("data") or {}
    return data.get("spec") or (data.get("name") if data.get("name") in ("digits", "mnist") else None)


def evaluate(source: str, *, data_spec: str | None = None, ref: str = "A", metrics: tuple[str, ...] | None = None,
             sampler: str | None = None, steps: int | None = None, spacing: str | None = None, eta: float | None = None,
             guidance: float | None = None, seeds: list[int] | None = None, classes: list[int] | None = None,
             batch_size: int = 250, bf16: bool = False, device: str = "cpu", inception_backend: str = "onnxruntime",
             progress: bool = True, quality: Quality | None = None, denoiser=None, backend: str | None = None,
             precision: str = "fp32") -> dict:
    """Sample ``source`` (a model) or read it (images), then measure it against the real split ``ref``.

    Everything that can be checked is checked before any sampling or feature extraction: the device, the metric,
    backend and device combination, the domain classifier, the image shape against ``data_spec``, the number of
    samples each metric needs, and (for ``metrics`` asked for explicitly) that ``acc`` has labels to check."""
    from distill.data import load_dataset
    from distill.latent import output_shape
    from distill.preflight import check_device
    from distill.samplers import nfe

    check_device(device)
    from distill.chain import is_chain
    from distill.diffusers_teacher import diffusers_parts
    from export.artifact import is_artifact

    if not is_image_source(source) and Path(source).is_dir() and not (Path(source) / "model.safetensors").exists() \
            and not is_artifact(source) and not is_chain(source) and diffusers_parts(Path(source)) is None:
        raise UsageError(f"SOURCE {source}: a folder without model.safetensors, an export manifest or a diffusers "
                         f"model; for a folder of images write folder:{source}")
    data_spec = data_spec or default_data(source)
    if data_spec is None:
        raise UsageError(f"{source}: cannot tell which real data to compare against; pass --data (e.g. mnist)")
    explicit = metrics is not None and quality is None
    if quality is None:
        data = load_dataset(data_spec)
        chosen = tuple(metrics) if metrics else DEFAULT_METRICS
        if not explicit and data.labels is None:  # acc by default only where there are classes to check
            chosen = tuple(m for m in chosen if m != "acc")
        quality = Quality(data, ref=ref, metrics=chosen, inception_backend=inception_backend, device=device,
                          progress=progress)
    quality.prepare()  # load the extractors now: a missing classifier or a bad backend fails before sampling
    result: dict = {"source": source, "data": data_spec}
    den = None
    if source.startswith("real:"):  # a real half: B against A is the real-vs-real floor
        from benchmarks.metrics import SPLITS, real_split

        split = source.partition(":")[2]
        if split not in SPLITS:
            raise UsageError(f"SOURCE {source}: choose real:A, real:B or real:all")
        images, labels = real_split(quality.data, split)
        result.update({"images": source, "count": len(images)})
        what, fix = f"SOURCE {source}", "use more real images"
        shape = tuple(images.shape[1:])
    elif is_image_source(source):
        images, labels, info = load_images(source)
        result.update(info)
        what, fix = f"SOURCE {source}", "use a larger image set"
        shape = tuple(images.shape[1:])  # (C, H, W)
    else:
        from export.backends import load_backend

        den = denoiser if denoiser is not None else load_backend(
            source, backend, precision="bf16" if bf16 and precision == "fp32" else precision, device=device)
        seeds = list(range(2500)) if seeds is None else seeds
        labels = [] if den.num_classes else None  # the requested classes, known before sampling
        what, fix = "--seeds", "pass more seeds (e.g. --seeds 0-99)"
        shape = output_shape(den)  # a latent model's decoded images
        images = None
    if shape != tuple(quality.data.shape):
        size = "x".join(map(str, quality.data.shape))
        why = " (the size its classifier expects)" if "domain" in quality.kinds() else ""
        raise UsageError(f"SOURCE {source}: images are {'x'.join(map(str, shape))} (C x H x W) but --data "
                         f"{data_spec} holds {size} images{why}; evaluate against the matching --data")
    if "acc" in quality.metrics and labels is None:
        if explicit:
            raise UsageError(f"--metrics acc: SOURCE {source} has no class labels to check; drop acc")
        quality = quality.without("acc")
    quality.check_sizes(len(seeds) if images is None else len(images), what, fix)
    if den is not None:
        from distill.checkpoint import card_guidance, card_sampling
        from distill.sampling import draw_samples

        guidance = card_guidance(den.metadata, guidance)
        if getattr(den, "kind", "denoiser") == "denoiser":
            sampler, steps, spacing, _ = card_sampling(den.metadata, sampler, steps, spacing)
        elif sampler is None and steps is None:  # a fused sampler graph
            sampler, steps = den.manifest["sampler"], den.manifest["steps"]
        start = time.perf_counter()
        # a torch denoiser passed in directly runs under autocast here; a backend applies its own precision
        images, labels = draw_samples(den, sampler=sampler, steps=steps, seeds=seeds, classes=classes,
                                      guidance=guidance, spacing=spacing, eta=eta, batch_size=batch_size,
                                      device=device, bf16=bf16 and denoiser is not None, progress=progress,
                                      source=source)
        seconds = time.perf_counter() - start
        result.update({"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps, den.schedule, spacing),
                       "spacing": spacing,
                       "eta": eta, "guidance": guidance, "bf16": bf16,
                       "backend": getattr(den, "name", "eager"), "precision": getattr(den, "precision", "fp32"),
                       "seeds": f"{seeds[0]}-{seeds[-1]}"
                       if seeds == list(range(seeds[0], seeds[0] + len(seeds))) else seeds,
                       "sample_seconds": round(seconds, 2)})
    start = time.perf_counter()
    result.update(quality(images, labels))
    result["metric_seconds"] = round(time.perf_counter() - start, 2)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    return result


def summary_line(r: dict) -> str:
    """One line for humans: the headline numbers of a result."""
    parts = [f"{k}={r[k]:.4g}" for k in ("fd", "fid", "kid", "kid_inception", "is", "acc") if k in r]
    what = (f"{r['source']}: {r['sampler']} {r['steps']} steps (NFE {r['nfe']}), w={r['guidance']}, sampled in "
            f"{r['sample_seconds']:.1f} s" if "sampler" in r else r["source"])
    return f"{what}: {' '.join(parts)} (n={r['n_fake']} vs {r['ref']}, {r.get('n_ref', '?')} real)"


def write_json(path: Path, obj) -> None:
    from distill.checkpoint import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
