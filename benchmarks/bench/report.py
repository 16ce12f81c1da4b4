"""``distill bench report`` and ``distill bench pick``: speed joined with quality, the Pareto frontier, the pick.

The table joins each speed row (one configuration at one batch size) with the quality of its numerics class. Per
batch size, a configuration is on the Pareto frontier when no other is both faster (images/s) and better (FD).
The headline sets the fastest configuration within a quality bound (FD ≤ ``bound`` × the teacher's best FD)
against the teacher at its best-quality setting run in plain eager fp32, at the same batch size, as a ratio of
images/s. Writes ``NAME.csv``, ``NAME.parquet``, ``NAME.md``, ``NAME.png`` and ``NAME.html`` (Bokeh; hovering a
point shows the configuration, its numbers and the commands that reproduce it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.bench.speed import read_jsonl
from distill.checkpoint import atomic_write
from distill.errors import UsageError

QUALITY_COLUMNS = ["fd", "kid", "acc", "fid", "is"]
TABLE_COLUMNS = ["config", "kind", "model", "sampler", "steps", "nfe", "guidance", "backend", "precision", "batch",
                 "images_per_s", "sample_ms", "sample_p10_ms", "sample_p90_ms", "eval_ms", "eval_p10_ms",
                 "eval_p90_ms", "repeats", "rounds", "round_spread", "peak_rss_mb", "peak_gpu_mb", *QUALITY_COLUMNS,
                 "fd_ratio", "pareto", "quality_from", "speed_command", "quality_command"]


def build_table(out: Path) -> tuple[pd.DataFrame, dict]:
    """The joined table of a benchmark folder (``speed.jsonl`` + ``quality.jsonl``) and its machine."""
    speed = read_jsonl(out / "speed.jsonl", ("config", "quality_id"))
    quality = read_jsonl(out / "quality.jsonl", ("quality_id",))
    if not speed:
        raise UsageError(f"{out}: no speed results (speed.jsonl); run distill bench speed --out {out} first")
    q_by_id: dict[str, dict] = {}
    for r in quality:  # the last measurement of a class wins
        q_by_id[r["quality_id"]] = r
    latest: dict[str, dict] = {}
    for r in speed:
        latest[r["config"]] = r
    rows = []
    for r in latest.values():
        q = q_by_id.get(r["quality_id"], {})
        passes = r.get("sample_round_ms") or []
        rows.append({**{k: r.get(k) for k in TABLE_COLUMNS if k in r},
                     "round_spread": max(passes) / min(passes) - 1 if len(passes) > 1 else None,
                     **{k: q.get(k) for k in QUALITY_COLUMNS},
                     "quality_from": q.get("quality_from"), "quality_n": q.get("n_fake"),
                     "speed_command": r.get("command"), "quality_command": q.get("command")})
    df = pd.DataFrame(rows)
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = np.nan
    df = annotate(df)
    machine = latest[next(iter(latest))].get("machine", {})
    meta = {"machine": machine, "harness_overhead_ms": max(r.get("harness_overhead_ms", 0.0) for r in latest.values()),
            "quality_samples": sorted({q.get("n_fake") for q in q_by_id.values()} - {None})}
    return df, meta


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """FD ratio to the teacher's best FD, and the Pareto flag per batch size."""
    df = df.copy()
    teacher = df[(df["kind"] == "teacher") & df["fd"].notna()]
    best = teacher["fd"].min() if len(teacher) else np.nan
    df["fd_ratio"] = df["fd"] / best if np.isfinite(best) else np.nan
    df["pareto"] = False
    for _, part in df[df["fd"].notna()].groupby("batch"):
        order = part.sort_values(["images_per_s", "fd"], ascending=[False, True])
        best_fd = np.inf
        for idx, row in order.iterrows():
            if row["fd"] < best_fd:
                df.loc[idx, "pareto"] = True
                best_fd = row["fd"]
    return df[TABLE_COLUMNS + [c for c in df.columns if c not in TABLE_COLUMNS]]


