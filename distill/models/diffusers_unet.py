"""A diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` behind the network interface the denoiser calls,
``net(x, time_input, labels)``.

The network is diffusers' own class, built from its own config (``config.json`` of a diffusers UNet directory), so
its weights load unchanged (under the prefix ``unet.``) and a student distilled from it is a diffusers UNet again.
It takes diffusers' discrete timestep index as its time input (``time_input="index"``; fractional between the
training timesteps).

A ``UNet2DConditionModel`` takes precomputed conditioning: a table of ``encoder_hidden_states`` rows (``K x L x D``,
e.g. K prompts' text-encoder outputs, computed elsewhere: no text encoder is loaded), stored in the model file as
the buffer ``conditioning``, plus an optional null row (the unconditional embedding, for classifier-free guidance)
as row ``K``. Row ``k`` is class label ``k``: ``--classes`` picks rows and ``--guidance`` guides against the null
row, through the same label machinery as a class-conditional model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ARCH = "diffusers-unet2d"


@dataclass
class DiffusersUNetConfig:
    """The diffusers config of the UNet (``UNet2DModel.config`` as a plain dict), stored in the model file."""

    unet: dict[str, Any] = field(default_factory=dict)
    kind: str = "UNet2DModel"  # or "UNet2DConditionModel"
    conditioning: list[int] | None = None  # the conditioning table's shape [rows, L, D] (null row included)
    null_row: bool = False  # the table's last row is the null (unconditional) embedding

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
        """Class labels: a conditional UNet's conditioning rows (the null row not counted), a class-conditional
        ``UNet2DModel``'s ``num_class_embeds``; 0 when unconditional."""
        if self.kind == "UNet2DConditionModel":
            return int(self.conditioning[0]) - int(self.null_row)
        return int(self.unet.get("num_class_embeds") or 0)

    @property
    def null_label(self) -> int | None:
        """The label of the null row (classifier-free guidance), or None."""
        return self.num_classes if self.kind == "UNet2DConditionModel" and self.null_row else None

    guidance_embed: bool = False  # a diffusers UNet takes no guidance weight input

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"unet": dict(self.unet)}
        if self.kind != "UNet2DModel":
            d.update(kind=self.kind, conditioning=list(self.conditioning), null_row=self.null_row)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusersUNetConfig:
        if not isinstance(d.get("unet"), dict):
            raise ValueError("a diffusers-unet2d config holds the UNet's diffusers config under 'unet'")
        kind = d.get("kind", "UNet2DModel")
        if kind not in ("UNet2DModel", "UNet2DConditionModel"):
            raise ValueError(f"kind {kind!r}: UNet2DModel or UNet2DConditionModel")
        table = d.get("conditioning")
        if kind == "UNet2DConditionModel" and not (isinstance(table, list) and len(table) == 3
                                                   and all(isinstance(v, int) and v > 0 for v in table)):
            raise ValueError("a UNet2DConditionModel config needs its conditioning table's shape [rows, L, D]")
        return cls(unet=dict(d["unet"]), kind=kind, conditioning=list(table) if table else None,
                   null_row=bool(d.get("null_row", False)))


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a JSON-able dict, without diffusers' private bookkeeping keys (``_class_name``...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class DiffusersUNet(nn.Module):
    """``UNet2DModel`` or ``UNet2DConditionModel`` called as ``net(x, time_input, labels)``; returns the
    prediction tensor. A conditional UNet looks its ``encoder_hidden_states`` up in the conditioning table (the null
    row when ``labels`` is None)."""

    def __init__(self, config: DiffusersUNetConfig):
        super().__init__()
        import diffusers

        self.config = config
        self.unet = getattr(diffusers, config.kind).from_config(config.unet)
        self.config.image_size  # noqa: B018 (a non-square sample_size is refused here, not at the first call)
        if config.kind == "UNet2DConditionModel":
            self.register_buffer("conditioning", torch.zeros(config.conditioning))

    def forward(self, x: Tensor, t_in: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.config.kind == "UNet2DConditionModel":
            if labels is None:
                if self.config.null_label is None:
                    raise ValueError("this conditional UNet has no null row; pass class labels (conditioning rows)")
                labels = torch.full((x.shape[0],), self.config.null_label, dtype=torch.long, device=x.device)
            states = self.conditioning[labels].to(x.dtype)
            return self.unet(x, t_in, encoder_hidden_states=states).sample
        class_labels = labels if self.config.num_classes else None
        return self.unet(x, t_in, class_labels=class_labels).sample
