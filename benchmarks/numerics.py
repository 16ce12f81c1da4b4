"""How much bf16 autocast blurs the consistency and DMD training signals, per noise level, against fp32.

    python -m benchmarks.numerics                       # mnist-cd + mnist teacher, batch 64, ~2 min on 2 cores
    python -m benchmarks.numerics --student mnist-cd --batch 32 --out /tmp/numerics

The consistency loss is a difference of two evaluations of the same network at neighbouring noise levels
(``f(x_hi, t_hi) - f_target(x_lo, t_lo)``, ECT's pairs at the end of training: the smallest gaps); the DMD
gradient is a difference of two score networks' estimates at one noised point (``fake - real``). In bf16 each
evaluation is rounded, and where the difference is small the rounding can be as large as the difference itself.
For each noise level and each way of running the step this measures, on the same batch:

- ``signal``: the RMS of the difference in fp32;
- ``error``: the RMS of (difference run this way - difference in fp32), and ``error / signal``;
- ``grad_cos``: the cosine between the student's gradient of the consistency loss run this way and in fp32
  (1: the same direction; near 0: mostly noise).

Ways: ``fp32``; ``bf16-whole`` (autocast around both evaluations with the whole UNet in bf16, as the trainer's
bf16 was); ``bf16-whole-target-fp32`` (that for the online evaluation, the no-grad target in fp32); ``bf16``
(autocast as the trainer runs it now: the UNet's conditioning embeddings, first convolution and output head in
fp32, ``UNet.fp32_ends``). The DMD trainer computes its two scores in fp32 in any case; its rows show what bf16
would cost there. A CPU without native bf16 (no avx512_bf16/amx_bf16) runs the bf16 rows 15-30x slower but
gives the same numbers.

Writes ``<out>.json``, ``<out>.csv`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.bench.report import md_table
from benchmarks.bench.speed import machine_info
from benchmarks.evaluate import write_json
from distill.checkpoint import load_denoiser
from distill.data import load_dataset
from distill.methods.consistency import consistency_distance, ect_pair
from distill.parameterization import append_dims
from distill.samplers import clean_alpha_sigma

SIGMAS = (0.005, 0.02, 0.08, 0.3, 1.0, 4.0, 20.0)  # VE-equivalent noise levels of the pair's upper point
COLUMNS = ["sigma", "way", "signal", "error", "error_over_signal", "grad_cos"]
WAYS = ("fp32", "bf16-whole", "bf16-whole-target-fp32", "bf16")


@contextlib.contextmanager
def whole_bf16(*nets: nn.Module):
    """Temporarily switch off the UNet's fp32 ends (``UNet.fp32_ends``): the whole network under autocast, as
    before they existed."""
    saved = [n.__dict__.get("fp32_ends") for n in nets]  # None: the class default
    try:
        for n in nets:
            n.fp32_ends = False
        yield
    finally:
        for n, v in zip(nets, saved):
            if v is None:
                del n.fp32_ends
            else:
                n.fp32_ends = v


def _autocast(on: bool):
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=on)


def consistency_rows(student, x0: torch.Tensor, labels, seed: int) -> list[dict]:
    """Per noise level, the consistency difference and the student's gradient, each way against fp32."""
    from distill.denoiser import Cond

    sched, cond, rows = student.schedule, Cond(labels), []
    params = [p for p in student.net.parameters() if p.requires_grad]
    for sig in SIGMAS:
        g = torch.Generator().manual_seed(seed)
        n = x0.shape[0]
        s_hi = torch.full((n,), sig, dtype=torch.float64)
        s_lo = ect_pair(s_hi, 7, 8).clamp(min=student.consistency["sigma_min"] * (1 + 1e-6))
        t_hi, t_lo = sched.t_of_sigma_ve(s_hi).float(), sched.t_of_sigma_ve(s_lo).float()
        eps = torch.randn(x0.shape, generator=g)
        (a_hi, sd_hi), (a_lo, sd_lo) = (tuple(append_dims(v, 4) for v in clean_alpha_sigma(sched, t))
                                        for t in (t_hi, t_lo))
        x_hi, x_lo = a_hi * x0 + sd_hi * eps, a_lo * x0 + sd_lo * eps
        gap = float((s_hi - s_lo).mean())
        out = {}
        for way in WAYS:
            with whole_bf16(student.net) if way.startswith("bf16-whole") else contextlib.nullcontext():
                student.net.zero_grad(set_to_none=True)
                with _autocast(way != "fp32"):
                    online = student(x_hi, t_hi, cond)
                with torch.no_grad(), _autocast(way not in ("fp32", "bf16-whole-target-fp32")):
                    target = student(x_lo, t_lo, cond)
                diff = (online.float() - target.float()).detach()
                (consistency_distance(online, target, "pseudo_huber") / gap).mean().backward()
            grad = torch.cat([p.grad.flatten() for p in params])
            out[way] = (diff, grad)
        ref_diff, ref_grad = out["fp32"]
        signal = float(ref_diff.square().mean().sqrt())
        for way, (diff, grad) in out.items():
            err = float((diff - ref_diff).square().mean().sqrt())
            rows.append({"loss": "consistency", "sigma": sig, "gap": gap, "way": way, "signal": signal,
                         "error": err, "error_over_signal": err / signal,
                         "grad_cos": float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))})
    return rows


