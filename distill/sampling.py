"""Sampling a checkpoint to files: the `distill sample` command's logic."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.checkpoint import atomic_write, card_guidance, card_sampling
from distill.denoiser import Cond
from distill.errors import UsageError
from distill.latent import decode_latents
from distill.samplers import check_sampler_options, generate


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, ncol: int | None = None, min_tile: int = 32) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one image, upscaling small tiles (nearest) to ``min_tile`` px."""
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / h))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    pad = 2
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def draw_samples(den, *, sampler: str | None = None, steps: int | None = None, seeds: list[int],
                 classes: list[int] | None = None,
                 guidance: float | None = None, spacing: str | None = None, eta: float | None = None,
                 batch_size: int = 256, device: str = "cpu", bf16: bool = False, progress: bool = True,
                 source: str = "the model", timesteps: list[float] | None = None) -> tuple[np.ndarray, Tensor | None]:
    """One sample per seed from a loaded denoiser, classes cycled over the seeds (all classes of a conditional
    model by default): uint8 NHWC images and the requested labels. ``bf16`` runs the network under autocast.
    ``guidance=None`` takes the model card's default weight (0 when it has none); ``sampler``, ``steps`` and
    ``spacing`` left ``None`` take the card's (a student's own sampler and exact timesteps, see
    :func:`~distill.checkpoint.card_sampling`); ``timesteps`` (``steps + 1`` decreasing times ending at 0) replace
    them."""
    meta = getattr(den, "metadata", {})
    guidance = card_guidance(meta, guidance)
    fused = getattr(den, "kind", "denoiser") == "sampler"
    if fused:  # an exported few-step sampler graph: its sampler and grid are part of the graph
        m = den.manifest
        if sampler not in (None, m["sampler"]) or steps not in (None, m["steps"]) or spacing is not None \
                or eta is not None or timesteps is not None:
            raise UsageError(f"{source} is a fused {m['steps']}-step {m['sampler']} sampler graph, fixed at export; "
                             "drop --sampler/--steps/--spacing/--eta (or export another graph)")
        sampler, steps, timesteps = m["sampler"], m["steps"], m["timesteps"]
    if timesteps is not None:
        steps = len(timesteps) - 1
    sampler, steps, spacing, card_times = card_sampling(meta, sampler, steps, spacing)
    timesteps = timesteps if timesteps is not None else card_times
    if not math.isfinite(guidance):
        raise UsageError(f"--guidance {guidance}: the guidance weight must be a finite number")
    check_sampler_options(sampler, eta)
    num_classes = den.num_classes
    if classes is not None and not num_classes:
        raise UsageError(f"--classes: {source} is unconditional; drop --classes")
    if guidance and not num_classes:
        raise UsageError(f"--guidance: {source} is unconditional, so it cannot be guided; drop --guidance")
    card = meta.get("card") or {}
    if guidance and str(card.get("method")).startswith("consistency") and not den.guidance_input:
        raise UsageError(f"--guidance: {source} is a consistency student distilled at w = "
                         f"{card.get('distilled_guidance', 0)}; it maps noise to data directly, so classifier-free "
                         "guidance cannot be applied to it; drop --guidance, or distill with --guidance-range for a "
                         "student that takes w")
    if guidance and card.get("method") in ("progressive", "guidance") and not den.guidance_input \
            and not card.get("label_dropout"):
        raise UsageError(f"--guidance: {source} is a student distilled at w = {card.get('distilled_guidance', 0)} "
                         "without the null class, so classifier-free guidance cannot run on it; drop --guidance, or "
                         "distill with --guidance-range for a student that takes w")
    grange = card.get("guidance_range")
    if den.guidance_input and grange and not grange[0] <= guidance <= grange[1]:
        warnings.warn(f"--guidance {guidance:g}: {source} was distilled for w in [{grange[0]:g}, {grange[1]:g}]; "
                      "outside it the student extrapolates, untested", stacklevel=2)
    if classes is not None and any(c < 0 or c >= num_classes for c in classes):
        raise UsageError(f"--classes: labels must be in 0-{num_classes - 1} for {source}")
    if num_classes and classes is None:
        classes = list(range(num_classes))
    labels = torch.tensor([classes[i % len(classes)] for i in range(len(seeds))]) if classes else None
    shape = den.image_shape
    chunks = []
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
        for start in range(0, len(seeds), batch_size):
            sl = slice(start, start + batch_size)
            cond = Cond(labels[sl].to(device) if labels is not None else None, guidance)
            if fused:
                x = den.sample(seeds[sl], cond).float()
            else:
                x = generate(den, shape, seeds[sl], sampler=sampler, steps=steps, spacing=spacing, cond=cond,
                             device=device, eta=eta, progress=progress, timesteps=timesteps).float()
            chunks.append(decode_latents(den, x).cpu())  # a latent model's samples, decoded to images
    return to_uint8(torch.cat(chunks)), labels


def sample_to_files(den, out: Path, *, source: str, sampler: str | None, steps: int | None, spacing: str | None,
                    eta: float | None, guidance: float | None, classes: list[int] | None, seeds: list[int],
                    batch_size: int, device: str = "cpu") -> tuple[Path, Path]:
    """Sample one image per seed from ``den`` and write ``grid.png`` and ``samples.npz`` (images, labels, seeds) to
    ``out``. ``den`` is a loaded backend (a model or an export folder opened by the caller, e.g. with
    ``export.backends.load_backend``): a denoiser, or a fused sampler graph (``kind == "sampler"``), with the model's
    ``metadata`` (its card: the sampler defaults), ``name`` and ``precision``. ``source`` is what it was loaded from,
    for messages and the recorded info."""
    from distill.preflight import check_device, check_output_dir

    check_device(device)
    check_output_dir(out, "--out")
    guidance = card_guidance(den.metadata, guidance)
    if getattr(den, "kind", "denoiser") == "denoiser":
        sampler, steps, spacing, _ = card_sampling(den.metadata, sampler, steps, spacing)
    elif sampler is None and steps is None:  # a fused sampler graph: what it runs is fixed at export
        sampler, steps = den.manifest["sampler"], den.manifest["steps"]
    images, labels = draw_samples(den, sampler=sampler, steps=steps, seeds=seeds, classes=classes,
                                  guidance=guidance, spacing=spacing, eta=eta, batch_size=batch_size,
                                  device=device, source=source)
    out = Path(out)
    npz, grid = out / "samples.npz", out / "grid.png"
    arrays = {"images": images, "seeds": np.array(seeds)}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    info = {"checkpoint": source, "sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta,
            "guidance": guidance, "backend": den.name, "precision": den.precision}
    arrays["info"] = np.array(json.dumps(info))

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(npz, write_npz)
    ncls = len(set(labels.tolist())) if labels is not None else 0
    save_png(grid, image_grid(images, ncol=ncls if ncls and len(seeds) % ncls == 0 else None))
    return grid, npz
