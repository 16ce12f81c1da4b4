"""A DMD2 student against its starting point and its teacher: FD, class accuracy and a memorisation check.

    python -m benchmarks.dmd                                     # runs/mnist-dmd, 2,500 samples per row
    python -m benchmarks.dmd --student runs/mnist-dmd --init mnist-1step --samples 500 --out /tmp/dmd

Rows: the teacher on its card's sampler, the teacher at DDPM 256 steps (the issue's reference; taken from
``--teacher-best`` (``benchmarks/results/teacher_2500_ddpm256.json``, the same seeds and reference) when it
holds the same sample count, since sampling it takes about 40 min on 2 cores; the lower of the two teacher rows is
the teacher's best that ``fd_over_teacher_best`` divides by), ``--init``
(the generator's starting point, one step) and ``--student`` (the DMD2 generator, one step), each on seeds
0 .. samples - 1 against real half A (domain FD and class accuracy). The reference half A lies inside the training
set, so a generator that memorised training images could score below the real-data floor: each row also has the
nearest-neighbour distance of its samples to the training images (median and 5th percentile of the per-sample
minimum L2 distance over pixels in [0, 1]) and the share of samples closer to a training image than 1.0; a
memorising generator has far smaller distances than the teacher's own samples.

Writes ``<out>.json``, ``<out>.csv`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench.report import md_table
from benchmarks.bench.speed import machine_info
from benchmarks.evaluate import write_json
from benchmarks.metrics import Quality
from distill.checkpoint import card_guidance, card_sampling, load_denoiser
from distill.data import load_dataset
from distill.sampling import draw_samples

CLOSE = 1.0  # L2 over a 32x32 image in [0, 1]: a near copy (two different digits are typically 6-10 apart)


def nearest_distances(images: np.ndarray, train: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Per sample, the smallest L2 distance to any training image (both uint8, flattened, scaled to [0, 1])."""
    ref = torch.from_numpy(train.reshape(len(train), -1).astype(np.float32) / 255.0)
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk].reshape(len(images[i:i + chunk]), -1).astype(np.float32) / 255.0)
        out.append(torch.cdist(x, ref).min(1).values)
    return torch.cat(out).numpy()


def row(name: str, den, quality: Quality, train_u8: np.ndarray, samples: int, batch: int, **sampling) -> dict:
    sampler, steps, spacing, _ = card_sampling(den.metadata, sampling.get("sampler"), sampling.get("steps"))
    start = time.perf_counter()
    images, labels = draw_samples(den, sampler=sampler, steps=steps, seeds=list(range(samples)), classes=None,
                                  guidance=card_guidance(den.metadata), spacing=spacing, eta=None, batch_size=batch,
                                  device="cpu", bf16=False, progress=False, source=name)
    seconds = time.perf_counter() - start
    metrics = quality(images, labels)
    nn = nearest_distances(np.asarray(images), train_u8)
    out = {"model": name, "sampler": sampler, "steps": steps, "fd": metrics["fd"], "acc": metrics.get("acc"),
           "nn_median": float(np.median(nn)), "nn_p5": float(np.percentile(nn, 5)),
           "share_closer_than_1": float((nn < CLOSE).mean()), "sample_seconds": round(seconds, 1)}
    print(out, flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/mnist-dmd")
    ap.add_argument("--init", default="mnist-1step")
    ap.add_argument("--teacher", default="mnist")
    ap.add_argument("--samples", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--teacher-best", type=Path, default=Path("benchmarks/results/teacher_2500_ddpm256.json"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dmd"))
    args = ap.parse_args(argv)
    from distill.sampling import to_uint8

    teacher = load_denoiser(args.teacher)
    data = load_dataset((teacher.metadata.get("data") or {}).get("spec") or "mnist")
    quality = Quality(data, ref="A", metrics=("fd", "acc"), progress=False)
    train_u8 = np.asarray(to_uint8(data.images))
    import json

    rows = [row("teacher (card)", teacher, quality, train_u8, args.samples, args.batch)]
    known = json.loads(args.teacher_best.read_text()) if args.teacher_best.is_file() else {}
    if known.get("n_fake") == args.samples and known.get("ref") == f"{data.spec}:A" and known.get("source") == \
            args.teacher:
        rows.append({"model": "teacher (ddpm 256)", "sampler": "ddpm", "steps": 256, "fd": known["fd"],
                     "acc": known.get("acc"), "from": str(args.teacher_best)})
    else:
        rows.append(row("teacher (ddpm 256)", teacher, quality, train_u8, args.samples, args.batch, sampler="ddpm",
                        steps=256))
    rows += [
        row(f"init {args.init}", load_denoiser(args.init), quality, train_u8, args.samples, args.batch),
        row(f"dmd2 {args.student}", load_denoiser(args.student), quality, train_u8, args.samples, args.batch)]
    best = min(rows[0]["fd"], rows[1]["fd"])  # the teacher's best: its card sampler or DDPM 256, whichever is lower
    for r in rows:
        r["fd_over_teacher_best"] = r["fd"] / best
    student = load_denoiser(args.student)
    record = {"rows": rows, "student_card": student.metadata.get("card"), "machine": machine_info(),
              "student_steps": int((student.metadata.get("train") or {}).get("steps", 0)),
              "command": " ".join(["python -m benchmarks.dmd", *(sys.argv[1:] if argv is None else argv)])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), record)
    df = pd.DataFrame(rows)
    df.to_csv(args.out.with_suffix(".csv"), index=False)
    m = record["machine"]
    args.out.with_suffix(".md").write_text("\n".join([
        f"# DMD2 one-step student: {args.student}", "",
        f"Machine: {m.get('cpu')} ({m.get('threads')} threads). {args.samples} samples per row, domain FD against "
        f"real half A. Reproduce: `{record['command']}`", "",
        md_table(df, list(df.columns)), "",
        f"nn_*: per-sample nearest-neighbour L2 distance to the {len(train_u8)} training images (pixels in [0, 1]); "
        "a memorising generator would sit far below the teacher's own samples.", ""]))


if __name__ == "__main__":
    main()
