"""Consistency distillation and consistency training runs: the `distill consistency` command's logic.

``OUT/`` is one training run (``model.safetensors`` with the student card, ``train_state.safetensors``,
``metrics.jsonl``). When training is done, a small search picks the intermediate sampling times of the 2- and
3-step samplers on a validation budget (its own seeds, against the real half B, never the evaluation seeds and
half A) and writes them into the card. Running the same command again resumes training exactly, or, when training
is complete, only repeats a search that has not been done.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from distill.errors import UsageError

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

SEARCH_SEED = 1_000_000  # validation seeds start here; evaluations use 0, 1, ...
SEARCH_REF = "B"  # validation reference: the real half that evaluations do not use
SEARCH_CANDIDATES = 8  # noise levels tried per intermediate time, before one refinement


@dataclass
class ConsistencyOptions:
    """Settings of a consistency distillation (``mode="cd"``) or consistency training (``"ct"``) run; ``None``
    fields take the mode's default (:meth:`resolved`)."""

    mode: str = "cd"
    steps: int = 2000  # optimizer steps
    scales: int | None = None  # a fixed discretization [cd: 18 (Song et al. 2023, CIFAR-10)]
    curriculum: tuple[int, int] | None = None  # the doubling curriculum (s0, s1) [ct: 10, 1280 (improved CT)]
    solver: str = "heun"  # cd: the teacher's ODE step (ddim, euler = ddim, heun)
    target_decay: float = 0.0  # the target network's EMA decay mu (0: stop-gradient, improved CT)
    metric: str = "pseudo_huber"
    weighting: str | None = None  # [cd: uniform; ct: inverse_gap]
    noise_sampling: str | None = None  # [cd: uniform; ct: ect from the teacher, lognormal from scratch]
    ect_q: float = 2.0  # ECT: the gap shrinks by q at each of 8 stages
    from_scratch: bool = False  # ct: the teacher's architecture with fresh weights (else initialised from it)
    sigma_data: float = 0.5
    dropout: float = 0.0
    guidance_range: tuple[float, float] | None = None  # cd: a w-input student for every w in [lo, hi]
    guidance_lr_scale: float = 30.0  # the new w embedding's learning rate, x lr
    guidance: float | None = None  # cd without a range: the fixed w distilled in [the teacher card's]
    prediction: str | None = None  # v or x0 [the teacher's; v for an eps teacher]
    label_dropout: float = 0.0
    lr: float = 1e-4
    batch_size: int = 128
    warmup: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # of the saved weights (0: the trained weights themselves)
    bf16: bool = False
    seed: int = 0
    ckpt_every: int = 100
    search_samples: int = 500  # 0: no search, the default Karras-spaced times
    max_steps: int = 3  # sampling times are searched for 2 .. max_steps steps
    sample_steps: int = 2  # the card's default step count

    def resolved(self) -> ConsistencyOptions:
        cd = self.mode == "cd"
        # consistency training from the teacher defaults to ECT (continuous pairs); from scratch, or given a
        # discretization, to improved CT's recipe
        discrete = self.scales is not None or self.curriculum is not None or self.from_scratch
        sampling = self.noise_sampling or ("uniform" if cd else ("lognormal" if discrete else "ect"))
        ect = sampling == "ect"
        curriculum = self.curriculum if self.curriculum is not None or self.scales is not None or cd or ect \
            else (10, 1280)
        scales = self.scales if self.scales is not None or not cd or self.curriculum is not None or ect else 18
        return replace(self, scales=scales, curriculum=curriculum,
                       weighting=self.weighting or ("uniform" if cd else "inverse_gap"), noise_sampling=sampling)

    def validate(self) -> None:
        from distill.distillation import check_guidance_options
        from distill.methods.consistency import METRICS, MODES, NOISE_SAMPLINGS, SOLVERS, WEIGHTINGS

        for option, value, allowed in (("--mode", self.mode, MODES), ("--solver", self.solver, SOLVERS),
                                       ("--metric", self.metric, METRICS), ("--weighting", self.weighting, WEIGHTINGS),
                                       ("--noise-sampling", self.noise_sampling, NOISE_SAMPLINGS)):
            if value is not None and value not in allowed:
                raise UsageError(f"{option} {value}: use one of {', '.join(allowed)}")
        if not self.ect_q > 1:
            raise UsageError(f"--ect-q {self.ect_q}: must be > 1")
        if self.noise_sampling == "ect" and self.mode == "cd":
            raise UsageError("--noise-sampling ect: ECT is consistency training (its lowest pairs end on the data, "
                             "which a teacher's ODE does not); use --mode ct, or another --noise-sampling with cd")
        if self.noise_sampling == "ect" and (self.scales is not None or self.curriculum is not None):
            raise UsageError("--noise-sampling ect draws continuous pairs; drop --scales/--curriculum (they set "
                             "improved CT's discretization)")
        if self.scales is not None and self.curriculum is not None:
            raise UsageError("--scales and --curriculum: give one (a fixed discretization or the doubling one)")
        if self.scales is not None and self.scales < 2:
            raise UsageError(f"--scales {self.scales}: a discretization needs at least 2 points")
        if self.curriculum is not None and not 1 <= self.curriculum[0] <= self.curriculum[1]:
            raise UsageError(f"--curriculum {self.curriculum[0]},{self.curriculum[1]}: give S0,S1 with "
                             "1 <= S0 <= S1, e.g. 10,1280")
        if self.mode == "ct":
            if self.guidance_range is not None or self.guidance:
                raise UsageError("--guidance/--guidance-range: consistency training has no teacher to guide; use "
                                 "--mode cd for a guided student")
        elif self.from_scratch:
            raise UsageError("--from-scratch: consistency distillation starts from its teacher; drop it, or use "
                             "--mode ct")
        check_guidance_options(self.guidance_range, self.guidance, example="0,2")
        if self.prediction not in (None, "v", "x0"):
            raise UsageError(f"--prediction {self.prediction}: a consistency student predicts v or x0")
        if not 1 <= self.sample_steps <= max(1, self.max_steps):
            raise UsageError(f"--sample-steps {self.sample_steps}: must be between 1 and --max-steps "
                             f"{self.max_steps}")

    def method_record(self) -> dict[str, Any]:
        """The settings outside the loss that a resume must match."""
        return {"from_scratch": self.from_scratch, "dropout": self.dropout, "sigma_data": self.sigma_data,
                "prediction": self.prediction}


