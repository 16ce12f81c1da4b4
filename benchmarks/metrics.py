"""Sample quality: FID, KID and IS through torchmetrics, on features we extract once and cache.

Two feature extractors, never mixed in one number:

- ``inception``: the standard FID network (:mod:`benchmarks.inception`), 2048-d pool3 features, images resized to
  299 px the TF-1 bilinear way. Runs through ONNX Runtime (fp32, exported once from our module and cached), which
  is exact and fast on a CPU; ``backend="torch"`` runs the module itself (any device); ``"torch-bf16"`` runs it
  in bf16 (for GPUs and bf16-capable CPUs; FID within ~0.3 % of fp32).
- ``domain``: the dataset's own classifier (:mod:`benchmarks.classifier`), 128-d features at native resolution,
  plus logits for class accuracy and a domain Inception Score.

torchmetrics does the statistics: its ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and
``InceptionScore`` receive our features through :class:`Precomputed` (an identity "network" that reports
``num_features``), so one extraction pass feeds all three metrics. They never sync across processes
(``sync_on_compute=False``): under a sharded ``distill bench quality`` the main process holds every feature.

Reference features of real data are cached under ``$DISTILL_CACHE`` (default ``~/.cache/distill``), keyed by the
extractor, the dataset and a hash of the images. Real data splits into two fixed halves, ``A`` and ``B`` (a seeded
permutation), so ``B`` against ``A`` is the real-vs-real floor of every distance at that sample count.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.errors import UsageError
from distill.rundir import cache_dir

# torchmetrics warns that KID and IS keep all features in memory: ours are precomputed and small.
warnings.filterwarnings("ignore", message=r"Metric `(Kernel Inception Distance|InceptionScore)` will save all")

SPLITS = ("A", "B", "all")
SPLIT_SEED = 0
IS_SPLITS = 10  # the Inception Score is averaged over this many splits of the samples


class Precomputed(nn.Module):
    """Identity feature "network" for torchmetrics: features are extracted (and cached) before the metric sees them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def to_uint8_nchw(images: Tensor | np.ndarray) -> Tensor:
    """Images as uint8 NCHW: accepts uint8 NHWC/NCHW arrays or float tensors in [-1, 1] (our model outputs)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8:
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape {tuple(images.shape)}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # NHWC
        images = images.permute(0, 3, 1, 2)
    return images.contiguous()


# -- feature extractors ----------------------------------------------------------------------------------------


@dataclass
class Extractor:
    """A named feature extractor. ``info`` goes into every result it produces."""

    name: str
    info: dict
    features: Callable[[Tensor], dict[str, Tensor]]  # uint8 NCHW batch -> {"features": ..., maybe "logits": ...}
    batch_size: int = 100
    fingerprint: str = ""
    title: str = ""  # what the log calls it, e.g. "InceptionV3" [name]

    def __call__(self, images: Tensor, progress: bool = False) -> dict[str, Tensor]:
        from tqdm.auto import tqdm

        images = to_uint8_nchw(images)
        parts: dict[str, list[Tensor]] = {}
        starts = range(0, len(images), self.batch_size)
        for i in tqdm(starts, desc=f"{self.name} features", disable=not progress, leave=False):
            for key, value in self.features(images[i:i + self.batch_size]).items():
                parts.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in parts.items()}


INCEPTION_BACKENDS = ("onnxruntime", "torch", "torch-bf16")


def inception_extractor(backend: str = "onnxruntime", device: str = "cpu", bf16: bool = False) -> Extractor:
    """The FID network. ``onnxruntime`` (fp32, CPU) is the exact default; ``torch`` runs on any device;
    ``torch-bf16`` (= ``torch`` with ``bf16=True``) is the fastest on CPUs with bf16 dot products."""
    from benchmarks import inception

    if backend == "torch-bf16":
        backend, bf16 = "torch", True

    info = {"extractor": "inception", "network": inception.NAME, "resize": "tf-bilinear 299x299",
            "backend": backend, "precision": "bf16" if bf16 else "fp32"}
    if backend == "onnxruntime":
        if bf16 or device != "cpu":
            raise UsageError("the onnxruntime Inception backend is fp32 on the CPU; use torch or torch-bf16 for "
                             "bf16 or GPUs")
        sessions: dict[int, object] = {}

        def features(batch: Tensor) -> dict[str, Tensor]:
            x = inception.preprocess(batch, channels_last=False)
            channels = x.shape[1]
            if channels not in sessions:
                sessions[channels] = _inception_session(channels)
            return {"features": torch.from_numpy(sessions[channels].run(None, {"x": x.numpy()})[0])}

    elif backend == "torch":
        net = inception.InceptionV3.from_torchscript()
        net = (net.bf16() if bf16 else net).to(device, memory_format=torch.channels_last)
        net.gray_weight = net.gray_weight.to(device)

        @torch.no_grad()
        def features(batch: Tensor) -> dict[str, Tensor]:
            return {"features": net(inception.preprocess(batch.to(device)))}

    else:
        raise UsageError(f"unknown Inception backend '{backend}'; use {', '.join(INCEPTION_BACKENDS)}")
    # Reference features are cached per backend and precision: a bf16 sample set is never scored against fp32 ones.
    return Extractor("inception", info, features, batch_size=50,
                     fingerprint=f"inception-{inception.SHA1[:12]}-{backend}-{info['precision']}",
                     title="InceptionV3" + (" (bf16)" if bf16 else ""))


def _export_inception(path: Path, channels: int) -> None:
    """Export the FID network for ``channels`` input channels to ONNX at ``path`` (atomically)."""
    from benchmarks import inception
    from distill.checkpoint import atomic_write

    net = inception.InceptionV3.from_torchscript()
    example = torch.zeros(2, channels, inception.SIZE, inception.SIZE)
    atomic_write(path, lambda tmp: torch.onnx.export(
        net, (example,), tmp, dynamo=False, input_names=["x"], output_names=["features"],
        dynamic_axes={"x": {0: "n"}, "features": {0: "n"}}, opset_version=17))


def _inception_session(channels: int):
    """An ONNX Runtime session for the FID network, exported once per input channel count and cached. A cached
    file that does not load (corrupt, truncated, from a broken disk) is exported again, once."""
    import onnxruntime as ort

    from benchmarks import inception

    path = cache_dir() / f"inception-{inception.SHA1[:12]}-c{channels}.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if path.is_file():
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no useful base class
            _cache_note(path, e)
    _note(f"exporting the InceptionV3 FID network ({channels}-channel input) to ONNX once (cached in {path}); "
          "later runs reuse it")
    try:
        _export_inception(path, channels)
    except UsageError as e:  # the cache cannot be written: export to a temporary folder, use it once
        import tempfile

        _note(f"{e}; set DISTILL_CACHE to a writable folder to keep the exported network")
        with tempfile.TemporaryDirectory() as tmp:
            _export_inception(Path(tmp) / path.name, channels)
            return ort.InferenceSession(str(Path(tmp) / path.name), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _note(text: str) -> None:
    """One ``note:`` line on stderr about the cache (an entry built once, or a cache that misbehaved); the result
    is unaffected."""
    import sys

    print(f"note: {text}", file=sys.stderr)


def _cache_note(path: Path, error: BaseException) -> None:
    """Say that a cache entry was unreadable and is being rebuilt."""
    reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    _note(f"{path}: unreadable cache entry ({reason}); recomputing it")


def domain_extractor(dataset: str, device: str = "cpu") -> Extractor:
    """The dataset's own classifier: 128-d features and class logits at native resolution."""
    from benchmarks.classifier import WEIGHTS, load_classifier

    if not (WEIGHTS / f"{dataset}-classifier.safetensors").is_file():
        shipped = sorted(p.name.split("-classifier")[0] for p in WEIGHTS.glob("*-classifier.safetensors"))
        raise UsageError(f"--metrics fd, kid, is and acc need a domain classifier, and there is none for {dataset} "
                         f"(shipped: {', '.join(shipped)}); use --metrics fid,kid_inception or train one with "
                         "python -m benchmarks.classifier")
    model = load_classifier(dataset).to(device)
    c = model.cfg
    info = {"extractor": f"domain:{c.dataset}", "network": f"{c.dataset}-classifier "
            f"(held-out accuracy {model.report.get('heldout_accuracy', float('nan')):.4f})",
            "resize": "none", "backend": "torch", "precision": "fp32"}

    @torch.no_grad()
    def features(batch: Tensor) -> dict[str, Tensor]:
        if tuple(batch.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise UsageError(f"images are {tuple(batch.shape[1:])}, the {c.dataset} classifier expects "
                             f"{(c.in_channels, c.image_size, c.image_size)}; evaluate against the matching --data")
        x = batch.to(device).float() / 127.5 - 1.0
        f, logits = model.features_and_logits(x)
        return {"features": f, "logits": logits}

    digest = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values()))
    return Extractor(f"domain:{c.dataset}", info, features, batch_size=500,
                     fingerprint=f"domain-{c.dataset}-{digest.hexdigest()[:12]}", title=f"{c.dataset}-classifier")


