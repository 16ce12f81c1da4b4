"""The shipped students exported to diffusers pipelines, against distill's own sampler on the same noise.

For each model: ``distill export diffusers`` into a temporary folder, then the reloaded pipeline and distill's
sampler on ``--seeds`` per-sample generators (labels cycled over the classes, the card's w): the largest
difference relative to the largest pixel value (images in [0, 1]), and the seconds each takes for the batch.

Writes ``diffusers_export.csv``, ``.json`` and ``.md`` to ``--out`` (default ``benchmarks/results``).

    python -m benchmarks.diffusers_export
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from benchmarks.bench.report import md_table
from distill.checkpoint import atomic_write, load_denoiser
from distill.hardware import cpu_info
from export.diffusers_pipeline import _load_quietly, export_diffusers, ours, run_pipeline

MODELS = ("mnist-4step", "mnist-1step", "mnist-4step-guided", "mnist-cd")


def measure(model: str, seeds: list[int], folder: Path) -> dict:
    record = export_diffusers(model, folder, log=lambda *_: None)
    den = load_denoiser(model).float()
    labels = torch.arange(len(seeds)) % den.num_classes if den.num_classes else None
    import diffusers

    pipe = _load_quietly(getattr(diffusers, record["pipeline"]), folder)
    start = time.perf_counter()
    got = run_pipeline(pipe, record["call"], seeds, labels)
    pipe_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = ours(den, record["interface"], record["timesteps"], seeds, labels)
    ours_s = time.perf_counter() - start
    return {"model": model, "pipeline": record["pipeline"], "unet": record["unet"],
            "scheduler": record["scheduler"], "steps": record["steps"], "samples": len(seeds),
            "max_rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "export_check_rel_err": record["parity"]["max_rel_err"],
            "pipeline_seconds": round(pipe_s, 3), "distill_seconds": round(ours_s, 3)}


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"))
@click.option("--samples", type=click.IntRange(1), default=64)
@click.option("--models", default=",".join(MODELS))
def main(out: Path, samples: int, models: str) -> None:
    seeds = list(range(samples))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models.split(","):
            rows.append(measure(model, seeds, Path(tmp) / model))
            click.echo(rows[-1])
    df = pd.DataFrame(rows)
    machine = {**cpu_info(), "python": platform.python_version(), "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "diffusers_export.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write(out / "diffusers_export.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n"))
    md = ["# Shipped students exported to diffusers pipelines", "",
          f"Machine: {machine['cpu']} ({', '.join(machine['cpu_flags'])}); torch {machine['torch']}, "
          f"{machine['threads']} threads. "
          f"{samples} samples per model, per-sample generators seeded 0-{samples - 1}; error = max |pipeline - "
          "distill| / max |distill| on images in [0, 1].", "",
          md_table(df, list(df.columns)), "",
          "Reproduce: `python -m benchmarks.diffusers_export`."]
    atomic_write(out / "diffusers_export.md", lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))


if __name__ == "__main__":
    main()