def default_timesteps(schedule, steps: int, sigma_max: float | None = None) -> list[float]:
    """``steps + 1`` sampling times ending at 0 before any search: the top of the discretization, then Karras
    spacing (rho = 7) of ``steps + 1`` noise levels down to sigma_min, of which the last is replaced by 0."""
    import torch

    from distill.methods.consistency import RHO, SIGMA_MIN, sigma_max_ve
    from distill.samplers import SIGMA_MAX_VE
    from distill.schedules import karras_sigmas

    top = sigma_max_ve(schedule, sigma_max or SIGMA_MAX_VE)
    sigmas = karras_sigmas(torch.linspace(0, 1, steps + 1, dtype=torch.float64), SIGMA_MIN, top, RHO)[:steps]
    return [float(t) for t in schedule.t_of_sigma_ve(sigmas)] + [0.0]


class Scorer(Protocol):
    """What the timestep search ranks candidate times by, built outside the core and passed in (the benchmarks'
    domain FD: ``benchmarks.scoring.QualityScorer()``). ``scorer(data, ref)`` prepares it against the real split
    ``ref`` of ``data`` (raising :class:`~distill.errors.UsageError` when it cannot, e.g. no domain classifier for
    that data: the search is then skipped) and returns ``score(images, labels) -> float``, lower is better, for
    uint8 NHWC samples and their requested labels (or ``None``). ``metric`` names the score in the card."""

    metric: str

    def __call__(self, data: Any, ref: str) -> Callable[[np.ndarray, Tensor | None], float]: ...


