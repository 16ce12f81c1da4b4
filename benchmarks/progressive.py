"""Progressive distillation against the teacher's step-count curve: quality and sampling time per round.

    python -m benchmarks.progressive                                   # the shipped run, 2,500 samples per row
    python -m benchmarks.progressive --run runs/mnist-students --samples 500 --guidance-samples 200

Rows (one CSV, rewritten atomically after each row; a rerun skips the rows already there, so it resumes):
- every student stage of ``--run`` (``steps-N``: its card's N steps and exact timesteps) at w = 0, with each of
  ``--student-samplers`` (DDIM, the one the rounds distil, and Meng et al.'s N-step stochastic sampler);
- the teacher with each training-free sampler (DDPM, DDIM, Heun, DPM-Solver++(2M), stochastic) at the students'
  NFEs, at its converged setting (``--teacher-best``, DPM-Solver++(2M) 20 steps), and at its converged DDIM
  (``--teacher-ode``, 64 steps): the deterministic sampler the rounds distil, the students' DDIM ceiling;
- guidance: the ``--guidance-student`` (default the 4-step one) and the teacher's converged sampler at each
  ``--guidance-weights`` w, with ``--guidance-samples`` samples.

Writes ``<out>.csv``, ``<out>.json`` (rows, distillation compute, acceptance checks), ``<out>.png`` (FD and FID
against NFE: the teacher's samplers as lines, the students as points) and ``<out>.md``.
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
from benchmarks.teacher_baseline import read_rows, write_rows
from distill.checkpoint import atomic_write, card_sampling, load_denoiser, read_metadata
from distill.data import load_dataset
from distill.parsing import parse_int_list

COLUMNS = ["model", "kind", "sampler", "steps", "nfe", "guidance", "n_fake", "fd", "fid", "acc", "kid",
           "sample_seconds"]
KEYS = ["model", "sampler", "steps", "guidance", "n_fake"]
TEACHER_SAMPLERS = ("ddpm", "ddim", "heun", "dpmpp_2m", "stochastic")
TEACHER_TRAIN_STEPS = 4000  # the shipped teacher's optimizer steps (distill/weights/mnist.md)


def student_stages(run: Path) -> list[Path]:
    """The ``steps-N`` stage folders of a progressive run that hold a model, fewest steps first."""
    stages = [p for p in Path(run).glob("steps-*") if (p / "model.safetensors").exists()]
    return sorted(stages, key=lambda p: int(p.name.split("-")[1]))


def step_seconds(log: Path) -> float:
    """Seconds of step time a training run's ``metrics.jsonl`` records (0 without a log)."""
    secs, prev = 0.0, 0
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            secs += r["sec_per_step"] * (r["step"] - prev)
            prev = r["step"]
    return secs


def compute(run: Path) -> dict:
    """Distillation compute from the stages' cards and logs, in training steps of the teacher: a student step
    (forward + backward) counts 1, a teacher forward pass 1/3 of one (a backward pass costs about two forwards)."""
    stages, total_equiv, total_sec = [], 0.0, 0.0
    def order(p: Path):  # the run's own order: the guidance stage, then rounds from most to fewest steps
        return (0, 0) if p.name == "guidance" else (1, -int(p.name.split("-")[-1]))

    for d in sorted((p for p in Path(run).iterdir() if (p / "model.safetensors").exists()), key=order):
        card = read_metadata(d / "model.safetensors").get("card") or {}
        c = card.get("compute") or {}
        steps, fwd = int(c.get("train_steps", 0)), int(c.get("teacher_forwards_per_step", 0))
        equiv = steps * (1 + fwd / 3)
        secs = step_seconds(d / "metrics.jsonl")
        stages.append({"stage": d.name, "train_steps": steps, "teacher_forwards_per_step": fwd,
                       "teacher_step_equivalents": round(equiv), "seconds": round(secs, 1)})
        total_equiv += equiv
        total_sec += secs
    return {"stages": stages, "teacher_step_equivalents": round(total_equiv), "seconds": round(total_sec, 1),
            "teacher_train_steps": TEACHER_TRAIN_STEPS}


def plot(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = df[df["guidance"] == 0]
    keys = [k for k in ("fd", "fid") if k in base and base[k].notna().any()]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        teacher = base[base["kind"] == "teacher"]
        for sampler, rows in teacher.groupby("sampler"):
            rows = rows.dropna(subset=[key]).sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="o", alpha=0.7, label=f"teacher {sampler}")
        students = base[base["kind"] == "student"].dropna(subset=[key])
        for (sampler, rows), color in zip(students.groupby("sampler"), ("black", "crimson", "navy")):
            rows = rows.sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="*", markersize=12, color=color, label=f"students (PD), {sampler}")
        style_axis(ax, key, legend_size=8)
    save_figure(fig, path, title)


