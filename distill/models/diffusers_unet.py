"""A diffusers ``UNet2DModel`` behind the network interface the denoiser calls, ``net(x, time_input, labels)``.

The network is diffusers' own class, built from its own config (``config.json`` of a diffusers UNet directory), so
its weights load unchanged (under the prefix ``unet.``) and a student distilled from it is a diffusers UNet again.
It takes diffusers' discrete timestep index as its time input (``time_input="index"``; fractional between the
training timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

ARCH = "diffusers-unet2d"


@dataclass
class DiffusersUNetConfig:
    """The diffusers config of the UNet (``UNet2DModel.config`` as a plain dict), stored in the model file."""

    unet: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.unet.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"sample_size {size}: only square images are supported")
            size = size[0]
        return int(size)

    @property
    def in_channels(self) -> int:
        return int(self.unet.get("in_channels", 3))

    @property
    def out_channels(self) -> int:
        return int(self.unet.get("out_channels", self.in_channels))

    @property
    def num_classes(self) -> int:
        """Class labels of a class-conditional UNet (``num_class_embeds``); 0 when unconditional."""
        return int(self.unet.get("num_class_embeds") or 0)

    guidance_embed: bool = False  # a diffusers UNet takes no guidance weight input

    def to_dict(self) -> dict[str, Any]:
        return {"unet": dict(self.unet)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusersUNetConfig:
        if not isinstance(d.get("unet"), dict):
            raise ValueError("a diffusers-unet2d config holds the UNet's diffusers config under 'unet'")
        return cls(unet=dict(d["unet"]))


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a JSON-able dict, without diffusers' private bookkeeping keys (``_class_name``...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class DiffusersUNet(nn.Module):
    """``UNet2DModel`` called as ``net(x, time_input, labels)``; returns the prediction tensor."""

    def __init__(self, config: DiffusersUNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        self.unet = UNet2DModel.from_config(config.unet)
        self.config.image_size  # noqa: B018 (a non-square sample_size is refused here, not at the first call)

    def forward(self, x: Tensor, t_in: Tensor, labels: Tensor | None = None) -> Tensor:
        class_labels = labels if self.config.num_classes else None
        return self.unet(x, t_in, class_labels=class_labels).sample
