"""Benchmark stages: quality and speed over a grid of models x steps x backends x precisions x batch sizes, and the
joined report (tables, Pareto plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.app.stages.base import StageConfig, StageResult, as_list, check_threads, log, name_list
from distill.errors import ConfigError

BACKENDS = ("eager", "compile", "onnxruntime", "onnxruntime-fused")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
METRICS = ("fd", "kid", "is", "acc", "fid", "kid_inception")


class ModelEntry(BaseModel):
    """One model of a grid, with the samplers, step counts and guidance weights to try [default: its card's]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    samplers: list[str] | None = None
    steps: list[int] | None = None
    guidance: list[float] | None = None
    backends: list[str] | None = None  # [default: the grid's]
    precisions: list[str] | None = None  # [default: the grid's]

    _lists = field_validator("samplers", "steps", "guidance", mode="before")(lambda cls, v: as_list(v))
    _backends = field_validator("backends", mode="before")(lambda cls, v: None if v is None else name_list(v, BACKENDS))
    _precisions = field_validator("precisions", mode="before")(
        lambda cls, v: None if v is None else name_list(v, PRECISIONS))


class GridFields(StageConfig):
    """The grid: a grid YAML file (or a shipped grid's name), or the models with backends, precisions, batches."""

    grid: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    backends: list[str] = Field(default_factory=lambda: ["eager"])
    precisions: list[str] = Field(default_factory=lambda: ["fp32"])
    batches: list[int] = Field(default_factory=lambda: [1, 64])
    device: str = "cpu"
    exports: str | None = None  # the folder of the benchmark's own ONNX exports [default: OUT/exports]
    use_exports: list[str] = Field(default_factory=list)  # export folders to run where they match a configuration
    force: bool = False  # measure again what the folder already holds

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v):
        return [{"model": m} if isinstance(m, str) else m for m in as_list(v) or []]

    _lists = field_validator("batches", "use_exports", mode="before")(lambda cls, v: as_list(v))
    _backends = field_validator("backends", mode="before")(lambda cls, v: name_list(v, BACKENDS))
    _precisions = field_validator("precisions", mode="before")(lambda cls, v: name_list(v, PRECISIONS))

    @model_validator(mode="after")
    def _check_grid(self):
        if self.grid and self.models:
            raise ConfigError("grid", "the grid file names the models; give grid or models, not both")
        if not self.grid and not self.models:
            raise ConfigError("models", "no grid: give grid (a YAML file or mnist-cpu) or models")
        if any(b < 1 for b in self.batches):
            raise ConfigError("batches", f"{self.batches}: batch sizes must be at least 1")
        return self

    def load_grid(self, out: Path | None = None):
        """The parsed grid (every model is loaded and every name checked); with ``out``, the ``use_exports``
        folders are linked where the configurations they match look for their export."""
        from benchmarks.bench.grid import build_grid, load_grid

        if self.grid:
            grid = load_grid(self.grid)
        else:
            spec = {"models": [m.model_dump(exclude_none=True) for m in self.models],
                    "backends": list(self.backends), "precisions": list(self.precisions),
                    "batches": list(self.batches)}
            grid = build_grid(spec, "the grid")
        if out is not None and self.use_exports:
            from benchmarks.bench.speed import adopt_exports

            for line in adopt_exports(grid.configs, Path(self.exports or Path(out) / "exports"), self.use_exports):
                log.info(line)
        return grid

    def command(self, out: Path | str | None = None) -> str:
        """The equivalent command line: one per model entry when the entries choose their own samplers or steps
        (the command line's lists apply to every model), joined by ``&&``."""
        import shlex

        base = shlex.split(super().command(out, skip=("models", "backends", "precisions", "batches", "grid")))
        if self.grid:
            return shlex.join(base + ["--grid", self.grid])
        lines = []
        for m in self.models:
            args = ["--models", m.model]
            for name, values in (("--samplers", m.samplers), ("--steps", m.steps), ("--guidance", m.guidance)):
                if values:
                    args += [name, ",".join(map(str, values))]
            args += ["--backends", ",".join(m.backends or self.backends), "--precisions",
                     ",".join(m.precisions or self.precisions), "--batches", ",".join(map(str, self.batches))]
            lines.append(shlex.join(base + args))
        return " && ".join(lines)


def _log_skipped(grid) -> None:
    for point, why in grid.skipped:
        log.info(f"left out {point}: {why}")


class QualityConfig(GridFields):
    """``distill bench quality``: FD / KID / class accuracy (FID with the Inception metrics) of every configuration,
    from the same per-sample seeds everywhere."""

    kind: ClassVar[str] = "bench_quality"
    cli: ClassVar[str] = "bench quality"

    samples: int = Field(2500, ge=2, le=1_000_000)
    data: str | None = None  # [default: the first model's training data]
    metrics: list[str] = Field(default_factory=lambda: ["fd", "kid", "acc"])
    batch_size: int = Field(250, ge=1)

    _metrics = field_validator("metrics", mode="before")(lambda cls, v: name_list(v, METRICS))


def _one_writer(out: Path):
    """The benchmark folder's lock (one process writing its results at a time; a second gets one line), held by
    the main process of a multi-process run only (the others write shards the main one joins)."""
    import contextlib
    import os

    from distill.rundir import run_lock

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return run_lock(Path(out))


