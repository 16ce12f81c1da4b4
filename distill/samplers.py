"""Samplers of one signature, stateless, in continuous time.

Every sampler is ``sample_*(denoise, x, ts, *, schedule, cond, generator, callback, progress) -> x0`` where
``denoise`` is any callable ``denoise(x_t, t, cond) -> x0_hat`` (a :class:`~distill.denoiser.Denoiser`, an ONNX
Runtime or TensorRT session behind the same call), ``schedule`` the noise schedule it was trained on (default:
``denoise.schedule``, so a backend either passes one or carries a ``.schedule`` attribute), ``x`` the starting state
at ``ts[0]`` and ``ts`` a decreasing 1-D tensor of times ending at 0. Time 0 is treated
as clean data (``alpha = 1, sigma = 0``) whatever the schedule's clipping. Noise comes from a
:class:`PerSampleGenerator`, so sample ``i`` depends only on its own seed, never on batch size or backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.parameterization import append_dims
from distill.schedules import DIFFUSERS_SPACINGS, DiscreteSchedule, Schedule, karras_sigmas

# EDM's sigma range (Karras et al. 2022, Table 1), on the VE-equivalent noise level sigma / alpha: "karras" and
# "logsnr" spacings stop at SIGMA_MIN_VE before the last step, and "karras" starts no higher than SIGMA_MAX_VE
# (a VP cosine schedule reaches sigma / alpha = e^10 at t = 1, where rho = 7 spacing would waste most steps).
SIGMA_MIN_VE, SIGMA_MAX_VE = 0.002, 80.0


class PerSampleGenerator:
    """One ``torch.Generator`` per sample, seeded ``seeds[i]`` (as EDM's ``StackedRandomGenerator``)."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], *, dtype=torch.float32, device="cpu") -> Tensor:
        """A ``(len(seeds), *shape)`` standard normal tensor, row ``i`` drawn from generator ``i``."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)


def clean_alpha_sigma(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha, sigma)`` at sampler times (a float, or per-sample tensors in ``t``'s dtype), with ``t = 0`` mapped
    to clean data exactly (``alpha = 1, sigma = 0``) whatever the schedule's clipping."""
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
    alpha, sigma = schedule.alpha_sigma(t)
    clean = t <= 0
    return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)


def alpha_sigma_at(schedule: Schedule, t: Tensor | float) -> tuple[float, float]:
    """:func:`clean_alpha_sigma` at one sampler time, as Python floats (float64 host-side arithmetic)."""
    alpha, sigma = clean_alpha_sigma(schedule, torch.as_tensor(t, dtype=torch.float64))
    return float(alpha), float(sigma)


def sigma_ve_at(schedule: Schedule, t: Tensor) -> float:
    """The VE-equivalent noise level ``sigma / alpha`` at one sampler time (0 at ``t = 0``)."""
    alpha, sigma = alpha_sigma_at(schedule, t)
    return sigma / alpha


def prior_scale(schedule: Schedule, t_max: float = 1.0) -> float:
    """The starting state's scale, ``x_T = scale * eps``: 1 on a variance-preserving schedule (the unit-variance
    prior of DDPM and of diffusers' pipelines, whose marginal ``alpha^2 var(x0) + sigma^2`` is 1 at unit data
    variance), ``sigma(t_max)`` on a variance-exploding one (EDM's and the consistency pipeline's ``sigma_max``)."""
    if schedule.variance == "vp":
        return 1.0
    return alpha_sigma_at(schedule, torch.tensor(t_max))[1]


def prior_sample(schedule: Schedule, generator: PerSampleGenerator, shape: Sequence[int], t_max: float = 1.0,
                 device="cpu", dtype=torch.float32) -> Tensor:
    """The starting state ``x_T = prior_scale * eps`` (the data term is negligible at ``t_max``)."""
    return prior_scale(schedule, t_max) * generator.randn(shape, device=device, dtype=dtype)


