"""Progressive and guidance distillation runs: the `distill progressive` command's logic.

A run directory holds one training run per stage, each a complete :class:`~distill.training.Trainer` run
(``model.safetensors`` with the student card, ``train_state.safetensors``, ``metrics.jsonl``):

    OUT/plan.json          the settings, checked when the command is run again
    OUT/guidance/          stage 0 (with a guidance range): the w-input student, sampled with the start grid
    OUT/steps-32/ ...      one round per halving, down to OUT/steps-<target>/

Stage ``k``'s teacher is stage ``k - 1``'s model file (frozen) and its student starts as a copy of it, so running
the same command again skips finished stages and resumes the interrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from distill.checkpoint import file_sha256  # noqa: F401  (re-exported: the students' cards record it)
from distill.errors import UsageError
from distill.methods.progressive import TEACHER_MAPS

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging

PLAN_FILE, PLAN_FORMAT = "plan.json", "distill.progressive/1"
GUIDANCE_STAGE = "guidance"


@dataclass
class ProgressiveOptions:
    """Settings of a progressive (and optionally guidance) distillation run."""

    start_steps: int = 64  # the teacher's DDIM step count where it has converged: round 1 halves it
    first_map: str = "ddim"  # round 1's teacher map: two DDIM steps, or its DPM-Solver++(2M) on start_steps
    target_steps: int = 1
    round_steps: tuple[int, ...] = (1000,)  # optimizer steps per round, in round order; the last value repeats
    guidance_range: tuple[float, float] | None = None  # (lo, hi): guidance distillation first, w drawn per example
    guidance_steps: int = 1000  # optimizer steps of the guidance stage
    guidance_lr_scale: float = 30.0  # the guidance stage's learning rate for the new w embedding, x --lr
    guidance: float | None = None  # without a range: the fixed w distilled into the student [teacher card's]
    prediction: str | None = None  # the student's: v or x0 [the teacher's; v for an eps teacher]
    label_dropout: float = 0.0
    lr: float = 1e-4
    batch_size: int = 128
    warmup: int = 0
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    ckpt_every: int = 100

    def validate(self) -> None:
        rounds = math.log2(self.start_steps / self.target_steps) if self.target_steps >= 1 else -1
        if self.target_steps < 1 or rounds < 1 or rounds != int(rounds):
            raise UsageError(f"--start-steps {self.start_steps} must be --target-steps {self.target_steps} times a "
                             "power of 2 (at least 2), e.g. --start-steps 64 --target-steps 1")
        if self.first_map not in TEACHER_MAPS:
            raise UsageError(f"--first-map {self.first_map}: use one of {', '.join(TEACHER_MAPS)}")
        if not self.round_steps or any(s < 1 for s in self.round_steps):
            raise UsageError("--round-steps: give one step count >= 1, or one per round (e.g. 200,400,800)")
        check_guidance_options(self.guidance_range, self.guidance, example="0,4")
        if self.prediction not in (None, "v", "x0"):
            raise UsageError(f"--prediction {self.prediction}: a few-step student predicts v or x0 (eps-prediction "
                             "fails at few steps, Salimans & Ho 2022)")

    def rounds(self) -> list[int]:
        """The student step count of each round: start/2, start/4, ... target."""
        out, n = [], self.start_steps
        while n > self.target_steps:
            n //= 2
            out.append(n)
        return out

    def steps_of_round(self, k: int) -> int:
        return self.round_steps[min(k, len(self.round_steps) - 1)]

    def plan_record(self) -> dict[str, Any]:
        """What must match when the command runs again (the target and checkpoint interval may change)."""
        d = asdict(self)
        d.pop("target_steps")
        d.pop("ckpt_every")
        if self.first_map == "ddim":
            d.pop("first_map")  # as recorded by runs made before there was a choice
        if self.guidance_range is None:
            d.pop("guidance_lr_scale")  # no guidance stage
        return json.loads(json.dumps(d))


def check_guidance_options(guidance_range: tuple[float, float] | None, guidance: float | None,
                           example: str) -> None:
    """A guidance range must be finite with LO <= HI, and excludes a fixed ``--guidance`` (one rule for every
    distillation command; ``example`` is the range the message suggests)."""
    if guidance_range is None:
        return
    lo, hi = guidance_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise UsageError(f"--guidance-range {lo},{hi}: give LO,HI with LO <= HI, e.g. {example}")
    if guidance is not None:
        raise UsageError("--guidance: with --guidance-range the student takes w as an input; drop --guidance")


@dataclass
class Stage:
    name: str  # "guidance" or "steps-N"
    student_steps: int | None  # None: the guidance stage
    train_steps: int
    first_round: bool = False  # the first progressive round (its teacher map is ProgressiveOptions.first_map)


def plan_stages(opts: ProgressiveOptions, guidance_stage: bool) -> list[Stage]:
    stages = [Stage(GUIDANCE_STAGE, None, opts.guidance_steps)] if guidance_stage else []
    return stages + [Stage(f"steps-{n}", n, opts.steps_of_round(k), k == 0) for k, n in enumerate(opts.rounds())]


def make_student(parent, *, guidance_input: bool, prediction: str, seed: int = 0, dropout: float = 0.0,
                 consistency: dict[str, float] | None = None):
    """A student that starts as ``parent``: a copy of its network with dropout ``dropout`` (off by default, as
    Salimans & Ho), plus a zero-initialised ``w`` embedding when it should take the guidance weight as an input (its
    hidden layer drawn from ``seed``, so a rerun builds the same student); with ``consistency``, behind the
    consistency boundary condition."""
    import torch

    from distill.denoiser import Denoiser
    from distill.models.unet import UNet, with_guidance_embedding

    net = copy.deepcopy(parent.net)
    if isinstance(net, UNet):
        state = net.state_dict()
        net = UNet(replace(net.config, dropout=dropout))
        net.load_state_dict(state)
        if guidance_input and not net.config.guidance_embed:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = with_guidance_embedding(net)
    elif guidance_input and not parent.guidance_input:
        raise UsageError("guidance distillation adds a w embedding to the native UNet only; this teacher's network "
                         f"is a {type(net).__name__}")
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    student = Denoiser(net.train(), copy.deepcopy(parent.schedule), prediction, parent.time_input,
                       parent.null_label, guidance_input=guidance_input or parent.guidance_input,
                       consistency=consistency,
                       clip_x0=parent.clip_x0,  # a diffusers teacher's clip_sample: its students clip as it does
                       sigma_data=parent.sigma_data)
    student.latent = parent.latent  # a latent teacher's students work on (and decode) the same latents
    return student


def student_card(*, stage: Stage, index: int, total: int, parent: str, parent_sha256: str, teacher: str,
                 student, opts: ProgressiveOptions, guidance_default: float, guidance_range, baked: float | None,
                 teacher_forwards: int) -> dict[str, Any]:
    """What a student file tells its users: how it was made and how to sample it (exact timesteps)."""
    from distill.samplers import make_timesteps

    steps = stage.student_steps or opts.start_steps
    card = {
        "method": "guidance" if stage.student_steps is None else "progressive",
        "stage": stage.name, "index": index, "stages": total,
        "round": 0 if stage.student_steps is None else round(math.log2(opts.start_steps / stage.student_steps)),
        "parent": parent, "parent_sha256": parent_sha256,
        "teacher": teacher, "parameterization": student.prediction, "schedule": student.schedule.config(),
        "sampler": "ddim", "steps": steps, "spacing": "uniform",
        "timesteps": [float(t) for t in make_timesteps(student.schedule, steps, "uniform")],
        "guidance": guidance_default, "guidance_range": list(guidance_range) if guidance_range else None,
        "label_dropout": opts.label_dropout,
        "compute": {"train_steps": stage.train_steps, "batch_size": opts.batch_size,
                    "teacher_forwards_per_step": teacher_forwards},
    }
    if stage.first_round and opts.first_map != "ddim":
        card["teacher_map"] = f"{opts.first_map} on the {opts.start_steps}-step uniform grid"
    if baked is not None:
        card["distilled_guidance"] = baked
    return card


def run_done(stage_dir: Path, train_steps: int) -> bool:
    """Whether the training run in ``stage_dir`` is finished: a state at ``train_steps`` or beyond and a model file
    written at that same step. A model of another step (a run killed between writing its two files), or one that
    does not read, is not done: resuming the run rewrites it from the state."""
    from distill.checkpoint import read_metadata
    from distill.training import MODEL_FILE, STATE_FILE

    state, model = stage_dir / STATE_FILE, stage_dir / MODEL_FILE
    if not (state.exists() and model.exists()):
        return False
    step = int(read_metadata(state).get("step", -1))
    if step < train_steps:
        return False
    try:
        return read_metadata(model).get("step") == step
    except UsageError:  # an unreadable model file: the resume writes it again
        return False


def _check_plan(out: Path, record: dict[str, Any]) -> None:
    from distill.checkpoint import atomic_write

    path = out / PLAN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{path}: unreadable; remove {out} or choose another --out") from None
        if not isinstance(old, dict) or old.get("format") != PLAN_FORMAT:
            raise UsageError(f"{path}: not a distill progressive plan; choose another --out")
        for key in sorted(set(old) | set(record)):
            if key != "format" and old.get(key) != record.get(key):
                raise UsageError(f"{out}: holds a distillation with {key} = {old.get(key)!r}, not {record.get(key)!r};"
                                 " run with the same settings to continue it, or choose another --out")
        return
    stray = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if stray:
        raise UsageError(f"{out}: is not empty and holds no distillation plan ({stray[0]}); choose another --out")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"format": PLAN_FORMAT, **record}, indent=2)))


@dataclass
class GuidancePlan:
    """How a distillation treats classifier-free guidance, from the teacher and the options."""

    range: tuple[float, float] | None  # a student taking w as an input, for w in [lo, hi]
    fixed: float | None  # without a range: the w the teacher is guided with (baked into the student)
    baked: float | None  # the w baked into the student, recorded on its card
    default: float  # the student card's default w


def guidance_plan(teacher, teacher_spec: str, guidance_range: tuple[float, float] | None,
                  guidance: float | None) -> GuidancePlan:
    """The guidance a student of ``teacher`` is distilled for: a range (a ``w``-input student; a teacher that
    already takes ``w`` keeps its own range), else a fixed ``w`` (the option, else the teacher card's default)."""
    tcard = teacher.metadata.get("card") or {}
    conditional = teacher.null_label is not None and bool(getattr(teacher.net, "config", None) and
                                                         teacher.net.config.num_classes)
    grange = guidance_range
    if grange is None and teacher.guidance_input:
        grange = tuple(tcard.get("guidance_range") or (0.0, 0.0))
    if grange is not None and not conditional:
        raise UsageError(f"--guidance-range: {teacher_spec} is unconditional, so there is nothing to guide")
    fixed = None if grange is not None else float(guidance if guidance is not None else tcard.get("guidance", 0.0))
    if fixed and not conditional:
        raise UsageError(f"--guidance: {teacher_spec} is unconditional, so it cannot be guided; drop --guidance")
    baked = fixed if fixed else tcard.get("distilled_guidance")
    default_w = float(tcard.get("guidance", 0.0)) if grange is None else \
        min(max(float(tcard.get("guidance", 0.0)), grange[0]), grange[1])
    return GuidancePlan(grange, fixed, baked, default_w)


def student_prediction(teacher) -> str:
    """A few-step student predicts what its teacher does, or v for an eps teacher (eps fails at few steps)."""
    # an EDM-preconditioned teacher's students keep its preconditioning (their network takes c_in x)
    return teacher.prediction if teacher.prediction in ("v", "x0", "edm", "edm_v") else "v"


def teacher_data(teacher, teacher_spec: str, data_spec: str | None):
    """``(spec, dataset)``: ``data_spec``, else the teacher's recorded training data, checked against the images
    the teacher makes."""
    from distill.data import load_dataset

    data_spec = data_spec or (teacher.metadata.get("data") or {}).get("spec")
    if not data_spec:
        raise UsageError(f"{teacher_spec}: does not record its training data; pass --data")
    from distill.latent import encode_dataset, output_shape

    data = load_dataset(data_spec)
    shape = output_shape(teacher)
    if tuple(data.shape) != shape:
        raise UsageError(f"--data {data_spec}: images are {'x'.join(map(str, data.shape))} but {teacher_spec} "
                         f"makes {'x'.join(map(str, shape))}; distill on the teacher's own data")
    rows = teacher.num_classes
    if rows and data.num_classes != rows:
        # a teacher whose classes are not the data's (a conditional UNet's conditioning rows): each image is paired
        # with row i mod K, so every row is distilled, in a fixed order
        from dataclasses import replace

        import torch

        LOG.info(f"note: --data {data_spec} has {data.num_classes or 'no'} classes but {teacher_spec} has {rows} "
                 f"conditioning rows; image i is distilled with row i mod {rows}")
        data = replace(data, labels=torch.arange(len(data)) % rows, num_classes=rows, class_names=None)
    if teacher.latent:  # a latent teacher distills on the data's latents (encoded once, cached)
        data = encode_dataset(data, teacher.latent)
    return data_spec, data


def distill_progressive(teacher_spec: str, out: Path, opts: ProgressiveOptions, *, data_spec: str | None = None,
                        command: str = "", progress: bool = True,
                        log: Callable[[str], None] = LOG.info) -> list[Path]:
    """Run (or continue) a progressive distillation of ``teacher_spec`` (a model file, run directory or shipped
    name) into ``out``; returns the model file of every stage, in order."""
    from distill.checkpoint import load_denoiser, model_metadata, resolve_model_path
    from distill.losses import Loss
    from distill.methods.progressive import GuidanceLoss, ProgressiveLoss
    from distill.models.unet import GUIDANCE_EMBED_PARAMS
    from distill.rundir import refuse_if_locked, remove_stale_temp_files, run_lock
    from distill.training import MODEL_FILE, STATE_FILE, TrainConfig, Trainer

    opts.validate()
    out = Path(out)
    refuse_if_locked(out)
    teacher_path = resolve_model_path(teacher_spec)
    teacher = load_denoiser(teacher_path)
    plan = guidance_plan(teacher, teacher_spec, opts.guidance_range, opts.guidance)
    grange, fixed, baked, default_w = plan.range, plan.fixed, plan.baked, plan.default
    prediction = opts.prediction or student_prediction(teacher)
    data_spec, data = teacher_data(teacher, teacher_spec, data_spec)
    stages = plan_stages(opts, guidance_stage=grange is not None and not teacher.guidance_input)
    record = {"teacher_sha256": file_sha256(teacher_path), "data": data_spec, **opts.plan_record()}
    paths: list[Path] = []
    with run_lock(out):
        _check_plan(out, record)
        remove_stale_temp_files(out)
        parent_path, parent_name = teacher_path, str(teacher_spec)
        for index, stage in enumerate(stages, 1):
            stage_dir = out / stage.name
            what = (f"stage {index}/{len(stages)} {stage.name}: " +
                    ("w-input student over w in [{:g}, {:g}]".format(*grange) if stage.student_steps is None else
                     f"{2 * stage.student_steps} -> {stage.student_steps} steps"))
            if run_done(stage_dir, stage.train_steps):
                log(f"{what}: done ({stage_dir / MODEL_FILE})")
            else:
                parent = load_denoiser(parent_path)
                student = make_student(parent, guidance_input=grange is not None, prediction=prediction,
                                       seed=opts.seed)
                first = parent_path == teacher_path
                w = grange if grange is not None else (fixed if first else 0.0)
                loss: Loss = (GuidanceLoss(parent, grange, opts.label_dropout) if stage.student_steps is None else
                              ProgressiveLoss(parent, stage.student_steps, w, opts.label_dropout,
                                              teacher_map=opts.first_map if stage.first_round else "ddim"))
                branches = 2 if (not parent.guidance_input and (grange is not None or w)) else 1
                per_step = (1 if stage.student_steps is None else 2) * branches
                sha = file_sha256(parent_path)
                card = student_card(stage=stage, index=index, total=len(stages), parent=parent_name,
                                    parent_sha256=sha, teacher=str(teacher_spec), student=student, opts=opts,
                                    guidance_default=default_w, guidance_range=grange, baked=baked,
                                    teacher_forwards=per_step)
                meta = {
                    **model_metadata(student),
                    "method": {**loss.describe(), "stage": stage.name, "parent_sha256": sha},
                    "card": card, "command": command,
                }
                cfg = TrainConfig(steps=stage.train_steps, batch_size=opts.batch_size, lr=opts.lr,
                                  warmup=opts.warmup, lr_decay="linear", grad_clip=opts.grad_clip, ema_decay=0.0,
                                  bf16=opts.bf16, seed=opts.seed, ckpt_every=opts.ckpt_every,
                                  lr_scale={GUIDANCE_EMBED_PARAMS: opts.guidance_lr_scale}
                                  if stage.student_steps is None else {})
                resume = (stage_dir / STATE_FILE).exists()
                log(f"{what}: {'resuming' if resume else 'training'} {stage.train_steps} steps")
                Trainer(student, loss, data, cfg, stage_dir, meta).run(resume=resume, progress=progress,
                                                                      desc=stage.name)
            parent_path, parent_name = stage_dir / MODEL_FILE, str(stage_dir)
            paths.append(parent_path)
    return paths
