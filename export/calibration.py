"""Calibration data for INT8: the inputs a student really sees, captured along its own sampling trajectories.

Diffusion activations change with the timestep (Q-Diffusion, PTQ4DM): ranges calibrated on random inputs, or on one
timestep, clip or waste the INT8 grid at the others. :func:`trajectory_inputs` runs the model's own sampler on its
own timesteps (the card's) and records every network input, so the set is stratified by construction: each
trajectory contributes one input per step, labels cycle over the classes and ``w`` spreads over the guidance range.
:func:`random_inputs` is the naive baseline (standard normal ``x_t``, uniform ``t``), kept for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distill.checkpoint import card_guidance, card_sampling
from distill.denoiser import Denoiser
from distill.samplers import generate, nfe

# Seeds of calibration trajectories: apart from evaluation seeds (0 ...) and the consistency search's (1,000,000 ...).
CALIBRATION_SEED = 3_000_000
SOURCES = ("trajectory", "random")


@dataclass
class CalibrationSet:
    """Graph inputs ``name -> (N, ...)`` arrays, the sampler step each row was taken at (-1: random), and how the
    set was made (recorded in the export manifest)."""

    inputs: dict[str, np.ndarray]
    step: np.ndarray
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.step)

    def rows(self, index) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.inputs.items()}

    def spread(self, count: int) -> dict[str, np.ndarray]:
        """``count`` rows spread evenly over the set (all steps represented), for parity checks."""
        index = np.linspace(0, len(self) - 1, count).round().astype(int) if count <= len(self) \
            else np.arange(count) % len(self)
        return self.rows(index)


def guidance_range(den: Denoiser) -> tuple[float, float]:
    """The guidance weights the model is meant for: the card's ``guidance_range`` (a w-input student), else
    ``[0, 2 w]`` around the card's default ``w`` (at least [0, 1])."""
    meta = getattr(den, "metadata", {})
    lo, hi = (meta.get("card") or {}).get("guidance_range") or (0.0, max(1.0, 2.0 * card_guidance(meta)))
    return float(lo), float(hi)


def guidance_values(den: Denoiser, count: int) -> np.ndarray:
    """``count`` guidance weights spread evenly over :func:`guidance_range`."""
    lo, hi = guidance_range(den)
    return lo + (np.arange(count) + 0.5) / count * (hi - lo)


