"""Teachers from diffusers directories: a ``UNet2DModel`` or ``UNet2DConditionModel`` (with precomputed
conditioning) and its scheduler config, with an ``AutoencoderKL`` for a latent teacher, as a distill model file.

A diffusers pipeline directory (``model_index.json`` with ``unet/`` and ``scheduler/``, what
``DDPMPipeline.save_pretrained`` writes) or a UNet directory holding its own ``scheduler_config.json`` is taken
anywhere a model is (``distill sample|eval|progressive|consistency|export DIR``, recipes). It is converted once into
a model file under ``$DISTILL_CACHE/diffusers`` (named by a hash of the directory's config and weight files, so an
edited directory converts again) holding the diffusers UNet (arch ``diffusers-unet2d``) and the scheduler mapped
onto the continuous-time denoiser:

- the beta table (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``; ``num_train_timesteps``, ``beta_start``,
  ``beta_end``) becomes :class:`~distill.schedules.DiscreteSchedule`, whose knots sit at diffusers' training
  timesteps (index ``i`` at ``t = (i + 1) / T``, :func:`~distill.denoiser.time_input` ``"index"``);
- ``prediction_type`` ``epsilon`` / ``v_prediction`` / ``sample`` becomes ``eps`` / ``v`` / ``x0``;
- ``clip_sample`` (with ``clip_sample_range``) clamps the clean estimate;
- the card samples with DDIM on the scheduler's own ``timestep_spacing`` (``leading`` with ``steps_offset``,
  ``trailing``, ``linspace``) at diffusers' default 50 steps, so ``distill sample DIR --sampler ddim --steps N``
  walks ``DDIMPipeline``'s timesteps.

Nothing is downloaded: the directory is read with diffusers' local loaders. What cannot be mapped exactly
(``trained_betas``, ``rescale_betas_zero_snr``, dynamic thresholding, a ``UNet2DConditionModel`` without its
precomputed ``conditioning.safetensors`` or with added embeddings, non-square images) is refused with a one-line
error naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from distill.errors import UsageError

LOG = logging.getLogger("distill")

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DISCRETE_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
                       "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                       "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                       "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRUST_PICKLE_ENV = "DISTILL_TRUST_PICKLE"  # =1: load pickle-based .bin weights (with torch.load(weights_only=True))
DEFAULT_STEPS = 50  # DDIMPipeline's num_inference_steps
ALPHA_TO_ONE_SCHEDULERS = ("DDIMScheduler", "DDIMParallelScheduler", "PNDMScheduler")  # what set_alpha_to_one moves


def weights_kwargs(folder: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments for a diffusers model folder: its safetensors weights when it has them (never
    the pickle file beside them); a pickle-based ``.bin`` alone only when the user trusts it
    (``DISTILL_TRUST_PICKLE=1``; diffusers then loads it with ``torch.load(weights_only=True)``)."""
    import os

    if (Path(folder) / WEIGHT_FILES[0]).is_file():
        return {"use_safetensors": True}
    pickled = Path(folder) / WEIGHT_FILES[1]
    if pickled.is_file():
        if os.environ.get(TRUST_PICKLE_ENV) != "1":
            raise UsageError(f"{pickled}: pickle-based weights can run code when loaded; convert them to safetensors "
                             f"(save_pretrained(..., safe_serialization=True)), or set {TRUST_PICKLE_ENV}=1 to trust "
                             "this file (then loaded with torch.load(weights_only=True))")
        return {"use_safetensors": False}
    return {}


