"""Training step times per method, precision and memory format, on this machine.

    python -m benchmarks.step_time                                   # ~6 min on 2 cores; all methods
    python -m benchmarks.step_time --methods teacher --compile       # + torch.compile of the network (~90 s more)

One row per method x precision x layout: the median wall time of ``--steps`` optimizer steps (after two warm-up
steps) of the real loss objects on the shipped MNIST teacher (1.19M parameters, 32x32) at the method's usual batch
(``teacher``: the diffusion loss at 128; ``progressive``: a round at 8 student steps, 2 teacher evaluations per
example, 128; ``cd``: consistency distillation with Heun (2 teacher evaluations and the target network), 128;
``ct``: consistency training with ECT's pairs (the target network), 128; ``dmd``: one DMD2 generator step with 4
fake-score updates and matching alone, 32). Precisions: fp32, and bf16 autocast (slow and marked so where the CPU
has no native bf16); layouts: contiguous NCHW and channels-last (``torch.channels_last`` weights and input).
The machine (CPU model and flags, threads) is in the output; compare numbers only within one run.

Writes ``<out>.json``, ``<out>.csv`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.bench.report import md_table
from benchmarks.bench.speed import machine_info
from benchmarks.evaluate import write_json
from distill.checkpoint import load_denoiser
from distill.data import load_dataset
from distill.hardware import native_bf16

METHODS = ("teacher", "progressive", "cd", "ct", "dmd")
BATCH = {"teacher": 128, "progressive": 128, "cd": 128, "ct": 128, "dmd": 32}


def make_loss(method: str, teacher, student, image_shape):
    """The method's loss object, as its command builds it (defaults of the command otherwise)."""
    if method == "teacher":
        from distill.losses import DiffusionLoss

        return DiffusionLoss(0.1)
    if method == "progressive":
        from distill.methods.progressive import ProgressiveLoss

        return ProgressiveLoss(teacher, 8)
    if method in ("cd", "ct"):
        from distill.methods.consistency import ConsistencyLoss

        kw = {"mode": "cd", "teacher": teacher, "solver": "heun", "scales": 18} if method == "cd" else \
            {"mode": "ct", "noise_sampling": "ect", "scales": None}
        return ConsistencyLoss(student, total_steps=1000, **kw)
    if method == "dmd":
        from distill.methods.dmd import DMDLoss

        return DMDLoss(teacher, image_shape=image_shape, gan_weight=0.0, disc_weight=0.0)
    raise ValueError(method)


def student_of(method: str, teacher):
    """The trained network: a copy of the teacher, with the consistency boundary condition for cd and ct (as
    ``distill consistency`` makes it)."""
    if method not in ("cd", "ct"):
        return copy.deepcopy(teacher)
    from distill.consistency import ConsistencyOptions
    from distill.distillation import make_student
    from distill.methods.consistency import SIGMA_MIN

    return make_student(teacher, guidance_input=False, prediction=teacher.prediction,
                        consistency={"sigma_min": SIGMA_MIN, "sigma_data": ConsistencyOptions.sigma_data})


def time_method(method: str, teacher, data, *, bf16: bool, channels_last: bool, compiled: bool, steps: int) -> dict:
    torch.manual_seed(0)
    student = student_of(method, teacher)
    student.net.train().requires_grad_(True)
    frozen = copy.deepcopy(teacher)
    loss = make_loss(method, frozen, student, tuple(data.images.shape[1:]))
    n = BATCH[method]
    x0, labels = data.images[:n].float(), data.labels[:n]
    if channels_last:
        for m in (student.net, frozen.net, loss):
            m.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
    if compiled:
        student.net = torch.compile(student.net)
    opt = torch.optim.AdamW(student.net.parameters(), lr=1e-5)
    times = []
    for k in range(steps + 2):
        g = torch.Generator().manual_seed(k)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = loss(student, x0, labels, g).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        float(value.detach())  # the trainer reads the loss every step (NaN guard)
        times.append(time.perf_counter() - start)
    return {"method": method, "batch": n, "precision": "bf16" if bf16 else "fp32",
            "layout": "channels_last" if channels_last else "nchw", "compiled": compiled,
            "sec_per_step": statistics.median(times[2:]), "first_step_sec": times[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after two warm-up steps)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the trained network")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step_time"))
    a = p.parse_args(argv)
    teacher, data = load_denoiser("mnist"), load_dataset("mnist")
    teacher.net.eval().requires_grad_(False)
    rows = []
    for method in a.methods.split(","):
        for bf16 in (False, True):
            for cl in (False, True):
                rows.append(time_method(method, teacher, data, bf16=bf16, channels_last=cl, compiled=False,
                                        steps=a.steps))
                print(rows[-1], flush=True)
            if a.compile:
                rows.append(time_method(method, teacher, data, bf16=bf16, channels_last=False, compiled=True,
                                        steps=a.steps))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    base = df[(df.precision == "fp32") & (df.layout == "nchw") & ~df.compiled].set_index("method")["sec_per_step"]
    df["speedup_vs_fp32"] = [base[m] / s for m, s in zip(df.method, df.sec_per_step)]
    m = machine_info()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out.with_suffix(".csv"), index=False)
    write_json(a.out.with_suffix(".json"), {"machine": m, "steps": a.steps, "rows": df.to_dict("records")})
    cols = ["method", "batch", "precision", "layout", "compiled", "sec_per_step", "speedup_vs_fp32"]
    text = "\n".join([
        "# Training step times", "",
        f"Reproduce: `python -m benchmarks.step_time{' --compile' if a.compile else ''}`. Machine: {m['cpu']} "
        f"({', '.join(m['cpu_flags'])}; native bf16: {native_bf16()}), {m['threads']} threads. Median of "
        f"{a.steps} steps after two warm-up steps; `speedup_vs_fp32` against the same method's fp32 NCHW eager row.",
        "", md_table(df.round(4), cols), ""])
    a.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
