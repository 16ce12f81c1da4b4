"""Domain feature extractors: a small CNN classifier per dataset, trained on the real images by our own code.

Its penultimate activations (``features``, 128-d) give a fast Fréchet distance (FD) that understands digits far
better than ImageNet's Inception does, and its logits give the class accuracy of conditional samples and a
domain Inception Score. Weights ship in ``benchmarks/weights/<dataset>-classifier.safetensors`` with a card
beside them; retrain with ``python -m benchmarks.classifier --data mnist``.

The held-out split is fixed (a seeded permutation of the dataset; the last ``holdout`` images), so the accuracy
on the card is reproducible and never measured on training images.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checkpoint import atomic_write, load_tensors, save_tensors
from distill.data import ImageDataset, load_dataset
from distill.errors import UsageError

WEIGHTS = Path(__file__).parent / "weights"
FORMAT = "distill.classifier/1"


@dataclass
class ClassifierConfig:
    dataset: str
    image_size: int
    in_channels: int
    num_classes: int
    width: int = 32
    feature_dim: int = 128
    holdout: int = 1000
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 2  # random translation augmentation, pixels
    seed: int = 0


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitClassifier(nn.Module):
    """Two (or three, from 16 px up) conv stages, global average pooling, a 128-d feature layer, logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        stages = [_block(cfg.in_channels, w), nn.MaxPool2d(2), _block(w, 2 * w)]
        if cfg.image_size >= 16:
            stages += [nn.MaxPool2d(2), _block(2 * w, 4 * w)]
        self.body = nn.Sequential(*stages)
        width = 4 * w if cfg.image_size >= 16 else 2 * w
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(width, cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: Tensor) -> Tensor:
        """x in [-1, 1], (N, C, H, W) -> (N, feature_dim)."""
        return self.feature(self.body(x).mean((2, 3), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(f)


def split_indices(n: int, holdout: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed (seeded) split into training and held-out indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - holdout], perm[n - holdout:]


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``shift`` pixels (background -1 fills the border)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return shifted.gather(3, cols)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train_classifier(data: ImageDataset, cfg: ClassifierConfig, progress: bool = True) -> tuple[DigitClassifier, dict]:
    """Train on the non-held-out images; report held-out accuracy."""
    if data.labels is None:
        raise UsageError(f"{data.name}: a domain classifier needs class labels")
    torch.manual_seed(cfg.seed)
    model = DigitClassifier(cfg)
    train_idx, test_idx = split_indices(len(data), cfg.holdout, cfg.seed)
    x, y = data.images[train_idx], data.labels[train_idx]
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], cfg.shift, gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            acc = accuracy(model, data.images[test_idx], data.labels[test_idx])
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}", flush=True)
    report = {"heldout_accuracy": accuracy(model, data.images[test_idx], data.labels[test_idx]),
              "train_accuracy": accuracy(model, x, y), "train_images": len(x), "heldout_images": len(test_idx),
              "train_seconds": round(time.time() - start, 1)}
    return model.eval(), report


def save_classifier(path: Path, model: DigitClassifier, report: dict) -> None:
    # save_tensors writes atomically (temp file + rename), as checkpoints are.
    meta = {"format": FORMAT, "config": asdict(model.cfg), "report": report}
    save_tensors(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)


def load_classifier(dataset: str, path: Path | None = None) -> DigitClassifier:
    """The shipped classifier of ``dataset`` (or one at ``path``)."""
    path = Path(path) if path else WEIGHTS / f"{dataset}-classifier.safetensors"
    if not path.is_file():
        shipped = sorted(p.name.split("-classifier")[0] for p in WEIGHTS.glob("*-classifier.safetensors"))
        raise UsageError(f"{path}: no domain classifier for '{dataset}' (shipped: {', '.join(shipped)}); "
                         f"train one with python -m benchmarks.classifier --data {dataset}")
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: not a distill classifier file (format {meta.get('format')!r})")
    model = DigitClassifier(ClassifierConfig(**meta["config"]))
    model.load_state_dict(tensors)
    model.report = meta.get("report", {})
    return model.eval().requires_grad_(False)


CARD = """# Domain classifier: {dataset}

Feature extractor for the fast Fréchet distance (FD, on the {feature_dim}-d penultimate layer), the class accuracy
of conditional samples and the domain Inception Score in `distill eval`. Trained by our own code on the real images.

| | |
|---|---|
| data | `{dataset}`: {n} images, {shape}, {num_classes} classes |
| split | fixed seeded permutation (seed {seed}); last {holdout} images held out, {train_images} used for training |
| architecture | CNN: width {width}, conv stages with batch norm, global average pool, {feature_dim}-d ReLU features, dropout 0.3, linear head; {params:,} parameters |
| training | AdamW (weight decay 1e-4), one-cycle lr {lr}, {epochs} epochs, batch {batch_size}, random shifts of up to {shift} px, label smoothing 0.05 |
| time | {train_seconds} s on {machine} |
| **held-out accuracy** | **{heldout_accuracy:.2%}** ({heldout_images} images) |
| training accuracy | {train_accuracy:.2%} |

Reproduce: `{command}`
"""


def main(argv: list[str] | None = None) -> None:
    import platform

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="digits | mnist | folder:PATH | npz:PATH")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--holdout", type=int, default=None)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    data = load_dataset(args.data)
    c, h, _ = data.shape
    defaults = {"digits": dict(holdout=297, epochs=40), "mnist": dict(holdout=1000, epochs=12)}
    extra = {**defaults.get(data.name, {}),
             **{k: v for k, v in dict(epochs=args.epochs, holdout=args.holdout).items() if v is not None}}
    cfg = ClassifierConfig(dataset=data.name, image_size=h, in_channels=c, num_classes=data.num_classes, **extra)
    model, report = train_classifier(data, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    save_classifier(args.out / f"{data.name}-classifier.safetensors", model, report)
    command = "python -m benchmarks.classifier --data " + args.data + "".join(
        f" --{k} {v}" for k, v in dict(epochs=args.epochs, holdout=args.holdout).items() if v is not None)
    card = CARD.format(n=len(data), shape="x".join(map(str, data.shape)),
                       params=sum(p.numel() for p in model.parameters()), command=command,
                       machine=f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})",
                       **asdict(cfg), **report)
    atomic_write(args.out / f"{data.name}-classifier.md", lambda tmp: Path(tmp).write_text(card))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
