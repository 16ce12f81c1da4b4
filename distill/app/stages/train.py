"""Training stages: a teacher, progressive (and guidance) distillation, consistency distillation and training."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distill.app.stages.base import StageConfig, StageResult, as_list, check_threads, log, torch_threads
from distill.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
PositiveFloat = Field(gt=0, allow_inf_nan=False)


@contextmanager
def training_run(cfg: TrainFields, what: str) -> Iterator[dict[str, Any]]:
    """What every training stage does around its run: resolve ``precision: auto`` (logged), run with the config's
    threads (restored after), time it. Yields ``{"bf16": bool, "record": {...}}``; the record gets the precision,
    its reason and the seconds, for the stage's result."""
    bf16, reason = resolve_precision(cfg.precision)
    log.info(f"{what}: {reason}")
    run = {"bf16": bf16, "record": {"precision": "bf16" if bf16 else "fp32", "precision_reason": reason}}
    start = time.perf_counter()
    with torch_threads(cfg.threads):
        yield run
    run["record"]["seconds"] = round(time.perf_counter() - start, 1)


def resolve_precision(precision: str, device: str = "cpu") -> tuple[bool, str]:
    """``(bf16, reason)`` for a training stage: ``auto`` is bf16 only where the hardware runs it natively."""
    from distill.hardware import resolve_precision as resolve

    chosen, reason = resolve(precision, device)
    return chosen == "bf16", reason


def finished_steps(out: Path) -> int:
    """The step of the training state in ``out`` (0 when there is none)."""
    from distill.checkpoint import read_metadata
    from distill.training import STATE_FILE

    state = out / STATE_FILE
    return int(read_metadata(state).get("step", 0)) if state.exists() else 0


def fresh_run_dir(out: Path) -> bool:
    """Whether ``out`` holds no checkpoint yet; a log left by a run killed before its first checkpoint is dropped,
    so the new run's ``metrics.jsonl`` is its own."""
    from distill.training import METRICS_FILE, STATE_FILE

    if (out / STATE_FILE).exists():
        return False
    (out / METRICS_FILE).unlink(missing_ok=True)
    return True


def last_loss(out: Path) -> float | None:
    import json

    from distill.training import METRICS_FILE

    path = out / METRICS_FILE
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return float(json.loads(lines[-1])["loss"]) if lines else None
    except (ValueError, KeyError):
        return None


class TrainFields(StageConfig):
    """The optimization settings every training stage has."""

    lr: float = PositiveFloat
    batch_size: int = Field(128, ge=1, le=65536)
    warmup: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0, allow_inf_nan=False)
    precision: Precision = "auto"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    ckpt_every: int = Field(100, ge=1)
    threads: int | None = None

    _threads = field_validator("threads")(lambda cls, v: check_threads(v))


class TeacherConfig(TrainFields):
    """``distill teacher train``: a native UNet diffusion teacher trained on an image dataset."""

    kind: ClassVar[str] = "teacher"
    cli: ClassVar[str] = "teacher train"
    flags: ClassVar[dict[str, str]] = {"data": "--data"}

    data: str = Field(min_length=1)
    image_size: int | None = Field(None, ge=4, le=1024)
    unconditional: bool = False
    schedule: Literal["cosine", "linear", "scaled_linear", "squaredcos_cap_v2"] = "cosine"
    prediction: Literal["v", "eps", "x0"] = "v"
    channels: int = Field(32, ge=4, le=1024)
    channel_mult: list[int] | None = None  # [default: 1,2 for <= 16 px, else 1,2,2]
    num_res_blocks: int = Field(2, ge=1, le=8)
    attn: list[int] | None = None  # resolutions with self-attention [default: the lowest]; [] = none
    dropout: float = Field(0.1, ge=0, le=0.9)
    steps: int = Field(4000, ge=1)
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False)
    warmup: int = Field(200, ge=0)
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, le=1)
    ckpt_every: int = Field(500, ge=1)

    _lists = field_validator("channel_mult", "attn", mode="before")(lambda cls, v: as_list(v))

    @model_validator(mode="after")
    def _check(self):
        if self.channel_mult is not None:
            if not self.channel_mult or any(m < 1 for m in self.channel_mult):
                raise ConfigError("channel_mult", f"{self.channel_mult}: give multipliers >= 1, e.g. 1,2,2")
            widest = self.channels * max(self.channel_mult)
            if widest > 8192:
                raise ConfigError("channel_mult", f"{self.channel_mult}: the widest level would have {widest} "
                                  f"channels (channels {self.channels} x multiplier); keep it at most 8192")
        return self


