"""Quality of a model (sampled with a given sampler, step count, guidance and seeds) or of a set of images:
the logic of ``distill eval``, also used by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.metrics import Quality
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
    from distill.checkpoint import read_metadata, resolve_model_path

    data = read_metadata(resolve_model_path(source)).get("data") or {}
    return data.get("spec") or (data.get("name") if data.get("name") in ("digits", "mnist") else None)


def evaluate(source: str, *, data_spec: str | None = None, ref: str = "A", metrics: tuple[str, ...] | None = None,
             sampler: str = "dpmpp_2m", steps: int = 20, spacing: str | None = None, eta: float | None = None,
             guidance: float | None = None, seeds: list[int] | None = None, classes: list[int] | None = None,
             batch_size: int = 250, bf16: bool = False, device: str = "cpu", inception_backend: str = "onnxruntime",
             progress: bool = True, quality: Quality | None = None, denoiser=None) -> dict:
    """Sample ``source`` (a model) or read it (images), then measure it against the real split ``ref``."""
    from distill.data import load_dataset
    from distill.samplers import nfe

    data_spec = data_spec or default_data(source)
    if data_spec is None:
        raise UsageError(f"{source}: cannot tell which real data to compare against; pass --data (e.g. mnist)")
    if quality is None:
        kwargs = {"metrics": tuple(metrics)} if metrics else {}
        quality = Quality(load_dataset(data_spec), ref=ref, inception_backend=inception_backend, device=device,
                          progress=progress, **kwargs)
    result: dict = {"source": source, "data": data_spec}
    if source.startswith("real:"):  # a real half: B against A is the real-vs-real floor
        from benchmarks.metrics import real_split

        images, labels = real_split(quality.data, source.partition(":")[2])
        result.update({"images": source, "count": len(images)})
    elif is_image_source(source):
        images, labels, info = load_images(source)
        result.update(info)
    else:
        from distill.checkpoint import card_guidance, load_denoiser
        from distill.sampling import draw_samples

        den = denoiser if denoiser is not None else load_denoiser(source, device)
        guidance = card_guidance(den.metadata, guidance)
        seeds = list(range(2500)) if seeds is None else seeds
        start = time.perf_counter()
        images, labels = draw_samples(den, sampler=sampler, steps=steps, seeds=seeds, classes=classes,
                                      guidance=guidance, spacing=spacing, eta=eta, batch_size=batch_size,
                                      device=device, bf16=bf16, progress=progress, source=source)
        seconds = time.perf_counter() - start
        result.update({"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps, den.schedule, spacing),
                       "spacing": spacing,
                       "eta": eta, "guidance": guidance, "bf16": bf16, "seeds": f"{seeds[0]}-{seeds[-1]}"
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
    what = f"{r['sampler']} {r['steps']} steps (NFE {r['nfe']}), w={r['guidance']}" if "sampler" in r else r["source"]
    return f"{what}: {' '.join(parts)} (n={r['n_fake']} vs {r['ref']}, {r.get('n_ref', '?')} real)"


def write_json(path: Path, obj) -> None:
    from distill.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
