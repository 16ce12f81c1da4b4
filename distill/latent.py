"""Latent teachers: a denoiser on the latents of a diffusers ``AutoencoderKL`` (the Stable Diffusion shape).

A diffusers pipeline directory with a ``vae/`` folder (an ``AutoencoderKL``) beside ``unet/`` and ``scheduler/`` is
a latent teacher. Its model file records, under ``latent``, where the autoencoder is (its directory, a digest of its
config and weights) and its ``scaling_factor`` and ``shift_factor``; its students inherit the record. Then:

- the denoiser, its samplers and every distillation method work on latents ``z = (mode(E(x)) - shift) * scale``
  (the posterior's mean: a deterministic encoding), the training images encoded once and cached under
  ``$DISTILL_CACHE/latents`` (keyed by the images' and the autoencoder's digests);
- ``distill sample`` and ``eval`` decode the sampled latents, ``x = D(z / scale + shift)``, into images;
- ``distill export`` writes the decoder beside the denoiser graph (see :mod:`export.onnx`).

The autoencoder is never copied into model files: it is loaded from its directory (a moved or edited directory is a
one-line error naming it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UsageError

VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def autoencoder_digest(vae_dir: Path) -> str:
    """One sha256 over the autoencoder directory's config and weight files."""
    from distill.checkpoint import file_sha256

    parts = (f"{n}:{file_sha256(vae_dir / n)}" for n in VAE_FILES if (vae_dir / n).is_file())
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


class Autoencoder(nn.Module):
    """An ``AutoencoderKL`` with its latent scaling: :meth:`encode` images in [-1, 1] to the denoiser's latents,
    :meth:`decode` latents to images."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0):
        super().__init__()
        self.vae, self.scaling_factor, self.shift_factor = vae, float(scaling_factor), float(shift_factor)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        mean = self.vae.encode(images).latent_dist.mode()
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample


class Decoder(nn.Module):
    """The decode half alone, ``latents -> images``: the graph ``distill export`` writes beside the denoiser."""

    def __init__(self, autoencoder: Autoencoder):
        super().__init__()
        self.vae = autoencoder.vae
        self.scaling_factor, self.shift_factor = autoencoder.scaling_factor, autoencoder.shift_factor

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample


def latent_record(vae_dir: Path, unet_channels: int, unet_size: int, where: Path) -> dict[str, Any]:
    """The ``latent`` metadata of a teacher whose UNet takes ``unet_channels`` x ``unet_size`` latents, for the
    autoencoder in ``vae_dir``; a mismatch is a one-line error naming ``where``."""
    import json

    cfg_file = vae_dir / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{cfg_file}: not a readable autoencoder config ({e})") from None
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UsageError(f"{cfg_file}: {cfg.get('_class_name')} is not supported; distill takes an AutoencoderKL")
    latent_channels = int(cfg.get("latent_channels", 4))
    if latent_channels != unet_channels:
        raise UsageError(f"{where}: the UNet takes {unet_channels} channels but the autoencoder's latents have "
                         f"{latent_channels}; pair the UNet with the autoencoder it was trained on")
    # the decoded size follows the UNet's latent size (the autoencoder's sample_size is only a default)
    size = unet_size * 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)
    return {"autoencoder": str(vae_dir.resolve()), "digest": autoencoder_digest(vae_dir),
            "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
            "shift_factor": float(cfg.get("shift_factor") or 0.0),
            "image_shape": [int(cfg.get("in_channels", 3)), size, size],
            "latent_shape": [latent_channels, unet_size, unet_size]}


_CACHE: dict[tuple[str, str], Autoencoder] = {}


def load_autoencoder(latent: dict[str, Any], where: str = "the model") -> Autoencoder:
    """The autoencoder a latent model's record names, checked against its digest (loaded once per process)."""
    path = Path(latent["autoencoder"])
    key = (str(path), latent["digest"])
    if key in _CACHE:
        return _CACHE[key]
    if not (path / "config.json").is_file():
        raise UsageError(f"{where}: its autoencoder {path} is missing; put the AutoencoderKL directory back there "
                         "(latent models load it from where the teacher was converted)")
    if autoencoder_digest(path) != latent["digest"]:
        raise UsageError(f"{where}: the autoencoder in {path} changed since the model was made (digest mismatch); "
                         "restore it, or convert the teacher again")
    from diffusers import AutoencoderKL

    from distill.diffusers_teacher import weights_kwargs

    kwargs = weights_kwargs(path)  # a pickle file only when trusted: before diffusers reads anything
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path}: diffusers cannot load this autoencoder ({str(e).splitlines()[0]})") from None
    ae = Autoencoder(vae.eval().requires_grad_(False), latent["scaling_factor"], latent.get("shift_factor", 0.0))
    _CACHE[key] = ae
    return ae


def latent_of(model) -> dict[str, Any] | None:
    """The ``latent`` record of a denoiser, a backend or a metadata dict (None for a pixel-space model)."""
    if isinstance(model, dict):
        return model.get("latent")
    own = getattr(model, "latent", None)
    if own is not None:
        return own
    return (getattr(model, "metadata", None) or {}).get("latent")


def output_shape(model) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a model makes: the decoded images of a latent model, else its own shape."""
    latent = latent_of(model)
    return tuple(latent["image_shape"]) if latent else tuple(model.image_shape)


@torch.no_grad()
def decode_latents(model, latents: Tensor, batch_size: int = 64) -> Tensor:
    """Images from a latent model's samples, decoded by the backend's own decoder when it has one (an export's
    ``decoder.onnx``), else by the autoencoder; a pixel-space model's samples pass through."""
    latent = latent_of(model)
    if latent is None or getattr(model, "decodes_itself", False):
        return latents
    decode = getattr(model, "decode", None)
    if decode is None:
        decode = load_autoencoder(latent).to(latents.device).decode
    return torch.cat([decode(latents[i:i + batch_size]).float() for i in range(0, len(latents), batch_size)])


def _tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def encode_dataset(data, latent: dict[str, Any], batch_size: int = 64):
    """``data`` (images in [-1, 1]) as the denoiser's latents: an :class:`~distill.data.ImageDataset` of latents
    (labels kept) whose ``pixels`` is ``data``; encoded once, then read from ``$DISTILL_CACHE/latents``."""
    from dataclasses import replace

    from distill.checkpoint import load_tensors, save_tensors
    from distill.rundir import cache_dir

    h = hashlib.sha256(data.images.numpy().tobytes())
    h.update(latent["digest"].encode())
    h.update(repr((latent["scaling_factor"], latent.get("shift_factor", 0.0))).encode())
    file = cache_dir() / "latents" / f"{h.hexdigest()[:32]}.safetensors"
    latents = None
    if file.is_file():
        try:
            tensors, meta = load_tensors(file)
            stored = tensors["latents"]
            if meta.get("key") == h.hexdigest() and meta.get("sha256") == _tensor_digest(stored):
                latents = stored
        except (OSError, ValueError, KeyError, UsageError):
            pass  # a damaged entry: encode again
    if latents is None:
        ae = load_autoencoder(latent, data.spec or data.name)
        latents = torch.cat([ae.encode(data.images[i:i + batch_size]) for i in range(0, len(data), batch_size)])
        file.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(file, {"latents": latents}, {"key": h.hexdigest(), "sha256": _tensor_digest(latents)})
    if tuple(latents.shape[1:]) != tuple(latent["latent_shape"]):
        raise UsageError(f"{data.spec or data.name}: encodes to latents of shape {tuple(latents.shape[1:])}, but the "
                         f"model takes {tuple(latent['latent_shape'])}")
    return replace(data, images=latents, pixels=data)
