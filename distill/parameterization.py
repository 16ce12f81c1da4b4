"""Conversions between what a network predicts (eps, x0 or v) and the clean-data estimate x0.

With ``x_t = alpha x0 + sigma eps`` and ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Appendix D), for any
alpha and sigma (VP or VE):

    x0  = (x_t - sigma eps) / alpha
    x0  = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
    eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)

which reduce to ``x0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v`` on a VP schedule.
"""

from __future__ import annotations

from torch import Tensor

PREDICTIONS = ("eps", "x0", "v")


def to_x0(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The x0 estimate implied by a network output ``pred`` of type ``kind``."""
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    if kind == "v":
        return (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    raise ValueError(f"unknown prediction {kind!r}: use one of {PREDICTIONS}")


def from_x0(x0: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network output of type ``kind`` that corresponds to the clean estimate ``x0`` at ``x_t``."""
    if kind == "x0":
        return x0
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
