"""The one model interface: ``denoise(x_t, t, cond) -> x0_hat`` in continuous time.

:class:`Denoiser` adapts any network ``net(x, time_input, labels[, w])`` that predicts eps, x0 or v under any
time-input convention, and applies classifier-free guidance: as two batched branches for a plain conditional
network, or by passing ``w`` to a network that takes the guidance weight as an input (a guidance-distilled student).

``Denoiser.forward`` is a pure tensor function: float32 time math (no float64), no Python branch on tensor values,
no host sync, so it traces (``torch.onnx.export``, ``torch.export``) and compiles (``fullgraph=True``) unchanged.
:class:`DenoiserGraph` is the same function with plain tensor inputs, the form that gets exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.parameterization import (
    EDM_PREDICTIONS,
    PREDICTIONS,
    append_dims,
    consistency_output,
    edm_input,
    eps_from_x0,
    to_x0,
)
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
    It may be a float or a per-sample ``(B,)`` tensor. Whether guidance runs is decided from the Python value, never
    from tensor contents (which would sync and break tracing): a float ``0.0`` runs one branch, any tensor runs the
    guided path (a zero entry gives exactly the conditional output). The meaning is the same for a network that
    takes ``w`` as an input: it is trained to give the guided output itself, in one evaluation.
    """

    labels: Tensor | None = None
    guidance: float | Tensor = 0.0

    @property
    def guided(self) -> bool:
        return self.labels is not None and (isinstance(self.guidance, Tensor) or self.guidance != 0)


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ``(1 + w) cond - w uncond``.

    The combination is affine in the prediction, so it is the same in eps, x0 or v space at a fixed ``x_t``.
    """
    if isinstance(w, Tensor):
        w = append_dims(w.to(cond_out), cond_out.ndim)
    return cond_out + w * (cond_out - uncond_out)


def time_input(schedule: Schedule, t: Tensor, convention: str) -> Tensor:
    """Map continuous time to the network's time input (in ``t``'s dtype: float32 inside a denoiser)."""
    if convention == "t":
        return t
    if convention == "t1000":
        return 1000.0 * t
    if convention == "index":
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("time_input 'index' needs a discrete schedule")
        index = schedule.index_of_t(t)
        # a training timestep in float32 (t = (i + 1) / T) comes back as i up to round-off: snap it to i, so the
        # network sees exactly the integer index diffusers passes
        whole = index.round()
        return torch.where((index - whole).abs() < 1e-3, whole, index)
    if convention == "log_sigma":
        return 0.25 * (-0.5 * schedule.logsnr(t))  # ln(sigma/alpha) = -lambda/2
    if convention == "logsnr":
        return schedule.logsnr(t)
    raise ValueError(f"unknown time input {convention!r}: use one of {', '.join(TIME_INPUTS)}")


def batch_times(t: Tensor | float, x_t: Tensor) -> Tensor:
    """``t`` (a float, a scalar or a ``(B,)`` tensor) as a float32 ``(B,)`` tensor on ``x_t``'s device (also used
    for the guidance weight ``w``)."""
    return torch.as_tensor(t, device=x_t.device).to(torch.float32).reshape(-1).expand(x_t.shape[0])


class Denoiser(nn.Module):
    """Wraps a raw network as ``denoise(x_t, t, cond) -> x0_hat``.

    Args:
        net: called as ``net(x_t, time_input, labels)``, or ``net(x_t, time_input, labels, w)`` when
            ``guidance_input``; may return a tensor or an object with ``.sample``.
        schedule: the noise schedule the network was trained on (a submodule: its tables move with the model).
        prediction: what the network outputs: ``"eps"``, ``"x0"`` or ``"v"``.
        time_input: the network's time convention, one of :data:`TIME_INPUTS`; always passed in float32, whatever
            the precision of the weights or of ``x_t`` (in bf16, ``1000 t`` would round to multiples of 4).
        null_label: the label index meaning "no class" (for classifier-free guidance), or ``None``.
        guidance_input: the network takes the guidance weight ``w`` as a ``(B,)`` float32 input and gives the
            guided prediction in one evaluation (a guidance-distilled student).
        consistency: ``{"sigma_min": ..., "sigma_data": ...}`` for a consistency model: the network's clean estimate
            goes through the boundary-condition preconditioning
            (:func:`~distill.parameterization.consistency_output`), so ``denoise(x_t, t) = x_t / alpha`` exactly
            where the VE-equivalent noise level is ``sigma_min`` or less.
        sigma_data: EDM's sigma_data, for ``prediction`` ``edm`` / ``edm_v`` (the network takes ``c_in x`` and
            outputs EDM's F, see :mod:`distill.parameterization`).
        clip_x0: clamp the clean estimate to ``[-clip_x0, clip_x0]`` (diffusers' ``clip_sample`` with its
            ``clip_sample_range``); ``None`` leaves it as the network gives it.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "v",
        time_input: str = "t1000",
        null_label: int | None = None,
        guidance_input: bool = False,
        consistency: dict[str, float] | None = None,
        clip_x0: float | None = None,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}: use one of {', '.join(TIME_INPUTS)}")
        self.net, self.schedule = net, schedule
        self.prediction, self.time_input, self.null_label = prediction, time_input, null_label
        self.guidance_input = guidance_input
        self.consistency = {"sigma_min": float(consistency["sigma_min"]),
                            "sigma_data": float(consistency.get("sigma_data", 0.5))} if consistency else None
        if self.consistency and not (0 < self.consistency["sigma_min"] and 0 < self.consistency["sigma_data"]):
            raise ValueError(f"consistency scalings need sigma_min > 0 and sigma_data > 0, got {consistency}")
        self.sigma_data = float(sigma_data)  # EDM preconditioning (prediction edm / edm_v): input c_in x, output F
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        if self.clip_x0 is not None and not self.clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0, got {clip_x0}")
        # a latent model's autoencoder record (distill.latent): what its samples decode with; None in pixel space
        self.latent: dict | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the network takes."""
        c = self.net.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def num_classes(self) -> int:
        """Class labels the network knows (0: unconditional), the null class not counted."""
        return int(self.net.config.num_classes or 0)

    def with_net(self, net: nn.Module) -> Denoiser:
        """The same denoiser (schedule, parameterization, guidance, boundary condition) around another network of
        the same kind: a consistency method's target network, an EMA."""
        den = Denoiser(net, self.schedule, self.prediction, self.time_input, self.null_label, self.guidance_input,
                       self.consistency, self.clip_x0, self.sigma_data)
        den.latent = self.latent
        return den

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``(alpha, sigma)`` (computed in float32) broadcastable against ``like``, in its dtype."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(torch.float32))
        return append_dims(alpha.to(like), like.ndim), append_dims(sigma.to(like), like.ndim)

    def raw(self, x_t: Tensor, t: Tensor, labels: Tensor | None, w: Tensor | None = None) -> Tensor:
        """The network's own output (its ``prediction`` type); ``w`` only for a ``guidance_input`` network."""
        t_in = time_input(self.schedule, t.to(torch.float32), self.time_input)
        if self.prediction in EDM_PREDICTIONS:  # EDM's input scaling c_in
            x_t = edm_input(x_t, *self.alpha_sigma(t, x_t), self.sigma_data)
        out = self.net(x_t, t_in, labels) if w is None else self.net(x_t, t_in, labels, w)
        out = out.sample if hasattr(out, "sample") else out
        return out.to(x_t.dtype)  # bf16 under autocast; the sampler's arithmetic stays in x_t's precision

    def _x0(self, x_t: Tensor, t: Tensor, labels: Tensor | None, w: Tensor | None = None) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        x0 = to_x0(self.raw(x_t, t, labels, w), self.prediction, x_t, alpha, sigma, self.sigma_data)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        if self.consistency is None:
            return x0
        return consistency_output(x0, x_t, alpha, sigma, **self.consistency)

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        t = batch_times(t, x_t)
        cond = cond if cond is not None else Cond()
        if self.guidance_input:
            # One evaluation: the network gives the guided output itself; no guidance without labels.
            w = batch_times(cond.guidance if cond.labels is not None else 0.0, x_t)  # float32 (B,), as t
            return self._x0(x_t, t, cond.labels, w)
        if not cond.guided:
            return self._x0(x_t, t, cond.labels)
        if self.null_label is None:
            raise ValueError("classifier-free guidance needs a model trained with a null class")
        null = torch.full_like(cond.labels, self.null_label)
        x0 = self._x0(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond.labels, null]))
        n = x_t.shape[0]  # slices, not chunk(2): chunk's size arithmetic pins a symbolic batch when exported
        return cfg_combine(x0[:n], x0[n:], cond.guidance)

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        """The noise estimate implied by :meth:`forward`."""
        t = batch_times(t, x_t)
        alpha, sigma = self.alpha_sigma(t, x_t)
        return eps_from_x0(self(x_t, t, cond), x_t, alpha, sigma)


