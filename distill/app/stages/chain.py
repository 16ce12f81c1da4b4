"""``distill chain``: hybrid few-step sampling, a chain of students with searched re-noise levels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from distill.app.stages.base import StageConfig, StageResult, as_list
from distill.errors import ConfigError, UsageError

log = logging.getLogger("distill")
LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the re-noise levels tried by default (t)


class ChainConfig(StageConfig):
    """``distill chain``: one step of each model in turn, re-noised between steps to a given or searched level."""

    kind: ClassVar[str] = "chain"
    cli: ClassVar[str] = "chain"
    inputs: ClassVar[tuple[str, ...]] = ("models",)

    models: list[str] = Field(min_length=1, max_length=8)  # in sampling order; a model may appear more than once
    times: list[float] | None = None  # the re-noise levels of models 2.. (one each) [searched]
    levels: list[float] = Field(default_factory=lambda: list(LEVELS), min_length=1)
    search_seeds: int = Field(400, ge=50, le=100_000)  # samples per candidate level
    data: str | None = None  # the real images the search scores against [the first model's data]

    _lists = field_validator("times", "levels", mode="before")(lambda cls, v: as_list(v))

    @model_validator(mode="after")
    def _check(self):
        if self.times is not None and len(self.times) != len(self.models) - 1:
            raise ConfigError("times", f"{len(self.times)} level(s) for {len(self.models)} models: give one per "
                              "model after the first")
        if any(not 0 < t < 1 for t in self.levels):
            raise ConfigError("levels", "every candidate level must lie in (0, 1)")
        return self

    def command(self, out: Path | str | None = None, skip: tuple[str, ...] = ()) -> str:
        import shlex

        parts = super().command(out, (*skip, "models")).split(" ", 2)  # "distill chain" + the options
        return " ".join(parts[:2] + [shlex.quote(m) for m in self.models] + parts[2:])


def search_levels(cfg: ChainConfig, members, names: list[str], index: list[int],
                  first_time: float) -> tuple[list, list[dict]]:
    """The plan ``[(member, t), ...]``: the first model at its one-step time, each later one at its given level or
    at the candidate level (below the previous one) whose chain so far scores the lowest FD on ``search_seeds``
    samples against the real half B (half A stays for the final evaluation), chosen one step at a time."""
    from benchmarks.evaluate import default_data, evaluate
    from benchmarks.metrics import Quality
    from distill.chain import Chain
    from distill.data import load_dataset

    plan, rows = [(index[0], first_time)], []
    quality, data_spec = None, cfg.data
    for step in range(1, len(index)):
        if cfg.times is not None:
            plan.append((index[step], float(cfg.times[step - 1])))
            continue
        candidates = [t for t in cfg.levels if t < plan[-1][1]]
        if not candidates:
            raise UsageError(f"--levels: none lies below step {step}'s previous level {plan[-1][1]:g}; give lower "
                             "levels or --times")
        if quality is None:
            data_spec = data_spec or default_data(cfg.models[0])
            if data_spec is None:
                raise UsageError(f"{cfg.models[0]}: cannot tell which real data to search against; pass --data")
            quality = Quality(load_dataset(data_spec), ref="B", metrics=("fd",), progress=False)
            quality.prepare()
        scored = []
        for t in candidates:
            chain = Chain(members, plan + [(index[step], t)], {}, names)
            r = evaluate(cfg.models[0], data_spec=data_spec, ref="B", metrics=("fd",),
                         seeds=list(range(cfg.search_seeds)), quality=quality, denoiser=chain, progress=False)
            scored.append((r["fd"], t))
            rows.append({"step": step, "model": cfg.models[step], "t": t, "fd": r["fd"], "n": cfg.search_seeds,
                         "ref": "B"})
            log.info(f"step {step + 1} ({cfg.models[step]}) from t = {t:g}: FD {r['fd']:.4g}")
        plan.append((index[step], min(scored)[1]))
    return plan, rows


def run_chain(cfg: ChainConfig, out: Path, *, command: str = "") -> StageResult:
    """Write the chain folder ``out`` (members copied, ``chain.json`` with the card and the search table)."""
    from distill.chain import chain_card, check_members, check_times, write_chain
    from distill.checkpoint import load_denoiser, one_step_time, resolve_model_path

    paths = [resolve_model_path(m).resolve() for m in cfg.models]
    unique = list(dict.fromkeys(paths))
    index = [unique.index(p) for p in paths]
    members = [load_denoiser(p) for p in unique]
    sources = [cfg.models[paths.index(p)] for p in unique]
    check_members(members, sources)
    plan, rows = search_levels(cfg, members, sources, index, one_step_time(members[index[0]].metadata))
    check_times([t for _, t in plan])  # given --times too, before anything is written
    card = chain_card(sources, members, plan, rows)
    file = write_chain(Path(out), sources, plan, card, command=command or cfg.command(out))
    times = ", ".join(f"{t:g}" for _, t in plan)
    return StageResult({"model": file.parent, "chain": file},
                       {"steps": len(plan), "times": [t for _, t in plan], "search": rows,
                        "summary": f"{len(plan)} steps from t = {times}"})
