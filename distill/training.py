"""The generic training loop: AdamW with warmup, gradient clipping, EMA, optional bf16 autocast, accelerate
for several devices, atomic safetensors checkpoints, exact resume, a progress bar and ``metrics.jsonl``.

It trains whatever :class:`~distill.denoiser.Denoiser` it is given against whatever loss object it is given.
Every random draw of step ``k`` (batch order, noise, dropout) is seeded from ``(seed, k)``, so a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distill.checkpoint import (
    STATE_FORMAT,
    atomic_write,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_model,
    save_tensors,
)
from distill.data import ImageDataset
from distill.denoiser import Denoiser
from distill.errors import UsageError

MODEL_FILE, STATE_FILE, METRICS_FILE = "model.safetensors", "train_state.safetensors", "metrics.jsonl"


@dataclass
class TrainConfig:
    """Optimization settings (stored in every checkpoint)."""

    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 200  # linear warmup steps
    lr_decay: str = "constant"  # after warmup: constant, linear (to 0 at `steps`) or cosine
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False  # bf16 autocast (CPU or GPU)
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.lr_decay in ("constant", "linear", "cosine"), "--lr-decay must be constant, linear or cosine"),
            (0.0 <= self.ema_decay < 1.0, "--ema-decay must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)"),
            (self.ckpt_every >= 1, "--ckpt-every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.lr_decay == "linear":
        return cfg.lr * (1.0 - frac)
    if cfg.lr_decay == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: epochs are seeded permutations of the dataset, read consecutively."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = pos // n, pos % n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """EMA decay with warmup, ``min(decay, (1 + k) / (10 + k))`` after ``k`` updates, so that a short run's
    average is not dominated by its random initial weights (0.999^1500 still weighs the init by 22%)."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ema_with_warmup(decay: float):
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` using :func:`ema_decay_at`."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        d = ema_decay_at(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


class Trainer:
    """Runs ``loss`` on ``model`` over ``data`` and writes a run directory ``out``.

    Args:
        model: the denoiser being trained (its ``net`` is what gets optimized and saved).
        loss: a loss object ``loss(model, x0, labels, generator) -> per-sample loss``.
        data: the training images.
        cfg: optimization settings.
        out: run directory for ``model.safetensors``, ``train_state.safetensors`` and ``metrics.jsonl``.
        metadata: written into both checkpoint files (model and diffusion config, data, method, command).
    """

    def __init__(self, model: Denoiser, loss, data: ImageDataset, cfg: TrainConfig, out: Path,
                 metadata: dict[str, Any]):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cfg.validate()
        # accelerate keeps one process-wide state; a second Trainer in the same process (a recipe's next stage,
        # a test) may want another mixed precision, so start from a fresh one (the distributed setup is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        self.cfg, self.loss, self.data, self.out = cfg, loss, data, Path(out)
        self.metadata = {**metadata, "train": asdict(cfg), "data": data.describe()}
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                       cpu=not torch.cuda.is_available())
        self.model = model
        params = [p for p in model.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.net, self.optimizer = self.accelerator.prepare(model.net, self.optimizer)
        model.net = self.net  # the loss calls the prepared (possibly DDP-wrapped) network through the denoiser
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.accelerator.unwrap_model(self.net), multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the training state, then the slim EMA model, each atomically."""
        if not self.accelerator.is_main_process:
            return
        net = self.accelerator.unwrap_model(self.net)
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt_tensors, groups = optimizer_to_tensors(self.optimizer)
        tensors.update(opt_tensors)
        meta = {**self.metadata, "format": STATE_FORMAT, "step": self.step, "optimizer_param_groups": groups}
        save_tensors(self.out / STATE_FILE, tensors, meta)
        save_model(self.out / MODEL_FILE, self.ema.module, {**self.metadata, "step": self.step})

    def resume(self) -> None:
        path = self.out / STATE_FILE
        tensors, meta = load_tensors(path)
        if meta.get("format") != STATE_FORMAT:
            raise UsageError(f"{path}: not a distill training state; remove it or choose another --out")
        stored_as = json.loads(json.dumps(self.metadata))  # tuples read back as lists
        for key in ("model", "diffusion", "method"):
            if meta.get(key) != stored_as.get(key):
                raise UsageError(f"{path}: was trained with a different {key} config; resume with the same "
                                 "options or choose another --out")
        net = self.accelerator.unwrap_model(self.net)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer_from_tensors(self.optimizer, tensors, meta["optimizer_param_groups"])
        self.step = int(meta["step"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop log lines past the resumed step, so metrics.jsonl reads as one uninterrupted run."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= self.step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep)))

    # -- the loop ----------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        seed = step_seed(cfg.seed, self.step)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global RNG
        generator = torch.Generator().manual_seed(seed)
        idx = batch_indices(len(self.data), cfg.batch_size, self.step, cfg.seed)
        idx = idx[acc.process_index::acc.num_processes]  # each process takes its shard of the global batch
        x0 = self.data.images[idx].to(acc.device)
        labels = self.data.labels[idx].to(acc.device) if self.data.labels is not None else None
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        with acc.autocast():
            loss = self.loss(self.model, x0, labels, generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.ema.update_parameters(acc.unwrap_model(self.net))
        self.step += 1
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr}

    def fit(self, progress: bool = True) -> dict[str, float]:
        """Train to ``cfg.steps``, checkpointing every ``ckpt_every`` steps, on interruption and at the end."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        running, t0 = [], time.perf_counter()
        try:
            with open(self.out / METRICS_FILE, "a") as log:
                while self.step < cfg.steps:
                    last = self.train_step()
                    running.append(last["loss"])
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        record = {"step": self.step, "loss": sum(running) / len(running),
                                  "grad_norm": last["grad_norm"], "lr": last["lr"],
                                  "sec_per_step": (time.perf_counter() - t0) / len(running)}
                        if self.accelerator.is_main_process:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        running, t0 = [], time.perf_counter()
                    if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save()
        except KeyboardInterrupt:
            self.save()  # a killed run resumes where it stopped
            raise
        finally:
            bar.close()
        self.save()
        return last
