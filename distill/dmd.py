"""Distribution matching distillation runs (DMD2): the ``distill dmd`` command's logic.

``OUT/`` is one training run of the generic trainer (``model.safetensors`` with the student card,
``train_state.safetensors`` holding the generator, its EMA, the fake score, the discriminator head and both
optimizers, ``metrics.jsonl`` with the distribution-matching, GAN, fake-score and discriminator losses). Running
the same command again resumes exactly; a finished run is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.errors import UsageError

LOG = logging.getLogger("distill")


@dataclass
class DMDOptions:
    """Settings of a DMD2 run (defaults: DMD2's recipe scaled to the small models here; see the README)."""

    steps: int = 1000  # generator updates
    gen_steps: int = 1  # the generator's sampling steps (1: one-step DMD2; 2-4: its multistep variant)
    batch_size: int = 32
    lr: float = 1e-5  # the generator's (DMD2: 2e-6 at batch 280 for a 296M ADM)
    fake_lr: float | None = None  # the fake score's [the generator's]
    head_lr: float | None = None  # the discriminator head's [the fake score's]
    fake_updates: int = 4  # fake-score / head updates per generator update (DMD2: 4)
    gan_weight: float = 3e-3  # the generator's GAN term (0: distribution matching only)
    disc_weight: float = 1e-2  # the head's GAN loss in its update
    t_min: float = 0.02
    t_max: float = 0.98
    guidance: float | None = None  # the real score's classifier-free guidance [the teacher card's]
    label_dropout: float = 0.1  # of the fake score's diffusion loss
    ema_decay: float = 0.999
    warmup: int = 0
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    ckpt_every: int = 100

    def validate(self) -> None:
        checks = [(self.steps >= 1, "--steps must be >= 1"),
                  (1 <= self.gen_steps <= 8, "--gen-steps must be in 1-8"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.lr > 0, "--lr must be > 0"),
                  (self.fake_lr is None or self.fake_lr > 0, "--fake-lr must be > 0"),
                  (self.head_lr is None or self.head_lr > 0, "--head-lr must be > 0"),
                  (self.fake_updates >= 1, "--fake-updates must be >= 1"),
                  (self.gan_weight >= 0 and self.disc_weight >= 0, "--gan-weight / --disc-weight must be >= 0"),
                  (0 < self.t_min < self.t_max <= 1, "--t-min / --t-max: need 0 < t-min < t-max <= 1"),
                  (0 <= self.label_dropout <= 1, "--label-dropout must be in [0, 1]"),
                  (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
                  (not (self.gan_weight > 0 and self.disc_weight == 0),
                   "--gan-weight with --disc-weight 0: the discriminator would never train; give it a weight or "
                   "pass --gan-weight 0")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def generator_time(init) -> tuple[str, float]:
    """``(sampler, t_g)``: how the initial student samples in one step: a consistency student from the top of its
    1-step grid, anything else by one DDIM step from the top of its card's one-step grid (t = 1 for most)."""
    from distill.checkpoint import one_step_time

    card = init.metadata.get("card") or {}
    return ("consistency" if card.get("sampler") == "consistency" else "ddim"), one_step_time(init.metadata)


def sampling_card(sampler: str, times: list[float]) -> dict:
    """The card's sampling fields for a generator on grid ``times``: a one-step generator samples as its initial
    student did (one DDIM or consistency step from ``t_g``); a K-step one with the consistency sampler (map to
    clean data, re-noise to the next grid time), and in one step from ``t_g`` as well (it is trained there too)."""
    grid = [*times, 0.0]
    return {"sampler": sampler if len(times) == 1 else "consistency", "steps": len(times), "spacing": "own",
            "timesteps": grid, "timesteps_by_steps": {"1": [times[0], 0.0], str(len(times)): grid}}


def distill_dmd(teacher_spec: str, out: Path, opts: DMDOptions, *, init: str | None = None,
                data_spec: str | None = None, command: str = "", progress: bool = True,
                log: Callable[[str], None] = LOG.info) -> Path:
    """Run (or continue) DMD2 of a one-step generator (``init``: a student, default the teacher itself) against
    ``teacher_spec`` into ``out``; returns the generator's model file."""
    from distill.checkpoint import card_guidance, load_denoiser, model_metadata, resolve_model_path
    from distill.distillation import file_sha256, run_done, teacher_data
    from distill.methods.dmd import DMDLoss
    from distill.rundir import refuse_if_locked
    from distill.training import MODEL_FILE, STATE_FILE, TrainConfig, Trainer

    opts.validate()
    out = Path(out)
    refuse_if_locked(out)
    teacher_path = resolve_model_path(teacher_spec)
    teacher = load_denoiser(teacher_path)
    init_spec = init or teacher_spec
    init_path = resolve_model_path(init_spec)
    student = load_denoiser(init_path)
    if student.schedule.config() != teacher.schedule.config():
        raise UsageError(f"--init {init_spec}: its noise schedule differs from {teacher_spec}'s; DMD needs a "
                         "generator on the teacher's schedule")
    if bool(student.num_classes) != bool(teacher.num_classes):
        raise UsageError(f"--init {init_spec}: {'class-conditional' if student.num_classes else 'unconditional'} "
                         f"while {teacher_spec} is not; pick a student of this teacher")
    w = card_guidance(teacher.metadata, opts.guidance)
    if w and teacher.null_label is None and not teacher.guidance_input:
        raise UsageError(f"--guidance {w}: {teacher_spec} has no null class for classifier-free guidance")
    data_spec, data = teacher_data(teacher, teacher_spec, data_spec)
    sampler, t_g = generator_time(student)
    loss = DMDLoss(teacher, image_shape=tuple(data.images.shape[1:]), generator_time=t_g,
                   generator_steps=opts.gen_steps, guidance=w,
                   fake_updates=opts.fake_updates, fake_lr=opts.fake_lr or opts.lr, head_lr=opts.head_lr,
                   gan_weight=opts.gan_weight, disc_weight=opts.disc_weight, t_range=(opts.t_min, opts.t_max),
                   label_dropout=opts.label_dropout, seed=opts.seed)
    sha = file_sha256(teacher_path)
    student.net.train()
    card = {"method": "dmd2", "teacher": str(teacher_spec), "parent": str(init_spec),
            "parent_sha256": file_sha256(init_path), "teacher_sha256": sha, "initialised_from": str(init_spec),
            "parameterization": student.prediction, "schedule": student.schedule.config(),
            **sampling_card(sampler, loss.generator_times),
            "guidance": w if student.guidance_input else 0.0, "distilled_guidance": w,
            "compute": {"train_steps": opts.steps, "batch_size": opts.batch_size,
                        # the real score (two branches when guided), the head's features of real and generated
                        # images per fake update, and of the generated images for the generator's GAN term
                        "teacher_forwards_per_step": (2 if w and not teacher.guidance_input else 1)
                        + (2 * opts.fake_updates if loss.head is not None else 0) + (1 if opts.gan_weight else 0),
                        "fake_updates_per_step": opts.fake_updates,
                        "fake_score_passes_per_step": {"forward_backward": opts.fake_updates, "forward": 1},
                        # at most: a multistep generator's backward simulation adds up to K - 1 per sample draw
                        "generator_forwards_per_step": (opts.fake_updates + 1) * opts.gen_steps}}
    # what a resume must match (more steps, other checkpoint intervals continue the same run)
    # (gen_steps 1 is left out, as runs made before it existed lack it)
    record = {k: v for k, v in asdict(opts).items()
              if k not in ("steps", "ckpt_every") and not (k == "gen_steps" and v == 1)}
    meta = {**model_metadata(student), "method": {**loss.describe(), **record, "teacher_sha256": sha},
            "card": card, "command": command}
    cfg = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, warmup=opts.warmup,
                      lr_decay="constant", grad_clip=opts.grad_clip, ema_decay=opts.ema_decay, bf16=opts.bf16,
                      seed=opts.seed, ckpt_every=opts.ckpt_every)
    state = out / STATE_FILE
    if run_done(out, opts.steps):
        log(f"dmd2 of {init_spec} against {teacher_spec}: training done ({out / MODEL_FILE})")
    else:
        log(f"dmd2 of {init_spec} against {teacher_spec}: {'resuming' if state.exists() else 'training'} "
            f"{opts.steps} generator steps into {out} ({opts.fake_updates} fake-score updates each)")
        Trainer(student, loss, data, cfg, out, meta).run(resume=state.exists(), progress=progress, desc="dmd2")
    return out / MODEL_FILE
