"""Checkpoints: safetensors with JSON metadata, written atomically; never pickle.

Two kinds of file:
- a **model** (``model.safetensors``): the slim inference artifact, network weights plus the metadata that
  rebuilds its :class:`~distill.denoiser.Denoiser` (architecture, schedule, prediction, time input, card);
- a **training state** (``train_state.safetensors``): model, EMA and optimizer tensors plus the step, for resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor, nn

from distill.errors import UsageError
from distill.samplers import GRID_SAMPLERS

MODEL_FORMAT = "distill.model/1"
STATE_FORMAT = "distill.train_state/1"


# What the user can fix about an output location; any other OSError is a genuine runtime failure.
FIXABLE_OS_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                     errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                     errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a parent is a file, not a folder",
                     errno.EEXIST: "a parent is a file, not a folder", errno.EISDIR: "it is a folder",
                     errno.ENAMETOOLONG: "file name too long", errno.EFBIG: "file too large",
                     errno.EBUSY: "the path is busy (a mount point or the current folder)"}


def fix_hint(code: int) -> str:
    """What the user can do about a fixable OSError's code."""
    return ("free space or choose another output path" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "choose another output path")


def os_error_line(e: OSError) -> UsageError | None:
    """An OSError the user can fix (a full or read-only disk, no permission) that escaped a command's own checks,
    as one line naming the file; None for any other (a genuine runtime failure)."""
    if e.errno not in FIXABLE_OS_ERRORS:
        return None
    where = e.filename if e.filename is not None else "a file"
    return UsageError(f"{where}: {FIXABLE_OS_ERRORS[e.errno]}; {fix_hint(e.errno)}")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file.

    A location that cannot be written (a read-only or full disk, no permission, a file where a folder should be)
    is a :class:`UsageError` naming ``path``; the temp file is removed whatever happens."""
    import re

    path = Path(path)
    fixable = FIXABLE_OS_ERRORS

    def usage_error(code: int) -> UsageError:
        return UsageError(f"{path}: cannot write it ({fixable[code]}); {fix_hint(code)}")

    if path.is_dir():
        raise UsageError(f"{path}: cannot write it ({fixable[errno.EISDIR]}); give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in fixable:
            raise usage_error(e.errno) from None
        raise
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        # OSError, or a library's own error wrapping one (safetensors: "I/O error: ... (os error 28)")
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := re.search(r"os error (\d+)", str(e))):
            code = int(m.group(1))
        if code in fixable:
            raise usage_error(code) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors serialization with its JSON header in a canonical order: safetensors writes the metadata
    in hash-map order, different from one process to the next, so the same weights and metadata would give files
    with different bytes (and sha256). The header's keys are sorted and it is padded with spaces to a multiple of 8
    bytes, as the format requires; tensor offsets are relative to the data and unchanged."""
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Save tensors with ``metadata`` (JSON-encoded per key) atomically; the same tensors and metadata always give
    the same bytes."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = safetensors_bytes(tensors, meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a safetensors file, with a clear error for a missing or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint; give the path of a .safetensors file written by distill")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({e}); re-create it") from None


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}: corrupt checkpoint ({e}); re-create it") from None


def save_model(path: Path, net: nn.Module, metadata: dict[str, Any]) -> None:
    """Write the slim inference artifact: ``net``'s weights and the metadata that rebuilds its denoiser, after
    checking that it loads back (:func:`validate_model`)."""
    tensors, meta = net.state_dict(), {"format": MODEL_FORMAT, **metadata}
    validate_model(tensors, meta, path)
    save_tensors(path, tensors, meta)


