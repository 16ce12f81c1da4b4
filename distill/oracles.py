"""Closed-form oracles: the exact denoiser and probability-flow map of Gaussian data.

For ``x0 ~ N(mu, Sigma)`` everything a sampler needs is known exactly, so a sampler run with
:class:`GaussianDenoiser` in place of a network must reproduce ``mu`` and ``Sigma`` up to its own
discretization error. Used by the tests and by ``benchmarks/sampler_exactness.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.schedules import Schedule


class GaussianDenoiser:
    """``E[x0 | x_t]`` for ``x0 ~ N(mu, Sigma)``, on flat ``(B, d)`` states; counts its calls (the NFE)."""

    def __init__(self, schedule: Schedule, mu: Tensor, cov: Tensor):
        self.schedule, self.mu, self.cov = schedule, mu.double(), cov.double()
        self.calls = 0

    def __call__(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        eye = torch.eye(self.mu.numel(), dtype=torch.float64)
        out = torch.empty_like(x_t)
        for a in torch.unique(alpha):
            sel = alpha == a
            s = sigma[sel][0]
            # E[x0 | x_t] = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x_t - a mu)
            gain = a * self.cov @ torch.linalg.inv(a**2 * self.cov + s**2 * eye)
            out[sel] = (self.mu + (x_t[sel].double() - a * self.mu) @ gain.T).to(out.dtype)
        return out


def gaussian_flow_map(schedule: Schedule, mu: Tensor, cov: Tensor, x_T: Tensor, t_max: float = 1.0) -> Tensor:
    """The probability-flow ODE's exact endpoint from ``x_T`` at ``t_max``.

    Per eigen-direction ``s^2`` of ``Sigma``, on the VE-equivalent state:
    ``x0 - mu = sqrt(s^2 / (s^2 + sigma_T^2)) (x_T / alpha_T - mu)``.
    """
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t_max, dtype=torch.float64))
    s2, u = torch.linalg.eigh(cov.double())
    gain = u @ torch.diag((s2 / (s2 + (sigma / alpha) ** 2)).sqrt()) @ u.T
    return mu + (x_T.double() / alpha - mu) @ gain.T


def example_gaussian() -> tuple[Tensor, Tensor]:
    """A 3-d Gaussian with correlated, unequal variances (eigenvalues from about 0.01 to 0.6)."""
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    a = torch.tensor([[0.6, 0.2, 0.0], [0.1, 0.4, 0.3], [0.0, -0.2, 0.5]], dtype=torch.float64)
    return mu, a @ a.T + 0.01 * torch.eye(3, dtype=torch.float64)
