"""Consistency students against the teacher's step-count curve and the progressive students.

    python -m benchmarks.consistency                                   # the recipes' runs, 2,500 samples per row
    python -m benchmarks.consistency --student cd=runs/mnist-cd --samples 500

Rows (one CSV, rewritten atomically after each row; a rerun skips the rows already there, so it resumes):
- each ``--student NAME=RUN`` (a ``distill consistency`` run or model file) at 1 .. ``--max-steps`` steps with the
  consistency sampler on its card's searched timesteps, w = 0, seeds 0 .. samples - 1 against real half A;
- the teacher's rows and the progressive students' rows, taken from ``--progressive`` (the progressive
  benchmark's CSV, measured with the same seeds, sample count, reference and precision), so that every model sits
  on the same axes.

Acceptance checks (the issue's): consistency distillation at 1 step <= 1.6x the teacher's best FD and at 2 steps
<= 1.3x; consistency training initialised from the teacher at 2 steps <= 1.3x and at 1 step <= 2x; and at 1 and 2
evaluations the better of the consistency and progressive students beside the best training-free sampler.

Writes ``<out>.csv``, ``<out>.json`` (rows, compute, checks), ``<out>.png`` (FD and FID against NFE) and
``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.evaluate import evaluate, write_json
from benchmarks.metrics import Quality
from benchmarks.progressive import COLUMNS, KEYS, TEACHER_TRAIN_STEPS, save_figure, step_seconds, style_axis
from benchmarks.teacher_baseline import read_rows, write_rows
from distill.checkpoint import atomic_write, load_denoiser, read_metadata, resolve_model_path
from distill.data import load_dataset

# The bounds on FD / the teacher's best FD, per method and step count.
BOUNDS = {"consistency_distillation": {1: 1.6, 2: 1.3}, "consistency_training": {1: 2.0, 2: 1.3}}


def run_compute(path: Path) -> dict:
    """A consistency run's compute from its card and log, in training steps of the teacher: a student step
    (forward + backward) counts 1, a forward pass of the batch (the target network's, each teacher's) 1/3."""
    model = resolve_model_path(path)
    card = read_metadata(model).get("card") or {}
    c = card.get("compute") or {}
    steps, fwd = int(c.get("train_steps", 0)), int(c.get("teacher_forwards_per_step", 0))
    secs = step_seconds(model.parent / "metrics.jsonl")
    return {"train_steps": steps, "teacher_forwards_per_step": fwd,
            "teacher_step_equivalents": round(steps * (1 + (1 + fwd) / 3)), "seconds": round(secs, 1),
            "teacher_train_steps": TEACHER_TRAIN_STEPS}


def checks(rows: pd.DataFrame, methods: dict[str, str], best_fd: float) -> list[dict]:
    """Each consistency student's bounds (by its card's method), then the side-by-side rows at 1 and 2 NFE."""
    out = []
    for name, method in methods.items():
        for steps, factor in sorted(BOUNDS.get(method, {}).items()):
            match = rows[(rows["model"] == name) & (rows["steps"] == steps)]
            if len(match):
                fd = float(match["fd"].iloc[0])
                out.append({"check": f"{name} ({method.replace('_', ' ')}) at {steps} step(s): FD <= {factor} x the "
                                     f"teacher's best ({best_fd:.4g})", "value": round(fd, 4),
                            "bound": round(factor * best_fd, 4), "pass": bool(fd <= factor * best_fd)})
    return out


def side_by_side(rows: pd.DataFrame, consistency: list[str]) -> list[dict]:
    """At 1 and 2 evaluations: the best consistency student, the best progressive student and the best
    training-free sampler of the teacher."""
    out = []
    for nfe in (1, 2):
        at = rows[rows["nfe"] == nfe]
        picks = {}
        for label, sel in (("consistency", at["model"].isin(consistency)),
                           ("progressive", (at["kind"] == "student") & ~at["model"].isin(consistency)),
                           ("training-free", at["kind"] == "teacher")):
            part = at[sel].dropna(subset=["fd"])
            if len(part):
                best = part.loc[part["fd"].idxmin()]
                picks[label] = {"model": best["model"], "sampler": best["sampler"], "fd": round(float(best["fd"]), 4),
                                "fid": None if pd.isna(best.get("fid")) else round(float(best["fid"]), 2)}
        students = [picks[k] for k in ("consistency", "progressive") if k in picks]
        if students:
            out.append({"nfe": nfe, **picks, "better_student": min(students, key=lambda r: r["fd"])["model"]})
    return out


def plot(df: pd.DataFrame, consistency: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fd", "fid") if k in df and df[k].notna().any()]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for sampler, rows in df[df["kind"] == "teacher"].groupby("sampler"):
            rows = rows.dropna(subset=[key]).sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="o", alpha=0.5, label=f"teacher {sampler}")
        pd_rows = df[(df["kind"] == "student") & ~df["model"].isin(consistency)].dropna(subset=[key])
        for sampler, rows in pd_rows.groupby("sampler"):
            rows = rows.sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="*", markersize=11, color="black" if sampler == "ddim" else "gray",
                    label=f"progressive students, {sampler}")
        for name, color in zip(consistency, ("crimson", "navy", "darkgreen", "darkorange")):
            rows = df[df["model"] == name].dropna(subset=[key]).sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="D", markersize=7, color=color, label=f"{name} (consistency)")
        style_axis(ax, key, legend_size=7)
    save_figure(fig, path, title)


def markdown(df: pd.DataFrame, meta: dict, comp: dict, check_rows: list[dict], sbs: list[dict]) -> str:
    cols = ["model", "kind", "sampler", "steps", "nfe", "fd", "fid", "acc", "sample_seconds"]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# Consistency students against the teacher ({meta['teacher']}) and the progressive students", "",
             f"{meta['samples']} samples per row (seeds 0-{meta['samples'] - 1}, classes cycled, w = 0) against real "
             f"half A of `{meta['data']}`; FD/accuracy with the domain classifier, FID with InceptionV3; bf16 = "
             f"{meta['bf16']}; {meta['threads']} CPU threads; sample_seconds is the time to draw all samples. The "
             f"consistency students sample with their card's searched timesteps (validation seeds from 1,000,000 "
             f"against real half B, never these). Teacher and progressive rows are copied from "
             f"`{meta['progressive']}` (same seeds, count, reference, precision).", "",
             "## Consistency students", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    mine = df[df["model"].isin(meta["students"])].sort_values(["model", "nfe"])
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in mine.iterrows()]
    lines += ["", "## Acceptance checks", "", "| check | value | bound | pass |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {c['bound']} | {'yes' if c['pass'] else '**no**'} |"
              for c in check_rows]
    lines += ["", "## Side by side at 1 and 2 evaluations (FD; FID)", "",
              "| NFE | best consistency | best progressive | best training-free | better student |",
              "|---|---|---|---|---|"]
    for r in sbs:
        cells = [f"{r[k]['model']} ({r[k]['sampler']}): {r[k]['fd']}; {r[k]['fid']}" if k in r else "-"
                 for k in ("consistency", "progressive", "training-free")]
        lines.append(f"| {r['nfe']} | " + " | ".join(cells) + f" | {r['better_student']} |")
    lines += ["", "## Training compute", "",
              "Teacher-training-step equivalents: a student step (forward + backward, batch 128) counts 1, each "
              "forward pass of the batch (the target network's, the teacher's) 1/3.", "",
              "| student | train steps | teacher forwards / step | teacher-step equivalents | seconds |",
              "|---|---|---|---|---|"]
    for name, c in comp.items():
        lines.append(f"| {name} | {c['train_steps']} | {c['teacher_forwards_per_step']} | "
                     f"{c['teacher_step_equivalents']} | {c['seconds']} |")
    others = df[~df["model"].isin(meta["students"])].sort_values(["kind", "sampler", "nfe"],
                                                                 ascending=[False, True, True])
    lines += ["", "## The teacher's samplers and the progressive students (copied rows)", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in others.iterrows()]
    lines += ["", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description="Consistency students against the teacher and the progressive students.")
    p.add_argument("--student", action="append", default=None, metavar="NAME=RUN",
                   help="a consistency student (repeatable) [cd=runs/mnist-cd, ct=runs/mnist-ct]")
    p.add_argument("--teacher", default="mnist")
    p.add_argument("--samples", type=int, default=2500)
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--progressive", type=Path, default=Path("benchmarks/results/progressive.csv"),
                   help="the progressive benchmark's rows (teacher and progressive students)")
    p.add_argument("--metrics", default="fd,acc,fid")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/consistency"))
    args = p.parse_args(argv)

    specs = args.student or ["cd=runs/mnist-cd", "ct=runs/mnist-ct"]
    students = dict(s.split("=", 1) for s in specs)
    teacher = load_denoiser(args.teacher)
    data_spec = (teacher.metadata.get("data") or {}).get("spec")
    quality = Quality(load_dataset(data_spec), ref="A", metrics=tuple(args.metrics.split(",")), progress=False)
    csv = args.out.with_suffix(".csv")
    df = read_rows(csv, columns=COLUMNS, keys=KEYS, name="consistency")
    done = {(r.model, r.sampler, int(r.steps), float(r.guidance), int(r.n_fake)) for r in df.itertuples()}
    csv.parent.mkdir(parents=True, exist_ok=True)
    methods = {}
    for name, path in students.items():
        den = load_denoiser(path)
        card = den.metadata["card"]
        # The consistency-training bounds are for a student initialised from the teacher; one trained from
        # scratch is reported without a bound.
        methods[name] = card["method"] + ("" if card.get("initialised_from", True) else "_from_scratch")
        for steps in range(1, args.max_steps + 1):
            if (name, "consistency", steps, 0.0, args.samples) in done:
                continue
            r = evaluate(name, data_spec=data_spec, sampler="consistency", steps=steps, guidance=0.0,
                         seeds=list(range(args.samples)), batch_size=args.batch_size, bf16=args.bf16, progress=False,
                         quality=quality, denoiser=den)
            row = {c: r.get(c, float("nan")) for c in COLUMNS}
            row.update({"model": name, "kind": "student"})
            df = pd.concat([df.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
            write_rows(df, csv)
            print(json.dumps({k: row[k] for k in ("model", "steps", "fd", "fid", "acc", "sample_seconds")}), flush=True)
    copied = pd.read_csv(args.progressive)
    copied = copied[(copied["n_fake"] == args.samples) & (copied["guidance"] == 0)]
    rows = pd.concat([df[df["model"].isin(students)], copied], ignore_index=True)
    rows = rows.astype({"nfe": "int64", "steps": "int64", "n_fake": "int64"})
    best_fd = float(rows.loc[rows["kind"] == "teacher", "fd"].min())
    check_rows = checks(rows, methods, best_fd)
    sbs = side_by_side(rows, list(students))
    comp = {name: run_compute(path) for name, path in students.items()}
    meta = {"students": list(students), "runs": students, "teacher": args.teacher, "data": data_spec,
            "samples": args.samples, "best_fd": best_fd, "progressive": str(args.progressive), "bf16": args.bf16,
            "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.consistency " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d")}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "compute": comp, "checks": check_rows,
                                               "side_by_side": sbs, "rows": rows.to_dict("records")})
    plot(rows, list(students), args.out.with_suffix(".png"),
         f"consistency vs progressive students vs the teacher (w = 0, {args.samples} samples)")
    text = markdown(rows, meta, comp, check_rows, sbs)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {csv}, {args.out.with_suffix('.png')}, {args.out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