def teacher_best(df: pd.DataFrame) -> pd.Series | None:
    """The teacher's best-quality setting (lowest FD), as its row."""
    teacher = df[(df["kind"] == "teacher") & df["fd"].notna()]
    return None if teacher.empty else teacher.loc[teacher["fd"].idxmin()]


def pick(df: pd.DataFrame, batch: int, *, max_fd: float | None = None, max_fid: float | None = None,
         max_ratio: float | None = None, students_only: bool = False) -> pd.Series | None:
    """The fastest configuration (images/s) at ``batch`` meeting every given quality bound; ``None`` if none."""
    part = df[df["batch"] == batch]
    if students_only:
        part = part[part["kind"] != "teacher"]
    if max_fd is not None:
        part = part[part["fd"] <= max_fd]
    if max_fid is not None:
        part = part[part["fid"] <= max_fid]
    if max_ratio is not None:
        part = part[part["fd_ratio"] <= max_ratio]
    part = part.dropna(subset=["images_per_s"])
    return None if part.empty else part.loc[part["images_per_s"].idxmax()]


def headline(df: pd.DataFrame, batch: int = 64, bound: float = 1.5, goal: float = 100.0) -> dict:
    """The best student configuration at ``batch`` within ``bound`` × the teacher's best FD, against the teacher
    at its best-quality setting in plain eager fp32 at the same batch size (images/s ratio)."""
    out: dict = {"batch": batch, "bound": bound, "goal": goal}
    best = teacher_best(df)
    if best is None:
        return {**out, "note": "no teacher quality in the results"}
    base = df[(df["model"] == best["model"]) & (df["sampler"] == best["sampler"]) & (df["steps"] == best["steps"])
              & (df["guidance"] == best["guidance"]) & (df["backend"] == "eager") & (df["precision"] == "fp32")
              & (df["batch"] == batch)]
    out["teacher_best"] = {"config": best["config"].rsplit("/", 2)[0], "fd": float(best["fd"])}
    if base.empty:
        return {**out, "note": f"the grid has no eager fp32 batch-{batch} run of the teacher's best setting"}
    out["baseline"] = {"config": base.iloc[0]["config"], "images_per_s": float(base.iloc[0]["images_per_s"])}
    for key, students in (("student", True), ("any", False)):
        p = pick(df, batch, max_ratio=bound, students_only=students)
        if p is not None:
            out[key] = {"config": p["config"], "images_per_s": float(p["images_per_s"]), "fd": float(p["fd"]),
                        "fd_ratio": float(p["fd_ratio"]),
                        "speedup": float(p["images_per_s"] / out["baseline"]["images_per_s"])}
    fastest = pick(df, batch, students_only=True)
    if fastest is not None and pd.notna(fastest["fd"]):
        out["fastest_student"] = {"config": fastest["config"], "images_per_s": float(fastest["images_per_s"]),
                                  "fd_ratio": float(fastest["fd_ratio"]),
                                  "speedup": float(fastest["images_per_s"] / out["baseline"]["images_per_s"])}
    out["met"] = bool(out.get("student", {}).get("speedup", 0) >= goal)
    return out