def search_timesteps(den, data, *, samples: int, max_steps: int, scorer: Scorer, guidance: float = 0.0,
                     bf16: bool = False, log: Callable[[str], None] = LOG.info) -> dict[str, Any] | None:
    """Greedy search of the intermediate sampling times (as Song et al. 2023 did for 2 steps): for ``k = 2 ..
    max_steps``, keep the first ``k - 1`` times found so far and try :data:`SEARCH_CANDIDATES` log-spaced noise
    levels below the last of them, then refine around the best; the criterion is ``scorer`` (e.g. the domain FD)
    of ``samples`` validation samples (seeds from :data:`SEARCH_SEED`) against the real half :data:`SEARCH_REF`.
    Returns ``{"timesteps_by_steps": ..., scorer.metric: ..., ...}``, or ``None`` when the scorer cannot score
    this data (e.g. it has no domain classifier)."""
    import numpy as np
    import torch

    from distill.methods.consistency import SIGMA_MIN
    from distill.sampling import draw_samples

    try:
        score = scorer(getattr(data, "pixels", None) or data, SEARCH_REF)  # on images (a latent model decodes)
    except UsageError as e:
        log(f"timestep search skipped ({e}); the card keeps the default Karras-spaced times")
        return None
    metric = scorer.metric
    seeds = list(range(SEARCH_SEED, SEARCH_SEED + samples))
    schedule = den.schedule

    def measure(ts: list[float]) -> float:
        images, labels = draw_samples(den, sampler="consistency", seeds=seeds, guidance=guidance, timesteps=ts,
                                      bf16=bf16, progress=False)
        return float(score(images, labels))

    def sigma_of(t: float) -> float:
        return float(torch.exp(-0.5 * schedule.logsnr(torch.tensor(t, dtype=torch.float64))))

    def time_of(sigma: float) -> float:
        return float(schedule.t_of_sigma_ve(torch.tensor(sigma, dtype=torch.float64)))

    one = default_timesteps(schedule, 1)
    found = {"1": one}
    scores = {"1": measure(one)}
    log(f"timestep search: 1 step {metric.upper()} {scores['1']:.4f} ({samples} validation samples vs real half "
        f"{SEARCH_REF})")
    prefix = one[:-1]
    for k in range(2, max_steps + 1):
        hi = sigma_of(prefix[-1])
        lo = max(SIGMA_MIN * 10, hi * 1e-3)
        sigmas = list(np.geomspace(hi, lo, SEARCH_CANDIDATES + 1)[1:])  # strictly below the previous time
        tried = {s: measure(prefix + [time_of(s), 0.0]) for s in sigmas}
        best = min(tried, key=tried.get)
        ordered = sorted(tried)
        j = ordered.index(best)
        neighbours = [ordered[j - 1] if j > 0 else best / 2, ordered[j + 1] if j + 1 < len(ordered) else hi]
        for other in neighbours:
            mid = math.sqrt(best * other)
            if mid < hi:
                tried[mid] = measure(prefix + [time_of(mid), 0.0])
        best = min(tried, key=tried.get)
        prefix = prefix + [time_of(best)]
        found[str(k)] = prefix + [0.0]
        scores[str(k)] = tried[best]
        log(f"timestep search: {k} steps {metric.upper()} {tried[best]:.4f} with the new time at sigma~ {best:.3g} "
            f"({len(tried)} tried)")
    return {"timesteps_by_steps": found, metric: scores, "samples": samples, "seeds": f"{seeds[0]}-{seeds[-1]}",
            "reference": f"real:{SEARCH_REF}", "metric": metric, "guidance": guidance}


