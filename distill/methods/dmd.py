"""Distribution matching distillation (Yin et al. 2024, DMD2) as one loss object over the generic trainer.

The student is a one-step generator ``G(z) = student(s z, t_g)`` (``s`` the schedule's prior scale, ``t_g`` the top
of its one-step grid): a progressive or consistency student, or the teacher itself, as the starting point. A
multistep generator (DMD2's K-step variant, ``generator_steps = K``) samples on the grid ``t_k = t_g (K - k) / K``:
at each grid time it maps the state to clean data, which the forward process re-noises to the next grid time (the
consistency sampler). It is trained at every grid time: per sample a step ``k`` is drawn and its input made by
backward simulation (the current generator run from prior noise through steps ``0 .. k-1``, without gradient),
so the inputs it trains on are the ones it meets when sampling. Per
optimizer step of the generator (the trainer's step), the loss first makes ``fake_updates`` updates of its own
networks on fresh generator samples (the two time-scale update rule), then returns the generator's loss:

- **fake score** ``f``: a copy of the teacher trained with the diffusion loss on detached generator samples, so it
  tracks the generator's distribution;
- **distribution matching**: at ``x_t = alpha_t G(z) + sigma_t eps``, ``t ~ U[t_min, t_max]``, the gradient
  ``g = (f(x_t) - r(x_t)) / mean|G(z) - r(x_t)|`` (``r``: the frozen teacher, classifier-free guided when the card
  guides; the mean per sample) moves G toward the teacher's distribution; loss ``1/2 ||G(z) - sg(G(z) - g)||^2``
  (its gradient is ``g``, per element, over the sample's size);
- **diffusion GAN**: a small head (conv, GroupNorm, SiLU, conv, mean) on the frozen teacher's bottleneck features
  of noised real and generated images; non-saturating losses, ``gan_weight`` for the generator and
  ``disc_weight`` for the head.

The fake score and the head share one AdamW whose state is saved with the run (:meth:`state_tensors`), and every
draw comes from the step's generator: a resumed run continues exactly. The frozen teacher is reloaded from its file.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from distill.denoiser import Cond, Denoiser
from distill.errors import TrainingDiverged, UsageError
from distill.losses import DiffusionLoss, diffuse
from distill.methods.progressive import _TeacherLoss
from distill.parameterization import append_dims
from distill.samplers import alpha_sigma_at, prior_scale, renoise

OPT_PREFIX = "opt."


def bottleneck_module(net: nn.Module) -> nn.Module | None:
    """The module whose output is a UNet's bottleneck: the native UNet's last ``mid`` block, a diffusers UNet's
    ``mid_block``; None when the network has neither."""
    for name, module in net.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "mid_block":
            return module
        if last == "mid" and isinstance(module, nn.ModuleList) and len(module):
            return module[-1]
    return None


def generator_grid(t_top: float, steps: int) -> list[float]:
    """A K-step generator's grid times ``t_k = t_top (K - k) / K``, ``k = 0 .. K-1`` (DMD2's four steps at
    t = 999, 749, 499, 249 of 1000, scaled to the generator's top); the sample is the last step's estimate."""
    return [t_top * (steps - k) / steps for k in range(steps)]


class DiscriminatorHead(nn.Module):
    """conv 3x3 -> GroupNorm -> SiLU -> conv 1x1 -> one logit per sample (the spatial mean)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                 nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.float()).flatten(1).mean(1)


