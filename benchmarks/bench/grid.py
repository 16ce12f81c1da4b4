"""The benchmark grid: models × (sampler, steps) × backends × precisions × batch sizes, as :class:`Config` rows.

A grid comes from a YAML file (``benchmarks/grids/*.yaml``) or from command-line lists. Each model entry may name
its own samplers, step counts and guidance weights; left out, a model runs what its card names (a student's own
sampler and step count, the teacher's default DPM-Solver++(2M) at 20 steps)::

    models:
      - model: mnist                 # the teacher's step-count curve
        sampler: dpmpp_2m
        steps: [4, 8, 16, 20]
      - model: mnist-4step           # a student: its card's sampler and steps
      - model: mnist-1step
        backends: [eager]            # an entry may name its own backends / precisions (or paths)
    backends: [eager, compile, onnxruntime, onnxruntime-fused]
    precisions: [fp32, bf16, int8]        # or, instead of both: paths: [eager-fp32, compile-bf16, ...]
    batches: [1, 64]

Combinations a backend cannot run (bf16 on ONNX Runtime, int8 on torch, a fused graph of more than 8 steps) are
left out of the grid and listed with the reason, not failed.

Two configurations whose numerics agree to float rounding share one quality measurement (:func:`numerics`):
fp32 on any backend (the exports' parity checks hold them to 1e-5), and bf16 autocast eager or compiled.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from distill.errors import UsageError
from distill.parsing import load_yaml

BENCH_BACKENDS = ("eager", "compile", "onnxruntime", "onnxruntime-fused")
BENCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
RUNS = {  # what each backend can run
    "eager": ("fp32", "bf16", "fp16"),
    "compile": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "onnxruntime-fused": ("fp32", "fp16", "int8"),
}
MAX_FUSED_STEPS = 8
GRID_DIR = Path(__file__).resolve().parent.parent / "grids"


@dataclass(frozen=True)
class Config:
    """One point of the grid. ``guidance`` is the classifier-free guidance weight (the card's when the grid
    gives none)."""

    model: str
    sampler: str
    steps: int
    guidance: float
    backend: str
    precision: str
    batch: int

    @property
    def id(self) -> str:
        return (f"{self.model}/{self.sampler}-{self.steps}/w{self.guidance:g}/{self.backend}-{self.precision}"
                f"/b{self.batch}")

    @property
    def group(self) -> tuple[str, str, str]:
        """Configurations measured in one process: one loaded (and compiled or exported) backend."""
        return (self.model, self.backend, self.precision)

    @property
    def numerics(self) -> str:
        return numerics(self.backend, self.precision)

    @property
    def quality_id(self) -> str:
        """The key of this configuration's samples and quality: batch-independent (per-sample seeds), shared by
        configurations with the same numerics."""
        return f"{self.model}@{model_digest(self.model)}/{self.sampler}-{self.steps}/w{self.guidance:g}/{self.numerics}"

    def as_row(self) -> dict[str, Any]:
        return {"config": self.id, **asdict(self)}

    def command(self, what: str = "speed") -> str:
        """The command that measures just this configuration."""
        args = ["distill", "bench", what, "--models", self.model, "--samplers", self.sampler, "--steps",
                str(self.steps), "--guidance", f"{self.guidance:g}", "--backends", self.backend, "--precisions",
                self.precision]
        if what == "speed":
            args += ["--batches", str(self.batch)]
        return shlex.join(args)


def numerics(backend: str, precision: str) -> str:
    """Which configurations produce the same images (up to float rounding): the quality-sharing class."""
    if precision == "fp32":
        return "fp32"
    if backend in ("eager", "compile"):
        return f"torch-{precision}"
    return f"onnx-{precision}" + ("-fused" if backend == "onnxruntime-fused" and precision == "int8" else "")


@cache
def model_sha256(model: str) -> str:
    """The sha256 of the model file (what an export's manifest records as its source); of a chain, its
    ``chain.json`` (which records every member's sha256)."""
    from distill.chain import CHAIN_FILE, chain_dir, is_chain
    from distill.checkpoint import file_sha256, resolve_model_path

    if is_chain(model):
        return file_sha256(chain_dir(model) / CHAIN_FILE)
    return file_sha256(resolve_model_path(model))


def model_digest(model: str) -> str:
    """A short content hash of the model file: cached samples and exports are keyed by it, so a changed model
    is measured again."""
    return model_sha256(model)[:12]


def _list(value, name: str, source: str, kind=str) -> list:
    values = value if isinstance(value, list) else [value]
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {name} {value!r} must be a {kind.__name__} or a list of them") from None


@dataclass
class Grid:
    """A parsed grid: the runnable configurations, in order, and the combinations left out (with the reason)."""

    configs: list[Config]
    skipped: list[tuple[str, str]]

    def groups(self) -> dict[tuple[str, str, str], list[Config]]:
        out: dict[tuple[str, str, str], list[Config]] = {}
        for c in self.configs:
            out.setdefault(c.group, []).append(c)
        return out

    def quality_configs(self) -> list[Config]:
        """One configuration per quality class: the first of the class in :data:`QUALITY_PREFERENCE` order
        (the fastest exact path for the class on a CPU)."""
        best: dict[str, Config] = {}
        for c in self.configs:
            q = best.get(c.quality_id)
            if q is None or QUALITY_PREFERENCE.index(c.backend) < QUALITY_PREFERENCE.index(q.backend):
                best[c.quality_id] = c
        return list(best.values())


QUALITY_PREFERENCE = ("onnxruntime-fused", "onnxruntime", "compile", "eager")


def build_grid(spec: dict[str, Any], source: str = "the grid") -> Grid:
    """``spec`` (the YAML's mapping, or the CLI's lists in the same shape) -> :class:`Grid`. Every model must
    load; every name is checked before anything runs."""
    from distill.checkpoint import card_guidance, card_sampling
    from distill.samplers import SAMPLERS
    from export.backends import source_metadata

    if not isinstance(spec, dict) or not spec.get("models"):
        raise UsageError(f"{source}: needs a non-empty 'models' list (see benchmarks/grids/mnist-cpu.yaml)")
    unknown = set(spec) - {"models", "backends", "precisions", "paths", "batches", "name"}
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; use models, backends, precisions "
                         "(or paths), batches, name")
    pairs = _pairs(spec, source)
    batches = _list(spec.get("batches", [1, 64]), "batches", source, int)
    if any(b < 1 for b in batches):
        raise UsageError(f"{source}: batch sizes must be at least 1 (got {batches})")
    configs, skipped = [], []
    for entry in spec["models"]:
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise UsageError(f"{source}: each models entry needs 'model' (a shipped name, file or run folder)")
        bad = set(entry) - {"model", "sampler", "samplers", "steps", "guidance", "backends", "precisions", "paths"}
        if bad:
            raise UsageError(f"{source}: model entry {entry['model']}: unknown key(s) {', '.join(sorted(bad))}")
        model = str(entry["model"])
        own = {k: entry[k] for k in ("backends", "precisions", "paths") if k in entry}
        inherit = {} if "paths" in own else {k: spec[k] for k in ("backends", "precisions") if k in spec}
        model_pairs = _pairs({**inherit, **own}, f"{source}: model entry {model}") if own else pairs
        meta = source_metadata(model)  # fails with one line for a missing model
        from distill.chain import is_chain

        chain = is_chain(model)
        samplers = _list(entry.get("samplers", entry.get("sampler", [None])), "samplers", source,
                         lambda s: s if s is None else str(s))
        step_list = _list(entry.get("steps", [None]), "steps", source, lambda s: s if s is None else int(s))
        guidances = _list(entry.get("guidance", [None]), "guidance", source, lambda g: g if g is None else float(g))
        for sampler in samplers:
            if sampler is not None and sampler not in SAMPLERS:
                raise UsageError(f"{source}: sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
            for steps in step_list:
                if steps is not None and steps < 1:
                    raise UsageError(f"{source}: steps must be at least 1 (got {steps})")
                s, k, _, _ = card_sampling(meta, sampler, steps)
                for g in guidances:
                    w = card_guidance(meta, g)
                    if not math.isfinite(w):
                        raise UsageError(f"{source}: guidance {g!r} must be a finite number")
                    for backend, precision in model_pairs:
                        why = _cannot(backend, precision, k, chain)
                        if why:
                            point = f"{backend}-{precision}" + (f" of {model} {s}-{k}" if backend in why else "")
                            if (point, why) not in skipped:
                                skipped.append((point, why))
                            continue
                        for batch in batches:
                            configs.append(Config(model, s, k, w, backend, precision, batch))
    seen, unique = set(), []
    for c in configs:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    if not unique:
        raise UsageError(f"{source}: no runnable configuration ({'; '.join(f'{p}: {w}' for p, w in skipped)})")
    return Grid(unique, skipped)


def _pairs(spec: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """The (backend, precision) pairs of a grid, or of one model entry that names its own: ``paths``, or every
    backend with every precision."""
    if "paths" in spec and ("backends" in spec or "precisions" in spec):
        raise UsageError(f"{source}: give either paths (backend-precision pairs) or backends and precisions")
    if "paths" in spec:
        pairs = []
        for path in _list(spec["paths"], "paths", source):
            backend, _, precision = path.rpartition("-")
            if backend not in BENCH_BACKENDS or precision not in BENCH_PRECISIONS:
                raise UsageError(f"{source}: path {path!r}; write BACKEND-PRECISION, e.g. compile-bf16 (backends "
                                 f"{', '.join(BENCH_BACKENDS)}; precisions {', '.join(BENCH_PRECISIONS)})")
            pairs.append((backend, precision))
        return pairs
    backends = _list(spec.get("backends", ["eager"]), "backends", source)
    precisions = _list(spec.get("precisions", ["fp32"]), "precisions", source)
    for b in backends:
        if b not in BENCH_BACKENDS:
            raise UsageError(f"{source}: backend {b!r}; use one of {', '.join(BENCH_BACKENDS)}")
    for p in precisions:
        if p not in BENCH_PRECISIONS:
            raise UsageError(f"{source}: precision {p!r}; use one of {', '.join(BENCH_PRECISIONS)}")
    return [(b, p) for b in backends for p in precisions]


def _cannot(backend: str, precision: str, steps: int, chain: bool = False) -> str | None:
    if chain and backend not in ("eager", "onnxruntime-fused"):
        return f"{backend}: a chain of students runs eagerly or as one fused graph (onnxruntime-fused)"
    if precision not in RUNS[backend]:
        return f"runs only {', '.join(RUNS[backend])}"
    if backend == "onnxruntime-fused" and steps > MAX_FUSED_STEPS:
        return f"onnxruntime-fused unrolls at most {MAX_FUSED_STEPS} steps"
    return None


def load_grid(path: str | Path) -> Grid:
    """A grid YAML file (a path, or the name of one under ``benchmarks/grids/``)."""
    p = Path(path)
    if not p.exists() and (GRID_DIR / f"{path}.yaml").is_file():
        p = GRID_DIR / f"{path}.yaml"
    if not p.is_file():
        names = ", ".join(sorted(f.stem for f in GRID_DIR.glob("*.yaml")))
        raise UsageError(f"--grid {path}: no such file or shipped grid (shipped: {names})")
    try:
        spec = load_yaml(p.read_text(), f"--grid {p}")
    except yaml.YAMLError as e:
        raise UsageError(f"--grid {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return build_grid(spec, f"--grid {p}")


def cli_grid(models: list[str], samplers: list[str] | None, steps: list[int] | None, guidance: list[float] | None,
             backends: list[str], precisions: list[str], batches: list[int]) -> Grid:
    """The grid the command-line lists describe: every model with every sampler and step count."""
    entries = [{"model": m, **({"samplers": samplers} if samplers else {}), **({"steps": steps} if steps else {}),
                **({"guidance": guidance} if guidance else {})} for m in models]
    return build_grid({"models": entries, "backends": backends, "precisions": precisions, "batches": batches},
                      "the command line")