def stability(df: pd.DataFrame, other: pd.DataFrame) -> dict:
    """The same speed benchmark run twice: per configuration, the ratio of the two whole-sample (and
    per-evaluation) medians; and within this run, how far apart its passes' medians were (max / min − 1)."""
    joined = df.merge(other[["config", "sample_ms", "eval_ms"]], on="config", suffixes=("", "_2"))
    if joined.empty:
        return {}
    spread = (joined["sample_ms_2"] / joined["sample_ms"] - 1).abs()
    espread = (joined["eval_ms_2"] / joined["eval_ms"] - 1).abs().dropna()
    passes = pd.to_numeric(df["round_spread"], errors="coerce").dropna()
    worst = joined.loc[spread.idxmax()]
    return {"configs": len(joined), "within_10pct": float((spread <= 0.10).mean()),
            "median_abs_diff": float(spread.median()), "p90_abs_diff": float(spread.quantile(0.9)),
            "max_abs_diff": float(spread.max()), "worst": worst["config"],
            "eval_median_abs_diff": float(espread.median()) if len(espread) else None,
            "eval_within_10pct": float((espread <= 0.10).mean()) if len(espread) else None,
            "passes_median_spread": float(passes.median()) if len(passes) else None,
            "passes_p90_spread": float(passes.quantile(0.9)) if len(passes) else None}


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def md_table(df: pd.DataFrame, cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


def markdown(df: pd.DataFrame, meta: dict, head: dict, stab: dict, command: str, skipped: list | None = None) -> str:
    m = meta.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('threads', '?')} threads)"
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    lines = [f"# Speed against quality on {where}", "", f"Reproduce: `{command}`", "",
             f"Machine: {m.get('cpu', '?')}, flags {' '.join(m.get('cpu_flags', []))}, {m.get('threads', '?')} threads "
             f"of {m.get('cpu_count', '?')} CPUs" + (f"; GPU {m['gpu']} (compute {m.get('compute_capability')}, "
                                                      f"driver {m.get('driver')}, CUDA {m.get('cuda')})"
                                                      if m.get("gpu") else "") + f"; {libs}.", "",
             f"Quality: {', '.join(map(str, meta.get('quality_samples', [])))} samples per configuration (seeds 0 …, "
             "the same noise for every configuration), domain FD against real half A. Speed: median of timed calls "
             "after warm-up, pooled over passes over the grid; the harness adds "
             f"{meta.get('harness_overhead_ms', 0) * 1000:.2f} µs to a call.", ""]
    lines += ["## Headline", ""]
    if "baseline" in head:
        b, tb = head["baseline"], head["teacher_best"]
        lines.append(f"- Teacher's best-quality setting: {tb['config']} (FD {tb['fd']:.4g}); plain eager fp32 at batch "
                     f"{head['batch']}: {b['images_per_s']:.3g} images/s.")
        for key, what in (("student", "Best student configuration"), ("any", "Best configuration of any model")):
            if key in head:
                s = head[key]
                lines.append(f"- {what} with FD ≤ {head['bound']}× the teacher's best: `{s['config']}`, "
                             f"{s['images_per_s']:.4g} images/s, FD {s['fd']:.4g} ({s['fd_ratio']:.2f}×): "
                             f"**{s['speedup']:.1f}×** the baseline.")
            else:
                lines.append(f"- {what} with FD ≤ {head['bound']}× the teacher's best: none in the grid.")
        if "fastest_student" in head:
            s = head["fastest_student"]
            lines.append(f"- Fastest student configuration regardless of quality: `{s['config']}`, "
                         f"{s['images_per_s']:.4g} images/s ({s['speedup']:.1f}× the baseline) at FD "
                         f"{s['fd_ratio']:.2f}× the teacher's best.")
        lines.append(f"- Goal: ≥ {head['goal']:g}× at FD ≤ {head['bound']}× the teacher's best: "
                     f"**{'met' if head.get('met') else 'not met'}**.")
    else:
        lines.append(f"- {head.get('note', 'no headline')}")
    lines.append("")
    if stab:
        lines += ["## Run-to-run stability (the same speed benchmark run twice)", "",
                  f"{stab['configs']} configurations: whole-sample medians within 10 % for "
                  f"{stab['within_10pct'] * 100:.0f} %; |difference| median {stab['median_abs_diff'] * 100:.1f} %, "
                  f"p90 {stab['p90_abs_diff'] * 100:.1f} %, max {stab['max_abs_diff'] * 100:.1f} % "
                  f"(`{stab['worst']}`)"
                  + (f"; per-evaluation medians within 10 % for {stab['eval_within_10pct'] * 100:.0f} % "
                     f"(median |difference| {stab['eval_median_abs_diff'] * 100:.1f} %)"
                     if stab.get("eval_within_10pct") is not None else "") + "."
                  + (f" Within the run, a configuration's passes (minutes apart) had medians apart by "
                     f"{stab['passes_median_spread'] * 100:.1f} % (median over configurations; p90 "
                     f"{stab['passes_p90_spread'] * 100:.1f} %): what pooling the passes evens out."
                     if stab.get("passes_median_spread") is not None else ""), ""]
    cols = ["config", "images_per_s", "sample_ms", "eval_ms", "peak_rss_mb", "fd", "fd_ratio", "kid", "acc"]
    for batch, part in df.groupby("batch"):
        front = part[part["pareto"]].sort_values("images_per_s", ascending=False)
        lines += [f"## Pareto frontier at batch {batch}", "", md_table(front, cols), ""]
    lines += ["## Every configuration", "", "Sorted by batch, then images/s. `sample_ms` is a whole sample (all "
              "steps) of the batch; `eval_ms` one network evaluation (empty for fused graphs: one call per sample).",
              "", md_table(df.sort_values(["batch", "images_per_s"], ascending=[True, False]),
                           cols[:4] + ["sample_p10_ms", "sample_p90_ms"] + cols[4:] + ["quality_from"]), ""]
    if skipped:
        lines += ["## Left out of the grid", ""] + [f"- {p}: {why}" for p, why in skipped] + [""]
    return "\n".join(lines)


