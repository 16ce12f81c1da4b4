"""The step-count baseline: a teacher's quality against the number of network evaluations (NFE) for each sampler.

    python -m benchmarks.teacher_baseline                       # the shipped mnist teacher, all settings
    python -m benchmarks.teacher_baseline --model runs/x --data digits --samples 200 --nfe 1,4,16

Writes ``<out>.csv`` (one row per sampler x NFE; the whole CSV is rewritten atomically after each row finishes,
and a rerun skips the rows already there, so an interrupted run resumes), ``<out>.png`` (FD and FID against NFE,
one line per sampler, with the real-vs-real floor) and ``<out>.md`` (the table and the floor). Heun costs
``2 * steps - 1`` evaluations, so its NFE budgets map to the largest step count that fits; a budget that buys no
more than a smaller one is skipped.
With classifier-free guidance every evaluation is one batched conditional + unconditional forward pass.
"""

from __future__ import annotations

import argparse
import csv as csv_module
import io
import json
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.evaluate import evaluate, write_json
from benchmarks.metrics import DEFAULT_METRICS, Quality, real_split
from distill.checkpoint import atomic_write
from distill.data import load_dataset
from distill.parsing import parse_int_list

SAMPLERS = ("ddpm", "ddim", "heun", "dpmpp_2m")
NFES = (1, 2, 4, 8, 16, 32, 64, 256)
COLUMNS = ["sampler", "steps", "nfe", "guidance", "n_fake", "n_ref", "ref", "fd", "kid", "kid_std", "is", "is_std",
           "acc", "fid", "sample_seconds", "metric_seconds"]
KEYS = ["sampler", "nfe", "guidance", "n_fake"]  # what identifies a finished row (see ``done`` in main)


def read_rows(path: Path, columns: list[str] = COLUMNS, keys: list[str] = KEYS,
              name: str = "teacher_baseline") -> pd.DataFrame:
    """The finished rows of an earlier run, for resuming; an empty frame if there is none.

    The CSV is written atomically, but one left by an older version (which wrote it in place) may end in a cut-off
    line or hold malformed rows: those are dropped, with a note, and simply recomputed. A file that is not this
    benchmark's CSV at all is an error rather than something to overwrite.
    """
    if not path.exists():
        return pd.DataFrame(columns=columns)
    lines = path.read_text().splitlines(keepends=True)
    cut = int(bool(lines) and not lines[-1].endswith("\n"))
    lines = lines[:len(lines) - cut]  # to_csv ends every row with a newline: a last line without one was cut off
    rows = list(csv_module.reader(lines))
    if not rows:
        return pd.DataFrame(columns=columns)
    header, body = rows[0], rows[1:]
    missing = [k for k in keys if k not in header]
    if missing:
        raise SystemExit(f"{path}: not a {name} CSV (no column {', '.join(missing)}); "
                         "move it away or pass another --out")
    complete = [r for r in body if len(r) == len(header)]
    buf = io.StringIO()
    csv_module.writer(buf).writerows([header, *complete])
    df = pd.read_csv(io.StringIO(buf.getvalue()))
    numeric = [k for k in keys if k in ("nfe", "steps", "guidance", "n_fake")]
    for k in numeric:
        df[k] = pd.to_numeric(df[k], errors="coerce")
    df = df.dropna(subset=keys).astype({k: "int64" for k in numeric if k != "guidance"}).reset_index(drop=True)
    dropped = cut + len(body) - len(df)
    if dropped:
        print(f"{path}: dropped {dropped} incomplete row(s); they will be recomputed", flush=True)
    return df


def write_rows(df: pd.DataFrame, path: Path) -> None:
    """Rewrite the whole CSV atomically (temp file + rename): a kill never leaves a half-written row."""
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def floor(quality: Quality, n: int) -> dict:
    """Real-vs-real: ``n`` images of half B against half A, with the same metrics and extractors."""
    images, labels = real_split(quality.data, "B")
    return quality(images[:n], labels[:n])


