"""Model cards generated from a run's manifest, the models' own student cards and the benchmark table:
``MODEL_CARD.md`` beside every student and export of a recipe run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write

CARD_FILE = "MODEL_CARD.md"
METHODS = {
    "teacher": "a diffusion teacher (native UNet) trained on its data",
    "progressive": "progressive distillation (Salimans & Ho 2022): each round halves the DDIM steps",
    "guidance": "guidance distillation (Meng et al. 2023): the guided output with w as an input",
    "consistency_distillation": "consistency distillation (Song et al. 2023): teacher ODE steps give the targets",
    "consistency_training": "consistency training (Song & Dhariwal 2023): no teacher evaluations",
    "dmd2": "distribution matching distillation (Yin et al. 2024, DMD2): the generator's samples matched to the "
            "teacher's distribution by the difference of a fake and the real score",
    "chain": "a chain of students: each maps its state to clean data, re-noised to the next member's level",
}
SAMPLE_COUNT_LIMIT = ("Measured on the machine named above at the sample count given; small-sample FD is biased "
                      "upward, so compare only rows of the same count and machine.")
ODE_METHODS = {"progressive", "guidance", "consistency_distillation"}  # students that copy the teacher's ODE
ODE_LIMIT = ("A distilled student copies its teacher's probability-flow ODE: its quality is bounded by the teacher's "
             "converged deterministic sampler, not by the teacher's best stochastic one.")
DMD_LIMIT = ("Distribution matching is not bounded by the teacher's ODE, but its generator is checked only by FD and "
             "class accuracy here: compare its nearest-neighbour distances to the training set with the teacher's "
             "(`python -m benchmarks.dmd`) before trusting a score below the teacher's.")
GUIDANCE_LIMIT = "A guidance-distilled student extrapolates outside its card's guidance range (sampling there warns)."


def limits(card: dict[str, Any]) -> list[str]:
    """The card's limitations: the sample-count caveat, and those of its method and guidance."""
    method = card.get("method")
    out = [SAMPLE_COUNT_LIMIT]
    if method in ODE_METHODS:
        out.append(ODE_LIMIT)
    elif method == "dmd2":
        out.append(DMD_LIMIT)
    if card.get("guidance_range"):
        out.append(GUIDANCE_LIMIT)
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _machine_line(machine: dict[str, Any]) -> str:
    flags = ", ".join(machine.get("cpu_flags") or []) or "none of the listed"
    gpu = f"; GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (f"{machine.get('cpu', 'unknown CPU')} ({machine.get('cpu_count', '?')} logical CPUs, "
            f"{machine.get('threads', '?')} torch threads; kernel-relevant flags: {flags}){gpu}")


def _rows(table, model: str, backend: str | None = None, precision: str | None = None) -> list[dict[str, Any]]:
    if table is None:
        return []
    part = table[table["model"] == model]
    if backend:
        part = part[part["backend"].str.startswith(backend)]
    if precision:
        part = part[part["precision"] == precision]
    return part.sort_values(["backend", "precision", "batch"]).to_dict("records")


