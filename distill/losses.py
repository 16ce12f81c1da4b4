"""Training objectives as loss objects: ``loss(model, x0, labels, generator) -> per-sample loss``.

The generic loop in :mod:`distill.training` knows nothing about them (as EDM's ``EDMLoss``); each method
(teacher training now, distillation later) adds a loss, not a loop. A loss is an ``nn.Module`` so that it can own
state: a frozen teacher, a target network (EMA or stop-gradient), buffers; a curriculum is a function of the step.
Everything in its state dict but the modules it names ``frozen`` is saved in ``train_state.safetensors`` and
restored by ``--resume``, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill.denoiser import Denoiser
from distill.errors import UsageError
from distill.parameterization import from_x0


def lerp_weights_(target: nn.Module, online: nn.Module, weight: float) -> None:
    """``target <- target + weight (online - target)`` over parameters and floating buffers: the EMA update
    (``weight = 1 - decay``); ``weight = 1`` copies (a stop-gradient target)."""
    with torch.no_grad():
        t = [v for v in target.state_dict().values() if v.is_floating_point()]
        o = [v for v in online.state_dict().values() if v.is_floating_point()]
        torch._foreach_lerp_(t, [v.to(t[0].dtype) for v in o], weight)


class Loss(nn.Module):
    """Base class of training objectives.

    Subclasses implement ``forward(model, x0, labels, generator) -> per-sample loss`` and may override
    :meth:`update` (after each optimizer step) and :meth:`describe` (what a resume must match). Modules named in
    ``frozen`` (a teacher, loaded again from its own file) are left out of the saved state.
    """

    frozen: ClassVar[tuple[str, ...]] = ()

    def update(self, net: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (counted from 1), with the trained network (unwrapped): update a target
        network, advance a curriculum. Nothing by default."""

    def describe(self) -> dict[str, Any]:
        """The loss's settings, recorded in checkpoints; a resume with different settings is refused."""
        return {"name": type(self).__name__}

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.frozen)

    def state_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint saves: the state dict minus the frozen modules."""
        skip = self._frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        """Restore :meth:`state_tensors`; a mismatch is a one-line UsageError naming ``source``."""
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith(self._frozen_prefixes())]
        if missing or unexpected:
            raise UsageError(f"{source}: its loss state does not match this method (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); resume with the same options or choose another --out")


class TargetNetwork(nn.Module):
    """A frozen copy of the trained network, moved toward it after each step: an EMA target (consistency
    distillation, decay mu) or, with decay 0, the stop-gradient copy of improved consistency training."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net).requires_grad_(False)

    def update(self, online: nn.Module, decay: float) -> None:
        lerp_weights_(self.net, online, 1.0 - decay)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def diffuse(model: Denoiser, x0: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, alpha_t, sigma_t)`` with ``x_t = alpha_t x0 + sigma_t eps``, ``eps`` drawn from ``generator``; alpha
    and sigma broadcast over the images."""
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    alpha, sigma = model.alpha_sigma(t, x0)
    return alpha * x0 + sigma * eps, alpha, sigma


def drop_labels(labels: Tensor | None, null_label: int | None, p: float, generator: torch.Generator):
    """Replace each label by the null class with probability ``p`` (classifier-free guidance training)."""
    if labels is None or null_label is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


class DiffusionLoss(Loss):
    """Denoising loss of a diffusion teacher (Ho et al. 2020), in the network's own output space.

    ``t ~ U(0, 1)``, ``x_t = alpha_t x0 + sigma_t eps``; the target is what the network should predict
    (eps, x0 or v) for the true x0, so eps-prediction gives DDPM's simple loss and v-prediction the
    "SNR + 1" weighting of Salimans & Ho (2022).
    """

    def __init__(self, label_dropout: float = 0.1):
        super().__init__()
        self.label_dropout = label_dropout

    def describe(self) -> dict[str, Any]:
        return {"name": "diffusion", "label_dropout": self.label_dropout}

    def forward(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        n = x0.shape[0]
        t = torch.rand(n, generator=generator, dtype=torch.float64).float().to(x0.device)
        x_t, alpha, sigma = diffuse(model, x0, t, generator)
        labels = drop_labels(labels, model.null_label, self.label_dropout, generator)
        pred = model.raw(x_t, t, labels)
        target = from_x0(x0, model.prediction, x_t, alpha, sigma, model.sigma_data)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
