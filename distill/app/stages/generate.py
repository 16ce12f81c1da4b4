"""Sampling and evaluation stages: images from a model or an export folder, and their quality."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distill.app.stages.base import StageConfig, StageResult, name_list
from distill.app.stages.export import SAMPLERS
from distill.errors import ConfigError, UsageError

SAMPLING_FIELDS = ("sampler", "steps", "spacing", "eta", "guidance", "classes", "seeds", "batch_size", "backend",
                   "precision")


def _seeds(value):
    from distill.parsing import parse_seeds

    if isinstance(value, str):
        try:
            value = parse_seeds(value)
        except UsageError as e:
            raise ValueError(str(e).removeprefix("--seeds ")) from None
    if isinstance(value, list) and len(set(value)) != len(value):  # a metric would count the repeated images twice
        repeats, seen = len(value) - len(set(value)), set()
        for seed in value:
            if seed in seen:
                raise ValueError(f"seed {seed} is given more than once ({repeats} repeat{'s' * (repeats > 1)}); "
                                 "each seed draws one sample, so give distinct seeds (e.g. 0-2499)")
            seen.add(seed)
    return value


def _classes(value):
    from distill.parsing import parse_int_list

    if isinstance(value, str):
        try:
            return parse_int_list(value, "--classes", lo=0)
        except UsageError as e:
            raise ValueError(str(e).removeprefix("--classes ")) from None
    return value


class SamplingFields(StageConfig):
    """How a model is sampled: sampler, steps, guidance, seeds, and where the network runs."""

    sampler: SAMPLERS | None = None  # [the model card's]
    steps: int | None = Field(None, ge=1, le=10000)
    spacing: Literal["uniform", "karras", "logsnr"] | None = None
    eta: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    guidance: float | None = Field(None, allow_inf_nan=False)
    classes: list[int] | None = None
    seeds: list[int] = Field(default_factory=lambda: list(range(64)), min_length=1, max_length=1_000_000)
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    backend: Literal["eager", "compile", "onnxruntime", "onnxruntime-trt", "tensorrt"] | None = None
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"

    _seeds = field_validator("seeds", mode="before")(lambda cls, v: _seeds(v))
    _classes = field_validator("classes", mode="before")(lambda cls, v: _classes(v))

    @model_validator(mode="after")
    def _check_sampling(self):
        from distill.samplers import check_sampler_options

        if self.classes is not None and any(c < 0 for c in self.classes):
            raise ConfigError("classes", "class labels are >= 0")
        try:
            check_sampler_options(self.sampler, self.eta)
        except UsageError as e:
            from distill.app.stages.base import options_error

            raise options_error(e, type(self)) from None
        return self

    def resolved_precision(self) -> str:
        """``auto``: bf16 where the hardware runs it natively, else fp32."""
        if self.precision != "auto":
            return self.precision
        from distill.hardware import resolve_precision

        return resolve_precision("auto", self.device)[0]

    def open(self, source: str):
        """The loaded backend that samples ``source``."""
        from distill.preflight import check_device
        from export.backends import load_backend

        check_device(self.device)
        return load_backend(source, self.backend, precision=self.resolved_precision(), device=self.device)


class SampleConfig(SamplingFields):
    """``distill sample``: one image per seed from a model or an export folder, a PNG grid and an ``.npz``."""

    kind: ClassVar[str] = "sample"
    cli: ClassVar[str] = "sample"
    positional: ClassVar[tuple[str, ...]] = ("model",)
    inputs: ClassVar[tuple[str, ...]] = ("model",)

    model: str = Field(min_length=1)


def run_sample(cfg: SampleConfig, out: Path) -> StageResult:
    from distill.sampling import sample_to_files

    den = cfg.open(cfg.model)
    grid, npz = sample_to_files(den, Path(out), source=cfg.model, sampler=cfg.sampler, steps=cfg.steps,
                                spacing=cfg.spacing, eta=cfg.eta, guidance=cfg.guidance, classes=cfg.classes,
                                seeds=cfg.seeds, batch_size=cfg.batch_size, device=cfg.device)
    return StageResult({"grid": grid, "samples": npz}, {"samples": len(cfg.seeds), "backend": den.name,
                                                        "precision": den.precision})


class EvalConfig(SamplingFields):
    """``distill eval``: FD / KID / IS / class accuracy (domain classifier) and FID (InceptionV3) of a model (sampled
    once per seed) or of a set of images, against a fixed half of the real data."""

    kind: ClassVar[str] = "eval"
    cli: ClassVar[str] = "eval"
    positional: ClassVar[tuple[str, ...]] = ("source",)
    inputs: ClassVar[tuple[str, ...]] = ("source",)

    source: str = Field(min_length=1)
    data: str | None = None
    ref: Literal["A", "B", "all"] = "A"
    metrics: list[Literal["fd", "kid", "is", "acc", "fid", "kid_inception"]] | None = None
    seeds: list[int] = Field(default_factory=lambda: list(range(2500)), min_length=1, max_length=1_000_000)
    batch_size: int = Field(250, ge=1)
    inception_backend: Literal["onnxruntime", "torch", "torch-bf16"] = "onnxruntime"

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v):
        from benchmarks.metrics import METRICS

        return v if v is None else name_list(v, METRICS)  # names once each, in order

    @model_validator(mode="after")
    def _check_source(self):
        from benchmarks.evaluate import is_image_source

        if is_image_source(self.source):  # nothing is sampled: a sampling option would be silently ignored
            given = [f for f in SAMPLING_FIELDS if f in self.model_fields_set]
            if given:
                raise ConfigError(given[0], f"{self.source} is a set of images, so nothing is sampled; drop it "
                                  "(sampling options apply when the source is a model)")
        return self


def run_eval(cfg: EvalConfig, out: Path | None = None) -> StageResult:
    """Measure ``cfg.source``; with ``out`` (a ``.json`` file) the full record is written there."""
    from benchmarks.evaluate import evaluate, write_json
    from distill.preflight import check_device

    check_device(cfg.device)
    result = evaluate(cfg.source, data_spec=cfg.data, ref=cfg.ref,
                      metrics=tuple(cfg.metrics) if cfg.metrics is not None else None, sampler=cfg.sampler,
                      steps=cfg.steps, spacing=cfg.spacing, eta=cfg.eta, guidance=cfg.guidance, seeds=cfg.seeds,
                      classes=cfg.classes, batch_size=cfg.batch_size, device=cfg.device,
                      inception_backend=cfg.inception_backend, backend=cfg.backend,
                      precision=cfg.resolved_precision())
    outputs = {}
    if out is not None:
        write_json(Path(out), result)
        outputs["result"] = Path(out)
    return StageResult(outputs, result)
