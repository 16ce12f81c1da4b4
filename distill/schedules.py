"""Noise schedules in continuous time.

Every schedule maps time ``t in [0, 1]`` (0 = data, 1 = noise) to the log signal-to-noise ratio
``lambda_t = 2 log(alpha_t / sigma_t)`` and back, and from it to ``(alpha_t, sigma_t)`` with
``x_t = alpha_t * x0 + sigma_t * eps``. Variance-preserving (VP) schedules have ``alpha^2 + sigma^2 = 1``;
variance-exploding (VE) ones have ``alpha = 1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

# Cosine-schedule clipping of the log-SNR (Salimans & Ho 2022, `diffusion_distillation/schedules.py`).
LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0


def karras_sigmas(u: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Karras et al. (2022) Eq. 5 with ``u = i / (N - 1)``: ``u = 0`` gives sigma_max, ``u = 1`` sigma_min."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


def karras_u(sigma: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Inverse of :func:`karras_sigmas`."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (sigma ** (1 / rho) - a) / (b - a)


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (``numpy.interp``) for increasing ``xp``, clamped at the ends."""
    xp, fp = xp.to(x), fp.to(x)
    x_c = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x_c.detach().contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x_c - x0) * (f1 - f0) / (x1 - x0)


@dataclass
class Schedule(ABC):
    """Base class: subclasses define :meth:`logsnr` and :meth:`t_of_logsnr`; the rest follows."""

    name: ClassVar[str] = ""
    variance: ClassVar[str] = "vp"  # "vp" (alpha^2 + sigma^2 = 1) or "ve" (alpha = 1)

    @abstractmethod
    def logsnr(self, t: Tensor) -> Tensor:
        """``lambda_t = 2 log(alpha_t / sigma_t)``, decreasing in t."""

    @abstractmethod
    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`logsnr`."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` from the log-SNR."""
        lam = self.logsnr(t)
        if self.variance == "ve":
            return torch.ones_like(lam), torch.exp(-0.5 * lam)
        # VP: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda).
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def t_of_sigma_ve(self, sigma_ve: Tensor) -> Tensor:
        """Time at which the VE-equivalent noise level ``sigma / alpha`` equals ``sigma_ve``."""
        return self.t_of_logsnr(-2.0 * torch.log(sigma_ve))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass
class CosineSchedule(Schedule):
    """Cosine VP schedule in log-SNR: ``lambda(t) = -2 log tan(a t + b)``, clipped (Salimans & Ho 2022)."""

    name: ClassVar[str] = "cosine"
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX

    def _ab(self) -> tuple[float, float]:
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
        return a, b

    def logsnr(self, t: Tensor) -> Tensor:
        a, b = self._ab()
        return -2.0 * torch.log(torch.tan(a * t + b))

    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        a, b = self._ab()
        return (torch.atan(torch.exp(-0.5 * lam)) - b) / a


def ddpm_betas(kind: str, num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """The beta tables of diffusers' ``DDPMScheduler`` (float64)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021) Eq. 17, betas clipped at 0.999.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}: use linear, scaled_linear or squaredcos_cap_v2")


@dataclass
class DiscreteSchedule(Schedule):
    """A DDPM beta table made continuous by interpolating its log-SNR linearly in time.

    Discrete index ``i`` (0-based, as diffusers counts) sits at ``t = (i + 1) / T``; ``t = 0`` is clean data,
    whose log-SNR we clip to ``LOGSNR_MAX`` so that the table stays finite and monotone.
    """

    name: ClassVar[str] = "discrete"
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    _table: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("_table")
        return cfg

    def alphas_cumprod(self) -> Tensor:
        betas = ddpm_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        return torch.cumprod(1.0 - betas, dim=0)

    def table(self) -> tuple[Tensor, Tensor]:
        """Knots ``(t, lambda)``, increasing in t."""
        if self._table is None:
            ac = self.alphas_cumprod()
            lam = torch.log(ac) - torch.log1p(-ac)
            T = self.num_train_timesteps
            ts = torch.arange(0, T + 1, dtype=torch.float64) / T
            lam = torch.cat([torch.tensor([max(LOGSNR_MAX, float(lam[0]) + 1.0)], dtype=torch.float64), lam])
            self._table = (ts, lam)
        return self._table

    def logsnr(self, t: Tensor) -> Tensor:
        ts, lam = self.table()
        return interp(t, ts, lam)

    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        ts, lams = self.table()
        return interp(lam, lams.flip(0), ts.flip(0))

    def index_of_t(self, t: Tensor) -> Tensor:
        """The (fractional) diffusers timestep index of time ``t``."""
        return t * self.num_train_timesteps - 1.0


@dataclass
class KarrasSchedule(Schedule):
    """EDM / Karras VE schedule (alpha = 1); time runs along the rho-warped sigma grid of Karras Eq. 5.

    ``t = 0`` is ``sigma_min`` and ``t = 1`` is ``sigma_max``, so uniform steps in t are the Karras sigmas.
    """

    name: ClassVar[str] = "karras"
    variance: ClassVar[str] = "ve"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5

    def sigma(self, t: Tensor) -> Tensor:
        return karras_sigmas(1.0 - t, self.sigma_min, self.sigma_max, self.rho)

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(self.sigma(t))

    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        return 1.0 - karras_u(torch.exp(-0.5 * lam), self.sigma_min, self.sigma_max, self.rho)


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (CosineSchedule, DiscreteSchedule, KarrasSchedule)}


def schedule_from_config(cfg: dict[str, Any]) -> Schedule:
    """Build a schedule from ``{"name": ..., **params}`` (the form :meth:`Schedule.config` writes)."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**cfg)
