"""Noise schedules in continuous time.

Every schedule maps time ``t in [0, 1]`` (0 = data, 1 = noise) to the log signal-to-noise ratio
``lambda_t = 2 log(alpha_t / sigma_t)`` and back, and from it to ``(alpha_t, sigma_t)`` with
``x_t = alpha_t * x0 + sigma_t * eps``. Variance-preserving (VP) schedules have ``alpha^2 + sigma^2 = 1``;
variance-exploding (VE) ones have ``alpha = 1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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
    """Piecewise-linear interpolation (``numpy.interp``) for increasing ``xp``, clamped at the ends (host-side:
    it searches, so traced code uses index arithmetic on evenly spaced knots instead)."""
    xp, fp = xp.to(x), fp.to(x)
    x_c = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x_c.detach().contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x_c - x0) * (f1 - f0) / (x1 - x0)


class Schedule(nn.Module, ABC):
    """Base class: subclasses define :meth:`logsnr` and :meth:`t_of_logsnr`; the rest follows.

    A schedule is a module so that its tables (buffers) live on the model's device, but it holds no parameters.
    Its math runs in the dtype of ``t``: float32 inside a denoiser (what gets traced and exported: no float64),
    float64 in samplers and tests. Tables stay float32 whatever the model is cast to (see :meth:`_apply`).
    """

    name: ClassVar[str] = ""
    variance: ClassVar[str] = "vp"  # "vp" (alpha^2 + sigma^2 = 1) or "ve" (alpha = 1)
    params: ClassVar[tuple[str, ...]] = ()  # the constructor arguments, in order: what config() records

    @abstractmethod
    def logsnr(self, t: Tensor) -> Tensor:
        """``lambda_t = 2 log(alpha_t / sigma_t)``, decreasing in t."""

    @abstractmethod
    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`logsnr` (host-side: used to build sampler grids, not inside a denoiser)."""

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha_sigma(t)

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
        return {"name": self.name, **{k: getattr(self, k) for k in self.params}}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.params)

    def _apply(self, fn, recurse: bool = True):
        # Tables follow the model between devices, but a cast of the model (.half(), .to(bfloat16)) must not
        # round them: the time math stays float32. fn is applied to one element only to learn the target device.
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(fn(buf[:1]).device)
        return self


class CosineSchedule(Schedule):
    """Cosine VP schedule in log-SNR: ``lambda(t) = -2 log tan(a t + b)``, clipped (Salimans & Ho 2022).

    With ``theta = a t + b``, ``alpha = cos(theta)`` and ``sigma = sin(theta)``; alpha is computed as
    ``sin(a (1 - t) + c)`` with ``c = pi/2 - a - b`` so that both ends keep full float32 precision.
    """

    name: ClassVar[str] = "cosine"
    params: ClassVar[tuple[str, ...]] = ("logsnr_min", "logsnr_max")

    def __init__(self, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
        super().__init__()
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self._b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self._a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b
        self._c = math.pi / 2 - self._a - self._b

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(self._a * (1.0 - t) + self._c), torch.sin(self._a * t + self._b)

    def logsnr(self, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-0.5 * lam)) - self._b) / self._a


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