def diffusers_parts(path: Path) -> tuple[Path, Path, Path | None] | None:
    """``(unet_dir, scheduler_config, vae_dir)`` of a diffusers directory (``vae_dir`` None unless a pipeline holds
    an autoencoder: a latent teacher, :mod:`distill.latent`), or None when ``path`` is not one."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file():
        unet, sched = path / "unet", path / "scheduler" / "scheduler_config.json"
        if not (unet / "config.json").is_file():
            raise UsageError(f"{path}: a diffusers pipeline directory without unet/config.json; distill takes a "
                             "pipeline with a UNet2DModel (unet/) and its scheduler (scheduler/)")
        if not sched.is_file():
            raise UsageError(f"{path}: no scheduler/scheduler_config.json; the UNet's noise schedule comes from it")
        vae = path / "vae"
        return unet, sched, vae if (vae / "config.json").is_file() else None
    if (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES):
        sched = path / "scheduler_config.json"
        if not sched.is_file():
            raise UsageError(f"{path}: a diffusers UNet directory without scheduler_config.json; put the scheduler "
                             "config the UNet was trained with beside it (or pass the pipeline directory)")
        return path, sched, None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: a diffusers config is a JSON object")
    return doc


def diffusion_config(sched: dict[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A diffusers scheduler config -> our ``diffusion`` metadata (schedule, prediction, time input, clipping)
    and the card's sampling defaults. Raises a one-line UsageError for what does not map exactly."""
    name = sched.get("_class_name", "DDPMScheduler")
    if name in EDM_SCHEDULERS:
        return edm_config(sched, where, name)
    if name not in DISCRETE_SCHEDULERS:
        raise UsageError(f"{where}: scheduler {name} is not a discrete DDPM-table scheduler; distill maps "
                         f"{', '.join(DISCRETE_SCHEDULERS[:3])} and the other beta-table schedulers, and "
                         f"{', '.join(EDM_SCHEDULERS)}")
    if sched.get("trained_betas") is not None:
        raise UsageError(f"{where}: trained_betas (a custom beta table) is not supported; use a named beta_schedule")
    if sched.get("rescale_betas_zero_snr"):
        raise UsageError(f"{where}: rescale_betas_zero_snr is not supported (its last timestep has zero SNR)")
    if sched.get("thresholding"):
        raise UsageError(f"{where}: dynamic thresholding is not supported; set thresholding to false")
    kind = sched.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise UsageError(f"{where}: beta_schedule {kind!r}: distill maps {', '.join(BETA_SCHEDULES)}")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise UsageError(f"{where}: prediction_type {prediction!r}: use one of {', '.join(PREDICTIONS)}")
    spacing = sched.get("timestep_spacing", "leading")
    from distill.schedules import DIFFUSERS_SPACINGS

    if spacing not in DIFFUSERS_SPACINGS:
        raise UsageError(f"{where}: timestep_spacing {spacing!r}: use one of {', '.join(DIFFUSERS_SPACINGS)}")
    schedule = {"name": "discrete", "beta_schedule": kind,
                "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
                "beta_start": float(sched.get("beta_start", 1e-4)), "beta_end": float(sched.get("beta_end", 0.02)),
                "steps_offset": int(sched.get("steps_offset", 0))}
    if name in ALPHA_TO_ONE_SCHEDULERS and not sched.get("set_alpha_to_one", True):
        # DDIM's last step lands on training timestep 0, not clean data (other schedulers ignore the key)
        schedule["set_alpha_to_one"] = False
    diffusion: dict[str, Any] = {"schedule": schedule, "prediction": PREDICTIONS[prediction], "time_input": "index"}
    if sched.get("clip_sample", name in ("DDPMScheduler", "DDIMScheduler")):
        diffusion["clip_x0"] = float(sched.get("clip_sample_range", 1.0))
    card = {"sampler": "ddim", "steps": DEFAULT_STEPS, "spacing": spacing}
    return diffusion, card


EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_PREDICTIONS = {"epsilon": "edm", "v_prediction": "edm_v"}


