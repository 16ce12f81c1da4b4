"""The generic training loop: AdamW with warmup, gradient clipping, an optional EMA, optional bf16 autocast,
accelerate for several devices, atomic safetensors checkpoints, exact resume, a progress bar and ``metrics.jsonl``.

It trains whatever :class:`~distill.denoiser.Denoiser` it is given against whatever loss object it is given
(:class:`~distill.losses.Loss`; the loss's own state is checkpointed with the run). The batch order of step ``k``
is seeded from ``(seed, k)`` and every other random draw (noise, timesteps, label dropout, dropout) from
``(seed, k, rank)``, so a resumed run continues exactly as an uninterrupted one would and each process of a
data-parallel run draws its own noise.

Failing safely: a NaN or Inf loss or gradient stops the run (exit 1) before the optimizer step, keeping the last
good checkpoint; one run at a time holds the run directory's lock; Ctrl-C and SIGTERM stop at the end of the
current step, after a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distill.checkpoint import (
    STATE_FORMAT,
    atomic_write,
    load_tensors,
    non_finite,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_model,
    save_tensors,
)
from distill.data import ImageDataset
from distill.denoiser import Denoiser
from distill.errors import Terminated, TrainingDiverged, UsageError
from distill.rundir import remove_stale_temp_files, run_lock

MODEL_FILE, STATE_FILE, METRICS_FILE = "model.safetensors", "train_state.safetensors", "metrics.jsonl"
LOG = logging.getLogger("distill")  # notes: the CLI prints them, a library caller configures logging


def close_process_group() -> None:
    """Tear down the process group of an ``accelerate launch`` (or ``torchrun``) before the interpreter exits: left
    to the interpreter's teardown, gloo's threads can abort the process ("terminate called without an active
    exception", SIGABRT) after all its work is done. Every process first waits for the others, so none tears its
    connections down while a peer still uses them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
    ema_decay: float = 0.999  # 0 = no EMA: the model file holds the trained weights themselves
    bf16: bool = False  # bf16 autocast (CPU or GPU)
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25
    # parameter-name prefix -> learning-rate multiplier (e.g. a new zero-initialised layer that must catch up)
    lr_scale: dict[str, float] = field(default_factory=dict)

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
            (self.log_every >= 1, "--log-every must be >= 1"),
            (0 <= self.seed < 2**32, "--seed must be in 0 to 2**32 - 1"),
            (all(math.isfinite(v) and v > 0 for v in self.lr_scale.values()), "learning-rate scales must be > 0"),
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


def param_groups(net: torch.nn.Module, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one per learning-rate scale (the first matching name prefix
    in ``lr_scale`` wins), the rest at scale 1; a single group when ``lr_scale`` is empty."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            scale = next((float(v) for k, v in lr_scale.items() if name.startswith(k)), 1.0)
            groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: epochs are seeded permutations of the dataset, read consecutively."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = pos // n, pos % n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100_003 + e) % 2**32))
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


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step ``step`` on process ``rank``; rank 0 keeps the single-process stream. torch's CPU generator
    keeps only the low 32 bits of a seed, so the rank offset must live there: rank r's seeds are rank 0's a
    billion steps later, which no run reaches."""
    return (seed * 1_000_003 + step + rank * 1_000_000_007) % 2**32


class Trainer:
    """Runs ``loss`` on ``model`` over ``data`` and writes a run directory ``out``.

    Args:
        model: the denoiser being trained (its ``net`` is what gets optimized and saved).
        loss: a loss object ``loss(model, x0, labels, generator) -> per-sample loss``, usually a
            :class:`~distill.losses.Loss` whose state is saved with the run and whose ``update`` runs after
            each optimizer step.
        data: the training images.
        cfg: optimization settings (``cfg.ema_decay = 0``: no EMA).
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
        self.cfg, self.data, self.out = cfg, data, Path(out)
        self.metadata = {**metadata, "train": asdict(cfg), "data": data.describe()}
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                       cpu=not torch.cuda.is_available())
        self.model = model
        self.loss = loss.to(self.accelerator.device) if isinstance(loss, torch.nn.Module) else loss
        self.optimizer = torch.optim.AdamW(param_groups(model.net, cfg.lr_scale), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.net, self.optimizer = self.accelerator.prepare(model.net, self.optimizer)
        model.net = self.net  # the loss calls the prepared (possibly DDP-wrapped) network through the denoiser
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.accelerator.unwrap_model(self.net), multi_avg_fn=ema_with_warmup(cfg.ema_decay),
                use_buffers=True)
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint on disk
        self._stop: int | None = None  # a signal received during fit()
        self._window: list[float] = []  # losses of the steps since the last log line (saved: a resume logs alike)

    # -- checkpoints -------------------------------------------------------------------------------------

    def inference_net(self) -> torch.nn.Module:
        """What ``model.safetensors`` holds: the EMA when there is one, else the trained network."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.net)

    def save(self) -> None:
        """Write the slim model, then the training state, each atomically; refuse non-finite weights.

        The state is the checkpoint's commit point: a run killed between the two renames leaves the state of the
        previous checkpoint (its resume rewrites the model), never a state at this step beside an older model."""
        if not self.accelerator.is_main_process:
            return
        net = self.accelerator.unwrap_model(self.net)
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if hasattr(self.loss, "state_tensors"):
            tensors.update({f"loss.{k}": v for k, v in self.loss.state_tensors().items()})
        opt_tensors, groups = optimizer_to_tensors(self.optimizer)
        tensors.update(opt_tensors)
        bad = non_finite(tensors)
        if bad:
            raise TrainingDiverged(f"step {self.step}: {bad[0]} holds NaN or Inf; {self._kept()}")
        meta = {**self.metadata, "format": STATE_FORMAT, "step": self.step, "optimizer_param_groups": groups,
                "log_window": list(self._window)}
        save_model(self.out / MODEL_FILE, self.inference_net(), {**self.metadata, "step": self.step})
        save_tensors(self.out / STATE_FILE, tensors, meta)
        self.saved_step = self.step

    def _kept(self) -> str:
        if self.saved_step is None:
            return f"nothing was saved in {self.out}; restart with a lower --lr"
        return (f"kept the last good checkpoint (step {self.saved_step}) in {self.out}; resume it with a lower --lr "
                "or restart")

    def resume(self) -> None:
        path = self.out / STATE_FILE
        tensors, meta = load_tensors(path)
        if meta.get("format") != STATE_FORMAT:
            raise UsageError(f"{path}: not a distill training state; remove it or choose another --out")
        if int(meta.get("step", 0)) > self.cfg.steps:  # nothing to train, and the model file must not be rewritten
            raise UsageError(f"{path}: the run is already at step {int(meta['step'])}, past --steps {self.cfg.steps}; "
                             f"give --steps {int(meta['step'])} or more to continue it, or choose another --out")
        stored_as = json.loads(json.dumps(self.metadata))  # tuples read back as lists
        for key in ("model", "diffusion", "method"):
            if meta.get(key) != stored_as.get(key):
                raise UsageError(f"{path}: was trained with a different {key} config; resume with the same "
                                 "options or choose another --out")
        if (self.ema is None) != (not any(k.startswith("ema.") for k in tensors)):
            raise UsageError(f"{path}: was trained {'without' if self.ema is not None else 'with'} an EMA; resume "
                             "with the same --ema-decay setting or choose another --out")
        net = self.accelerator.unwrap_model(self.net)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if hasattr(self.loss, "load_state_tensors"):
            self.loss.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")}, str(path))
        optimizer_from_tensors(self.optimizer, tensors, meta["optimizer_param_groups"])
        self.step = self.saved_step = int(meta["step"])
        self._window = [float(v) for v in meta.get("log_window") or []]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop log lines past the resumed step (and a line a killed write cut short), so metrics.jsonl reads as
        one uninterrupted run."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= self.step:
                keep.append(line)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep)))

    # -- the loop ----------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        seed = step_seed(cfg.seed, self.step, acc.process_index)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global RNG
        generator = torch.Generator().manual_seed(seed)
        idx = batch_indices(len(self.data), cfg.batch_size, self.step, cfg.seed)  # the global batch, all ranks
        idx = idx[acc.process_index::acc.num_processes]  # each process takes its shard of the global batch
        x0 = self.data.images[idx].to(acc.device)
        labels = self.data.labels[idx].to(acc.device) if self.data.labels is not None else None
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.net.train()
        with acc.autocast():
            loss = self.loss(self.model, x0, labels, generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = float(acc.clip_grad_norm_(self.net.parameters(),
                                              cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        loss_value = float(loss.detach())
        # The gradient norm is all-reduced, so every process takes this branch at the same step.
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingDiverged(f"step {self.step + 1}: the loss is {loss_value:g} (gradient norm {grad_norm:g}),"
                                   f" the run diverged; {self._kept()}")
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(self.net))
        self.step += 1
        if hasattr(self.loss, "update"):
            self.loss.update(acc.unwrap_model(self.net), self.step)
        # a loss with parts of its own (DMD2: distribution matching, GAN, fake score) reports them per step
        return {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, **getattr(self.loss, "metrics", {})}

    @contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the run at the end of the current step (a step interrupted midway would leave
        half-updated weights); a second Ctrl-C stops at once, without saving."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> int | None:
        """The signal that asked this run to stop, agreed on by all processes (one may have received it first)."""
        if self.accelerator.num_processes == 1:
            return self._stop
        flag = torch.tensor([self._stop or 0], device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, reduction="max")) or None

    def fit(self, progress: bool = True, desc: str = "train") -> dict[str, float]:
        """Train to ``cfg.steps``, checkpointing every ``ckpt_every`` steps, at the end and when stopped by a
        signal (then :class:`KeyboardInterrupt` or :class:`~distill.errors.Terminated` is raised)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc=desc, dynamic_ncols=True)
        last: dict[str, float] = {}
        running, t0, timed = self._window, time.perf_counter(), 0  # timed: steps since t0 (this process)
        try:
            with self._deferred_signals(), open(self.out / METRICS_FILE, "a") as log:
                while self.step < cfg.steps:
                    last = self.train_step()
                    running.append(last["loss"])
                    timed += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        record = {"step": self.step, "loss": sum(running) / len(running),
                                  "grad_norm": last["grad_norm"], "lr": last["lr"],
                                  "sec_per_step": (time.perf_counter() - t0) / timed,
                                  **{k: v for k, v in last.items() if k not in ("loss", "grad_norm", "lr")}}
                        if self.accelerator.is_main_process:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        running.clear()
                        t0, timed = time.perf_counter(), 0
                    stop = self._stop_requested()
                    if stop is not None:
                        self.save()  # a stopped run resumes exactly where it stopped
                        raise Terminated() if stop == signal.SIGTERM else KeyboardInterrupt()
                    if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save()
                self.save()
        finally:
            bar.close()
        return last

    def run(self, resume: bool = False, progress: bool = True, desc: str = "train") -> dict[str, float]:
        """Start (or with ``resume``, continue) the run in ``out``, holding the run directory's lock throughout."""
        self._check_run_dir(resume)  # before anything is created
        if not self.accelerator.is_main_process:
            if resume:
                self.resume()
            return self.fit(progress=False, desc=desc)
        with run_lock(self.out):
            self._check_run_dir(resume)  # again under the lock: another run may have started meanwhile
            remove_stale_temp_files(self.out)
            if resume:
                self.resume()
            elif (self.out / METRICS_FILE).is_file() and (self.out / METRICS_FILE).stat().st_size:
                LOG.info(f"note: {self.out / METRICS_FILE} holds the log of a run that saved no checkpoint; starting "
                         "it afresh")
                self._truncate_metrics()  # at step 0: every line of the dead run goes
            return self.fit(progress, desc)

    def _check_run_dir(self, resume: bool) -> None:
        state = self.out / STATE_FILE
        if state.exists() and not resume:
            raise UsageError(f"{self.out}: already holds a training run; pass --resume to continue it or choose "
                             "another --out")
        if resume and not state.exists():
            raise UsageError(f"{state}: nothing to resume; drop --resume to start a new run")
