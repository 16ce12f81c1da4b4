"""CI gates: bounds on a run's results that turn into exit code 3.

A gate reads the benchmark table (``distill bench report``'s joined speed and quality rows) or an export's
manifest. Kinds:

- ``quality``: a model's FD / FID / KID (``max``, or ``max_ratio`` to the teacher's best FD in the same table) or
  class accuracy (``min``);
- ``speedup``: a model's images/s over a baseline's at one batch size (``min``); the baseline defaults to the
  teacher's best-quality setting in eager fp32 (the report's headline baseline);
- ``parity``: an export's largest relative error against torch (``max_rel_err``, default the export's own bound);
- ``int8_drop``: a model's FD under INT8 over its FD in FP32 on the same backend (``max_ratio``);
- ``pick``: something in the table meets the quality bound (``distill bench pick``), the fastest is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.errors import ConfigError

Bound = Field(None, allow_inf_nan=False)


class GateBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None  # [default: KIND-TARGET]


class RowFilter(GateBase):
    model: str = Field(min_length=1)  # a stage name of the recipe, or a model as the table names it
    steps: int | None = None
    backend: str | None = None
    precision: str | None = None
    batch: int | None = None


class QualityGate(RowFilter):
    kind: Literal["quality"] = "quality"
    metric: Literal["fd", "fid", "kid", "acc"] = "fd"
    max: float | None = Bound
    min: float | None = Bound
    max_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self):
        if sum(v is not None for v in (self.max, self.min, self.max_ratio)) != 1:
            raise ConfigError("max", "give one bound: max, min or max_ratio (FD over the teacher's best FD)")
        if self.max_ratio is not None and self.metric != "fd":
            raise ConfigError("max_ratio", "is a ratio of FDs; use metric fd, or max for another metric")
        return self


class SpeedupGate(RowFilter):
    kind: Literal["speedup"] = "speedup"
    min: float = Field(gt=0, allow_inf_nan=False)
    batch: int = Field(64, ge=1)
    over: str | None = None  # the baseline model [default: the teacher's best setting]
    over_backend: str = "eager"
    over_precision: str = "fp32"
    over_steps: int | None = None


class ParityGate(GateBase):
    kind: Literal["parity"] = "parity"
    export: str = Field(min_length=1)  # an export stage of the recipe, or an export folder
    max_rel_err: float | None = Field(None, gt=0, allow_inf_nan=False)


class Int8DropGate(RowFilter):
    kind: Literal["int8_drop"] = "int8_drop"
    max_ratio: float = Field(gt=0, allow_inf_nan=False)
    backend: str = "onnxruntime"


class PickGate(GateBase):
    kind: Literal["pick"] = "pick"
    batch: int = Field(64, ge=1)
    max_fd: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_fid: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_ratio: float | None = Field(None, ge=0, allow_inf_nan=False)
    students_only: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.max_fd is None and self.max_fid is None and self.max_ratio is None:
            raise ConfigError("max_fd", "no quality bound: give max_fd, max_fid or max_ratio")
        return self


Gate = Annotated[QualityGate | SpeedupGate | ParityGate | Int8DropGate | PickGate, Field(discriminator="kind")]
GATE_KINDS = {"quality": QualityGate, "speedup": SpeedupGate, "parity": ParityGate, "int8_drop": Int8DropGate,
              "pick": PickGate}


def gate_name(gate) -> str:
    return gate.name or f"{gate.kind}-{getattr(gate, 'model', None) or getattr(gate, 'export', None) or 'table'}"


@dataclass
class GateResult:
    name: str
    passed: bool
    value: float | None
    bound: str  # e.g. "fd_ratio <= 2"
    detail: str = ""
    pick: dict[str, Any] | None = None

    def line(self) -> str:
        """One line for a failed (or passed) gate: the bound, the value, and by how much."""
        if self.value is None:
            return f"gate {self.name}: {self.bound}: {self.detail}"
        _op, limit = self.bound.split()[-2], float(self.bound.split()[-1])
        by = self.value - limit
        rel = f", {by / limit:+.1%}" if limit else ""
        verdict = "met" if self.passed else f"missed by {abs(by):.4g}{rel}"
        detail = f" {self.detail}" if self.detail else ""
        return f"gate {self.name}: {self.bound}: got {self.value:.4g} ({verdict}){detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "value": self.value, "bound": self.bound,
                "detail": self.detail, **({"pick": self.pick} if self.pick else {})}


def _rows(df, f: RowFilter, model: str):
    part = df[df["model"] == model]
    for col in ("steps", "backend", "precision", "batch"):
        value = getattr(f, col, None)
        if value is not None:
            part = part[part[col] == value]
    return part


def _bounded(name: str, what: str, value: float, op: str, limit: float, detail: str = "") -> GateResult:
    ok = value <= limit if op == "<=" else value >= limit
    return GateResult(name, bool(ok and math.isfinite(value)), float(value), f"{what} {op} {limit:g}", detail)


def _missing(name: str, bound: str, why: str) -> GateResult:
    return GateResult(name, False, None, bound, why)


def check_gate(gate, *, table=None, models: dict[str, str] | None = None,
               exports: dict[str, Path] | None = None) -> GateResult:
    """Evaluate one gate. ``table``: the benchmark DataFrame; ``models``/``exports``: a recipe's stage names mapped
    to the model (as the table names it) and to export folders."""
    models, exports = models or {}, exports or {}
    name = gate_name(gate)
    if isinstance(gate, ParityGate):
        from export.artifact import read_manifest

        folder = exports.get(gate.export, Path(gate.export))
        parity = read_manifest(folder)["parity"]
        limit = gate.max_rel_err if gate.max_rel_err is not None else parity.get("tolerance")
        if limit is None:
            return _missing(name, "max_rel_err", f"{folder} is INT8 (judged by quality); give max_rel_err")
        return _bounded(name, "max relative error", parity["max_rel_err"], "<=", limit, f"({folder})")
    if table is None:
        return _missing(name, gate.kind, "the run has no benchmark table; add a benchmark to the recipe")
    if isinstance(gate, PickGate):
        return _pick(gate, table, name)
    model = models.get(gate.model, gate.model)
    rows = _rows(table, gate, model)
    if rows.empty:
        where = ", ".join(f"{c} {getattr(gate, c)}" for c in ("steps", "backend", "precision", "batch")
                          if getattr(gate, c, None) is not None)
        return _missing(name, gate.kind, f"no row of {model}{f' ({where})' if where else ''} in the benchmark "
                        "table")
    if isinstance(gate, QualityGate):
        col = "fd_ratio" if gate.max_ratio is not None else gate.metric
        values = rows[col].dropna()
        if values.empty:
            return _missing(name, col, f"the table has no {col} for {model}")
        if gate.min is not None:
            return _bounded(name, col, values.min(), ">=", gate.min)
        return _bounded(name, col, values.max(), "<=", gate.max_ratio if gate.max_ratio is not None else gate.max)
    if isinstance(gate, Int8DropGate):
        q = rows[rows["fd"].notna()]
        int8, fp32 = q[q["precision"] == "int8"], q[q["precision"] == "fp32"]
        if int8.empty or fp32.empty:
            return _missing(name, "int8 FD / fp32 FD", f"the table needs {model} on {gate.backend} in int8 and fp32")
        return _bounded(name, "int8 FD / fp32 FD", int8["fd"].max() / fp32["fd"].min(), "<=", gate.max_ratio)
    return _speedup(gate, table, rows, name, models)


def _speedup(gate: SpeedupGate, table, rows, name: str, models: dict[str, str]) -> GateResult:
    from benchmarks.bench.report import teacher_best

    rows = rows[rows["batch"] == gate.batch].dropna(subset=["images_per_s"])
    if rows.empty:
        return _missing(name, "speedup", f"no batch-{gate.batch} speed of {gate.model} in the table")
    base = table[(table["batch"] == gate.batch) & (table["backend"] == gate.over_backend)
                 & (table["precision"] == gate.over_precision)]
    if gate.over is not None:
        base = base[base["model"] == models.get(gate.over, gate.over)]
        if gate.over_steps is not None:
            base = base[base["steps"] == gate.over_steps]
    else:
        best = teacher_best(table)
        if best is None:
            return _missing(name, "speedup", "no teacher quality in the table to take the baseline from; give over")
        base = base[(base["model"] == best["model"]) & (base["steps"] == best["steps"])
                    & (base["sampler"] == best["sampler"])]
    base = base.dropna(subset=["images_per_s"])
    if base.empty:
        return _missing(name, "speedup", f"no {gate.over_backend}-{gate.over_precision} batch-{gate.batch} baseline")
    if base["fd"].notna().any():
        base = base.sort_values("fd")
    ratio = rows["images_per_s"].max() / base.iloc[0]["images_per_s"]
    return _bounded(name, f"speedup over {base.iloc[0]['config']}", ratio, ">=", gate.min)


def _pick(gate: PickGate, table, name: str) -> GateResult:
    from benchmarks.bench.report import pick

    bound = ", ".join(f"{k} <= {v:g}" for k, v in (("FD", gate.max_fd), ("FID", gate.max_fid),
                                                   ("FD ratio", gate.max_ratio)) if v is not None)
    if not (table["batch"] == gate.batch).any():
        have = ", ".join(str(b) for b in sorted(table["batch"].unique()))
        raise ConfigError("batch", f"{gate.batch}: the table has batch sizes {have}")
    if gate.max_fid is not None and ("fid" not in table or table["fid"].isna().all()):
        raise ConfigError("max_fid", "the table has no FID; measure quality with the fid metric, or bound the FD")
    if gate.max_ratio is not None and table["fd_ratio"].isna().all():
        raise ConfigError("max_ratio", "the table has no teacher quality to take the ratio to; add the teacher to "
                          "the grid, or bound the FD")
    row = pick(table, gate.batch, max_fd=gate.max_fd, max_fid=gate.max_fid, max_ratio=gate.max_ratio,
               students_only=gate.students_only)
    if row is None:
        return GateResult(name, False, None, f"{bound} at batch {gate.batch}", "nothing in the table meets it")
    keys = ["config", "model", "sampler", "steps", "guidance", "backend", "precision", "batch", "images_per_s",
            "sample_ms", "eval_ms", "peak_rss_mb", "fd", "fd_ratio", "fid", "kid", "acc", "speed_command",
            "quality_command"]
    picked = {}
    for k in keys:
        v = row.get(k)
        v = v.item() if hasattr(v, "item") else v
        picked[k] = None if isinstance(v, float) and v != v else v
    return GateResult(name, True, None, f"{bound} at batch {gate.batch}", f"picked {picked['config']}", picked)


def machine_note(table_machine: dict[str, Any] | None) -> str | None:
    """A line saying that a table was measured on another machine than this one (its speeds may not hold here)."""
    from distill.hardware import cpu_info

    if not table_machine:
        return None
    here = cpu_info()
    theirs = table_machine.get("gpu") or table_machine.get("cpu")
    mine = here.get("cpu")
    if theirs and mine and theirs != mine:
        return f"the table was measured on {theirs}; this machine is {mine}: its speeds may not hold here"
    flags_t, flags_h = set(table_machine.get("cpu_flags") or []), set(here.get("cpu_flags") or [])
    if flags_t and flags_h and flags_t != flags_h:
        return (f"the table was measured on a CPU with flags {', '.join(sorted(flags_t))}; this one has "
                f"{', '.join(sorted(flags_h))}: its speeds may not hold here")
    return None


def table_machine(path: Path) -> dict[str, Any] | None:
    """The machine a results table was measured on: a benchmark folder's speed rows, or a report's JSON beside its
    CSV/Parquet file."""
    import json

    path = Path(path)
    if path.is_dir():
        from benchmarks.bench.report import build_table

        return build_table(path)[1].get("machine")
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            return json.loads(side.read_text()).get("machine")
        except ValueError:
            return None
    return None