def edm_config(sched: dict[str, Any], where: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An EDM scheduler (Karras et al. 2022, as diffusers' ``EDMEulerScheduler`` and
    ``EDMDPMSolverMultistepScheduler``): the VE Karras schedule with the network preconditioned (input ``c_in x``,
    time ``0.25 ln sigma``, output EDM's F with ``sigma_data``); the card samples with Euler (or DPM-Solver++(2M))
    on the scheduler's sigma grid (``karras``, or ``exponential``: even in log sigma, our ``logsnr`` spacing)."""
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in EDM_PREDICTIONS:
        raise UsageError(f"{where}: prediction_type {prediction!r}: an EDM scheduler takes "
                         f"{' or '.join(EDM_PREDICTIONS)}")
    spacing = {"karras": "karras", "exponential": "logsnr"}.get(sched.get("sigma_schedule", "karras"))
    if spacing is None:
        raise UsageError(f"{where}: sigma_schedule {sched.get('sigma_schedule')!r}: use karras or exponential")
    if sched.get("final_sigmas_type", "zero") != "zero":
        raise UsageError(f"{where}: final_sigmas_type {sched.get('final_sigmas_type')!r}: distill's samplers end on "
                         "clean data (final_sigmas_type zero)")
    sigma_data = float(sched.get("sigma_data", 0.5))
    schedule = {"name": "karras", "sigma_min": float(sched.get("sigma_min", 0.002)),
                "sigma_max": float(sched.get("sigma_max", 80.0)), "rho": float(sched.get("rho", 7.0)),
                "sigma_data": sigma_data}
    diffusion = {"schedule": schedule, "prediction": EDM_PREDICTIONS[prediction], "time_input": "log_sigma",
                 "sigma_data": sigma_data}
    sampler = "euler" if name == "EDMEulerScheduler" else "dpmpp_2m"
    return diffusion, {"sampler": sampler, "steps": DEFAULT_STEPS, "spacing": spacing}


def _digest(unet_dir: Path, sched: Path, vae: Path | None) -> str:
    """One hash over the UNet's config and weights, the scheduler config and the autoencoder (each file's
    sha256)."""
    from distill.checkpoint import file_sha256
    from distill.latent import autoencoder_digest

    files = [unet_dir / "config.json", sched, *(unet_dir / w for w in WEIGHT_FILES),
             *[p for p in conditioning_candidates(unet_dir) if p.is_file()][:1]]
    parts = [f"conversion:{CONVERSION_VERSION}", *(f"{p.name}:{file_sha256(p)}" for p in files if p.is_file())]
    if vae is not None:
        parts.append(f"vae:{autoencoder_digest(vae)}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


CONDITIONING_FILE = "conditioning.safetensors"
CONDITIONAL_UNSUPPORTED = ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim",
                           "num_class_embeds")
CONVERSION_VERSION = "2"  # what a conversion writes (bumped when the mapping changes: older conversions redo)


def conditioning_candidates(unet_dir: Path) -> list[Path]:
    """Where a conditional UNet's precomputed conditioning is looked for: beside the pipeline, then in the UNet's
    own folder."""
    return [unet_dir.parent / CONDITIONING_FILE, unet_dir / CONDITIONING_FILE]


def read_conditioning(unet_dir: Path, unet_cfg: dict[str, Any]):
    """``(table, null_row)``: the ``encoder_hidden_states`` rows (``K x L x D``) of a ``UNet2DConditionModel``,
    with its null row appended when the file has one; a one-line error names the file to write."""
    import torch
    from safetensors.torch import load_file

    for key in CONDITIONAL_UNSUPPORTED:
        if unet_cfg.get(key) is not None:
            raise UsageError(f"{unet_dir / 'config.json'}: {key} {unet_cfg[key]!r} is not supported (distill feeds a "
                             "conditional UNet encoder_hidden_states only)")
    found = [p for p in conditioning_candidates(unet_dir) if p.is_file()]
    if not found:
        raise UsageError(f"{unet_dir.parent / CONDITIONING_FILE}: missing; a UNet2DConditionModel needs its "
                         "precomputed conditioning there: a safetensors file with 'encoder_hidden_states' (K x L x D, "
                         "one row per prompt or class) and optionally 'null' (L x D, the unconditional embedding)")
    file = found[0]
    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise UsageError(f"{file}: not a readable safetensors file ({e})") from None
    rows = tensors.get("encoder_hidden_states")
    if rows is None or rows.ndim != 3 or 0 in rows.shape:
        raise UsageError(f"{file}: needs 'encoder_hidden_states' of shape K x L x D (K rows, L tokens, D features)")
    dim = unet_cfg.get("cross_attention_dim", 1280)
    if isinstance(dim, int) and rows.shape[2] != dim:
        raise UsageError(f"{file}: encoder_hidden_states have {rows.shape[2]} features but the UNet's "
                         f"cross_attention_dim is {dim}")
    null = tensors.get("null")
    if null is not None:
        null = null.reshape(-1, *rows.shape[1:])[:1] if null.numel() == rows[0].numel() else None
        if null is None:
            raise UsageError(f"{file}: 'null' must have the shape of one row, {tuple(rows.shape[1:])}")
    table = torch.cat([rows, null]) if null is not None else rows
    if not bool(torch.isfinite(table).all()):
        raise UsageError(f"{file}: the conditioning holds NaN or Inf")
    return table.float().contiguous(), null is not None


def diffusers_model_file(path: Path, parts: tuple[Path, Path]) -> Path:
    """The distill model file of the diffusers directory ``path``, whose :func:`diffusers_parts` are ``parts``
    (converted once, then reused)."""
    from distill.checkpoint import cached_conversion, save_model
    from distill.models.diffusers_unet import ARCH, DiffusersUNet, DiffusersUNetConfig, public_config

    unet_dir, sched_path, vae_dir = parts
    digest = _digest(unet_dir, sched_path, vae_dir)
    out, done = cached_conversion("diffusers", digest)
    if done:
        return out
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name") == "DistilledUNet":
        source = _read_json(path / "distill_export.json").get("source", {}) \
            if (Path(path) / "distill_export.json").is_file() else {}
        raise UsageError(f"{path}: a distill model exported for diffusers pipelines (a DistilledUNet); pass the model "
                         f"it was exported from ({source.get('model', 'its model file')}), or load it with diffusers")
    kind = unet_cfg.get("_class_name", "UNet2DModel")
    if kind not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UsageError(f"{unet_dir / 'config.json'}: {kind} is not supported; distill takes a UNet2DModel or a "
                         "UNet2DConditionModel")
    table, null_row = read_conditioning(unet_dir, unet_cfg) if kind == "UNet2DConditionModel" else (None, False)
    diffusion, card = diffusion_config(_read_json(sched_path), sched_path)
    import diffusers

    kwargs = weights_kwargs(unet_dir)  # a pickle file only when trusted: before diffusers reads anything
    LOG.info(f"note: converting the diffusers directory {path} once (cached in {out.parent}); later runs reuse it")
    try:
        unet = getattr(diffusers, kind).from_pretrained(str(unet_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{unet_dir}: diffusers cannot load this UNet ({str(e).splitlines()[0]})") from None
    try:
        net = DiffusersUNet(DiffusersUNetConfig(public_config(unet.config), kind=kind,
                                                conditioning=list(table.shape) if table is not None else None,
                                                null_row=null_row))
    except ValueError as e:
        raise UsageError(f"{unet_dir / 'config.json'}: {e}") from None
    net.unet.load_state_dict(unet.state_dict())
    if table is not None:
        net.conditioning.copy_(table)
    meta = {"model": {"arch": ARCH, "config": net.config.to_dict()}, "diffusion": diffusion, "card": card,
            "source": {"diffusers": str(Path(path).resolve()), "digest": digest}}
    if vae_dir is not None:
        from distill.latent import latent_record

        meta["latent"] = latent_record(vae_dir, net.config.in_channels, net.config.image_size, unet_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(out, net, meta)
    return out