def non_finite(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def validate_model(tensors: dict[str, Tensor], meta: dict[str, Any], path: Path | str):
    """What every command that writes (or reads) a model checks first: a complete config that builds a denoiser,
    weights that load into it, all finite, and a finite default guidance weight. Raises :class:`UsageError` naming
    ``path``; returns the denoiser with the weights loaded."""
    import math

    if meta.get("format") != MODEL_FORMAT:
        raise UsageError(f"{path}: not a distill model (format {meta.get('format')!r})")
    bad = non_finite(tensors)
    if bad:
        raise UsageError(f"{path}: {len(bad)} weight tensors hold NaN or Inf (first: {bad[0]}); the run diverged: "
                         "use an earlier checkpoint or retrain with a lower --lr")
    guidance = (meta.get("card") or {}).get("guidance", 0.0)
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise UsageError(f"{path}: the default guidance weight must be a finite number, got {guidance!r}")
    den = build_denoiser(meta, str(path))
    try:
        den.net.load_state_dict(tensors)
    except RuntimeError as e:
        raise UsageError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return den


def model_metadata(den) -> dict[str, Any]:
    """The ``model`` and ``diffusion`` metadata that rebuild ``den`` (:func:`build_denoiser`'s input)."""
    from distill.models.diffusers_unet import ARCH, DiffusersUNet

    diffusion = {"schedule": den.schedule.config(), "prediction": den.prediction, "time_input": den.time_input}
    if den.consistency:
        diffusion["consistency"] = dict(den.consistency)
    if den.clip_x0 is not None:
        diffusion["clip_x0"] = den.clip_x0
    if den.prediction in ("edm", "edm_v"):
        diffusion["sigma_data"] = den.sigma_data
    from distill.factory import ARCH as FACTORY
    from distill.factory import FactoryNet

    arch = ARCH if isinstance(den.net, DiffusersUNet) else FACTORY if isinstance(den.net, FactoryNet) else "unet"
    meta = {"model": {"arch": arch, "config": den.net.config.to_dict()}, "diffusion": diffusion}
    if getattr(den, "latent", None):
        meta["latent"] = dict(den.latent)
    return meta


def check_model_metadata(meta: dict[str, Any], source: str) -> None:
    """A model file must hold the ``model`` and ``diffusion`` configs that rebuild it (one line if not)."""
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("diffusion"), dict):
        raise UsageError(f"{source}: incomplete metadata (no 'model' and 'diffusion' config); re-create the file "
                         "with distill (teacher train / publish)")


def build_denoiser(meta: dict[str, Any], source: str = "checkpoint"):
    """Rebuild an (untrained) denoiser from model metadata; incomplete metadata is a one-line UsageError."""
    from distill.denoiser import Denoiser
    from distill.models import diffusers_unet
    from distill.models.unet import UNet, UNetConfig
    from distill.schedules import schedule_from_config

    check_model_metadata(meta, source)
    model, diffusion = meta["model"], meta["diffusion"]
    from distill import factory

    archs = {"unet": (UNet, UNetConfig), diffusers_unet.ARCH: (diffusers_unet.DiffusersUNet,
                                                               diffusers_unet.DiffusersUNetConfig),
             factory.ARCH: (factory.FactoryNet, factory.FactoryConfig)}
    if model.get("arch") not in archs:
        raise UsageError(f"{source}: unknown architecture {model.get('arch')!r}; this build knows "
                         f"{', '.join(map(repr, archs))}")
    try:
        net_class, config_class = archs[model["arch"]]
        cfg = config_class.from_dict(model["config"])
        # the native UNet keeps label num_classes as the null class of classifier-free guidance; a diffusers
        # UNet2DConditionModel its conditioning table's null row (if any); a UNet2DModel has none
        null = (cfg.num_classes if cfg.num_classes else None) if net_class is UNet else cfg.null_label
        den = Denoiser(net_class(cfg), schedule_from_config(diffusion["schedule"]), diffusion["prediction"],
                       diffusion["time_input"], null_label=null, guidance_input=cfg.guidance_embed,
                       consistency=diffusion.get("consistency"), clip_x0=diffusion.get("clip_x0"),
                       sigma_data=diffusion.get("sigma_data", 0.5))
        den.latent = meta.get("latent")
        return den
    except KeyError as e:
        raise UsageError(f"{source}: incomplete metadata (missing {e}); re-create the file with distill") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: invalid model config ({e}); re-create the file with distill") from None


SHIPPED_DIR = Path(__file__).parent / "weights"


def shipped_models() -> list[str]:
    """Names of the models inside the package (``distill/weights/NAME.safetensors``), e.g. ``mnist``."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def resolve_model_path(path: Path | str) -> Path:
    """A model file, a run directory, the name of a shipped model, or a diffusers directory (converted once into a
    model file, :mod:`distill.diffusers_teacher`) -> the model file's path."""
    from distill.factory import factory_model_file, is_factory_spec

    if is_factory_spec(path):  # factory:MODULE:FUNCTION, a network built by user code (distill.factory)
        return factory_model_file(str(path))
    path = Path(path)
    if not path.exists() and path.name == str(path) and (SHIPPED_DIR / f"{path}.safetensors").is_file():
        return SHIPPED_DIR / f"{path}.safetensors"
    if path.is_dir():
        if not (path / "model.safetensors").exists():
            from distill.diffusers_teacher import diffusers_model_file, diffusers_parts

            parts = diffusers_parts(path)
            if parts is not None:
                return diffusers_model_file(path, parts)
        return path / "model.safetensors"
    if not path.exists():
        names = ", ".join(shipped_models()) or "none"
        raise UsageError(f"{path}: no such checkpoint, run directory or shipped model (shipped: {names})")
    return path


