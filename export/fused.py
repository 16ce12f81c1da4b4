"""A few-step sampler as one graph: initial noise (plus the per-step noise the sampler draws), labels and ``w`` in,
the final image out, so that a deployment makes one call per batch instead of one per step.

The graph runs the very sampler function ``distill sample`` runs (``distill.samplers.SAMPLERS``) on the student's
own grid; only the random draws change hands: a :class:`ReplayNoise` hands the sampler slices of the ``noise``
input in the order a :class:`~distill.samplers.PerSampleGenerator` would have drawn them, so the fused graph fed
:func:`fused_noise` of some seeds gives the Python loop's samples for those seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.denoiser import Cond, Denoiser
from distill.samplers import SAMPLERS, PerSampleGenerator, prior_scale

MAX_FUSED_STEPS = 8  # beyond this the graph holds k copies of the network for little gain in call overhead


class ReplayNoise:
    """Stands in for a :class:`~distill.samplers.PerSampleGenerator`: the ``k``-th draw returns ``noise[:, k]``."""

    def __init__(self, noise: Tensor | None):
        self.noise, self.used = noise, 0

    def randn(self, shape: Sequence[int], *, dtype=torch.float32, device="cpu") -> Tensor:
        if self.noise is None:
            self.used += 1  # counting mode (see noise_slots)
            return torch.zeros((1, *shape), dtype=dtype, device=device)
        out = self.noise[:, self.used]
        self.used += 1
        return out.to(device=device, dtype=dtype)


def noise_slots(denoiser: Denoiser, sampler: str, timesteps: Tensor, shape: Sequence[int]) -> int:
    """How many noise draws ``sampler`` makes on ``timesteps`` after the prior (0 for a deterministic one)."""
    counter = ReplayNoise(None)
    x = torch.zeros((1, *shape))
    SAMPLERS[sampler](lambda x_t, t, cond: torch.zeros_like(x_t), x, timesteps, schedule=denoiser.schedule,
                      generator=counter)
    return counter.used


def fused_noise(seeds: Sequence[int], shape: Sequence[int], slots: int) -> Tensor:
    """The ``noise`` input for ``seeds``: ``(B, 1 + slots, *shape)``, the prior draw first, then the sampler's draws,
    each row from its own seed exactly as :func:`distill.samplers.generate` draws them."""
    generator = PerSampleGenerator(seeds)
    return torch.stack([generator.randn(shape) for _ in range(1 + slots)], dim=1)


class FusedSampler(nn.Module):
    """``(noise[, labels][, w]) -> image``: ``sampler`` on ``timesteps`` (``k + 1`` decreasing times ending at 0)
    around ``denoiser``, unrolled into one graph (then, for a latent model given its ``decoder``, the decode).

    ``noise`` is ``(B, 1 + slots, C, H, W)`` standard normal (see :func:`fused_noise`); the prior is
    ``prior_scale * noise[:, 0]`` (:func:`~distill.samplers.prior_scale`). Like
    :class:`~distill.denoiser.DenoiserGraph`, which inputs exist is fixed here.
    """

    def __init__(self, denoiser: Denoiser, sampler: str, timesteps: Sequence[float], shape: Sequence[int],
                 labels: bool, guided: bool = False, decoder: nn.Module | None = None):
        super().__init__()
        self.decoder = decoder  # a latent model's decoder (distill.latent.Decoder): the graph ends in images
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}")
        if guided and not labels:
            raise ValueError("a guided graph needs labels")
        ts = torch.as_tensor(list(timesteps), dtype=torch.float64)
        if len(ts) - 1 > MAX_FUSED_STEPS:
            raise ValueError(f"a fused graph unrolls at most {MAX_FUSED_STEPS} steps, not {len(ts) - 1}")
        # The times, rounded to float32 (what the network sees in any case), so that no float64 constant enters
        # the graph; the sampler's alpha/sigma arithmetic on them runs on the host and is folded into constants.
        self.times = ts.to(torch.float32).tolist()
        self.denoiser, self.sampler, self.shape = denoiser, sampler, tuple(shape)
        self.labels, self.guided = labels, guided
        self.slots = noise_slots(denoiser, sampler, torch.tensor(self.times, dtype=torch.float64), self.shape)
        self.prior_sigma = prior_scale(denoiser.schedule, float(self.times[0]))

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def input_names(self) -> list[str]:
        return ["noise"] + ["labels"] * self.labels + ["w"] * self.guided

    def example_inputs(self, batch: int) -> tuple[Tensor, ...]:
        inputs = [fused_noise(range(batch), self.shape, self.slots)]
        if self.labels:
            inputs.append(torch.arange(batch) % max(1, self.denoiser.null_label or 1))
        if self.guided:
            inputs.append(torch.linspace(0.0, 2.0, batch))
        return tuple(inputs)

    def forward(self, noise: Tensor, labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        cond = Cond(labels if self.labels else None, w if self.guided else 0.0)
        x = self.prior_sigma * noise[:, 0]
        # One 0-d tensor per time, made here from Python floats: under torch.export they stay known constants (a
        # (k+1)-element tensor would become a fake tensor whose values the host-side arithmetic cannot read).
        ts = [torch.tensor(t, dtype=torch.float32) for t in self.times]
        x = SAMPLERS[self.sampler](self.denoiser, x, ts, schedule=self.denoiser.schedule, cond=cond,
                                   generator=ReplayNoise(noise[:, 1:]))
        return x if self.decoder is None else self.decoder(x)