def distill_consistency(teacher_spec: str, out: Path, opts: ConsistencyOptions, *, scorer: Scorer | None = None,
                        data_spec: str | None = None, command: str = "", progress: bool = True,
                        log: Callable[[str], None] = LOG.info) -> Path:
    """Run (or continue) consistency distillation or training from ``teacher_spec`` (a model file, run directory
    or shipped name) into ``out``; returns the student's model file. ``scorer`` ranks the timestep search's
    candidates (see :class:`Scorer`); it is needed when ``opts.search_samples > 0``."""
    import torch

    from distill.checkpoint import load_denoiser, load_tensors, model_metadata, resolve_model_path, save_tensors
    from distill.distillation import (
        file_sha256,
        guidance_plan,
        make_student,
        run_done,
        student_prediction,
        teacher_data,
    )
    from distill.methods.consistency import SIGMA_MIN, ConsistencyLoss
    from distill.models.unet import GUIDANCE_EMBED_PARAMS, UNet
    from distill.rundir import refuse_if_locked, run_lock
    from distill.training import MODEL_FILE, STATE_FILE, TrainConfig, Trainer

    opts.validate()
    if opts.search_samples and scorer is None:
        raise UsageError(f"search_samples {opts.search_samples}: the timestep search needs a scorer; pass one "
                         "(scorer=benchmarks.scoring.QualityScorer()), or set search_samples to 0")
    opts = opts.resolved()
    out = Path(out)
    refuse_if_locked(out)
    teacher_path = resolve_model_path(teacher_spec)
    teacher = load_denoiser(teacher_path)
    cd = opts.mode == "cd"
    # Consistency training has no teacher to guide (validate() refused guidance options): it trains at w = 0.
    plan = guidance_plan(teacher, teacher_spec, opts.guidance_range if cd else None, opts.guidance if cd else 0.0)
    data_spec, data = teacher_data(teacher, teacher_spec, data_spec)
    if opts.from_scratch and not isinstance(teacher.net, UNet):
        raise UsageError(f"--from-scratch: rebuilds the native UNet only; {teacher_spec}'s network is a "
                         f"{type(teacher.net).__name__}")
    boundary = {"sigma_min": SIGMA_MIN, "sigma_data": opts.sigma_data}
    grange = plan.range if cd else None
    student = make_student(teacher, guidance_input=grange is not None, prediction=opts.prediction or
                           student_prediction(teacher), seed=opts.seed, dropout=opts.dropout, consistency=boundary)
    if opts.from_scratch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            student = student.with_net(UNet(student.net.config).train())
    w = grange if grange is not None else (plan.fixed or 0.0)
    loss = ConsistencyLoss(student, mode=opts.mode, teacher=teacher if cd else None, total_steps=opts.steps,
                           scales=opts.scales, curriculum=opts.curriculum or (10, 1280), solver=opts.solver,
                           target_decay=opts.target_decay, metric=opts.metric, weighting=opts.weighting,
                           noise_sampling=opts.noise_sampling, guidance=w, label_dropout=opts.label_dropout,
                           ect_q=opts.ect_q)
    branches = 2 if (not teacher.guidance_input and (grange is not None or plan.fixed)) else 1
    teacher_forwards = ((2 if opts.solver == "heun" else 1) * branches) if cd else 0
    sha = file_sha256(teacher_path)
    steps = opts.sample_steps
    defaults = {str(k): default_timesteps(student.schedule, k) for k in range(1, max(1, opts.max_steps) + 1)}
    card = {
        "method": "consistency_distillation" if cd else "consistency_training", "mode": opts.mode,
        "teacher": str(teacher_spec), "parent": str(teacher_spec), "parent_sha256": sha,
        "initialised_from": None if opts.from_scratch else str(teacher_spec),
        "parameterization": student.prediction, "schedule": student.schedule.config(), "boundary": boundary,
        "sampler": "consistency", "steps": steps, "spacing": "own", "timesteps": defaults[str(steps)],
        "timesteps_by_steps": defaults, "timestep_search": None,
        "guidance": plan.default if cd else 0.0, "guidance_range": list(grange) if grange else None,
        "label_dropout": opts.label_dropout,
        "compute": {"train_steps": opts.steps, "batch_size": opts.batch_size,
                    "teacher_forwards_per_step": teacher_forwards},
    }
    if cd and plan.baked is not None:
        card["distilled_guidance"] = plan.baked
    meta = {**model_metadata(student),
            "method": {**loss.describe(), **opts.method_record(), "teacher_sha256": sha},
            "card": card, "command": command}
    new_embedding = grange is not None and not teacher.guidance_input
    cfg = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, warmup=opts.warmup,
                      lr_decay="constant", grad_clip=opts.grad_clip, ema_decay=opts.ema_decay, bf16=opts.bf16,
                      seed=opts.seed, ckpt_every=opts.ckpt_every,
                      lr_scale={GUIDANCE_EMBED_PARAMS: opts.guidance_lr_scale} if new_embedding else {})
    state = out / STATE_FILE
    what = f"consistency {'distillation' if cd else 'training'} of {teacher_spec}"
    if run_done(out, opts.steps):
        log(f"{what}: training done ({out / MODEL_FILE})")
    else:
        log(f"{what}: {'resuming' if state.exists() else 'training'} {opts.steps} steps into {out}")
        Trainer(student, loss, data, cfg, out, meta).run(resume=state.exists(), progress=progress,
                                                         desc=f"consistency-{opts.mode}")
    model_path = out / MODEL_FILE
    with run_lock(out):
        tensors, saved = load_tensors(model_path)
        saved_card = saved.get("card") or {}
        search_key = {"samples": opts.search_samples, "max_steps": opts.max_steps}
        if opts.search_samples and (saved_card.get("timestep_search") or {}).get("settings") != search_key:
            den = load_denoiser(model_path)
            found = search_timesteps(den, data, samples=opts.search_samples, max_steps=opts.max_steps,
                                     scorer=scorer, guidance=float(saved_card.get("guidance", 0.0)), bf16=opts.bf16,
                                     log=log)
            if found is not None:
                by_steps = {**saved_card.get("timesteps_by_steps", {}), **found.pop("timesteps_by_steps")}
                saved_card = {**saved_card, "timesteps_by_steps": by_steps, "timesteps": by_steps[str(steps)],
                              "timestep_search": {**found, "settings": search_key}}
                save_tensors(model_path, tensors, {**saved, "card": saved_card})
    return model_path