def run_teacher(cfg: TeacherConfig, out: Path, *, command: str = "", progress: bool = True) -> StageResult:
    """Train (or continue, when ``out`` holds a checkpoint) a teacher into ``out``."""
    from distill.rundir import refuse_if_locked
    from distill.teacher import build_teacher, train_teacher
    from distill.training import MODEL_FILE

    out = Path(out)
    refuse_if_locked(out)  # before the data loads
    with training_run(cfg, "teacher") as run:
        teacher = build_teacher(
            data_spec=cfg.data, image_size=cfg.image_size, unconditional=cfg.unconditional, schedule=cfg.schedule,
            prediction=cfg.prediction, channels=cfg.channels, channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks, attn_res=cfg.attn, dropout=cfg.dropout,
            label_dropout=cfg.label_dropout,
            train=dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
                       lr_decay=cfg.lr_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, bf16=run["bf16"],
                       seed=cfg.seed, ckpt_every=cfg.ckpt_every))
        resume = not fresh_run_dir(out)
        if resume and finished_steps(out) >= cfg.steps:
            log.info(f"teacher: already trained ({out / MODEL_FILE})")
        else:
            train_teacher(teacher, out, resume=resume, command=command or cfg.command(out), progress=progress)
    return StageResult({"model": out / MODEL_FILE}, {"steps": cfg.steps, "loss": last_loss(out), **run["record"]})


class StudentFields(TrainFields):
    """What the distillation stages share: a teacher, its data, guidance and the student's parameterization."""

    positional: ClassVar[tuple[str, ...]] = ("teacher",)
    inputs: ClassVar[tuple[str, ...]] = ("teacher",)

    teacher: str = Field(min_length=1)  # a model file, run directory or shipped name
    data: str | None = None  # [default: the teacher's training data]
    guidance_range: tuple[float, float] | None = None
    guidance_lr_scale: float = Field(30.0, gt=0, allow_inf_nan=False)
    guidance: float | None = Field(None, allow_inf_nan=False)
    prediction: Literal["v", "x0"] | None = None
    label_dropout: float = Field(0.0, ge=0, le=1)
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)

    _range = field_validator("guidance_range", mode="before")(lambda cls, v: as_list(v))


class ProgressiveConfig(StudentFields):
    """``distill progressive``: halve the teacher's DDIM step count round by round (Salimans & Ho 2022), with an
    optional guidance-distillation stage first (Meng et al. 2023)."""

    kind: ClassVar[str] = "progressive"
    cli: ClassVar[str] = "progressive"

    start_steps: int = Field(64, ge=2, le=1 << 20)
    first_map: Literal["ddim", "dpmpp_2m"] = "ddim"
    target_steps: int = Field(1, ge=1, le=1 << 19)
    round_steps: list[int] = Field(default_factory=lambda: [1000], min_length=1, max_length=64)
    guidance_steps: int = Field(1000, ge=1)

    _rounds = field_validator("round_steps", mode="before")(lambda cls, v: as_list(v))

    @model_validator(mode="after")
    def _check(self):
        if any(s < 1 for s in self.round_steps):
            raise ConfigError("round_steps", f"{self.round_steps}: give step counts >= 1, one per round (the last "
                              "repeats)")
        return self.check_options()

    def options(self, bf16: bool = False):
        from distill.distillation import ProgressiveOptions

        return ProgressiveOptions(
            start_steps=self.start_steps, first_map=self.first_map, target_steps=self.target_steps,
            round_steps=tuple(self.round_steps),
            guidance_range=self.guidance_range, guidance_steps=self.guidance_steps,
            guidance_lr_scale=self.guidance_lr_scale, guidance=self.guidance, prediction=self.prediction,
            label_dropout=self.label_dropout, lr=self.lr, batch_size=self.batch_size, warmup=self.warmup,
            grad_clip=self.grad_clip, bf16=bf16, seed=self.seed, ckpt_every=self.ckpt_every)


def run_progressive(cfg: ProgressiveConfig, out: Path, *, command: str = "", progress: bool = True) -> StageResult:
    """Run (or continue) a progressive distillation into ``out``; the output ``model`` is the last round's student,
    ``steps-N`` / ``guidance`` every stage's."""
    from distill.distillation import distill_progressive

    out = Path(out)
    with training_run(cfg, "progressive") as run:
        paths = distill_progressive(cfg.teacher, out, cfg.options(run["bf16"]), data_spec=cfg.data,
                                    command=command or cfg.command(out), progress=progress, log=log.info)
    outputs = {p.parent.name: p for p in paths}
    outputs["model"] = paths[-1]
    return StageResult(outputs, {"students": [str(p) for p in paths], "steps": cfg.target_steps,
                                 "loss": last_loss(paths[-1].parent), **run["record"]})


