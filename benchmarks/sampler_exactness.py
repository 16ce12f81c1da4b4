"""How closely each sampler reproduces Gaussian data when given the exact denoiser.

For every schedule x sampler x step count, sample ``n`` points with :class:`~distill.oracles.GaussianDenoiser`
and report the relative errors of the sample mean and covariance against the true ones and against the same
prior noise pushed through the exact flow map (which removes sampling error and leaves the solver's own error;
not defined for the stochastic DDPM sampler).

Writes ``sampler_exactness.csv``, ``.json`` and ``.md`` to ``--out`` (default ``benchmarks/results``).

    python -m benchmarks.sampler_exactness
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pandas as pd
import torch

from distill.checkpoint import atomic_write
from distill.oracles import GaussianDenoiser, example_gaussian, gaussian_flow_map
from distill.samplers import DEFAULT_SPACING, PerSampleGenerator, generate, make_timesteps, nfe, prior_sample
from distill.schedules import CosineSchedule, DiscreteSchedule, KarrasSchedule

SCHEDULES = {"cosine": CosineSchedule(), "ddpm-linear": DiscreteSchedule("linear"), "karras": KarrasSchedule()}


def measure(schedule_name: str, sampler: str, steps: int, n: int) -> dict:
    schedule = SCHEDULES[schedule_name]
    mu, cov = example_gaussian()
    den = GaussianDenoiser(schedule, mu, cov)
    x = generate(den, (3,), range(n), sampler=sampler, steps=steps, dtype=torch.float64)
    m, c = x.mean(0), torch.cov(x.T)
    row = {"schedule": schedule_name, "sampler": sampler, "steps": steps, "nfe": den.calls, "n": n,
           "mean_err_vs_true": float(torch.linalg.norm(m - mu) / torch.linalg.norm(mu)),
           "cov_err_vs_true": float(torch.linalg.norm(c - cov) / torch.linalg.norm(cov))}
    assert den.calls == nfe(sampler, steps, schedule)
    if sampler != "ddpm":
        t0 = float(make_timesteps(schedule, steps, DEFAULT_SPACING[sampler])[0])
        x_T = prior_sample(schedule, PerSampleGenerator(range(n)), (3,), t0, dtype=torch.float64)
        ref = gaussian_flow_map(schedule, mu, cov, x_T, t0)
        row["mean_err_vs_flow"] = float(torch.linalg.norm(m - ref.mean(0)) / torch.linalg.norm(mu))
        row["cov_err_vs_flow"] = float(torch.linalg.norm(c - torch.cov(ref.T)) / torch.linalg.norm(cov))
    return row


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"))
@click.option("--n", type=int, default=20000, show_default=True, help="Samples per deterministic run.")
@click.option("--n-ddpm", type=int, default=5000, show_default=True, help="Samples per DDPM run (per-sample noise).")
@click.option("--steps", default="4,8,16,32,64,128,256,512", show_default=True)
def main(out: Path, n: int, n_ddpm: int, steps: str) -> None:
    step_list = [int(s) for s in steps.split(",")]
    rows = []
    for schedule in SCHEDULES:
        for sampler in ("ddim", "euler", "heun", "dpmpp_2m", "ddpm"):
            for k in step_list:
                rows.append(measure(schedule, sampler, k, n_ddpm if sampler == "ddpm" else n))
                click.echo(json.dumps(rows[-1]))
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    # Every result file is written atomically (temp file + rename): a kill never leaves a half-written one.
    atomic_write(out / "sampler_exactness.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write(out / "sampler_exactness.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    # Markdown: covariance error vs the exact flow (deterministic) or vs the truth (DDPM), per step count.
    lines = ["# Sampler exactness on Gaussian data (exact denoiser)", "",
             f"3-d Gaussian, {n} samples ({n_ddpm} for DDPM). Relative Frobenius error of the sample covariance: "
             "against the same noise through the exact flow map for deterministic samplers (solver error only), "
             "against the true covariance for DDPM (includes sampling error, about "
             f"{(2 / n_ddpm) ** 0.5:.1%}).", "",
             "| schedule | sampler | " + " | ".join(f"{k} steps" for k in step_list) + " |",
             "|---|---|" + "---|" * len(step_list)]
    for (schedule, sampler), g in df.groupby(["schedule", "sampler"], sort=False):
        col = "cov_err_vs_true" if sampler == "ddpm" else "cov_err_vs_flow"
        lines.append(f"| {schedule} | {sampler} | " + " | ".join(f"{v:.2%}" for v in g[col]) + " |")
    atomic_write(out / "sampler_exactness.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    click.echo(f"wrote {out / 'sampler_exactness.md'}")


if __name__ == "__main__":
    main()
