"""The one model interface: ``denoise(x_t, t, cond) -> x0_hat`` in continuous time.

:class:`Denoiser` adapts any network ``net(x, time_input, labels)`` that predicts eps, x0 or v under any
time-input convention, and applies classifier-free guidance when ``cond.guidance`` is non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.parameterization import PREDICTIONS, append_dims, eps_from_x0, to_x0
from distill.schedules import DiscreteSchedule, Schedule

# How the network wants its time input, as a function of (schedule, t).
TIME_INPUTS = {
    "t": "continuous time t in [0, 1]",
    "t1000": "1000 t (the DDPM convention on continuous time)",
    "index": "diffusers' discrete timestep index t T - 1 (discrete schedules only)",
    "log_sigma": "0.25 ln(sigma / alpha), EDM's c_noise on the VE-equivalent noise level",
    "logsnr": "the log-SNR lambda_t",
}


@dataclass
class Cond:
    """Conditioning: class labels (``None`` = unconditional) and the guidance weight ``w``.

    ``w`` follows Ho & Salimans (2022): ``eps~ = (1 + w) eps(x, c) - w eps(x, null)``; ``w = 0`` is no guidance.
    It may be a float or a per-sample ``(B,)`` tensor.
    """

    labels: Tensor | None = None
    guidance: float | Tensor = 0.0


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ``(1 + w) cond - w uncond``.

    The combination is affine in the prediction, so it is the same in eps, x0 or v space at a fixed ``x_t``.
    """
    if isinstance(w, Tensor):
        w = append_dims(w.to(cond_out), cond_out.ndim)
    return cond_out + w * (cond_out - uncond_out)


def time_input(schedule: Schedule, t: Tensor, convention: str) -> Tensor:
    """Map continuous time to the network's time input."""
    if convention == "t":
        return t
    if convention == "t1000":
        return 1000.0 * t
    if convention == "index":
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("time_input 'index' needs a discrete schedule")
        return schedule.index_of_t(t)
    if convention == "log_sigma":
        return 0.25 * (-0.5 * schedule.logsnr(t))  # ln(sigma/alpha) = -lambda/2
    if convention == "logsnr":
        return schedule.logsnr(t)
    raise ValueError(f"unknown time input {convention!r}: use one of {', '.join(TIME_INPUTS)}")


class Denoiser(nn.Module):
    """Wraps a raw network as ``denoise(x_t, t, cond) -> x0_hat``.

    Args:
        net: called as ``net(x_t, time_input, labels)``; may return a tensor or an object with ``.sample``.
        schedule: the noise schedule the network was trained on.
        prediction: what the network outputs: ``"eps"``, ``"x0"`` or ``"v"``.
        time_input: the network's time convention, one of :data:`TIME_INPUTS`.
        null_label: the label index meaning "no class" (for classifier-free guidance), or ``None``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "v",
        time_input: str = "t1000",
        null_label: int | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}: use one of {', '.join(TIME_INPUTS)}")
        self.net, self.schedule = net, schedule
        self.prediction, self.time_input, self.null_label = prediction, time_input, null_label

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``(alpha, sigma)`` broadcastable against ``like``."""
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        return append_dims(alpha.to(like), like.ndim), append_dims(sigma.to(like), like.ndim)

    def raw(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The network's own output (its ``prediction`` type)."""
        t_in = time_input(self.schedule, t.double(), self.time_input).to(x_t.dtype)
        out = self.net(x_t, t_in, labels)
        out = out.sample if hasattr(out, "sample") else out
        return out.to(x_t.dtype)  # bf16 under autocast; the sampler's arithmetic stays in x_t's precision

    def _x0(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return to_x0(self.raw(x_t, t, labels), self.prediction, x_t, alpha, sigma)

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        cond = cond or Cond()
        w = cond.guidance
        guided = cond.labels is not None and (bool(torch.any(w != 0)) if isinstance(w, Tensor) else w != 0)
        if not guided:
            return self._x0(x_t, t, cond.labels)
        if self.null_label is None:
            raise ValueError("classifier-free guidance needs a model trained with a null class")
        null = torch.full_like(cond.labels, self.null_label)
        x0 = self._x0(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond.labels, null]))
        x0_cond, x0_uncond = x0.chunk(2)
        return cfg_combine(x0_cond, x0_uncond, w)

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        """The noise estimate implied by :meth:`forward`."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        alpha, sigma = self.alpha_sigma(t, x_t)
        return eps_from_x0(self(x_t, t, cond), x_t, alpha, sigma)