class ConsistencyConfig(StudentFields):
    """``distill consistency``: consistency distillation (``mode: cd``) or training (``ct``)."""

    kind: ClassVar[str] = "consistency"
    cli: ClassVar[str] = "consistency"

    mode: Literal["cd", "ct"] = "cd"
    steps: int = Field(2000, ge=1)
    scales: int | None = Field(None, ge=2, le=1 << 20)
    curriculum: tuple[int, int] | None = None
    solver: Literal["ddim", "euler", "heun"] = "heun"
    target_decay: float = Field(0.0, ge=0, lt=1)
    metric: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    weighting: Literal["uniform", "inverse_gap"] | None = None
    noise_sampling: Literal["uniform", "lognormal", "ect"] | None = None
    ect_q: float = Field(2.0, gt=1, allow_inf_nan=False)
    from_scratch: bool = False
    sigma_data: float = Field(0.5, gt=0, allow_inf_nan=False)
    dropout: float = Field(0.0, ge=0, le=0.9)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    search_samples: int = Field(500, ge=0, le=10**6)
    max_steps: int = Field(3, ge=1, le=16)
    sample_steps: int = Field(2, ge=1, le=16)

    _curriculum = field_validator("curriculum", mode="before")(lambda cls, v: as_list(v))

    @model_validator(mode="after")
    def _check(self):
        return self.check_options()

    def options(self, bf16: bool = False):
        from distill.consistency import ConsistencyOptions

        fields = {k: getattr(self, k) for k in ConsistencyOptions.__dataclass_fields__ if k in type(self).model_fields}
        return ConsistencyOptions(**{**fields, "bf16": bf16})


def run_consistency(cfg: ConsistencyConfig, out: Path, *, command: str = "", progress: bool = True) -> StageResult:
    """Run (or continue) consistency distillation or training into ``out``; the output ``model`` is the student,
    with the searched multistep sampling times on its card."""
    from benchmarks.scoring import QualityScorer
    from distill.consistency import distill_consistency

    out = Path(out)
    with training_run(cfg, "consistency") as run:
        path = distill_consistency(cfg.teacher, out, cfg.options(run["bf16"]), data_spec=cfg.data,
                                   command=command or cfg.command(out), progress=progress, log=log.info,
                                   scorer=QualityScorer() if cfg.search_samples else None)
    return StageResult({"model": path}, {"steps": cfg.steps, "loss": last_loss(out), "mode": cfg.mode,
                                         **run["record"]})


class DMDConfig(TrainFields):
    """``distill dmd``: distribution matching distillation (DMD2) of a one-step generator against a teacher."""

    kind: ClassVar[str] = "dmd"
    cli: ClassVar[str] = "dmd"
    positional: ClassVar[tuple[str, ...]] = ("teacher",)
    inputs: ClassVar[tuple[str, ...]] = ("teacher", "init")

    teacher: str = Field(min_length=1)  # the real score: a model file, run directory or shipped name
    init: str | None = None  # the generator's starting point [the teacher]
    data: str | None = None  # [default: the teacher's training data]
    steps: int = Field(1000, ge=1)
    gen_steps: int = Field(1, ge=1, le=8)  # the generator's sampling steps (2-4: multistep DMD2)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False)
    fake_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    head_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    fake_updates: int = Field(4, ge=1, le=100)
    gan_weight: float = Field(3e-3, ge=0, allow_inf_nan=False)
    disc_weight: float = Field(1e-2, ge=0, allow_inf_nan=False)
    t_min: float = Field(0.02, gt=0, lt=1)
    t_max: float = Field(0.98, gt=0, le=1)
    guidance: float | None = Field(None, allow_inf_nan=False)
    label_dropout: float = Field(0.1, ge=0, le=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self):
        if self.t_min >= self.t_max:
            raise ConfigError("t_min", f"{self.t_min} >= t_max {self.t_max}: need t_min < t_max")
        return self

    def options(self, bf16: bool = False):
        from distill.dmd import DMDOptions

        fields = {k: getattr(self, k) for k in DMDOptions.__dataclass_fields__ if k in type(self).model_fields}
        return DMDOptions(**{**fields, "bf16": bf16})


def run_dmd(cfg: DMDConfig, out: Path, *, command: str = "", progress: bool = True) -> StageResult:
    """Run (or continue) DMD2 into ``out``; the output ``model`` is the one-step generator."""
    from distill.dmd import distill_dmd

    out = Path(out)
    with training_run(cfg, "dmd") as run:
        path = distill_dmd(cfg.teacher, out, cfg.options(run["bf16"]), init=cfg.init, data_spec=cfg.data,
                           command=command or cfg.command(out), progress=progress, log=log.info)
    return StageResult({"model": path}, {"steps": cfg.steps, "loss": last_loss(out), **run["record"]})
