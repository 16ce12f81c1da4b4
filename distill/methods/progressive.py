"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) and guidance distillation (Meng et al. 2023), as
loss objects over the generic trainer.

**Progressive round** (:class:`ProgressiveLoss`): the student samples in ``N`` DDIM steps on the uniform grid
``t_i = i / N``; it is trained so that one of its DDIM steps ``t -> s = t - 1/N`` lands where two DDIM steps of its
teacher (the previous round's model, on the grid of ``2N``) land. With ``z_t = alpha_t x + sigma_t eps`` and the
teacher's two steps ``t -> t - 1/(2N) -> s`` giving ``z~_s``, the x-target is the one that makes a single DDIM step
exact:

    x~ = (z~_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

(at ``s = 0`` this is the teacher's second x-prediction). The loss is the "truncated SNR" weighting
``max(alpha_t^2 / sigma_t^2, 1) ||x_hat - x~||^2``.

**A better first map** (``teacher_map="dpmpp_2m"``): two DDIM steps copy the teacher's probability-flow ODE, and
the converged ODE is not the teacher's best sampler (the shipped MNIST teacher: FD 0.27 for DDIM 64 against 0.21
for DPM-Solver++(2M) at 16 steps, 500 samples). A first round can instead copy the teacher's
DPM-Solver++(2M) sampler on the grid of ``2N``: whole trajectories are run from prior noise, and each of the
student's intervals ``t_i -> t_(i-1)`` of a trajectory gives a pair (the state at ``t_i``, the x-target whose
DDIM step lands on the trajectory's state at ``t_(i-1)``). The 2M solver's second-order term carries the previous
step's estimate, so its map over one interval depends on the trajectory before it: hence trajectories, not the
noised data. Same two teacher evaluations per pair; the student then samples like that sampler, in half its steps.

**Guidance stage** (:class:`GuidanceLoss`): a student that takes ``w`` as a network input learns the teacher's
classifier-free-guided x-prediction ``(1 + w) x(z, c) - w x(z, null)`` at ``t ~ U(0, 1)``, ``w ~ U[w_lo, w_hi]``,
with the same weighting. Progressive rounds on it then draw ``w`` per example, so every few-step student serves
the whole guidance range in one network evaluation per step.

Both hold their teacher frozen (reloaded from its file on resume, never saved with the run); any teacher behind
the denoiser interface works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.denoiser import Cond, Denoiser
from distill.losses import Loss, diffuse, drop_labels
from distill.parameterization import append_dims
from distill.samplers import clean_alpha_sigma, ddim_step, prior_scale, sample_dpmpp_2m

# With a guidance range, the share of examples distilled at its low end (w = 0 for the usual [0, w_max]).
GUIDANCE_LOW_PROB = 0.2


def truncated_snr_weight(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Salimans & Ho's "truncated SNR" weighting of an x-space loss: ``max(alpha^2 / sigma^2, 1)``."""
    return torch.clamp(alpha.square() / sigma.square(), min=1.0)


def ddim_x_target(z_t: Tensor, z_s: Tensor, a_t, s_t, a_s, s_s) -> Tensor:
    """The x-prediction at ``z_t`` whose single DDIM step ``t -> s`` lands on ``z_s`` (Salimans & Ho 2022,
    Algorithm 2); per-sample ``(B,)`` tensors or floats. At ``s_s = 0`` it is ``z_s / a_s``."""
    a_t, s_t, a_s, s_s = (append_dims(v, z_t.ndim) if isinstance(v, Tensor) else v for v in (a_t, s_t, a_s, s_s))
    ratio = s_s / s_t
    return (z_s - ratio * z_t) / (a_s - ratio * a_t)


class _TeacherLoss(Loss):
    """What both distillation losses share: a frozen teacher, the guidance weights drawn per example, label
    dropout, and the truncated-SNR x-space loss."""

    frozen = ("teacher",)

    def __init__(self, teacher, guidance: float | tuple[float, float] = 0.0, label_dropout: float = 0.0):
        """``teacher``: any ``denoise(x_t, t, cond) -> x0`` callable (a :class:`Denoiser`, an oracle, a backend)."""
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval() if isinstance(teacher, nn.Module) else teacher
        self.guidance = tuple(guidance) if isinstance(guidance, (tuple, list)) else float(guidance)
        self.label_dropout = float(label_dropout)

    def describe(self) -> dict[str, Any]:
        out = {"guidance": list(self.guidance) if isinstance(self.guidance, tuple) else self.guidance,
               "label_dropout": self.label_dropout, "weighting": "truncated_snr"}
        if isinstance(self.guidance, tuple):
            out["guidance_low_prob"] = GUIDANCE_LOW_PROB
        return out

    def _eval(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()  # no dropout in the targets, whatever mode the loss module was put in

    def _conds(self, model: Denoiser, labels: Tensor | None, n: int, generator: torch.Generator,
               device) -> tuple[Cond, Cond]:
        """(teacher's, student's) conditioning. A guidance range draws ``w ~ U[lo, hi]`` per example for both; a
        fixed ``w`` guides the teacher and is baked into a student without a ``w`` input."""
        labels = drop_labels(labels, model.null_label, self.label_dropout, generator)
        if labels is None:
            return Cond(), Cond()
        if isinstance(self.guidance, tuple):
            lo, hi = self.guidance
            w = lo + (hi - lo) * torch.rand(n, generator=generator)
            # the range's low end (w = 0: no guidance) drawn more often, where a guided student was worst
            w = torch.where(torch.rand(n, generator=generator) < GUIDANCE_LOW_PROB, torch.full_like(w, lo), w)
            return Cond(labels, w.to(device)), Cond(labels, w.to(device))
        w = self.guidance
        return Cond(labels, w), Cond(labels, w if model.guidance_input else 0.0)

    def _loss(self, model: Denoiser, z_t: Tensor, t: Tensor, cond: Cond, target: Tensor, a_t: Tensor,
              s_t: Tensor) -> Tensor:
        x_hat = model(z_t, t, cond)
        err = (x_hat.float() - target.float()).square().flatten(1).mean(1)
        return truncated_snr_weight(a_t, s_t).reshape(-1) * err


TEACHER_MAPS = ("ddim", "dpmpp_2m")


def _take(cond: Cond, idx: Tensor) -> Cond:
    """The conditioning of examples ``idx``."""
    if cond.labels is None:
        return cond
    w = cond.guidance[idx] if isinstance(cond.guidance, Tensor) else cond.guidance
    return Cond(cond.labels[idx], w)


class ProgressiveLoss(_TeacherLoss):
    """One round of progressive distillation: the student's one DDIM step on the grid of ``student_steps`` equals
    two DDIM steps of the teacher, or with ``teacher_map="dpmpp_2m"`` the teacher's DPM-Solver++(2M) sampler on
    the grid of ``2 student_steps`` (module docstring)."""

    def __init__(self, teacher: Denoiser, student_steps: int, guidance: float | tuple[float, float] = 0.0,
                 label_dropout: float = 0.0, teacher_map: str = "ddim"):
        super().__init__(teacher, guidance, label_dropout)
        if student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {student_steps}")
        if teacher_map not in TEACHER_MAPS:
            raise ValueError(f"unknown teacher map {teacher_map!r}: use one of {', '.join(TEACHER_MAPS)}")
        self.student_steps = int(student_steps)
        self.teacher_map = teacher_map

    def describe(self) -> dict[str, Any]:
        out = {"name": "progressive", "student_steps": self.student_steps,
               "teacher_steps": 2 * self.student_steps, **super().describe()}
        if self.teacher_map != "ddim":  # absent for the DDIM map, as in runs made before there was a choice
            out["teacher_map"] = self.teacher_map
        return out

    def forward(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        return self._loss(model, *self.targets(model, x0, labels, generator))

    def targets(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator):
        """``(z_t, t, student's cond, x-target, alpha_t, sigma_t)`` of one batch."""
        if self.teacher_map == "dpmpp_2m":
            return self._trajectory_targets(model, x0, labels, generator)
        n, big_n = x0.shape[0], self.student_steps
        i = torch.randint(1, big_n + 1, (n,), generator=generator)
        # Grid times in float64, then float32: t = i / N, the midpoint and s = t - 1 / N exactly as the sampler's.
        t = (i.double() / big_n).float().to(x0.device)
        t_mid = ((i.double() - 0.5) / big_n).float().to(x0.device)
        s = ((i.double() - 1.0) / big_n).float().to(x0.device)
        z_t, a_t, s_t = diffuse(model, x0, t, generator)
        t_cond, s_cond = self._conds(model, labels, n, generator, x0.device)
        a_m, s_m = clean_alpha_sigma(model.schedule, t_mid)
        a_s, s_s = clean_alpha_sigma(model.schedule, s)
        with torch.no_grad():
            self._eval()
            z_mid = ddim_step(z_t, self.teacher(z_t, t, t_cond), a_t, s_t, a_m, s_m)
            z_s = ddim_step(z_mid, self.teacher(z_mid, t_mid, t_cond), a_m, s_m, a_s, s_s)
            target = ddim_x_target(z_t, z_s, a_t, s_t, a_s, s_s)
        return z_t, t, s_cond, target, a_t, s_t

    def _trajectory_targets(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator):
        """Pairs from ``ceil(n / N)`` DPM-Solver++(2M) trajectories of the teacher on the grid of ``2N`` (from prior
        noise, with the batch's first labels), ``n`` of their ``N`` intervals each drawn at random; the batch's
        images only set the shape and the labels."""
        n, big_n = x0.shape[0], self.student_steps
        m = -(-n // big_n)
        t_cond, s_cond = self._conds(model, labels[:m] if labels is not None else None, m, generator, x0.device)
        grid = torch.linspace(1.0, 0.0, 2 * big_n + 1, dtype=torch.float64)
        z = prior_scale(model.schedule) * torch.randn((m, *x0.shape[1:]), generator=generator).to(x0)
        states = [z]
        with torch.no_grad():
            self._eval()
            sample_dpmpp_2m(self.teacher, z, grid, schedule=model.schedule, cond=t_cond,
                            callback=lambda step: states.append(step["x"]))
        # pair k: trajectory k % m, interval i = k // m + 1 (t = i / N, state index 2 (N - i)), n of N m at random
        k = torch.randperm(big_n * m, generator=generator)[:n]
        traj, i = k % m, k // m + 1
        pick = torch.stack(states)  # (2N + 1, m, C, H, W), state j at time 1 - j / (2N)
        z_t, z_s = pick[2 * (big_n - i), traj], pick[2 * (big_n - i) + 2, traj]
        t = (i.double() / big_n).float().to(x0.device)
        s = ((i.double() - 1.0) / big_n).float().to(x0.device)
        a_t, s_t = clean_alpha_sigma(model.schedule, t)
        a_s, s_s = clean_alpha_sigma(model.schedule, s)
        target = ddim_x_target(z_t, z_s, a_t, s_t, a_s, s_s)
        return z_t, t, _take(s_cond, traj.to(x0.device)), target, a_t, s_t


class GuidanceLoss(_TeacherLoss):
    """Stage one of guidance distillation (Meng et al. 2023): a student with a ``w`` input reproduces the
    teacher's classifier-free-guided x-prediction over the guidance range, at ``t ~ U(0, 1)``."""

    def __init__(self, teacher: Denoiser, guidance: tuple[float, float], label_dropout: float = 0.0):
        super().__init__(teacher, tuple(guidance), label_dropout)

    def describe(self) -> dict[str, Any]:
        return {"name": "guidance", **super().describe()}

    def forward(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        return self._loss(model, *self.targets(model, x0, labels, generator))

    def targets(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator):
        """``(z_t, t, student's cond, x-target, alpha_t, sigma_t)`` of one batch."""
        n = x0.shape[0]
        # t in (0, 1]: 1 - U[0, 1), so t = 0 (clean data, where the loss is 0/0) is never drawn.
        t = (1.0 - torch.rand(n, generator=generator, dtype=torch.float64)).float().to(x0.device)
        z_t, a_t, s_t = diffuse(model, x0, t, generator)
        t_cond, s_cond = self._conds(model, labels, n, generator, x0.device)
        with torch.no_grad():
            self._eval()
            target = self.teacher(z_t, t, t_cond)
        return z_t, t, s_cond, target, a_t, s_t