def cached_conversion(kind: str, digest: str) -> tuple[Path, bool]:
    """Where the model file converted from a source with ``digest`` lives (``$DISTILL_CACHE/<kind>/``) and whether
    a complete conversion is already there (its ``source.digest`` matches; a damaged file is converted again)."""
    from distill.rundir import cache_dir

    out = cache_dir() / kind / f"{digest[:24]}.safetensors"
    try:
        return out, out.is_file() and read_metadata(out).get("source", {}).get("digest") == digest
    except (OSError, ValueError, UsageError):
        return out, False


def card_guidance(meta: dict[str, Any], guidance: float | None = None) -> float:
    """``guidance`` when given, else the default classifier-free guidance weight a model file records
    (``card.guidance``), else 0."""
    return float((meta.get("card") or {}).get("guidance", 0.0) if guidance is None else guidance)


DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m", 20


def card_sampling(meta: dict[str, Any], sampler: str | None = None, steps: int | None = None,
                  spacing: str | None = None) -> tuple[str, int, str | None, list[float] | None]:
    """``(sampler, steps, spacing, timesteps)`` to sample a model with: what the user gave, else what its card
    names (a distilled student's own sampler, step count and exact timesteps), else DPM-Solver++(2M) at 20 steps.
    The card's step count and exact timesteps are used whenever the sampler is the card's or, for a card whose
    sampler walks a given grid, any such sampler (``GRID_SAMPLERS``: ddim, ddpm, stochastic, consistency), and the
    step count and spacing are not overridden (other step counts keep a diffusers teacher's timestep spacing). A
    card may also hold exact timesteps for other step counts
    (``timesteps_by_steps``, e.g. a consistency student's searched 2- and 3-step grids), used when such a count is
    asked for."""
    from distill.schedules import DIFFUSERS_SPACINGS

    card = meta.get("card") or {}
    sampler = sampler or card.get("sampler") or DEFAULT_SAMPLER
    on_grid = sampler == card.get("sampler") or (sampler in GRID_SAMPLERS and card.get("sampler") in GRID_SAMPLERS)
    steps = steps or (card.get("steps") if on_grid else None) or DEFAULT_STEPS
    if on_grid and spacing in (None, card.get("spacing")):
        if steps == card.get("steps"):
            return sampler, steps, card.get("spacing"), card.get("timesteps")
        other = (card.get("timesteps_by_steps") or {}).get(str(steps))
        if other is not None:
            return sampler, steps, card.get("spacing"), other
    if spacing is None and on_grid and card.get("spacing") in DIFFUSERS_SPACINGS:
        spacing = card["spacing"]  # a diffusers teacher samples on its scheduler's own grid at any step count
    return sampler, steps, spacing, None


def one_step_time(meta: dict[str, Any]) -> float:
    """Where a model reads its noise for a one-step sample: the top of its card's one-step grid (a consistency
    student's searched level, a DMD generator's), else ``t = 1``."""
    times = card_sampling(meta, None, 1)[3]
    return float(times[0]) if times else 1.0


def load_denoiser(path: Path | str, device: str = "cpu"):
    """Load a model file, a run directory holding ``model.safetensors``, or a shipped model by name (``mnist``)."""
    path = resolve_model_path(path)
    tensors, meta = load_tensors(path)
    if meta.get("format") != MODEL_FORMAT:
        raise UsageError(f"{path}: not a distill model file (format {meta.get('format')!r}); "
                         "pass the model.safetensors of a run")
    den = validate_model(tensors, meta, path)
    den.metadata = meta
    return den.to(device).eval()


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, Tensor], list]:
    """Flatten an optimizer's state dict into tensors plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}{idx}.{key}"] = torch.as_tensor(value)
    return tensors, sd["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], param_groups: list,
                           prefix: str = "optim.") -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": param_groups})
