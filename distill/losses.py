"""Training objectives as small loss objects: ``loss(model, x0, labels, generator) -> per-sample loss``.

The generic loop in :mod:`distill.training` knows nothing about them (as EDM's ``EDMLoss``); each method
(teacher training now, distillation later) adds a loss, not a loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.denoiser import Denoiser
from distill.parameterization import from_x0


def drop_labels(labels: Tensor | None, null_label: int | None, p: float, generator: torch.Generator):
    """Replace each label by the null class with probability ``p`` (classifier-free guidance training)."""
    if labels is None or null_label is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


@dataclass
class DiffusionLoss:
    """Denoising loss of a diffusion teacher (Ho et al. 2020), in the network's own output space.

    ``t ~ U(0, 1)``, ``x_t = alpha_t x0 + sigma_t eps``; the target is what the network should predict
    (eps, x0 or v) for the true x0, so eps-prediction gives DDPM's simple loss and v-prediction the
    "SNR + 1" weighting of Salimans & Ho (2022).
    """

    label_dropout: float = 0.1

    def __call__(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        n = x0.shape[0]
        t = torch.rand(n, generator=generator, dtype=torch.float64).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        alpha, sigma = model.alpha_sigma(t, x0)
        x_t = alpha * x0 + sigma * eps
        labels = drop_labels(labels, model.null_label, self.label_dropout, generator)
        pred = model.raw(x_t, t, labels)
        target = from_x0(x0, model.prediction, x_t, alpha, sigma)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

