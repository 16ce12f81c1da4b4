"""The native UNet: residual blocks, attention at chosen resolutions, sinusoidal time embedding, class
embedding with a null class for classifier-free guidance (after Ho et al. 2020 and Dhariwal & Nichol 2021)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; stored in every checkpoint's metadata."""

    image_size: int = 32
    in_channels: int = 1
    out_channels: int = 1
    channels: int = 32  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get self-attention
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional; otherwise label num_classes is the null class
    time_embed_dim: int | None = None  # default 4 * channels
    guidance_embed: bool = False  # takes the guidance weight w as an input (guidance-distilled students)
    # the w embedding multiplied by w, so it is exactly zero at w = 0 for any trained weights (students made before
    # this was added keep the ungated embedding: False when their config lacks it)
    guidance_gate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        size = self.image_size
        for _ in self.channel_mult[:-1]:
            if size % 2:
                raise ValueError(f"image_size {self.image_size} cannot be halved {len(self.channel_mult) - 1} "
                                 "times: use fewer channel_mult levels or pad the images")
            size //= 2
        if self.channels < 4 or any(m < 1 for m in self.channel_mult):
            raise ValueError("channels must be >= 4 and every channel_mult >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["guidance_gate"]:  # absent from configs stored before the gate: they must compare equal
            del d["guidance_gate"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        d = dict(d)
        for k in ("channel_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _groups(ch: int) -> int:
    return math.gcd(32, ch) if ch >= 8 else 1


# The guidance weight is embedded like time, scaled so that w in [0, 10] spans the range 1000 t spans for time.
GUIDANCE_EMBED_SCALE = 100.0
# The name prefix of the w embedding's parameters (``UNet.guidance_mlp``): what a guidance student adds to its teacher.
GUIDANCE_EMBED_PARAMS = "guidance_mlp."


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; DDPM's time embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a per-channel scale and shift (Dhariwal & Nichol)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions, residual."""

    def __init__(self, ch: int, num_heads: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"{ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def _fp32_ends(mixed: bool, x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off around the UNet's ends (the conditioning embeddings, the first convolution, the output head)
    when it is on: there bf16 rounding would be as large as the differences that consistency and DMD training
    learn from (``benchmarks/results/numerics.md``: at the smallest noise levels bf16 rounding of the whole network
    is 4-7x the consistency signal and its gradient's cosine to fp32's 0.63-0.67; with fp32 ends 0.9-1.4x and
    0.85-0.99). These layers are a few percent of the network's work; without autocast this is a no-op."""
    if mixed:
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class UNet(nn.Module):
    """``UNet(config)(x, t_in, labels) -> prediction`` with the same shape as ``x``.

    ``t_in`` is whatever scalar time input the denoiser's convention gives (e.g. ``1000 t``), embedded in float32;
    ``labels`` are class indices, ``None`` or the null index ``num_classes`` meaning unconditional; ``w`` is the
    guidance weight, used only with ``config.guidance_embed``.
    """

    # the ends in fp32 under autocast (see _fp32_ends); off only to measure what the whole network in bf16 gives
    fp32_ends: bool = True

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        ch, emb_dim = c.channels, c.time_embed_dim or 4 * c.channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.guidance_mlp = None
        if c.guidance_embed:
            # Added to the time embedding (Meng et al. 2023); zero-initialised output, so a student copied from its
            # teacher (with_guidance_embedding) starts as exactly the teacher, for every w.
            self.guidance_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[2].weight)
            nn.init.zeros_(self.guidance_mlp[2].bias)
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, c.dropout)])
                cur = ch * mult
                if res in c.attn_resolutions:
                    block.append(Attention(cur, c.num_heads))
                self.down.append(block)
                skip_chs.append(cur)
            if level < len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, c.dropout), Attention(cur, c.num_heads),
                                  ResBlock(cur, cur, emb_dim, c.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_chs.pop(), ch * mult, emb_dim, c.dropout)])
                cur = ch * mult
                if res in c.attn_resolutions:
                    block.append(Attention(cur, c.num_heads))
                if level > 0 and i == c.num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(block)

        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, c.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, t_in: Tensor, labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        mixed = self.fp32_ends and torch.is_autocast_enabled(x.device.type)
        with _fp32_ends(mixed, x):
            emb, h = self._embed(x.float() if mixed else x, t_in, labels, w)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        with _fp32_ends(mixed, x):
            return self.conv_out(F.silu(self.norm_out(h.float() if mixed else h)))

    def _embed(self, x: Tensor, t_in: Tensor, labels: Tensor | None, w: Tensor | None) -> tuple[Tensor, Tensor]:
        """The conditioning embedding (time, guidance weight, class) and the first convolution's output."""
        t_in = torch.as_tensor(t_in, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t_in, self.config.channels).to(x.dtype))
        if self.guidance_mlp is not None:
            w = torch.zeros_like(t_in) if w is None else torch.as_tensor(w, device=x.device).reshape(-1).expand(
                x.shape[0])
            g = self.guidance_mlp(timestep_embedding(GUIDANCE_EMBED_SCALE * w, self.config.channels).to(x.dtype))
            emb = emb + (g * w.to(g.dtype)[:, None] if self.config.guidance_gate else g)
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(labels.long())
        return emb, self.conv_in(x)


def with_guidance_embedding(net: UNet) -> UNet:
    """A copy of ``net`` that also takes the guidance weight ``w``: same weights, plus a zero-initialised ``w``
    embedding gated by ``w`` (exactly zero at ``w = 0`` whatever training does to it), so it gives ``net``'s output
    for every ``w`` until trained (guidance distillation's start) and at ``w = 0`` after."""
    from dataclasses import replace

    student = UNet(replace(net.config, guidance_embed=True, guidance_gate=True)).to(next(net.parameters()).device)
    missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(GUIDANCE_EMBED_PARAMS) for k in missing):
        raise ValueError(f"cannot copy weights into a guidance student: missing {missing}, unexpected {unexpected}")
    return student.train(net.training)
