"""A teacher that is neither distill's UNet nor a diffusers model, built by a Python factory
(``factory:factory_teacher:build``, used by tests/test_diffusers.py)."""

import torch
from torch import nn

from distill.factory import FactoryModel


class TinyEpsNet(nn.Module):
    """Two convolutions with the time input added as a channel bias: predicts eps from (x, t)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 16, 3, padding=1)
        self.time = nn.Linear(1, 16)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t, labels=None):
        h = self.inp(x) + self.time(t[:, None].to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def build():
    torch.manual_seed(0)
    return FactoryModel(TinyEpsNet(), {"name": "cosine"}, prediction="eps", time_input="t", image_shape=(1, 8, 8),
                        card={"sampler": "ddim", "steps": 8}, data="digits")