def _teacher_curve(part: pd.DataFrame) -> pd.DataFrame:
    t = part[(part["kind"] == "teacher") & (part["backend"] == "eager") & (part["precision"] == "fp32")]
    return t.dropna(subset=["fd"]).sort_values("steps")


def plot_png(df: pd.DataFrame, path: Path, title: str, bound: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = df.dropna(subset=["fd", "images_per_s"])
    batches = sorted(data["batch"].unique())
    fig, axes = plt.subplots(1, max(len(batches), 1), figsize=(7 * max(len(batches), 1), 5.5), squeeze=False)
    models = sorted(data["model"].unique())
    colors = dict(zip(models, plt.cm.tab10.colors))
    markers = {"eager": "o", "compile": "s", "onnxruntime": "^", "onnxruntime-fused": "D"}
    for ax, batch in zip(axes[0], batches):
        part = data[data["batch"] == batch]
        for (model, backend), rows in part.groupby(["model", "backend"]):
            ax.scatter(rows["images_per_s"], rows["fd"], color=colors[model], marker=markers.get(backend, "o"),
                       s=36, alpha=0.8, edgecolor="black", linewidth=0.4)
        curve = _teacher_curve(part)
        if len(curve):
            ax.plot(curve["images_per_s"], curve["fd"], color="gray", linestyle=":", linewidth=1.2)
            for _, r in curve.iterrows():
                ax.annotate(f"{int(r['steps'])}", (r["images_per_s"], r["fd"]), fontsize=7, color="gray",
                            xytext=(3, 3), textcoords="offset points")
        front = part[part["pareto"]].sort_values("images_per_s")
        ax.step(front["images_per_s"], front["fd"], where="pre", color="crimson", linewidth=1.5)
        best = teacher_best(df)
        if bound and best is not None:
            ax.axhline(best["fd"] * bound, color="green", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images/s (whole sample, all steps)")
        ax.set_ylabel("FD (domain classifier features; lower is better)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in models]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=b) for b, mk in markers.items()
                if b in set(data["backend"])]
    handles += [Line2D([], [], color="crimson", label="Pareto frontier"),
                Line2D([], [], color="gray", linestyle=":", label="teacher, eager fp32, by steps")]
    if bound:
        handles.append(Line2D([], [], color="green", linestyle="--", label=f"{bound}× the teacher's best FD"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_html(df: pd.DataFrame, path: Path, title: str, bound: float | None) -> None:
    """The interactive Pareto plot (Bokeh, self-contained: its JavaScript is inlined, so it opens offline)."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, Div, HoverTool, Span
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    data = df.dropna(subset=["fd", "images_per_s"]).copy()
    data["speed_command"] = data["speed_command"].fillna("")
    data["quality_command"] = data["quality_command"].fillna("")
    models = sorted(data["model"].unique())
    colors = dict(zip(models, Category10_10))
    markers = {"eager": "circle", "compile": "square", "onnxruntime": "triangle", "onnxruntime-fused": "diamond"}
    best = teacher_best(df)
    plots = [Div(text=f"<h2>{title}</h2><p>Hover a point for its configuration and the commands that reproduce it. "
                      "Red: the Pareto frontier; gray dotted: the teacher in eager fp32 by step count.</p>")]
    tooltips = [("config", "@config"), ("images/s", "@images_per_s{0.00}"), ("FD", "@fd{0.0000}"),
                ("FD / teacher best", "@fd_ratio{0.00}"), ("sample ms", "@sample_ms{0.0}"),
                ("peak RSS MB", "@peak_rss_mb{0}"), ("measure speed", "@speed_command"),
                ("measure quality", "@quality_command")]
    for batch in sorted(data["batch"].unique()):
        part = data[data["batch"] == batch]
        fig = figure(title=f"batch {batch}", x_axis_type="log", y_axis_type="log", width=900, height=520,
                     x_axis_label="images/s (whole sample, all steps)", y_axis_label="FD (lower is better)",
                     tools="pan,wheel_zoom,box_zoom,reset,save")
        renderers = []
        for (model, backend), rows in part.groupby(["model", "backend"]):
            src = ColumnDataSource(rows[["config", "images_per_s", "fd", "fd_ratio", "sample_ms", "peak_rss_mb",
                                         "speed_command", "quality_command"]])
            renderers.append(fig.scatter("images_per_s", "fd", source=src, size=10, color=colors[model],
                                         marker=markers.get(backend, "circle"), alpha=0.8, line_color="black",
                                         legend_label=f"{model} · {backend}"))
        front = part[part["pareto"]].sort_values("images_per_s")
        fig.step(front["images_per_s"].tolist(), front["fd"].tolist(), mode="before", color="crimson", line_width=2)
        curve = _teacher_curve(part)
        if len(curve):
            fig.line(curve["images_per_s"].tolist(), curve["fd"].tolist(), color="gray", line_dash="dotted",
                     line_width=2)
        if bound and best is not None:
            fig.add_layout(Span(location=float(best["fd"] * bound), dimension="width", line_color="green",
                                line_dash="dashed"))
        fig.add_tools(HoverTool(renderers=renderers, tooltips=tooltips))
        fig.legend.label_text_font_size = "8pt"
        fig.legend.click_policy = "hide"
        fig.add_layout(fig.legend[0], "right")
        plots.append(fig)
    html = file_html(column(*plots), INLINE, title)
    atomic_write(path, lambda tmp: Path(tmp).write_text(html))


def write_report(out: Path, dest: Path, name: str, *, command: str, compare: Path | None = None, batch: int = 64,
                 bound: float = 1.5, skipped: list | None = None) -> dict:
    """Every report file for the benchmark folder ``out``, written to ``dest/NAME.*``; returns the summary."""
    df, meta = build_table(out)
    stab = stability(df, build_table(compare)[0]) if compare else {}
    head = headline(df, batch=batch, bound=bound)
    dest.mkdir(parents=True, exist_ok=True)
    m = meta["machine"]
    title = f"distill: speed against quality ({m.get('gpu') or m.get('cpu', '?')})"
    atomic_write(dest / f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write(dest / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(dest / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown(df, meta, head, stab, command,
                                                                                  skipped)))
    atomic_write(dest / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"headline": head, "stability": stab, **meta}, indent=2, default=str) + "\n"))
    plot_png(df, dest / f"{name}.png", title, bound)
    plot_html(df, dest / f"{name}.html", title, bound)
    return {"headline": head, "stability": stab, "rows": len(df), "files": [str(dest / f"{name}.{e}") for e in
                                                                             ("csv", "parquet", "md", "json", "png",
                                                                              "html")]}


def load_table(path: Path) -> pd.DataFrame:
    """A results table: a benchmark folder (joined afresh), or a report's CSV / Parquet file."""
    path = Path(path)
    if path.is_dir():
        return build_table(path)[0]
    if path.suffix == ".csv" and path.is_file():
        return annotate(pd.read_csv(path))
    if path.suffix == ".parquet" and path.is_file():
        return annotate(pd.read_parquet(path))
    raise UsageError(f"RESULTS {path}: not a benchmark folder (distill bench speed --out) or a report .csv/.parquet")