def plot(df: pd.DataFrame, floor_row: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fd", "fid") if k in df and df[k].notna().any()]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for sampler, rows in df.groupby("sampler"):
            rows = rows.sort_values("nfe")
            ax.plot(rows["nfe"], rows[key], marker="o", label=sampler)
        if key in floor_row:
            ax.axhline(floor_row[key], color="gray", linestyle="--", label="real B vs A")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel({"fd": "FD (domain classifier features)", "fid": "FID (InceptionV3)"}[key])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    # format given explicitly: the temporary file's name does not end in .png
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def markdown(df: pd.DataFrame, floor_row: dict, meta: dict) -> str:
    cols = [c for c in ("sampler", "nfe", "steps", "fd", "kid", "acc", "is", "fid", "sample_seconds") if c in df]
    table = df[cols].sort_values(["sampler", "nfe"])
    lines = [f"# Step-count baseline: {meta['model']}", "",
             f"{meta['samples']} samples per row (seeds 0-{meta['samples'] - 1}, classes cycled), guidance "
             f"w = {meta['guidance']}, against real half {meta['ref']} of `{meta['data']}` ({meta['n_ref']} images). "
             f"FD/KID/IS/accuracy: {meta['domain']}" + (f"; FID: {meta['inception']}" if meta["inception"] != "{}"
                                                         else "") + ".", "",
             "Real-vs-real floor (" + f"{meta['floor_n']} images of half B vs A): " +
             ", ".join(f"{k} {floor_row[k]:.4g}" for k in ("fd", "kid", "acc", "is", "fid") if k in floor_row), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                       for c in cols) + " |")
    best = df.loc[df["fd"].idxmin()]
    lines += ["", f"Best FD: {best['sampler']} at NFE {best['nfe']} ({best['fd']:.4g}, "
                  f"{best['fd'] / floor_row['fd']:.2f}x the floor at this sample count).",
              "", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import sys

    from distill.checkpoint import card_guidance, load_denoiser
    from distill.samplers import nfe as nfe_of
    from distill.samplers import steps_for_nfe

    p = argparse.ArgumentParser(description="Teacher quality versus NFE for each sampler.")
    p.add_argument("--model", default="mnist", help="model file, run directory or shipped name")
    p.add_argument("--data", default=None, help="real data [default: the model's]")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--samples", type=int, default=500, help="samples per row")
    p.add_argument("--guidance", type=float, default=None, help="[default: the model card's]")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="sample with the network under bf16 autocast")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_baseline"))
    args = p.parse_args(argv)

    den = load_denoiser(args.model)
    data_spec = args.data or (den.metadata.get("data") or {}).get("spec")
    if data_spec is None:
        p.error(f"{args.model}: pass --data (the model does not record its training data)")
    guidance = card_guidance(den.metadata, args.guidance)
    quality = Quality(load_dataset(data_spec), ref="A", metrics=tuple(args.metrics.split(",")), progress=False)
    csv = args.out.with_suffix(".csv")
    df = read_rows(csv)
    done = {(r.sampler, int(r.nfe), float(r.guidance), int(r.n_fake)) for r in df.itertuples()}
    csv.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.samples))
    for sampler in args.samplers.split(","):
        seen = set()
        for budget in parse_int_list(args.nfe, "--nfe"):
            steps = steps_for_nfe(sampler, budget, den.schedule)
            cost = nfe_of(sampler, steps, den.schedule)
            if cost in seen:
                continue
            seen.add(cost)
            if (sampler, cost, guidance, args.samples) in done:
                continue
            r = evaluate(args.model, data_spec=data_spec, sampler=sampler, steps=steps, guidance=guidance,
                         seeds=seeds, batch_size=args.batch_size, bf16=args.bf16, progress=False,
                         quality=quality, denoiser=den)
            row = {c: r.get(c, float("nan")) for c in COLUMNS}  # nan, as in a reread CSV
            df = pd.concat([df.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
            write_rows(df, csv)
            print(json.dumps({k: row[k] for k in ("sampler", "nfe", "fd", "fid", "acc", "sample_seconds")
                              if k in row}), flush=True)
    df = df[(df["guidance"] == guidance) & (df["n_fake"] == args.samples)]
    floor_row = floor(quality, args.samples)
    meta = {"model": args.model, "data": data_spec, "ref": "A", "samples": args.samples, "guidance": guidance,
            "n_ref": floor_row.get("n_ref"), "floor_n": args.samples,
            "domain": json.dumps(floor_row.get("domain", {})), "inception": json.dumps(floor_row.get("inception", {})),
            "bf16": args.bf16, "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.teacher_baseline " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d")}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "floor": floor_row, "rows": df.to_dict("records")})
    plot(df, floor_row, args.out.with_suffix(".png"), f"{args.model}: quality vs NFE (w = {guidance}, "
                                                     f"{args.samples} samples)")
    text = markdown(df, floor_row, meta)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {csv}, {args.out.with_suffix('.png')}, {args.out.with_suffix('.md')}")
    return df


if __name__ == "__main__":
    main()