class DiscreteSchedule(Schedule):
    """A DDPM beta table made continuous by interpolating its log-SNR linearly in time.

    Discrete index ``i`` (0-based, as diffusers counts) sits at ``t = (i + 1) / T``; ``t = 0`` is clean data,
    whose log-SNR we clip to ``LOGSNR_MAX`` so that the table stays finite and monotone. The knots are evenly
    spaced in t, so a lookup is index arithmetic (``floor(t T)``), not a search: it traces and exports.
    """

    name: ClassVar[str] = "discrete"
    params: ClassVar[tuple[str, ...]] = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end",
                                         "steps_offset", "set_alpha_to_one")

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, steps_offset: int = 0, set_alpha_to_one: bool = True):
        super().__init__()
        self.beta_schedule, self.num_train_timesteps = beta_schedule, int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.steps_offset = int(steps_offset)  # diffusers' index offset of its "leading" sampling grid
        # diffusers' DDIM set_alpha_to_one: False ends its grids at training timestep 0 (t = 1 / T), not clean data
        self.set_alpha_to_one = bool(set_alpha_to_one)
        ac = self.alphas_cumprod()
        lam = torch.log(ac) - torch.log1p(-ac)
        lam = torch.cat([torch.tensor([max(LOGSNR_MAX, float(lam[0]) + 1.0)], dtype=torch.float64), lam])
        self._logsnr64 = lam  # host-side float64 copy, for samplers and tests
        self._logsnr_np = lam.numpy()
        self.register_buffer("logsnr_table", lam.float(), persistent=False)

    def alphas_cumprod(self) -> Tensor:
        betas = ddpm_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        return torch.cumprod(1.0 - betas, dim=0)

    def table(self) -> tuple[Tensor, Tensor]:
        """Knots ``(t, lambda)`` in float64, increasing in t."""
        T = self.num_train_timesteps
        return torch.arange(0, T + 1, dtype=torch.float64) / T, self._logsnr64

    def logsnr(self, t: Tensor) -> Tensor:
        T = self.num_train_timesteps
        if t.dtype == torch.float64 and t.ndim == 0:
            # one host-side time (a sampler's step arithmetic): plain floats on a numpy copy of the table, so that
            # inside an export trace (a fused sampler graph) the value stays a known constant, not a lookup
            pos = min(max(float(t) * T, 0.0), float(T))
            k = min(int(math.floor(pos)), T - 1)
            lo, hi = self._logsnr_np[k], self._logsnr_np[k + 1]
            return torch.tensor(float(lo + (pos - k) * (hi - lo)), dtype=torch.float64, device=t.device)
        table = self._logsnr64.to(t.device) if t.dtype == torch.float64 else self.logsnr_table
        pos = (t * T).clamp(0, T)
        k = pos.floor().clamp(max=T - 1)
        frac = pos - k
        k = k.long()
        lo, hi = table[k], table[k + 1]
        return lo + frac * (hi - lo)

    def t_of_logsnr(self, lam: Tensor) -> Tensor:
        ts, lams = self.table()
        return interp(lam, lams.flip(0), ts.flip(0))

    def index_of_t(self, t: Tensor) -> Tensor:
        """The (fractional) diffusers timestep index of time ``t``."""
        return t * self.num_train_timesteps - 1.0

    def diffusers_grid(self, steps: int, spacing: str) -> Tensor:
        """``steps + 1`` decreasing times on diffusers' timestep grid (``DDIMScheduler.set_timesteps``: the
        ``leading``, ``trailing`` or ``linspace`` timestep spacing of Lin et al. 2024, Table 2, with
        ``steps_offset``), index ``i`` at ``t = (i + 1) / T``, then clean data (``t = 0``; diffusers' DDIM with
        ``set_alpha_to_one``, its default), or without it training timestep 0 (``t = 1 / T``: the samplers then
        return that state, as diffusers' DDIM does)."""
        import numpy as np

        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps {steps}: a {T}-step table samples in 1 to {T} steps")
        if spacing == "leading":
            index = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            index = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            index = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"unknown diffusers timestep spacing {spacing!r}: use {', '.join(DIFFUSERS_SPACINGS)}")
        ts = torch.from_numpy((index + 1).astype(np.float64) / T)
        end = 0.0 if self.set_alpha_to_one else 1.0 / T
        return torch.cat([ts, torch.full((1,), end, dtype=torch.float64)])


DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")


class KarrasSchedule(Schedule):
    """EDM / Karras VE schedule (alpha = 1); time runs along the rho-warped sigma grid of Karras Eq. 5.

    ``t = 0`` is ``sigma_min`` and ``t = 1`` is ``sigma_max``, so uniform steps in t are the Karras sigmas.
    """

    name: ClassVar[str] = "karras"
    variance: ClassVar[str] = "ve"
    params: ClassVar[tuple[str, ...]] = ("sigma_min", "sigma_max", "rho", "sigma_data")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.rho, self.sigma_data = float(rho), float(sigma_data)

    def sigma(self, t: Tensor) -> Tensor:
        return karras_sigmas(1.0 - t, self.sigma_min, self.sigma_max, self.rho)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

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