def stratified_guidance(den: Denoiser, count: int) -> np.ndarray:
    """``w`` for ``count`` samples whose labels cycle over the classes, spread over :func:`guidance_range` so that
    every class meets the whole range (``w`` advances along the class cycles)."""
    num = max(1, den.num_classes)
    order = np.argsort([(i // num) + (i % num) / num for i in range(count)], kind="stable")
    return guidance_values(den, count)[order]


def fused_inputs(fused, samples: int, seed: int = CALIBRATION_SEED) -> CalibrationSet:
    """Calibration inputs of a fused sampler graph (:class:`~export.fused.FusedSampler`): its own noise, labels and
    ``w``. The network inside sees its real trajectories, and each unrolled step's copy gets its own ranges:
    timestep-aware calibration by construction."""
    from export.fused import fused_noise

    den = fused.denoiser
    inputs = {"noise": fused_noise(range(seed, seed + samples), fused.shape, fused.slots).numpy()}
    if fused.labels:
        inputs["labels"] = (np.arange(samples) % den.num_classes).astype(np.int64)
    if fused.guided:
        inputs["w"] = stratified_guidance(den, samples).astype(np.float32)
    info = {"source": "trajectory", "trajectories": samples, "fused": True, "sampler": fused.sampler,
            "steps": fused.steps, "timesteps": fused.times, "seeds": f"{seed}-{seed + samples - 1}",
            "inputs": samples, "ranges": "per unrolled step (each step's copy of the network calibrated apart)"}
    return CalibrationSet(inputs, np.zeros(samples, dtype=int), info)


class _Recorder:
    """A denoiser that records each call's inputs (as graph inputs) before answering."""

    def __init__(self, den: Denoiser, labels: bool, guided: bool):
        self.den, self.labels, self.guided, self.schedule = den, labels, guided, den.schedule
        self.calls: list[dict[str, np.ndarray]] = []

    def __call__(self, x_t, t, cond):
        row = {"x_t": x_t.float().numpy().copy(), "t": t.float().numpy().copy()}
        if self.labels:
            row["labels"] = cond.labels.numpy().copy()
        if self.guided:
            row["w"] = torch.as_tensor(cond.guidance).float().expand(x_t.shape[0]).numpy().copy()
        self.calls.append(row)
        return self.den(x_t, t, cond)


def trajectory_inputs(den: Denoiser, trajectories: int, *, labels: bool, guided: bool, seed: int = CALIBRATION_SEED,
                      batch_size: int = 64) -> CalibrationSet:
    """Inputs recorded along ``trajectories`` fp32 samples of the model's own sampler and timesteps (its card's),
    every step of each (a Heun sampler's corrections included)."""
    from distill.denoiser import Cond

    meta = getattr(den, "metadata", {})
    sampler, steps, spacing, timesteps = card_sampling(meta)
    c = den.net.config
    shape = (c.in_channels, c.image_size, c.image_size)
    ws = stratified_guidance(den, trajectories) if guided else None
    recorder = _Recorder(den, labels, guided)
    steps_of_row = []
    for start in range(0, trajectories, batch_size):
        seeds = list(range(seed + start, seed + min(trajectories, start + batch_size)))
        lab = torch.tensor([(start + i) % c.num_classes for i in range(len(seeds))]) if labels else None
        w = torch.tensor(ws[start:start + len(seeds)], dtype=torch.float32) if guided else card_guidance(meta)
        before = len(recorder.calls)
        generate(recorder, shape, seeds, sampler=sampler, steps=steps, spacing=spacing,
                 cond=Cond(lab, w if labels else 0.0), timesteps=timesteps)
        steps_of_row += [np.full(len(seeds), k) for k in range(len(recorder.calls) - before)]
    inputs = {k: np.concatenate([r[k] for r in recorder.calls]) for k in recorder.calls[0]}
    info = {"source": "trajectory", "trajectories": trajectories, "sampler": sampler, "steps": steps,
            "timesteps": [float(t) for t in timesteps] if timesteps is not None else None, "spacing": spacing,
            "seeds": f"{seed}-{seed + trajectories - 1}", "inputs": int(len(inputs["t"]))}
    return CalibrationSet(inputs, np.concatenate(steps_of_row), info)


def random_inputs(den: Denoiser, count: int, *, labels: bool, guided: bool, seed: int = CALIBRATION_SEED
                  ) -> CalibrationSet:
    """The naive baseline: ``x_t`` standard normal, ``t`` uniform in (0, 1), labels and ``w`` uniform."""
    c = den.net.config
    rng = np.random.default_rng(seed)
    inputs = {"x_t": rng.standard_normal((count, c.in_channels, c.image_size, c.image_size), dtype=np.float32),
              "t": rng.uniform(0.0, 1.0, count).astype(np.float32)}
    if labels:
        inputs["labels"] = rng.integers(0, c.num_classes, count).astype(np.int64)
    if guided:
        lo, hi = guidance_range(den)
        inputs["w"] = rng.uniform(lo, hi, count).astype(np.float32)
    return CalibrationSet(inputs, np.full(count, -1), {"source": "random", "inputs": count, "seed": seed})


def calibration_set(den: Denoiser, source: str, samples: int, *, labels: bool, guided: bool) -> CalibrationSet:
    """``samples`` trajectories (``source='trajectory'``), or as many random inputs as those trajectories give."""
    if source not in SOURCES:
        raise ValueError(f"unknown calibration source {source!r}: use one of {SOURCES}")
    if source == "trajectory":
        return trajectory_inputs(den, samples, labels=labels, guided=guided)
    sampler, steps, spacing, _ = card_sampling(getattr(den, "metadata", {}))
    return random_inputs(den, samples * nfe(sampler, steps, den.schedule, spacing), labels=labels, guided=guided)
