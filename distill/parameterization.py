"""Conversions between what a network predicts (eps, x0 or v) and the clean-data estimate x0.

With ``x_t = alpha x0 + sigma eps`` and ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Appendix D), for any
alpha and sigma (VP or VE):

    x0  = (x_t - sigma eps) / alpha
    x0  = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
    eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)

which reduce to ``x0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v`` on a VP schedule.

``edm`` and ``edm_v`` are EDM's preconditioned output F (Karras et al. 2022, Table 1; diffusers' EDM schedulers with
``prediction_type`` ``epsilon`` and ``v_prediction``): ``x0 = c_skip x~ + c_out F`` (``- c_out F`` for ``edm_v``) on
the VE-equivalent state ``x~ = x_t / alpha`` and noise level ``sigma / alpha``, with ``sigma_data``; such a network
also takes its input scaled, ``c_in x~`` (:func:`edm_input`).
"""

from __future__ import annotations

from torch import Tensor

PREDICTIONS = ("eps", "x0", "v", "edm", "edm_v")
EDM_PREDICTIONS = ("edm", "edm_v")


def _edm(x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str, sigma_data: float):
    """``(x~, c_skip, signed c_out)`` of EDM's preconditioning at ``x_t``."""
    x_ve = x_t / alpha
    c_skip, c_out = edm_scalings(sigma / alpha, sigma_data)
    return x_ve, c_skip, (c_out if kind == "edm" else -c_out)


def edm_input(x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """What an EDM-preconditioned network takes: ``c_in x~ = (x_t / alpha) / sqrt((sigma/alpha)^2 + sigma_d^2)``."""
    return (x_t / alpha) / ((sigma / alpha) ** 2 + sigma_data**2) ** 0.5


def to_x0(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The x0 estimate implied by a network output ``pred`` of type ``kind``."""
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    if kind == "v":
        return (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    if kind in EDM_PREDICTIONS:
        x_ve, c_skip, c_out = _edm(x_t, alpha, sigma, kind, sigma_data)
        return c_skip * x_ve + c_out * pred
    raise ValueError(f"unknown prediction {kind!r}: use one of {PREDICTIONS}")


def from_x0(x0: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The network output of type ``kind`` that corresponds to the clean estimate ``x0`` at ``x_t``."""
    if kind == "x0":
        return x0
    if kind in EDM_PREDICTIONS:
        x_ve, c_skip, c_out = _edm(x_t, alpha, sigma, kind, sigma_data)
        return (x0 - c_skip * x_ve) / c_out
    eps = eps_from_x0(x0, x_t, alpha, sigma)
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown prediction {kind!r}: use one of {PREDICTIONS}")


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``eps = (x_t - alpha x0) / sigma``."""
    return (x_t - alpha * x0) / sigma


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that a per-sample ``(B,)`` tensor broadcasts over images."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def consistency_scalings(sigma, sigma_min: float, sigma_data: float = 0.5):
    """Boundary-condition scalings of a consistency model (Song et al. 2023, Appendix C):
    ``f(x, sigma) = c_skip x + c_out F(c_in x, ...)`` with ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``
    exactly, so ``f(x, sigma_min) = x``. ``sigma`` is the VE-equivalent noise level (``sigma / alpha`` of a VP
    schedule), a float or a per-sample tensor; returns ``(c_skip, c_out, c_in)`` of the same kind."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM's preconditioning (Karras et al. 2022, Table 1): ``D(x, sigma) = c_skip x + c_out F`` with
    ``c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)`` and ``c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)`` on the
    VE-equivalent noise level. A VP v-prediction network is exactly this form with ``sigma_d = 1`` and ``F = -v``."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_output(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_min: float,
                       sigma_data: float = 0.5) -> Tensor:
    """A consistency model's output ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F`` (Song et al. 2023) from a
    network's clean estimate ``x0`` at ``x_t = alpha x0 + sigma eps`` (alpha, sigma broadcastable).

    Everything is on the VE-equivalent state ``x~ = x_t / alpha`` and noise level ``sigma~ = sigma / alpha`` (clamped
    to ``sigma_min``, below which the model is the identity). ``F`` is the network in EDM form,
    ``F = (x0 - c_skip^EDM x~) / c_out^EDM``, so that a student initialised from a teacher starts as the teacher
    wherever ``sigma~ >> sigma_min``; the boundary scalings then make ``f(x, sigma_min) = x~`` exactly
    (``c_out(sigma_min) = 0``)."""
    sig = (sigma / alpha).clamp(min=sigma_min)
    x_ve = x_t / alpha
    e_skip, e_out = edm_scalings(sig, sigma_data)
    c_skip, c_out, _ = consistency_scalings(sig, sigma_min, sigma_data)
    return c_skip * x_ve + c_out * ((x0 - e_skip * x_ve) / e_out)