def make_timesteps(schedule: Schedule, steps: int, spacing: str = "uniform", t_max: float = 1.0) -> Tensor:
    """``steps + 1`` decreasing times from ``t_max`` to 0.

    ``uniform`` is even in t; ``karras`` even in ``sigma^(1/7)`` of the VE-equivalent noise level (Karras et al.
    2022, Eq. 5) from ``min(sigma(t_max), 80)``, after one interval from ``t_max`` down to 80 when the schedule
    starts higher (VP); ``logsnr`` even in log-SNR (Lu et al. 2022). The last two stop
    at ``sigma = 0.002`` and then step to clean data. ``leading``, ``trailing`` and ``linspace`` are diffusers'
    timestep grids on a discrete table (:meth:`~distill.schedules.DiscreteSchedule.diffusers_grid`; they start below
    ``t = 1``, as diffusers does). Start sampling at ``ts[0]`` (see :func:`prior_sample`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing == "uniform":
        return torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    if spacing in DIFFUSERS_SPACINGS:
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError(f"spacing {spacing!r} is diffusers' grid on a discrete timestep table; this schedule "
                             f"is {schedule.name!r}: use uniform, karras or logsnr")
        return schedule.diffusers_grid(steps, spacing)
    t_max_ = torch.tensor(t_max, dtype=torch.float64)
    # A schedule whose own t = 0 is already sigma_min (Karras) still needs a grid point apart from the final
    # clean-data point, hence the small floor.
    t_min = schedule.t_of_sigma_ve(torch.tensor(SIGMA_MIN_VE, dtype=torch.float64)).clamp(1e-4 * t_max, t_max)
    if steps == 1:
        inner = t_max_.reshape(1)
    elif spacing == "karras":
        sig_max, sig_min = torch.exp(-0.5 * schedule.logsnr(torch.stack([t_max_, t_min])))
        if sig_max > SIGMA_MAX_VE:
            # EDM's grid starts at sigma 80, but a VP marginal there is not pure noise: it still holds alpha * x0,
            # which for data whose mean is far from 0 (MNIST's black background) biases every sample (Heun then
            # converges away from DDIM and DPM-Solver++). So one interval runs from the true start down to 80.
            u = torch.linspace(0, 1, steps - 1, dtype=torch.float64)
            sigmas = karras_sigmas(u, float(sig_min), SIGMA_MAX_VE, 7.0)
            inner = torch.cat([t_max_.reshape(1), schedule.t_of_sigma_ve(sigmas)])
        else:
            u = torch.linspace(0, 1, steps, dtype=torch.float64)
            inner = schedule.t_of_sigma_ve(karras_sigmas(u, float(sig_min), float(sig_max), 7.0))
    elif spacing == "logsnr":
        lam = torch.linspace(float(schedule.logsnr(t_max_)), float(schedule.logsnr(t_min)), steps,
                             dtype=torch.float64)
        inner = schedule.t_of_logsnr(lam)
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use uniform, karras or logsnr")
    inner[0] = t_max  # exact start, free of round-off through the inverse
    return torch.cat([inner, torch.zeros(1, dtype=torch.float64)])


def _per_sample(v, like: Tensor):
    """A float stays a float; a per-sample ``(B,)`` tensor broadcasts over ``like``'s image dimensions."""
    return append_dims(v.to(like), like.ndim) if isinstance(v, Tensor) else v


def _relu(v):
    return v.clamp(min=0.0) if isinstance(v, Tensor) else max(v, 0.0)