def style_axis(ax, key: str, legend_size: int) -> None:
    """Log-log quality (``fd`` or ``fid``) against NFE, as every student plot draws it."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel({"fd": "FD (domain classifier features)", "fid": "FID (InceptionV3)"}[key])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def student_samplers(den, names: str) -> list[str]:
    """The samplers a student runs with: ``names`` (comma-separated), less stochastic for a 1-step student (its one
    step is DDIM's deterministic one: the same samples)."""
    return [s for s in names.split(",") if not (s == "stochastic" and den.metadata["card"]["steps"] == 1)]


def step_checks(rows: pd.DataFrame, best_fd: float) -> list[dict]:
    """The issue's step-count acceptance checks, from the rows at one sample count and w = 0."""
    out = []
    students = rows[rows["kind"] == "student"]
    # The student's best sampler at each step count (the table has every one).
    students = students.loc[students.groupby("nfe")["fd"].idxmin()].set_index("nfe")
    for nfe, factor in ((4, 1.25), (1, 3.0)):
        if nfe in students.index:
            fd = float(students.loc[nfe, "fd"])
            out.append({"check": f"{nfe}-step student ({students.loc[nfe, 'sampler']}) FD <= {factor} x the "
                                 f"teacher's best ({best_fd:.4g})",
                        "value": round(fd, 4), "bound": round(factor * best_fd, 4),
                        "pass": bool(fd <= factor * best_fd)})
    teacher = rows[rows["kind"] == "teacher"]
    for nfe in (1, 2, 4):
        same = teacher[teacher["nfe"] == nfe]
        if nfe in students.index and len(same):
            best = same.loc[same["fd"].idxmin()]
            fd = float(students.loc[nfe, "fd"])
            out.append({"check": f"{nfe}-step student ({students.loc[nfe, 'sampler']}) FD <= 1/3 of the best "
                                 f"training-free sampler at NFE {nfe} "
                                 f"({best['sampler']}, {best['fd']:.4g})",
                        "value": round(fd, 4), "bound": round(best["fd"] / 3, 4), "pass": bool(fd <= best["fd"] / 3)})
    return out


def guidance_checks(rows: pd.DataFrame, student: str, teacher_best: tuple[str, int]) -> list[dict]:
    """One student against the guided teacher at its converged sampler, per w (rows at one sample count):
    class accuracy within 1 point and FD within 1.25x."""
    out = []
    for w in sorted(set(rows.loc[rows["model"] == student, "guidance"])):
        s = rows[(rows["model"] == student) & (rows["guidance"] == w)]
        t = rows[(rows["model"] == "teacher") & (rows["sampler"] == teacher_best[0]) &
                 (rows["steps"] == teacher_best[1]) & (rows["guidance"] == w)]
        if len(s) and len(t):
            s, t = s.loc[s["fd"].idxmin()], t.iloc[0]  # the student's best sampler at this w
            ok = abs(s["acc"] - t["acc"]) <= 0.01 and s["fd"] <= 1.25 * t["fd"]
            out.append({"check": f"w = {w:g}: {student} ({s['sampler']}) vs the guided teacher ({teacher_best[0]} "
                                 f"{teacher_best[1]}), n = {int(s['n_fake'])}: accuracy within 1 point and FD <= 1.25x",
                        "value": f"acc {s['acc']:.4f} vs {t['acc']:.4f}, FD {s['fd']:.4g} vs {t['fd']:.4g}",
                        "bound": f"acc {t['acc'] - 0.01:.4f}-{t['acc'] + 0.01:.4f}, FD <= {1.25 * t['fd']:.4g}",
                        "pass": bool(ok)})
    return out


def _fd_of(rows: pd.DataFrame, sampler: str, steps: int) -> float | None:
    match = rows[(rows["sampler"] == sampler) & (rows["steps"] == steps)]
    return float(match["fd"].iloc[0]) if len(match) else None


def markdown(df: pd.DataFrame, meta: dict, comp: dict, check_rows: list[dict]) -> str:
    cols = ["model", "sampler", "steps", "nfe", "guidance", "n_fake", "fd", "fid", "acc", "sample_seconds"]
    lines = [f"# Progressive distillation: {meta['run']} (teacher {meta['teacher']})", "",
             f"Against real half A of `{meta['data']}`; FD/accuracy with the domain classifier, FID with "
             f"InceptionV3. Students sample on their card's steps and exact timesteps, with DDIM (what the rounds "
             f"distil) and Meng et al.'s N-step stochastic sampler (same NFE); bf16 = {meta['bf16']}; "
             f"{meta['threads']} CPU threads; sample_seconds is the time to draw all n_fake samples.", "",
             "## Quality and time per step count (w = 0)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base = df[(df["guidance"] == 0) & (df["n_fake"] == meta["samples"])].sort_values(
        ["kind", "sampler", "nfe"], ascending=[False, True, True])
    for _, row in base.iterrows():
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                       for c in cols) + " |")
    if len(df[df["guidance"] > 0]):
        lines += ["", f"## Guidance ({meta['guidance_samples']} samples per row)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        rows = df[(df["n_fake"] == meta["guidance_samples"]) & (df["model"].isin(
            [meta["guidance_student"], "teacher"])) & ((df["guidance"] > 0) | (df["sampler"] == meta[
                "teacher_best"][0]) | (df["model"] == meta["guidance_student"]))]
        for _, row in rows.sort_values(["guidance", "model"]).iterrows():
            lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                           for c in cols) + " |")
    lines += ["", "## Acceptance checks", "", "| check | value | bound | pass |", "|---|---|---|---|"]
    for c in check_rows:
        lines.append(f"| {c['check']} | {c['value']} | {c['bound']} | {'yes' if c['pass'] else '**no**'} |")
    if meta.get("ode_fd") is not None:
        lines += ["", f"The rounds distil the teacher's deterministic sampler; converged ({meta['teacher_ode'][0]} "
                      f"{meta['teacher_ode'][1]} steps) its FD is {meta['ode_fd']:.4g}, "
                      f"{meta['ode_fd'] / meta['best_fd']:.2f}x the teacher's best ({meta['best_fd']:.4g}): a "
                      "student that reproduced it exactly would sit there with DDIM."]
    lines += ["", "## Distillation compute", "",
              f"{comp['teacher_step_equivalents']} teacher-training-step equivalents ({comp['seconds'] / 60:.0f} min "
              f"of step time) against the teacher's {comp['teacher_train_steps']} training steps. A student step "
              "(forward + backward, batch 128) counts 1, each teacher forward pass of the batch 1/3.", "",
              "| stage | train steps | teacher forwards / step | teacher-step equivalents | seconds |",
              "|---|---|---|---|---|"]
    for s in comp["stages"]:
        lines.append(f"| {s['stage']} | {s['train_steps']} | {s['teacher_forwards_per_step']} | "
                     f"{s['teacher_step_equivalents']} | {s['seconds']} |")
    lines += ["", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from distill.samplers import nfe as nfe_of
    from distill.samplers import steps_for_nfe

    p = argparse.ArgumentParser(description="Progressive-distillation students against the teacher's curve.")
    p.add_argument("--run", type=Path, default=Path("runs/mnist-students"), help="a distill progressive run")
    p.add_argument("--teacher", default="mnist")
    p.add_argument("--samples", type=int, default=2500)
    p.add_argument("--student-steps", default="1,2,4,8", help="which steps-N stages to measure")
    p.add_argument("--student-samplers", default="ddim,stochastic", help="samplers each student runs with")
    p.add_argument("--teacher-nfe", default="1,2,4", help="NFEs of the training-free samplers' rows")
    p.add_argument("--teacher-best", default="dpmpp_2m:20", help="the teacher's converged sampler:steps")
    p.add_argument("--teacher-ode", default="ddim:64", help="the converged sampler:steps the rounds distil")
    p.add_argument("--guidance-weights", default="0,0.5,1,2")
    p.add_argument("--guidance-samples", type=int, default=1000)
    p.add_argument("--guidance-student", default="steps-4")
    p.add_argument("--metrics", default="fd,acc,fid")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/progressive"))
    args = p.parse_args(argv)

    teacher = load_denoiser(args.teacher)
    data_spec = (teacher.metadata.get("data") or {}).get("spec")
    metrics = tuple(args.metrics.split(","))
    quality = Quality(load_dataset(data_spec), ref="A", metrics=metrics, progress=False)
    light = Quality(quality.data, ref="A", metrics=tuple(m for m in metrics if m != "fid"), progress=False)
    csv = args.out.with_suffix(".csv")
    df = read_rows(csv, columns=COLUMNS, keys=KEYS, name="progressive")
    done = {(r.model, r.sampler, int(r.steps), float(r.guidance), int(r.n_fake)) for r in df.itertuples()}
    csv.parent.mkdir(parents=True, exist_ok=True)

    def run_row(model: str, kind: str, den, sampler: str | None, steps: int | None, w: float, n: int, q: Quality):
        nonlocal df
        sampler, steps, _, _ = card_sampling(den.metadata, sampler, steps)
        if (model, sampler, steps, float(w), n) in done:
            return
        r = evaluate(model, data_spec=data_spec, sampler=sampler, steps=steps, guidance=w, seeds=list(range(n)),
                     batch_size=args.batch_size, bf16=args.bf16, progress=False, quality=q, denoiser=den)
        row = {c: r.get(c, float("nan")) for c in COLUMNS}
        row.update({"model": model, "kind": kind})
        df = pd.concat([df.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
        write_rows(df, csv)
        print(json.dumps({k: row[k] for k in ("model", "sampler", "steps", "guidance", "n_fake", "fd", "fid", "acc",
                                              "sample_seconds")}), flush=True)

    wanted = set(parse_int_list(args.student_steps, "--student-steps"))
    stages = {p.name: p for p in student_stages(args.run) if int(p.name.split("-")[1]) in wanted}
    for name, path in stages.items():
        den = load_denoiser(path)
        for sampler in student_samplers(den, args.student_samplers):
            run_row(name, "student", den, sampler, None, 0.0, args.samples, quality)
    best_sampler, best_steps = args.teacher_best.split(":")
    run_row("teacher", "teacher", teacher, best_sampler, int(best_steps), 0.0, args.samples, quality)
    ode_sampler, ode_steps = args.teacher_ode.split(":")
    run_row("teacher", "teacher", teacher, ode_sampler, int(ode_steps), 0.0, args.samples, light)
    for sampler in TEACHER_SAMPLERS:
        seen = set()
        for budget in parse_int_list(args.teacher_nfe, "--teacher-nfe"):
            steps = steps_for_nfe(sampler, budget, teacher.schedule)
            cost = nfe_of(sampler, steps, teacher.schedule)
            if cost in seen or cost != budget:
                continue
            seen.add(cost)
            run_row("teacher", "teacher", teacher, sampler, steps, 0.0, args.samples, light)
    student = load_denoiser(stages[args.guidance_student]) if args.guidance_student in stages and \
        args.guidance_weights else None
    if student is not None and not student.guidance_input:
        print(f"{args.guidance_student} takes no guidance weight (not guidance-distilled): no guidance rows")
        student = None
    if student is not None:
        for w in (float(x) for x in args.guidance_weights.split(",")):
            for sampler in student_samplers(student, args.student_samplers):
                run_row(args.guidance_student, "student", student, sampler, None, w, args.guidance_samples, light)
            run_row("teacher", "teacher", teacher, best_sampler, int(best_steps), w, args.guidance_samples, light)

    df = df.astype({"nfe": "int64", "steps": "int64", "n_fake": "int64"})
    main_rows = df[df["n_fake"] == args.samples]
    best = main_rows[(main_rows["model"] == "teacher") & (main_rows["guidance"] == 0)]
    best_fd = float(best["fd"].min())
    comp = compute(args.run)
    check_rows = step_checks(main_rows[main_rows["guidance"] == 0], best_fd) + guidance_checks(
        df[df["n_fake"] == args.guidance_samples], args.guidance_student, (best_sampler, int(best_steps)))
    meta = {"run": str(args.run), "teacher": args.teacher, "data": data_spec, "samples": args.samples,
            "guidance_samples": args.guidance_samples, "guidance_student": args.guidance_student,
            "teacher_best": (best_sampler, int(best_steps)), "teacher_ode": (ode_sampler, int(ode_steps)),
            "best_fd": best_fd, "ode_fd": _fd_of(best, ode_sampler, int(ode_steps)), "bf16": args.bf16,
            "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.progressive " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d")}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "compute": comp, "checks": check_rows,
                                               "rows": df.to_dict("records")})
    plot(main_rows, args.out.with_suffix(".png"),
         f"{args.run.name}: students vs the teacher's samplers (w = 0, {args.samples} samples)")
    text = markdown(df, meta, comp, check_rows)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {csv}, {args.out.with_suffix('.png')}, {args.out.with_suffix('.md')}")
    return df


if __name__ == "__main__":
    main()