class DMDLoss(_TeacherLoss):
    """DMD2 for the one-step generator being trained (module docstring).

    Args:
        teacher: the frozen teacher (the real score), a :class:`Denoiser`.
        generator_time: ``t_g``, where the generator reads its noise (the top of its one-step grid).
        generator_steps: ``K``, the generator's steps (1: one-step DMD2; more: the multistep variant).
        guidance: the teacher's classifier-free guidance weight ``w`` for the real score.
        fake_updates: fake-score / head updates per generator update.
        fake_lr: the fake score's learning rate.
        head_lr: the discriminator head's [``fake_lr``]; a fresh head at the fake score's small rate stays at
            chance for hundreds of steps (measured: its loss 1.38 = 2 ln 2 after 300 steps at 1e-5).
        gan_weight, disc_weight: the GAN term's weight in the generator's and the head's loss (0: no GAN).
        t_range: the distribution-matching and GAN noise levels, ``t ~ U[t_min, t_max]``.
        label_dropout: of the fake score's diffusion loss (so it also learns the unconditional score).
        seed: the discriminator head's initialisation.
    """

    frozen = ("teacher",)

    def __init__(self, teacher: Denoiser, *, image_shape: tuple[int, ...], generator_time: float = 1.0,
                 generator_steps: int = 1, guidance: float = 0.0,
                 fake_updates: int = 4, fake_lr: float = 1e-5, head_lr: float | None = None,
                 gan_weight: float = 3e-3,
                 disc_weight: float = 1e-2,
                 t_range: tuple[float, float] = (0.02, 0.98), label_dropout: float = 0.0, seed: int = 0):
        super().__init__(teacher, float(guidance), 0.0)
        if fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {fake_updates}")
        if not 0.0 < t_range[0] < t_range[1] <= 1.0:
            raise ValueError(f"t_range must satisfy 0 < t_min < t_max <= 1, got {t_range}")
        if generator_steps < 1:
            raise ValueError(f"generator_steps must be >= 1, got {generator_steps}")
        self.generator_times = generator_grid(float(generator_time), int(generator_steps))
        self.generator_time, self.fake_updates, self.fake_lr = float(generator_time), int(fake_updates), fake_lr
        self.head_lr = float(head_lr if head_lr is not None else fake_lr)
        self.gan_weight, self.disc_weight, self.t_range = float(gan_weight), float(disc_weight), tuple(t_range)
        self.fake_label_dropout = float(label_dropout)
        self.fake = copy.deepcopy(teacher.net).requires_grad_(True).train()
        self.fake_loss = DiffusionLoss(label_dropout=self.fake_label_dropout)
        groups = [{"params": list(self.fake.parameters())}]
        self.head = None
        if self.gan_weight > 0 or self.disc_weight > 0:
            module = bottleneck_module(teacher.net)
            if module is None:
                raise UsageError(f"--gan-weight: the teacher's network ({type(teacher.net).__name__}) has no UNet "
                                 "bottleneck (mid / mid_block) for the GAN head; pass --gan-weight 0 --disc-weight 0")
            self._features: list[Tensor] = []
            module.register_forward_hook(lambda m, i, o: self._features.append(o if isinstance(o, Tensor) else o[0]))
            channels = self._bottleneck_channels(teacher, image_shape)
            with torch.random.fork_rng(devices=[]):  # the head's initial weights depend on the run's seed only
                torch.manual_seed(seed)
                self.head = DiscriminatorHead(channels)
            groups.append({"params": list(self.head.parameters()), "lr": self.head_lr})
        self.opt = torch.optim.AdamW(groups, lr=fake_lr, weight_decay=0.0)
        self.metrics: dict[str, float] = {}

    def _bottleneck_channels(self, teacher: Denoiser, image_shape: tuple[int, ...]) -> int:
        with torch.no_grad():
            self._features.clear()
            teacher(torch.zeros((1, *image_shape)), torch.full((1,), 0.5), self._null_cond(teacher, 1, "cpu"))
        channels = int(self._features[-1].shape[1])
        self._features.clear()
        return channels

    @staticmethod
    def _null_cond(teacher: Denoiser, n: int, device) -> Cond:
        if not teacher.num_classes:
            return Cond()
        label = teacher.null_label if teacher.null_label is not None else 0
        return Cond(torch.full((n,), label, dtype=torch.int64, device=device))

    def describe(self) -> dict[str, Any]:
        steps = {"generator_steps": len(self.generator_times)} if len(self.generator_times) > 1 else {}
        return {"name": "dmd2", "generator_time": self.generator_time, **steps, "guidance": self.guidance,
                "fake_updates": self.fake_updates, "fake_lr": self.fake_lr, "head_lr": self.head_lr,
                "gan_weight": self.gan_weight, "disc_weight": self.disc_weight, "t_range": list(self.t_range),
                "fake_label_dropout": self.fake_label_dropout}

    # -- saved state: the networks (state dict) and their optimizer ------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        opt, _ = optimizer_to_tensors(self.opt, OPT_PREFIX)
        return {**super().state_tensors(), **opt}

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith(OPT_PREFIX)}, source)
        opt = {k: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)}
        if not opt:
            raise UsageError(f"{source}: no fake-score optimizer state in it; resume with the same options or "
                             "choose another --out")
        optimizer_from_tensors(self.opt, opt, self.opt.state_dict()["param_groups"], OPT_PREFIX)

    def _fake_denoiser(self) -> Denoiser:
        return self.teacher.with_net(self.fake)

    # -- the pieces --------------------------------------------------------------------------------------

    def _g(self, model: Denoiser, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The generator's clean estimate at state ``x``, times ``t`` (a generator taking ``w`` gets the teacher's
        guidance weight, which its card then samples at)."""
        if model.guidance_input and cond.labels is not None:
            cond = Cond(cond.labels, self.guidance)
        return model(x, t, cond)

    def generate(self, model: Denoiser, z: Tensor, cond: Cond, generator: torch.Generator | None = None) -> Tensor:
        """``G(z)``: the generator's clean estimate from prior noise ``z`` at ``t_g``; a multistep generator's at a
        random step of its grid per sample, its input made by backward simulation (module docstring; gradient only
        through the last evaluation)."""
        n, times = z.shape[0], self.generator_times
        x = prior_scale(model.schedule, times[0]) * z
        if len(times) == 1:
            return self._g(model, x, torch.full((n,), times[0], device=z.device), cond)
        k = torch.randint(len(times), (n,), generator=generator)
        x_in = x.clone()
        with torch.no_grad():
            for j in range(1, int(k.max()) + 1):
                x0 = self._g(model, x, torch.full((n,), times[j - 1], device=z.device), cond).float()
                a, s = alpha_sigma_at(model.schedule, times[j])
                x = renoise(x0, 1.0, 0.0, a, s, torch.randn(x.shape, generator=generator).to(x))
                pick = (k == j).to(z.device)
                x_in[pick] = x[pick].to(x_in.dtype)
        t = torch.tensor(times, dtype=torch.float32)[k].to(z.device)
        return self._g(model, x_in, t, cond)

    def _times(self, n: int, generator: torch.Generator, device) -> Tensor:
        lo, hi = self.t_range
        return (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)).float().to(device)

    def _logits(self, model: Denoiser, x0: Tensor, cond: Cond, generator: torch.Generator) -> Tensor:
        """The head's logits on the frozen teacher's bottleneck features of ``x0`` noised at a random level."""
        t = self._times(x0.shape[0], generator, x0.device)
        x_t, _, _ = diffuse(model, x0, t, generator)
        self._features.clear()
        self.teacher(x_t, t, cond)
        return self.head(self._features[-1])

    def _fake_step(self, model: Denoiser, x0_real: Tensor, labels: Tensor | None, cond: Cond,
                   generator: torch.Generator) -> dict[str, float]:
        """One update of the fake score (diffusion loss on detached generator samples) and the head."""
        z = torch.randn(x0_real.shape, generator=generator).to(x0_real)
        with torch.no_grad():
            fake = self.generate(model, z, cond, generator).float()
        loss = self.fake_loss(self._fake_denoiser(), fake, labels, generator).mean()
        out = {"fake_loss": float(loss.detach())}
        if self.head is not None:  # real and generated images through the teacher as one batch
            both = Cond(torch.cat([cond.labels] * 2)) if cond.labels is not None else cond
            d_real, d_fake = self._logits(model, torch.cat([x0_real, fake]), both, generator).chunk(2)
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            loss = loss + self.disc_weight * d_loss
            out["disc_loss"] = float(d_loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        total = float(loss.detach())
        if not torch.isfinite(torch.tensor(total)):
            raise TrainingDiverged(f"the fake score / discriminator loss is {total:g} (the run diverged); the last "
                                   "checkpoint is kept")
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        return out

    def forward(self, model: Denoiser, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        n = x0.shape[0]
        cond = Cond(labels) if labels is not None else Cond()
        real_cond = Cond(labels, self.guidance) if labels is not None else Cond()
        self._eval()
        self.fake.train()
        with torch.enable_grad():
            for _ in range(self.fake_updates):
                stats = self._fake_step(model, x0, labels, cond, generator)
        self.fake.eval()  # the distribution-matching target: no dropout
        z = torch.randn(x0.shape, generator=generator).to(x0)
        g_x = self.generate(model, z, cond, generator)
        t = self._times(n, generator, x0.device)
        # the two scores in fp32 (autocast off): their difference is the signal, and bf16 rounding of each would
        # be as large as it at low noise
        with torch.no_grad(), torch.autocast(device_type=x0.device.type, enabled=False):
            x_t, _, _ = diffuse(model, g_x.detach().float(), t, generator)
            real = self.teacher(x_t, t, real_cond).float()
            fake = self._fake_denoiser()(x_t, t, cond).float()
            weight = (g_x.detach().float() - real).abs().flatten(1).mean(1).clamp(min=1e-8)
            grad = (fake - real) / append_dims(weight, g_x.ndim)
            target = g_x.detach().float() - grad
        dm = 0.5 * (g_x.float() - target).square().flatten(1).mean(1)
        loss = dm
        self.metrics = {"dm_loss": float(dm.mean().detach()), **stats}
        if self.head is not None and self.gan_weight > 0:
            self.head.requires_grad_(False)
            g_logits = self._logits(model, g_x, cond, generator)
            self.head.requires_grad_(True)
            gan = F.softplus(-g_logits)
            loss = loss + self.gan_weight * gan
            self.metrics["gan_loss"] = float(gan.mean().detach())
        self.fake.train()
        return loss