def dmd_rows(teacher, fake, x0: torch.Tensor, labels, seed: int) -> list[dict]:
    """Per noise level, ``fake - real`` score difference at the noised point, bf16 against fp32."""
    from distill.denoiser import Cond

    sched, cond, rows = teacher.schedule, Cond(labels), []
    for sig in SIGMAS:
        g = torch.Generator().manual_seed(seed)
        t = sched.t_of_sigma_ve(torch.full((x0.shape[0],), sig, dtype=torch.float64)).float()
        a, s = (append_dims(v, 4) for v in clean_alpha_sigma(sched, t))
        x_t = a * x0 + s * torch.randn(x0.shape, generator=g)
        diffs = {}
        for way in ("fp32", "bf16-whole", "bf16"):
            whole = whole_bf16(teacher.net, fake.net) if way == "bf16-whole" else contextlib.nullcontext()
            with whole, torch.no_grad(), _autocast(way != "fp32"):
                diffs[way] = fake(x_t, t, cond).float() - teacher(x_t, t, cond).float()
        ref = diffs["fp32"]
        signal = float(ref.square().mean().sqrt())
        for way, d in diffs.items():
            err = float((d - ref).square().mean().sqrt())
            rows.append({"loss": "dmd", "sigma": sig, "gap": None, "way": way, "signal": signal, "error": err,
                         "error_over_signal": err / signal, "grad_cos": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="mnist-cd", help="a consistency student [mnist-cd]")
    p.add_argument("--teacher", default="mnist", help="the real score for the DMD rows [mnist]")
    p.add_argument("--fake", default="mnist-4step",
                   help="a stand-in fake score for the DMD rows: any model on the teacher's schedule "
                        "[mnist-4step, a network close to the teacher, as a fake score is]")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/numerics"))
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    student, teacher, fake = (load_denoiser(m) for m in (a.student, a.teacher, a.fake))
    for m in (teacher, fake):
        m.net.eval().requires_grad_(False)
    student.net.eval()  # dropout off: the ways differ only in precision
    data = load_dataset("mnist")
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(a.seed))[:a.batch]
    x0, labels = data.images[idx].float(), data.labels[idx]
    rows = consistency_rows(student, x0, labels, a.seed) + dmd_rows(teacher, fake, x0, labels, a.seed)
    df = pd.DataFrame(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out.with_suffix(".csv"), index=False)
    m = machine_info()
    write_json(a.out.with_suffix(".json"), {"student": a.student, "teacher": a.teacher, "fake": a.fake,
                                            "batch": a.batch, "machine": m, "rows": rows})
    lines = [f"# bf16 against fp32 in the consistency and DMD signals ({a.student}; DMD: {a.teacher} vs {a.fake})",
             "", f"Batch {a.batch} of training images; {m['cpu']} ({', '.join(m['cpu_flags'])}; native bf16: "
             f"{m['native_bf16']}), {m['threads']} threads.", ""]
    for loss in ("consistency", "dmd"):
        sub = df[df["loss"] == loss]
        lines += [f"## {loss}", "", md_table(sub, COLUMNS if loss == "consistency" else COLUMNS[:-1]), ""]
    a.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