class DenoiserGraph(nn.Module):
    """A :class:`Denoiser` with plain tensor inputs, the form that is exported and compiled:
    ``(x_t, t)``, ``(x_t, t, labels)`` or ``(x_t, t, labels, w)`` -> ``x0_hat``, with ``t`` and ``w`` float32
    ``(B,)`` and ``labels`` int64 ``(B,)``. Which inputs exist is fixed at construction (static configuration):
    ``guided`` adds ``w`` and runs classifier-free guidance (two batched branches, or one for a ``guidance_input``
    network)."""

    def __init__(self, denoiser: Denoiser, labels: bool, guided: bool = False):
        super().__init__()
        if guided and not labels:
            raise ValueError("a guided graph needs labels")
        self.denoiser, self.labels, self.guided = denoiser, labels, guided

    @property
    def input_names(self) -> list[str]:
        return ["x_t", "t"] + ["labels"] * self.labels + ["w"] * self.guided

    def example_inputs(self, batch: int, shape: tuple[int, ...], device="cpu") -> tuple[Tensor, ...]:
        """Inputs of the right dtypes for tracing: noise, times in (0, 1), labels 0, 1, ... and w = 1."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *shape), generator=g).to(device)
        t = torch.linspace(0.05, 0.95, batch).to(device)
        inputs = [x, t]
        if self.labels:
            inputs.append((torch.arange(batch) % max(1, self.denoiser.null_label or 1)).to(device))
        if self.guided:
            inputs.append(torch.linspace(0.0, 2.0, batch).to(device))
        return tuple(inputs)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        guidance = w if self.guided else 0.0
        return self.denoiser(x_t, t, Cond(labels if self.labels else None, guidance))
