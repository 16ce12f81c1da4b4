"""Building and training a native diffusion teacher: the `distill teacher train` command's logic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.data import ImageDataset, load_dataset
from distill.errors import UsageError
from distill.models.unet import UNetConfig
from distill.parsing import parse_int_list
from distill.schedules import CosineSchedule, DiscreteSchedule, Schedule
from distill.training import TrainConfig, Trainer

# diffusers' defaults for each DDPM beta table (start, end).
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


@dataclass
class TeacherRun:
    """Everything a teacher training run needs, validated before anything is written."""

    data: ImageDataset
    unet: UNetConfig
    schedule: Schedule
    prediction: str
    label_dropout: float
    train: TrainConfig

    def metadata(self) -> dict[str, Any]:
        return {
            "model": {"arch": "unet", "config": self.unet.to_dict()},
            "diffusion": {"schedule": self.schedule.config(), "prediction": self.prediction,
                          "time_input": "t1000"},
            "method": {"name": "teacher", "label_dropout": self.label_dropout},
        }


def make_schedule(name: str) -> Schedule:
    if name == "cosine":
        return CosineSchedule()
    start, end = BETA_RANGES[name]
    return DiscreteSchedule(name, 1000, start, end)


def _ints(value: Sequence[int] | str | None, option: str) -> tuple[int, ...]:
    """A list of integers given as a sequence, or as the command line's ``"1,2,2"``."""
    if value is None:
        return ()
    return tuple(parse_int_list(value, option, allow_empty=True) if isinstance(value, str) else map(int, value))


def build_teacher(*, data_spec: str, image_size: int | None, unconditional: bool, schedule: str, prediction: str,
                  channels: int, channel_mult: Sequence[int] | str | None, num_res_blocks: int,
                  attn_res: Sequence[int] | str | None, dropout: float, label_dropout: float,
                  train: dict[str, Any]) -> TeacherRun:
    """Load the data and resolve the architecture defaults from the image size (``channel_mult`` and ``attn_res``
    are lists of integers; ``None`` takes the default, an empty ``attn_res`` means no attention)."""
    data = load_dataset(data_spec, image_size)
    c, h, w = data.shape
    if h != w:
        raise UsageError(f"--data {data_spec}: images are {h}x{w}; the UNet needs square images (pass --image-size)")
    mult = _ints(channel_mult, "--channel-mult")
    mult = mult or ((1, 2) if h <= 16 else (1, 2, 2))
    lowest = h // 2 ** (len(mult) - 1)
    if attn_res is not None:  # an empty --attn means no attention
        attn = _ints(attn_res, "--attn")
        levels = [h // 2**i for i in range(len(mult))]
        missing = [r for r in attn if r not in levels]
        if missing:
            raise UsageError(f"--attn {','.join(map(str, attn))}: no level of this UNet is {missing[0]}x{missing[0]}; "
                             "its levels are "
                             f"{', '.join(map(str, levels))}")
    else:
        attn = (lowest,)  # attention only where it is cheap: 16x16 attention tripled the step time at 32 px
    num_classes = 0 if unconditional or data.labels is None else data.num_classes
    cfg = UNetConfig(image_size=h, in_channels=c, out_channels=c, channels=channels, channel_mult=mult,
                     num_res_blocks=num_res_blocks, attn_resolutions=attn, dropout=dropout,
                     num_classes=num_classes)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(f"--channel-mult/--channels: {e}") from None
    tcfg = TrainConfig(**train)
    tcfg.validate()
    return TeacherRun(data, cfg, make_schedule(schedule), prediction, label_dropout if num_classes else 0.0, tcfg)


def train_teacher(run: TeacherRun, out: Path, *, resume: bool = False, command: str = "",
                  progress: bool = True) -> Trainer:
    """Train (or resume) a teacher into ``out``."""
    import torch

    from distill.denoiser import Denoiser
    from distill.losses import DiffusionLoss
    from distill.models.unet import UNet

    torch.manual_seed(run.train.seed)  # the initial weights are part of the run's reproducibility
    net = UNet(run.unet)
    null = run.unet.num_classes or None
    model = Denoiser(net, run.schedule, run.prediction, "t1000", null_label=null)
    meta = {**run.metadata(), "command": command}
    trainer = Trainer(model, DiffusionLoss(run.label_dropout), run.data, run.train, Path(out), meta)
    trainer.run(resume=resume, progress=progress)
    return trainer


def publish(run: Path | str, dest: Path, *, guidance: float, data_spec: str | None = None,
            sampler: str | None = None) -> Path:
    """Copy a run's inference artifact to ``dest`` (a ``.safetensors`` path), recording the default guidance
    weight (``card.guidance``, used by ``distill eval``/``sample`` when none is given), the training data and,
    when given, the default sampler (``card.sampler``; a distilled student's must walk its own grid, and the sampler
    it was distilled for stays on the card as ``distilled_sampler``)."""
    import math

    from distill.checkpoint import load_tensors, resolve_model_path, save_tensors, validate_model

    if not math.isfinite(guidance):
        raise UsageError(f"--guidance {guidance}: the default guidance weight must be a finite number")
    if Path(dest).suffix != ".safetensors":
        raise UsageError(f"DEST {dest}: a model file must end in .safetensors (shipped models load by that name)")
    src = resolve_model_path(run)
    tensors, meta = load_tensors(src)
    data = dict(meta.get("data") or {})
    if data_spec:
        data["spec"] = data_spec
    if not data.get("spec"):
        raise UsageError(f"{src}: does not record its training data; pass --data")
    if data_spec:
        load_dataset(data_spec)  # an unknown or unreadable --data fails here, not later in distill eval
    card = {**(meta.get("card") or {}), "guidance": guidance}
    if sampler is not None and sampler != card.get("sampler"):
        from distill.samplers import GRID_SAMPLERS, check_sampler_options

        check_sampler_options(sampler)
        if card.get("steps") and sampler not in GRID_SAMPLERS:
            raise UsageError(f"--sampler {sampler}: {src} is a distilled student that samples on its own "
                             f"{card['steps']}-step grid; use one of {', '.join(GRID_SAMPLERS)}")
        if card.get("steps"):
            card["distilled_sampler"] = card.get("distilled_sampler", card.get("sampler"))
        card["sampler"] = sampler
    meta = {**meta, "data": data, "card": card}
    validate_model(tensors, meta, src)  # a complete config that loads, finite weights: before anything is written
    save_tensors(dest, tensors, meta)
    return dest