def model_card(*, title: str, path: Path, card: dict[str, Any], record: dict[str, Any], commands: list[str],
               machine: dict[str, Any], rows: list[dict[str, Any]], export: dict[str, Any] | None = None,
               seconds: float | None = None, made: str = "by `distill run` from the run's manifest",
               regenerate: str = "run the recipe again", notes: str | None = None) -> str:
    """The card's Markdown text; ``notes`` (hand-written Markdown: history, other measurements) is appended."""
    method = card.get("method") or ("teacher" if not card else "?")
    lines = [f"# Model card: `{title}`", "", f"Generated {made}; do not edit by hand ({regenerate}).", "",
             "| | |", "|---|---|",
             f"| file | `{path}` |",
             f"| method | {METHODS.get(method, method)} |",
             f"| teacher | `{card.get('teacher', '–')}` (parent `{card.get('parent', '–')}`) |"]
    if card.get("steps"):
        ts = ", ".join(f"{t:g}" for t in card.get("timesteps") or [])
        lines.append(f"| sampling | {card.get('sampler', '?')}, {card['steps']} steps"
                     + (f" (t = {ts})" if ts else "") + " |")
    if card.get("guidance_range"):
        lo, hi = card["guidance_range"]
        lines.append(f"| guidance | w in [{lo:g}, {hi:g}] as a network input (default {card.get('guidance', 0):g}) |")
    else:
        lines.append(f"| guidance | w = {card.get('guidance', 0):g} |")
    compute = card.get("compute") or {}
    if compute:
        lines.append("| compute | " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in compute.items())
                     + (f"; {seconds:.0f} s on the machine below" if seconds else "") + " |")
    if record.get("precision"):
        lines.append(f"| training precision | {record['precision']} ({record.get('precision_reason', '')}) |")
    if export:
        p = export.get("parity") or {}
        lines.append(f"| export | {export.get('precision')} {export.get('kind')} graph for {export.get('target')}; "
                     f"max relative error against {p.get('against', 'torch')} {_fmt(p.get('max_rel_err'))}"
                     + (f" (bound {p['tolerance']:g})" if p.get("tolerance") else "") + " |")
    lines.append("| made by | " + " && ".join(f"`{c}`" for c in commands) + " |")
    lines += ["", "## Quality and latency", ""]
    if rows:
        lines += [f"Machine: {_machine_line(machine)}.", "",
                  "| sampler | steps | backend | precision | batch | images/s | ms per batch | FD "
                  "| FD / teacher's best | KID | class accuracy | samples |", "|---" * 12 + "|"]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in (
                "sampler", "steps", "backend", "precision", "batch", "images_per_s", "sample_ms", "fd", "fd_ratio",
                "kid", "acc", "quality_n")) + " |")
    else:
        lines.append("Not benchmarked in this run (add it to the recipe's benchmark models).")
    lines += ["", "## Intended use", "",
              "Sampling images like its training data, fast, from the `distill` toolkit or its export (ONNX Runtime, "
              "TensorRT); a baseline for step-count and precision trade-offs.", "", "## Limitations", ""]
    lines += [f"- {t}" for t in limits(card)]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def shipped_card(model: str, *, table=None, machine: dict[str, Any] | None = None, notes: str | None = None,
                 regenerate: str = "") -> str:
    """The card of a model file outside a run (a shipped model; or a chain, from its ``chain.json``): its metadata,
    and its rows of a benchmark table."""
    from distill.chain import CHAIN_FILE, chain_dir, is_chain, read_chain
    from distill.checkpoint import read_metadata, resolve_model_path

    if is_chain(model):
        path = chain_dir(model) / CHAIN_FILE
        meta = read_chain(model)["metadata"]
    else:
        path = resolve_model_path(model)
        meta = read_metadata(path)
    train = meta.get("train") or {}
    record = {"precision": "bf16" if train.get("bf16") else "fp32", "precision_reason": "as trained"}
    card = meta.get("card") or {}
    if not card.get("compute") and train.get("steps"):
        card = {**card, "compute": {"train_steps": train["steps"], "batch_size": train.get("batch_size")}}
    try:  # the repository's relative path of a shipped file, not this checkout's absolute one
        path = path.resolve().relative_to(Path(__file__).resolve().parents[2])
    except ValueError:
        pass  # a file outside the repository keeps its own path
    return model_card(title=model, path=path, card=card, record=record,
                      commands=[meta["command"]] if meta.get("command") else [], machine=machine or {},
                      rows=_rows(table, model), made="by `distill card` from the model file's metadata and the "
                      "benchmark table", regenerate=regenerate or "run distill card again", notes=notes)


def write_cards(recipe, out: Path, manifest: dict[str, Any], table) -> list[Path]:
    """``MODEL_CARD.md`` beside every student (and the trained teacher) and in every export folder."""
    written = []
    machine = manifest.get("machine") or {}
    stages = manifest.get("stages") or {}
    for entry in recipe.entries():
        s = stages.get(entry.name)
        if not s:
            continue
        if entry.kind in ("teacher", "progressive", "consistency", "dmd", "chain"):
            from distill.chain import CHAIN_FILE

            path = Path(out) / s["outputs"]["model"]["path"]  # a model file, or a chain's folder
            folder, shown = (path, path / CHAIN_FILE) if entry.kind == "chain" else (path.parent, path)
            text = model_card(title=f"{recipe.name}/{entry.name}", path=shown, card=_source_card(str(path)),
                              record=s["record"], commands=s["commands"], machine=machine,
                              rows=_rows(table, recipe.models[entry.name]), seconds=s.get("seconds"))
            dest = folder / CARD_FILE
        elif entry.kind == "export":
            folder = Path(out) / s["outputs"]["export"]["path"]
            source = entry.config.model
            card = _source_card(source)
            backend = "onnxruntime-fused" if entry.config.fused else "onnxruntime"
            rows = [r for r in _rows(table, source, backend, entry.config.precision)
                    if r["backend"] == backend]
            text = model_card(title=f"{recipe.name}/{entry.name}", path=folder / "model.onnx", card=card,
                              record={}, commands=s["commands"], machine=machine, rows=rows, export=s["record"])
            dest = folder / CARD_FILE
        else:
            continue
        if not dest.exists() or dest.read_text() != text:
            atomic_write(dest, lambda tmp, t=text: Path(tmp).write_text(t))
        written.append(dest)
    return written


def _source_card(spec: str) -> dict[str, Any]:
    """The card of a model an export was made from: a model file's metadata, or a chain folder's ``chain.json``."""
    from distill.chain import is_chain, read_chain
    from distill.checkpoint import read_metadata, resolve_model_path

    meta = read_chain(spec)["metadata"] if is_chain(spec) else read_metadata(resolve_model_path(spec))
    return meta.get("card") or {}