def run_bench_quality(cfg: QualityConfig, out: Path) -> StageResult:
    from benchmarks.bench.quality import run_quality
    from benchmarks.evaluate import default_data

    grid = cfg.load_grid(out)
    data = cfg.data or default_data(grid.configs[0].model)
    if data is None:
        raise ConfigError("data", f"{grid.configs[0].model}: cannot tell which real data to compare against; give "
                          "data")
    _log_skipped(grid)
    with _one_writer(out):
        rows = run_quality(grid, Path(out), samples=cfg.samples, data_spec=data, metrics=tuple(cfg.metrics),
                           device=cfg.device, batch_size=cfg.batch_size, force=cfg.force,
                           exports=Path(cfg.exports) if cfg.exports else None, log=log.info)
    return StageResult({"results": Path(out) / "quality.jsonl"},
                       {"quality": {r["quality_id"]: {m: r.get(m) for m in cfg.metrics} for r in rows}})


class SpeedConfig(GridFields):
    """``distill bench speed``: latency of a whole sample and of one network evaluation, images/s and peak memory of
    every configuration, each model x backend x precision in its own process."""

    kind: ClassVar[str] = "bench_speed"
    cli: ClassVar[str] = "bench speed"

    repeats: int = Field(20, ge=3, le=100000)
    max_seconds: float = Field(20.0, ge=0.1, allow_inf_nan=False)
    rounds: int = Field(3, ge=1, le=100)
    threads: int | None = None

    _threads = field_validator("threads")(lambda cls, v: check_threads(v))


def run_bench_speed(cfg: SpeedConfig, out: Path) -> StageResult:
    from benchmarks.bench.speed import run_speed

    grid = cfg.load_grid(out)
    _log_skipped(grid)
    with _one_writer(out):  # two measuring at once would also skew each other's timings
        rows = run_speed(grid, Path(out), device=cfg.device, threads=cfg.threads, repeats=cfg.repeats,
                         max_seconds=cfg.max_seconds, rounds=cfg.rounds, force=cfg.force,
                         exports=Path(cfg.exports) if cfg.exports else None, log=log.info)
    return StageResult({"results": Path(out) / "speed.jsonl"},
                       {"images_per_s": {r["config"]: r["images_per_s"] for r in rows}})


class ReportConfig(StageConfig):
    """``distill bench report``: the tables (CSV, Parquet, Markdown, JSON) and Pareto plots (PNG, HTML) of a
    benchmark folder."""

    kind: ClassVar[str] = "bench_report"
    cli: ClassVar[str] = "bench report"
    positional: ClassVar[tuple[str, ...]] = ("results",)

    results: str = "runs/bench"
    dest: str | None = None
    name: str = Field("report", min_length=1)
    compare: str | None = None
    batch: int = Field(64, ge=1)
    bound: float = Field(1.5, ge=1.0, allow_inf_nan=False)


def run_bench_report(cfg: ReportConfig, command: str = "") -> StageResult:
    from benchmarks.bench.report import write_report

    dest = Path(cfg.dest or cfg.results)
    summary = write_report(Path(cfg.results), dest, cfg.name, command=command or cfg.command(),
                           compare=Path(cfg.compare) if cfg.compare else None, batch=cfg.batch, bound=cfg.bound)
    files = {Path(f).suffix.lstrip("."): Path(f) for f in summary["files"]}
    return StageResult(files, {"headline": summary["headline"], "rows": summary["rows"]})


class BenchConfig(QualityConfig, SpeedConfig):
    """A recipe's benchmark: quality, then speed, then the report, into one folder."""

    kind: ClassVar[str] = "benchmark"
    cli: ClassVar[str] = "bench"

    report_batch: int | None = Field(None, ge=1)  # [default: the largest batch of the grid]
    bound: float = Field(1.5, ge=1.0, allow_inf_nan=False)

    def part(self, cls: type[StageConfig], **extra: Any) -> StageConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in cls.model_fields}
        return cls(**{**fields, **extra})

    def commands(self, out: Path | str) -> list[str]:
        """The equivalent ``distill bench`` commands, in order."""
        q = self.part(QualityConfig)
        s = self.part(SpeedConfig)
        r = ReportConfig(results=str(out), batch=self.report_batch or max(self.batches), bound=self.bound)
        return [q.command(out), s.command(out), r.command()]


def run_bench(cfg: BenchConfig, out: Path, *, speed: bool = True) -> StageResult:
    """Quality, speed (unless ``speed`` is false) and the report of ``cfg``'s grid, in ``out``."""
    out = Path(out)
    quality = run_bench_quality(cfg.part(QualityConfig), out)
    record: dict[str, Any] = {"quality": quality.record["quality"]}
    outputs = dict(quality.outputs)
    if speed:
        speed_result = run_bench_speed(cfg.part(SpeedConfig), out)  # its processes take cfg.threads
        record["images_per_s"] = speed_result.record["images_per_s"]
        report = run_bench_report(ReportConfig(results=str(out), dest=str(out), name="report",
                                               batch=cfg.report_batch or max(cfg.batches), bound=cfg.bound),
                                  command=" && ".join(cfg.commands(out)))
        outputs.update({f"report_{k}": v for k, v in report.outputs.items()})
        record["headline"] = report.record["headline"]
    return StageResult(outputs, record)

