"""Export stages: an ONNX artifact folder (FP32, FP16, INT8 Q/DQ; per step or a fused sampler) and a TensorRT
engine built from one."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distill.app.stages.base import StageConfig, StageResult, as_list, check_threads, log, torch_threads
from distill.errors import ConfigError

SAMPLERS = Literal["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "stochastic", "consistency"]
INT8_FIELDS = ("int8_target", "calibration", "calib_method", "calib_samples", "percentile", "step_percentile",
               "exclude", "float_steps")


class ExportConfig(StageConfig):
    """``distill export onnx``: MODEL's denoiser (or with ``fused`` its whole few-step sampler) as ONNX, checked
    against torch before anything is written."""

    kind: ClassVar[str] = "export"
    cli: ClassVar[str] = "export onnx"
    positional: ClassVar[tuple[str, ...]] = ("model",)
    inputs: ClassVar[tuple[str, ...]] = ("model",)
    negative_flags: ClassVar[dict[str, str]] = {"guided": "--unguided"}

    model: str = Field(min_length=1)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    fused: bool = False
    guided: bool | None = None
    sampler: SAMPLERS | None = None
    steps: int | None = Field(None, ge=1, le=8)
    int8_target: Literal["cpu", "tensorrt"] = "cpu"
    calibration: Literal["trajectory", "random"] = "trajectory"
    calib_method: Literal["auto", "minmax", "moving-average", "entropy", "percentile", "step-percentile"] = "auto"
    calib_samples: int | None = Field(None, ge=1, le=100000)
    percentile: float = Field(99.999, gt=0, le=100)
    step_percentile: float = Field(50.0, ge=0, le=100)
    exclude: list[str] | None = None  # layers kept in float [default: export.precision.DEFAULT_EXCLUDE]; [] = none
    float_steps: list[int] = Field(default_factory=list)
    threads: int | None = None

    _threads = field_validator("threads")(lambda cls, v: check_threads(v))
    _lists = field_validator("float_steps", mode="before")(lambda cls, v: as_list(v))

    @field_validator("exclude", mode="before")
    @classmethod
    def _exclude(cls, v):
        if isinstance(v, str):
            return [] if v.strip().lower() == "none" else as_list(v)
        return v

    @model_validator(mode="after")
    def _check(self):
        given = [f for f in INT8_FIELDS if f in self.model_fields_set]
        if given and self.precision != "int8":
            raise ConfigError(given[0], "applies to precision int8; set precision to int8 or drop it")
        return self.check_options()

    def options(self):
        from export.onnx import ExportOptions
        from export.precision import DEFAULT_EXCLUDE, Int8Options

        return ExportOptions(
            precision=self.precision, fused=self.fused, guided=self.guided, sampler=self.sampler, steps=self.steps,
            int8=Int8Options(target=self.int8_target, calibration=self.calibration, method=self.calib_method,
                             samples=self.calib_samples, percentile=self.percentile,
                             step_percentile=self.step_percentile,
                             exclude=DEFAULT_EXCLUDE if self.exclude is None else tuple(self.exclude),
                             float_steps=tuple(self.float_steps)))


def run_export(cfg: ExportConfig, out: Path, *, command: str = "") -> StageResult:
    """Write the artifact folder ``out`` (``model.onnx`` + ``manifest.json``); an earlier one is replaced whole."""
    from export.onnx import export_onnx

    out = Path(out)
    with torch_threads(cfg.threads):
        manifest = export_onnx(cfg.model, out, cfg.options(), command=command or cfg.command(out), log=log.info)
    p = manifest["parity"]
    return StageResult({"export": out, "graph": out / "model.onnx"},
                       {"precision": manifest["precision"], "kind": manifest["kind"], "target": manifest["target"],
                        "parity": {"against": p["against"], "max_rel_err": p["max_rel_err"],
                                   "tolerance": p["tolerance"]}})


class TensorRTConfig(StageConfig):
    """``distill export tensorrt``: a strongly typed TensorRT engine from an ONNX export folder (needs TensorRT and an
    NVIDIA GPU; ``dry_run`` checks the export and writes the equivalent ``trtexec`` command without them)."""

    kind: ClassVar[str] = "tensorrt"
    cli: ClassVar[str] = "export tensorrt"
    positional: ClassVar[tuple[str, ...]] = ("source",)
    inputs: ClassVar[tuple[str, ...]] = ("source",)

    source: str = Field(min_length=1)
    min_batch: int = Field(1, ge=1)
    opt_batch: int | None = Field(None, ge=1)
    max_batch: int = Field(256, ge=1)
    workspace: int = Field(4 << 30, ge=1)
    timing_cache: str | None = None
    tf32: bool = True
    dry_run: bool = False

    @model_validator(mode="after")
    def _check(self):
        return self.check_options()

    def options(self):
        from export.tensorrt import BuildOptions

        return BuildOptions(min_batch=self.min_batch, opt_batch=self.opt_batch, max_batch=self.max_batch,
                            workspace=self.workspace, tf32=self.tf32,
                            timing_cache=Path(self.timing_cache) if self.timing_cache else None)


def run_tensorrt(cfg: TensorRTConfig, out: Path, *, command: str = "") -> StageResult:
    """Build the engine folder ``out`` (or with ``dry_run``, only its plan and ``trtexec`` command)."""
    from export.tensorrt import build_engine, prepare_build

    out = Path(out)
    if cfg.dry_run:
        manifest = prepare_build(Path(cfg.source), out, cfg.options())
        return StageResult({}, {"trtexec": manifest["tensorrt"]["trtexec"], "built": False})
    manifest = build_engine(Path(cfg.source), out, cfg.options(), command=command or cfg.command(out), log=log.info)
    t = manifest["tensorrt"]
    return StageResult({"engine": out}, {"built": True, "version": t["version"], "gpu": t["gpu"],
                                         "compute_capability": t["compute_capability"], "tf32": t["tf32"],
                                         "trtexec": t.get("trtexec")})


class DiffusersExportConfig(StageConfig):
    """``distill export diffusers``: MODEL as a diffusers pipeline directory (``DDIMPipeline`` for DDIM students
    and teachers, ``ConsistencyModelPipeline`` for consistency students), checked against distill's own sampler
    on the same noise before anything is written."""

    kind: ClassVar[str] = "diffusers"
    cli: ClassVar[str] = "export diffusers"
    positional: ClassVar[tuple[str, ...]] = ("model",)
    inputs: ClassVar[tuple[str, ...]] = ("model",)

    model: str = Field(min_length=1)
    steps: int | None = Field(None, ge=1, le=1000)
    threads: int | None = None

    _threads = field_validator("threads")(lambda cls, v: check_threads(v))


def run_diffusers_export(cfg: DiffusersExportConfig, out: Path, *, command: str = "") -> StageResult:
    """Write the diffusers pipeline directory ``out``; an earlier export there is replaced whole."""
    from export.diffusers_pipeline import export_diffusers

    out = Path(out)
    with torch_threads(cfg.threads):
        record = export_diffusers(cfg.model, out, steps=cfg.steps, command=command or cfg.command(out),
                                  log=log.info)
    p = record["parity"]
    return StageResult({"export": out},
                       {"pipeline": record["pipeline"], "unet": record["unet"], "scheduler": record["scheduler"],
                        "steps": record["steps"], "call": record["call"],
                        "parity": {"against": p["against"], "max_rel_err": p["max_rel_err"],
                                   "tolerance": p["tolerance"]}})
