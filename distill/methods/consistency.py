"""Consistency distillation and consistency training (Song et al. 2023; Song & Dhariwal 2023) as one loss object
over the generic trainer.

The student ``f(x, t)`` is a :class:`~distill.denoiser.Denoiser` with the boundary-condition preconditioning
(``consistency=``): its output is a clean estimate, and ``f(x, t_min) = x / alpha`` exactly. Both methods train it
to give the same output at two adjacent points ``t_n < t_{n+1}`` of one trajectory, on a discretization of the
VE-equivalent noise level ``sigma~ = sigma / alpha`` (Karras et al. 2022, Eq. 5: ``sigma_min = 0.002`` to
``sigma_max = 80``, rho = 7, mapped to the schedule's own times):

    loss = lambda(n) d( f_theta(x_{t_{n+1}}, t_{n+1}),  f_theta-(x^_{t_n}, t_n) )

- **Consistency distillation** (``mode="cd"``): ``x_{t_{n+1}} = alpha x0 + sigma eps``, and ``x^_{t_n}`` is one step
  of the frozen teacher's probability-flow ODE from it (DDIM, which is the Euler step on the VE-equivalent state,
  or Heun).
- **Consistency training** (``mode="ct"``): no teacher evaluations; ``x^_{t_n} = alpha_n x0 + sigma_n eps`` with
  the same ``eps`` (the improved recipe: pseudo-Huber metric, log-normal noise levels, the doubling curriculum of
  discretization steps, weighting ``1 / (sigma_{n+1} - sigma_n)``).

``f_theta-`` is the target network: an EMA of the student with decay ``mu``, or (``mu = 0``) the stop-gradient copy
of the current weights (improved CT). Online and target evaluations draw the same dropout masks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from distill.denoiser import Denoiser
from distill.losses import TargetNetwork
from distill.methods.progressive import _TeacherLoss
from distill.parameterization import append_dims
from distill.samplers import SIGMA_MAX_VE, clean_alpha_sigma, ddim_step, heun_step
from distill.schedules import Schedule, karras_sigmas

MODES = ("cd", "ct")
SOLVERS = ("ddim", "euler", "heun")  # euler: the Euler step on the VE-equivalent state, i.e. the DDIM step
METRICS = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_gap")
NOISE_SAMPLINGS = ("uniform", "lognormal", "ect")
SIGMA_MIN, RHO = 0.002, 7.0
P_MEAN, P_STD = -1.1, 2.0  # improved CT's log-normal noise-level distribution (Song & Dhariwal 2023)
ECT_Q = 2.0  # ECT's mapping shrinks the pair's gap by q at each of its 8 stages (Geng et al. 2024)
ECT_STAGES = 8


def ect_pair(sigma_t: Tensor, step: int, total_steps: int, q: float = ECT_Q) -> Tensor:
    """ECT's continuous pair (Geng et al. 2024): ``r = t (1 - n(t) / q^(s + 1))`` with ``n(t) = 1 + 8 sigmoid(-t)``
    on the VE-equivalent noise level ``t``, stage ``s = floor(step / (K / 8))``: the gap shrinks as training goes."""
    stage = step // max(1, total_steps // ECT_STAGES)
    return sigma_t * (1.0 - (1.0 + 8.0 * torch.sigmoid(-sigma_t)) / q ** (stage + 1))


def sigma_max_ve(schedule: Schedule, sigma_max: float = SIGMA_MAX_VE) -> float:
    """The top of the discretization: ``sigma_max`` (EDM's 80), or less when the schedule stops lower."""
    top = float(torch.exp(-0.5 * schedule.logsnr(torch.tensor(1.0, dtype=torch.float64))))
    return min(top, sigma_max)


def consistency_sigmas(schedule: Schedule, n: int, sigma_min: float = SIGMA_MIN,
                       sigma_max: float = SIGMA_MAX_VE, rho: float = RHO) -> Tensor:
    """``n >= 2`` increasing VE-equivalent noise levels from ``sigma_min`` to the top (float64)."""
    if n < 2:
        raise ValueError(f"a consistency discretization needs at least 2 points, got {n}")
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    return karras_sigmas(u, sigma_min, sigma_max_ve(schedule, sigma_max), rho).flip(0)


def ict_scales(step: int, total_steps: int, s0: int, s1: int) -> int:
    """Improved CT's doubling curriculum (Song & Dhariwal 2023, Eq. 8): ``N(k) = min(s0 2^floor(k / K'), s1) + 1``
    discretization points at step ``k``, with ``K' = floor(K / (log2 floor(s1 / s0) + 1))``."""
    k_prime = max(1, math.floor(total_steps / (math.log2(max(1, s1 // s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_interval_probs(sigmas: Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> Tensor:
    """Probability of each interval ``[sigma_n, sigma_{n+1}]`` under ``ln sigma ~ N(p_mean, p_std^2)`` (improved CT),
    normalised over the discretization."""
    cdf = torch.special.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return p / p.sum()


def pseudo_huber_c(dim: int) -> float:
    """Improved CT's pseudo-Huber constant ``c = 0.00054 sqrt(d)`` for ``d`` numbers per sample."""
    return 0.00054 * math.sqrt(dim)


def consistency_distance(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Per-sample distance: ``l2`` is the mean squared difference; ``pseudo_huber`` is
    ``sqrt(||a - b||^2 + c^2) - c`` over the whole sample (Song & Dhariwal 2023)."""
    sq = (a.float() - b.float()).square().flatten(1)
    if metric == "l2":
        return sq.mean(1)
    if metric == "pseudo_huber":
        c = pseudo_huber_c(sq.shape[1])
        return torch.sqrt(sq.sum(1) + c * c) - c
    raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


@contextmanager
def same_random_state(seed: int, device: torch.device):
    """Run a block on the global RNG seeded ``seed`` (CPU and, on a GPU, that device), restoring it afterwards:
    two blocks entered with the same seed draw the same dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ConsistencyLoss(_TeacherLoss):
    """Consistency distillation (``teacher`` given, ``mode="cd"``) or consistency training (``mode="ct"``, no
    teacher evaluations) of ``student`` (module docstring).

    Args:
        student: the consistency student (its network is copied as the target network).
        teacher: the frozen teacher (CD only); any ``denoise(x_t, t, cond) -> x0`` callable.
        total_steps: the run's optimizer steps (the curriculum's ``K``).
        scales: a fixed number of discretization points, or ``None`` for the doubling ``curriculum`` ``(s0, s1)``.
        solver: the teacher's ODE step between adjacent points (CD): ddim/euler (the same step) or heun.
        target_decay: the target network's EMA decay ``mu`` (0: stop-gradient of the current weights).
        metric, weighting, noise_sampling: see :data:`METRICS`, :data:`WEIGHTINGS`, :data:`NOISE_SAMPLINGS`.
        guidance, label_dropout: as in progressive distillation (a range draws ``w`` per example for a student
            that takes ``w`` as an input).
    """

    def __init__(self, student: Denoiser, *, mode: str, teacher=None, total_steps: int, scales: int | None = 18,
                 curriculum: tuple[int, int] = (10, 1280), solver: str = "heun", target_decay: float = 0.0,
                 metric: str = "pseudo_huber", weighting: str = "uniform", noise_sampling: str = "uniform",
                 sigma_max: float = SIGMA_MAX_VE, guidance: float | tuple[float, float] = 0.0,
                 label_dropout: float = 0.0, ect_q: float = ECT_Q):
        super().__init__(teacher, guidance, label_dropout)
        checks = {"mode": (mode, MODES), "solver": (solver, SOLVERS), "metric": (metric, METRICS),
                  "weighting": (weighting, WEIGHTINGS), "noise_sampling": (noise_sampling, NOISE_SAMPLINGS)}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        if (mode == "cd") != (teacher is not None):
            raise ValueError("consistency distillation needs a teacher; consistency training uses none")
        if student.consistency is None:
            raise ValueError("the student needs the boundary-condition preconditioning (Denoiser(consistency=...))")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {target_decay}")
        if scales is not None and scales < 2:
            raise ValueError(f"scales must be >= 2, got {scales}")
        if scales is None and not 1 <= curriculum[0] <= curriculum[1]:
            raise ValueError(f"curriculum (s0, s1) needs 1 <= s0 <= s1, got {curriculum}")
        self.mode, self.total_steps, self.scales = mode, int(total_steps), scales
        self.curriculum = (int(curriculum[0]), int(curriculum[1]))
        self.solver, self.target_decay, self.metric = solver, float(target_decay), metric
        self.weighting, self.noise_sampling, self.sigma_max = weighting, noise_sampling, float(sigma_max)
        self.ect_q = float(ect_q)
        self.sigma_min = student.consistency["sigma_min"]
        self.target = TargetNetwork(student.net)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # optimizer steps done (checkpointed)
        self._grids: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        base = super().describe()
        base.pop("weighting")
        # The run length shapes the curriculum only: a fixed discretization may be trained on for more steps.
        ect = self.noise_sampling == "ect"
        return {"name": "consistency", "mode": self.mode, "scales": None if ect else self.scales,
                "total_steps": self.total_steps if ect or not self.scales else None,
                "curriculum": None if self.scales or ect else list(self.curriculum),
                **({"ect_q": self.ect_q, "ect_stages": ECT_STAGES} if ect else {}),
                "solver": self.solver if self.mode == "cd" else None, "target_decay": self.target_decay,
                "metric": self.metric, "weighting": self.weighting, "noise_sampling": self.noise_sampling,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **base}

    def num_scales(self, step: int | None = None) -> int:
        """Discretization points at ``step`` (default: the current one)."""
        if self.scales is not None:
            return self.scales
        step = int(self.step) if step is None else step
        return ict_scales(step, self.total_steps, *self.curriculum)

    def grid(self, schedule: Schedule, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(times, sigmas, interval probabilities)`` of an ``n``-point discretization, increasing, float64."""
        if n not in self._grids:
            sigmas = consistency_sigmas(schedule, n, self.sigma_min, self.sigma_max)
            times = schedule.t_of_sigma_ve(sigmas)
            probs = (lognormal_interval_probs(sigmas) if self.noise_sampling == "lognormal" else
                     torch.full((n - 1,), 1.0 / (n - 1), dtype=torch.float64))
            self._grids[n] = (times, sigmas, probs)
        return self._grids[n]

    def update(self, net, step: int) -> None:
        self.target.update(net, self.target_decay)
        self.step.fill_(step)

    def teacher_step(self, x: Tensor, t_hi: Tensor, t_lo: Tensor, cond, schedule: Schedule) -> Tensor:
        """One step of the teacher's probability-flow ODE from ``t_hi`` to ``t_lo`` (per-sample times, both on the
        discretization, so ``t_lo > 0``): DDIM (= Euler on the VE-equivalent state), or Heun's correction of it
        (Karras et al. 2022, Algorithm 1), except from above sigma~ = 80 where the correction is worse (see
        :func:`~distill.samplers.sample_heun`)."""
        a_hi, s_hi = clean_alpha_sigma(schedule, t_hi)
        a_lo, s_lo = clean_alpha_sigma(schedule, t_lo)
        x0 = self.teacher(x, t_hi, cond)
        x_euler = ddim_step(x, x0, a_hi, s_hi, a_lo, s_lo)
        if self.solver != "heun":
            return x_euler
        x_heun = heun_step(x, x0, x_euler, self.teacher(x_euler, t_lo, cond), a_hi, s_hi, a_lo, s_lo)
        corrects = append_dims(s_hi / a_hi <= SIGMA_MAX_VE * (1 + 1e-6), x.ndim)
        return torch.where(corrects, x_heun, x_euler)

    def pairs(self, schedule: Schedule, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t_hi, t_lo, sigma gap, lower point is clean)`` of ``n`` training pairs (float64, on the CPU): points
        of the discretization, or ECT's continuous pairs (``t ~ LogNormal(-1.1, 2)``, the lower level by
        :func:`ect_pair`; below sigma_min the target is the data itself)."""
        if self.noise_sampling == "ect":
            top = sigma_max_ve(schedule, self.sigma_max)
            sig_hi = torch.exp(P_MEAN + P_STD * torch.randn(n, generator=generator, dtype=torch.float64))
            sig_hi = sig_hi.clamp(self.sigma_min * (1 + 1e-6), top)
            sig_lo = ect_pair(sig_hi, int(self.step), self.total_steps, self.ect_q)
            clean = sig_lo < self.sigma_min
            gap = sig_hi - torch.where(clean, torch.zeros_like(sig_lo), sig_lo)  # ECT: r clamped to 0, gap t
            sig_lo = sig_lo.clamp(min=self.sigma_min)
            return (schedule.t_of_sigma_ve(sig_hi), schedule.t_of_sigma_ve(sig_lo), gap, clean)
        times, sigmas, probs = self.grid(schedule, self.num_scales())
        i = torch.multinomial(probs, n, replacement=True, generator=generator)
        return times[i + 1], times[i], sigmas[i + 1] - sigmas[i], torch.zeros(n, dtype=torch.bool)

    def forward(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        n = x0.shape[0]
        t_hi, t_lo, gap, clean = self.pairs(model.schedule, n, generator)
        t_hi, t_lo = t_hi.float().to(x0.device), t_lo.float().to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        a_hi, s_hi = (append_dims(v, x0.ndim) for v in clean_alpha_sigma(model.schedule, t_hi))
        x_hi = a_hi * x0 + s_hi * eps
        t_cond, s_cond = self._conds(model, labels, n, generator, x0.device)
        with torch.no_grad():
            if self.mode == "cd":
                self._eval()
                x_lo = self.teacher_step(x_hi, t_hi, t_lo, t_cond, model.schedule)
            else:
                a_lo, s_lo = (append_dims(v, x0.ndim) for v in clean_alpha_sigma(model.schedule, t_lo))
                x_lo = a_lo * x0 + s_lo * eps
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with same_random_state(seed, x0.device):
            online = model(x_hi, t_hi, s_cond)
        self.target.net.train(model.net.training)  # the same dropout (on or off) as the online evaluation
        with torch.no_grad(), same_random_state(seed, x0.device):
            target = model.with_net(self.target.net)(x_lo, t_lo, s_cond)
            if clean.any():  # ECT: a lower level below sigma_min is the data itself
                target = torch.where(append_dims(clean.to(x0.device), x0.ndim), x0.to(target.dtype), target)
        distance = consistency_distance(online, target, self.metric)
        if self.weighting == "uniform":
            return distance
        return distance / gap.float().to(x0.device)