def ddim_step(x_t: Tensor, x0: Tensor, a_t, s_t, a_s, s_s, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step t -> s (Song et al. 2021, Eq. 12) in general (alpha, sigma) form.

    ``a_t, s_t, a_s, s_s`` are floats or per-sample ``(B,)`` tensors. ``eta`` scales the ancestral noise
    ``c^2 = eta^2 (s_s^2 / s_t^2) (s_t^2 - (a_t/a_s)^2 s_s^2)``; ``eta = 1`` is exactly the DDPM posterior step
    q(x_s | x_t, x0) (Ho et al. 2020, Eq. 7). At ``eta = 0`` this is also the Euler step of the probability-flow ODE
    on the VE-equivalent state ``x / alpha`` (Karras et al. 2022, Algorithm 1, line 5) with the x0-prediction.
    """
    a_t, s_t, a_s, s_s = (_per_sample(v, x_t) for v in (a_t, s_t, a_s, s_s))
    eps = (x_t - a_t * x0) / s_t
    if eta == 0:
        return a_s * x0 + s_s * eps
    c2 = eta**2 * (s_s**2 / s_t**2) * _relu(s_t**2 - (a_t / a_s) ** 2 * s_s**2)
    x_s = a_s * x0 + _relu(s_s**2 - c2) ** 0.5 * eps
    if not isinstance(c2, Tensor) and c2 == 0:
        return x_s  # the last step to clean data draws no noise
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    return x_s + c2**0.5 * noise


def renoise(x_k: Tensor, a_k, s_k, a_s, s_s, noise: Tensor) -> Tensor:
    """Forward-process transition ``q(x_s | x_k)`` from a cleaner time ``k`` to a noisier time ``s``: mean
    ``(a_s / a_k) x_k``, variance ``s_s^2 - (a_s / a_k)^2 s_k^2`` (any Gaussian diffusion with these marginals)."""
    a_k, s_k, a_s, s_s = (_per_sample(v, x_k) for v in (a_k, s_k, a_s, s_s))
    ratio = a_s / a_k
    return ratio * x_k + _relu(s_s**2 - ratio**2 * s_k**2) ** 0.5 * noise


def heun_step(x_t: Tensor, x0: Tensor, x_euler: Tensor, x0_euler: Tensor, a_t, s_t, a_s, s_s) -> Tensor:
    """Heun's 2nd-order correction (Karras et al. 2022, Algorithm 1, lines 6-8) on the VE-equivalent state
    ``x~ = x / alpha``, ``sigma~ = sigma / alpha``: ``x~_s = x~_t + (sigma~_s - sigma~_t) (d_t + d'_s) / 2`` with
    ``d = (x~ - x0) / sigma~``, where ``x_euler`` is :func:`ddim_step`'s result and ``x0_euler`` the denoiser at it.
    Floats or per-sample tensors; ``s_s`` must be > 0 (the last step to clean data is Euler only)."""
    a_t, s_t, a_s, s_s = (_per_sample(v, x_t) for v in (a_t, s_t, a_s, s_s))
    sig_t, sig_s = s_t / a_t, s_s / a_s
    d_cur = (x_t / a_t - x0) / sig_t
    d_next = (x_euler / a_s - x0_euler) / sig_s
    return a_s * (x_t / a_t + (sig_s - sig_t) * 0.5 * (d_cur + d_next))


def dpmpp_2m_step(x_t: Tensor, x0: Tensor, a_t, s_t, a_s, s_s, x0_prev: Tensor | None = None,
                  h_prev=None) -> tuple[Tensor, object]:
    """One DPM-Solver++(2M) step t -> s (Lu et al. 2022, Algorithm 2, data-prediction form); floats or per-sample
    tensors. Returns ``(x_s, h)``; pass ``h`` and this step's ``x0`` as ``h_prev``/``x0_prev`` to the next step
    (first order when they are ``None``). A step to ``sigma = 0`` returns ``x0`` (the limit h -> inf)."""
    if not isinstance(s_s, Tensor) and s_s == 0:
        return x0, None
    a_t, s_t, a_s, s_s = (_per_sample(v, x_t) for v in (a_t, s_t, a_s, s_s))
    tensors = isinstance(s_s, Tensor)
    log, expm1 = (torch.log, torch.expm1) if tensors else (math.log, math.expm1)
    h = log(a_s / s_s) - log(a_t / s_t)  # Lu et al.'s lambda is half our log-SNR: log(alpha / sigma)
    d = x0
    if x0_prev is not None:
        r = _per_sample(h_prev, x_t) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    x_s = (s_s / s_t) * x_t - a_s * expm1(-h) * d
    if tensors:
        x_s = torch.where(s_s == 0, x0, x_s)
    return x_s, h


def _loop(ts: Tensor, progress: bool, desc: str):
    return tqdm(range(len(ts) - 1), desc=desc, disable=not progress, leave=False)


def _noise_like(x: Tensor, generator: PerSampleGenerator | None) -> Tensor:
    if generator is None:
        raise ValueError("a stochastic sampler needs a PerSampleGenerator")
    return generator.randn(x.shape[1:], dtype=x.dtype, device=x.device)


def _t(ts: Tensor, i: int, x: Tensor) -> Tensor:
    return ts[i].to(x.device).expand(x.shape[0])


Callback = Callable[[dict], None]


def _schedule(denoise, schedule: Schedule | None) -> Schedule:
    if schedule is not None:
        return schedule
    if getattr(denoise, "schedule", None) is None:
        raise ValueError("pass schedule=...: the denoiser has no .schedule attribute")
    return denoise.schedule


@torch.no_grad()
def sample_ddim(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                progress: bool = False, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021), deterministic at ``eta = 0``."""
    schedule = _schedule(denoise, schedule)
    for i in _loop(ts, progress, "ddpm" if eta == 1 else "ddim"):
        a_t, s_t = alpha_sigma_at(schedule, ts[i])
        a_s, s_s = alpha_sigma_at(schedule, ts[i + 1])
        x0 = denoise(x, _t(ts, i, x), cond)
        noise = _noise_like(x, generator) if eta > 0 and s_s > 0 else None
        x = ddim_step(x, x0, a_t, s_t, a_s, s_s, eta, noise)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_ddpm(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                progress: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), i.e. DDIM with ``eta = 1``."""
    return sample_ddim(denoise, x, ts, schedule=schedule, cond=cond, generator=generator, callback=callback,
                       progress=progress, eta=1.0)


@torch.no_grad()
def sample_stochastic(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                      generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                      progress: bool = False) -> Tensor:
    """N-step stochastic sampling (Meng et al. 2023, Sec. 4.3, after Karras et al.'s churn): at each grid time, one
    deterministic DDIM step of twice the length (to the grid point after next), then the forward process back up
    to the next grid point with fresh noise. One evaluation per interval, the last interval deterministic, so it
    costs what DDIM does on the same grid; on a distilled student it trades some of the deterministic sampler's
    accumulated error for noise (better FD at 4 and 8 steps)."""
    schedule = _schedule(denoise, schedule)
    last = len(ts) - 2
    for i in _loop(ts, progress, "stochastic"):
        a_t, s_t = alpha_sigma_at(schedule, ts[i])
        a_s, s_s = alpha_sigma_at(schedule, ts[i + 1])
        x0 = denoise(x, _t(ts, i, x), cond)
        if i < last:
            a_k, s_k = alpha_sigma_at(schedule, ts[i + 2])
            x = renoise(ddim_step(x, x0, a_t, s_t, a_k, s_k), a_k, s_k, a_s, s_s, _noise_like(x, generator))
        else:
            x = ddim_step(x, x0, a_t, s_t, a_s, s_s)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": x0})
    return x


def _heun_corrects(sigma_cur: float, sigma_next: float) -> bool:
    """Whether a Heun step adds its 2nd-order correction: not on the last step to sigma = 0 (Karras et al.), and
    not from above EDM's sigma_max = 80, where one step of a VP schedule spans orders of magnitude of sigma and
    the trapezoid rule on the 1/sigma-shaped slope is far worse than the Euler (= DDIM) step alone."""
    return sigma_next > 0 and sigma_cur <= SIGMA_MAX_VE * (1 + 1e-9)


def _karras_ode(denoise, x: Tensor, ts: Tensor, schedule, cond, callback, progress, heun: bool) -> Tensor:
    # Karras et al. (2022) Algorithms 1-2 on the VE-equivalent state x~ = x / alpha, sigma~ = sigma / alpha, where
    # the probability-flow ODE is dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~; its Euler step is the DDIM step.
    schedule = _schedule(denoise, schedule)
    for i in _loop(ts, progress, "heun" if heun else "euler"):
        a_cur, s_cur = alpha_sigma_at(schedule, ts[i])
        a_next, s_next = alpha_sigma_at(schedule, ts[i + 1])
        x0 = denoise(x, _t(ts, i, x), cond)
        x_next = ddim_step(x, x0, a_cur, s_cur, a_next, s_next)
        if heun and _heun_corrects(s_cur / a_cur, s_next / a_next):
            x0_next = denoise(x_next, _t(ts, i + 1, x), cond)
            x_next = heun_step(x, x0, x_next, x0_next, a_cur, s_cur, a_next, s_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_euler(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                 generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                 progress: bool = False) -> Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without correction)."""
    return _karras_ode(denoise, x, ts, schedule, cond, callback, progress, heun=False)


@torch.no_grad()
def sample_heun(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                progress: bool = False) -> Tensor:
    """Algorithm 1 (deterministic Heun steps) from Karras et al. (2022); Euler on the last step to sigma = 0."""
    return _karras_ode(denoise, x, ts, schedule, cond, callback, progress, heun=True)


@torch.no_grad()
def sample_dpmpp_2m(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                    generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                    progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep data-prediction form."""
    schedule = _schedule(denoise, schedule)
    x0_prev, h_prev = None, None
    for i in _loop(ts, progress, "dpmpp_2m"):
        a_t, s_t = alpha_sigma_at(schedule, ts[i])
        a_s, s_s = alpha_sigma_at(schedule, ts[i + 1])
        x0 = denoise(x, _t(ts, i, x), cond)
        x, h_prev = dpmpp_2m_step(x, x0, a_t, s_t, a_s, s_s, x0_prev, h_prev)
        x0_prev = x0
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_consistency(denoise, x: Tensor, ts: Tensor, *, schedule: Schedule | None = None, cond=None,
                       generator: PerSampleGenerator | None = None, callback: Callback | None = None,
                       progress: bool = False) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): at each grid time the model maps the state
    straight to clean data, then the forward process noises that estimate afresh to the next grid time,
    ``x_s = alpha_s x0 + sigma_s z``. One evaluation per interval; with ``ts = [t_max, 0]`` it is the one-step
    sample ``f(x_T, t_max)``. Meant for consistency models; on any other model it is a crude ancestral sampler.
    A chain of students (:class:`~distill.chain.Chain`, any ``denoise`` with ``step_denoisers``: one denoiser per
    interval) runs its ``i``-th member at ``ts[i]``."""
    schedule = _schedule(denoise, schedule)
    per_step = getattr(denoise, "step_denoisers", None)
    if per_step is not None and len(per_step) != len(ts) - 1:
        raise ValueError(f"a chain of {len(per_step)} steps cannot walk a {len(ts) - 1}-step grid")
    for i in _loop(ts, progress, "consistency"):
        x0 = (per_step[i] if per_step is not None else denoise)(x, _t(ts, i, x), cond)
        a_s, s_s = alpha_sigma_at(schedule, ts[i + 1])
        x = renoise(x0, 1.0, 0.0, a_s, s_s, _noise_like(x, generator)) if s_s > 0 else x0
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": x0})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "stochastic": sample_stochastic,
    "consistency": sample_consistency,
}

# The spacing each sampler is usually run with (overridable).
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "euler": "karras", "heun": "karras",
                   "dpmpp_2m": "logsnr", "stochastic": "uniform", "consistency": "karras"}

# Samplers taking one network evaluation per interval of whatever grid they are given: a distilled student's own
# grid (its card's steps and exact timesteps) applies to every one of them.
GRID_SAMPLERS = ("ddim", "ddpm", "stochastic", "consistency")


def nfe(sampler: str, steps: int, schedule: Schedule, spacing: str | None = None) -> int:
    """Network evaluations of ``steps`` steps: one per step, plus Heun's corrections (see :func:`_heun_corrects`)."""
    if sampler != "heun":
        return steps
    ts = make_timesteps(schedule, steps, spacing or DEFAULT_SPACING[sampler])
    sig = [sigma_ve_at(schedule, t) for t in ts]
    return steps + sum(_heun_corrects(sig[i], sig[i + 1]) for i in range(steps))


def steps_for_nfe(sampler: str, evaluations: int, schedule: Schedule, spacing: str | None = None) -> int:
    """The most steps whose cost is at most ``evaluations`` network evaluations (at least one step)."""
    steps = 1
    while nfe(sampler, steps + 1, schedule, spacing) <= evaluations:
        steps += 1
    return steps


def check_sampler_options(sampler: str | None, eta: float | None = None) -> None:
    """Refuse an unknown sampler and an ``eta`` given to a sampler that does not take it (one rule for the CLI,
    the Python API and the benchmarks), as a one-line :class:`~distill.errors.UsageError`. ``None`` (the model
    card's sampler, not yet known) is checked again once resolved."""
    from distill.errors import UsageError

    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: unknown; use one of {', '.join(SAMPLERS)}")
    if eta is not None and sampler is not None and sampler != "ddim":
        raise UsageError(f"--eta: only the ddim sampler takes eta, not {sampler}; drop --eta or pass --sampler ddim")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta {eta}: must lie in [0, 1]")


def generate(denoise, shape: Sequence[int], seeds: Sequence[int], *, sampler: str = "ddim", steps: int = 50,
             spacing: str | None = None, cond=None, device="cpu", dtype=torch.float32, progress: bool = False,
             eta: float | None = None, schedule: Schedule | None = None,
             timesteps: Sequence[float] | None = None) -> Tensor:
    """Draw one sample per seed: prior noise, timesteps, sampler; the common path of CLI and benchmarks.
    ``timesteps`` (``steps + 1`` decreasing times ending at 0, e.g. a student card's) replace the spacing."""
    check_sampler_options(sampler, eta)
    schedule = _schedule(denoise, schedule)
    generator = PerSampleGenerator(seeds)
    if timesteps is not None:
        ts = torch.as_tensor(list(timesteps), dtype=torch.float64)
        if len(ts) != steps + 1 or float(ts[-1]) != 0.0 or bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"timesteps must be {steps + 1} decreasing times ending at 0")
    else:
        ts = make_timesteps(schedule, steps, spacing or DEFAULT_SPACING[sampler])
    x = prior_sample(schedule, generator, shape, float(ts[0]), device=device, dtype=dtype)
    kwargs = {"eta": eta} if eta is not None else {}
    return SAMPLERS[sampler](denoise, x, ts, schedule=schedule, cond=cond, generator=generator, progress=progress,
                             **kwargs)