# -- real data -------------------------------------------------------------------------------------------------


def real_split(data, split: str) -> tuple[Tensor, Tensor | None]:
    """uint8 images (and labels) of a fixed half of the dataset: ``A``, ``B`` or ``all``."""
    if split not in SPLITS:
        raise UsageError(f"--ref {split}: choose one of {', '.join(SPLITS)}")
    images = to_uint8_nchw(data.images)
    labels = data.labels
    if split != "all":
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
        half = perm[: len(images) // 2] if split == "A" else perm[len(images) // 2:]
        images = images[half]
        labels = labels[half] if labels is not None else None
    return images, labels


def features_digest(feats: dict[str, Tensor]) -> str:
    """sha256 over a feature set's names, dtypes, shapes and values: written beside a cache entry, checked on reading,
    so that flipped bytes or values swapped in with intact shapes are a miss instead of a silently wrong FD."""
    h = hashlib.sha256()
    for k in sorted(feats):
        v = feats[k].detach().cpu().contiguous()
        h.update(f"{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_features(data, split: str, extractor: Extractor, progress: bool = True) -> dict[str, Tensor]:
    """Features of a real split, computed once per (extractor, dataset, images) and cached as safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from distill.checkpoint import atomic_write

    images, _ = real_split(data, split)
    digest = hashlib.sha1(images.numpy().tobytes()).hexdigest()[:12]
    name = f"{data.name.replace(':', '_').replace('/', '_')}-{split}-{digest}"
    path = cache_dir() / "reference" / f"{extractor.fingerprint}-{name}.safetensors"
    if path.is_file():
        try:  # a cache entry that does not load or does not fit these images is a miss: recompute, overwrite
            with safe_open(str(path), "pt") as fh:  # the tensors and the checksum written with them, in one read
                recorded = (fh.metadata() or {}).get("sha256")
                feats = {k: fh.get_tensor(k) for k in fh.keys()}
            if recorded != features_digest(feats):
                raise ValueError("no checksum" if recorded is None else "checksum mismatch: its contents changed")
            f = feats["features"]
            if f.ndim != 2 or len(f) != len(images) or not torch.isfinite(f).all():
                raise ValueError(f"features of shape {tuple(f.shape)} for {len(images)} images")
            return feats
        except Exception as e:  # SafetensorError, KeyError, OSError, ValueError: all mean "rebuild it"
            _cache_note(path, e)
    of = f"{data.name} half {split}" if split != "all" else f"all of {data.name}"
    _note(f"building the {extractor.title or extractor.name} reference features of {of} once ({len(images):,} "
          f"images; cached in {path.parent}); later runs reuse them")
    feats = extractor(images, progress=progress)
    try:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in feats.items()}, tmp,
                                                 metadata={"sha256": features_digest(feats)}))
    except UsageError as e:  # an unwritable cache costs time, not the result
        _note(f"{e}; set DISTILL_CACHE to a writable folder to keep reference features")
    return feats


# -- the statistics (torchmetrics) -----------------------------------------------------------------------------


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID's formula on any features (torchmetrics ``FrechetInceptionDistance``, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID (torchmetrics ``KernelInceptionDistance``): mean and std over random subsets, seeded."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                     sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, splits: int = IS_SPLITS, seed: int = 0) -> tuple[float, float]:
    """IS (torchmetrics ``InceptionScore``) on the given classifier logits: mean and std over splits, seeded."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


METRICS = ("fd", "kid", "is", "acc", "fid", "kid_inception")
DEFAULT_METRICS = ("fd", "kid", "is", "acc", "fid")
DOMAIN_METRICS = ("fd", "kid", "is", "acc")
INCEPTION_METRICS = ("fid", "kid_inception")


@dataclass
class Quality:
    """Computes the requested metrics of image sets against one real reference split."""

    data: object  # distill.data.ImageDataset
    ref: str = "A"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    inception_backend: str = "onnxruntime"
    device: str = "cpu"
    progress: bool = True
    _extractors: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UsageError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if not self.metrics:
            raise UsageError(f"--metrics is empty: give one or more of {', '.join(METRICS)}")
        if "acc" in self.metrics and self.data.labels is None:
            raise UsageError(f"--metrics acc: dataset {self.data.name} has no labels")
        if self.inception_backend not in INCEPTION_BACKENDS:
            raise UsageError(f"--inception-backend {self.inception_backend}: choose one of "
                             f"{', '.join(INCEPTION_BACKENDS)}")
        if self.kinds() & {"inception"} and self.inception_backend == "onnxruntime" and self.device != "cpu":
            used = ", ".join(m for m in self.metrics if m in INCEPTION_METRICS)
            raise UsageError(f"--inception-backend onnxruntime runs on the CPU only, and --metrics {used} needs it "
                             f"on --device {self.device}; pass --inception-backend torch (or torch-bf16), or "
                             "--device cpu")

    def kinds(self) -> set[str]:
        """The feature extractors the requested metrics need: ``domain`` and/or ``inception``."""
        return ({"domain"} if set(self.metrics) & set(DOMAIN_METRICS) else set()) | (
            {"inception"} if set(self.metrics) & set(INCEPTION_METRICS) else set())

    def prepare(self) -> Quality:
        """Load the extractors the metrics need (a missing domain classifier fails here, before any sampling)."""
        for kind in sorted(self.kinds()):
            self.extractor(kind)
        return self

    def without(self, metric: str) -> Quality:
        """The same measurement without ``metric`` (sharing the loaded extractors)."""
        return replace(self, metrics=tuple(m for m in self.metrics if m != metric), _extractors=self._extractors)

    def min_samples(self) -> dict[str, int]:
        """The fewest samples each requested metric can be computed from: FD and KID need two (a covariance, a
        kernel between distinct samples); IS needs two per split, so that no split is a single image."""
        need = {"fd": 2, "fid": 2, "kid": 2, "kid_inception": 2, "is": 2 * IS_SPLITS, "acc": 1}
        return {m: need[m] for m in self.metrics}

    def check_sizes(self, n_fake: int, what: str = "the sample set", fix: str = "use more samples") -> None:
        """Refuse, before any sampling, a sample set (``what``, with ``n_fake`` images) or reference split too
        small for a requested metric; ``fix`` says how to get more."""
        for metric, need in self.min_samples().items():
            if n_fake < need:
                raise UsageError(f"--metrics {metric} needs at least {need} samples, but {what} gives {n_fake}; "
                                 f"{fix} or drop {metric}")
        n_ref = len(real_split(self.data, self.ref)[0]) if self.ref != "all" else len(self.data)
        for metric in ("fd", "fid", "kid", "kid_inception"):
            if metric in self.metrics and n_ref < 2:
                raise UsageError(f"--metrics {metric}: --ref {self.ref} of --data {self.data.spec or self.data.name} "
                                 f"holds {n_ref} image(s), it needs at least 2; use more real images")

    def extractor(self, kind: str) -> Extractor:
        if kind not in self._extractors:
            self._extractors[kind] = (domain_extractor(self.data.name, self.device) if kind == "domain" else
                                      inception_extractor(self.inception_backend, self.device))
        return self._extractors[kind]

    def _features(self, kind: str, images: Tensor, out: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Reference and sample features of one extractor; records the extractor and reference count in ``out``."""
        ext = self.extractor(kind)
        real = reference_features(self.data, self.ref, ext, progress=self.progress)
        out[kind] = ext.info
        out["n_ref"] = len(real["features"])
        return real, ext(images, progress=self.progress)

    def __call__(self, images: Tensor | np.ndarray, labels: Tensor | None = None) -> dict:
        """Metrics of ``images`` (uint8 or [-1, 1]); ``labels`` = the requested classes, for ``acc``."""
        images = to_uint8_nchw(images)
        out: dict = {"ref": f"{self.data.name}:{self.ref}", "n_fake": len(images)}
        want = set(self.metrics)
        if want & {"fd", "kid", "is", "acc"}:
            real, fake = self._features("domain", images, out)
            if "fd" in want:
                out["fd"] = frechet_distance(real["features"], fake["features"])
            if "kid" in want:
                out["kid"], out["kid_std"] = kernel_distance(real["features"], fake["features"])
            if "is" in want:
                out["is"], out["is_std"] = inception_score(fake["logits"])
            if "acc" in want and labels is not None:
                out["acc"] = float((fake["logits"].argmax(1) == torch.as_tensor(labels)).float().mean())
        if want & {"fid", "kid_inception"}:
            real, fake = self._features("inception", images, out)
            if "fid" in want:
                out["fid"] = frechet_distance(real["features"], fake["features"])
            if "kid_inception" in want:
                out["kid_inception"], out["kid_inception_std"] = kernel_distance(real["features"], fake["features"])
        return out
