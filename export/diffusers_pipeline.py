"""Students out to diffusers: ``distill export diffusers MODEL --out DIR`` writes a pipeline directory that
``DiffusionPipeline.from_pretrained(DIR)`` loads, whose pipeline gives the student's own samples.

Which pipeline and scheduler:

- **DDIM students** (progressive and guidance students, whose card samples with deterministic DDIM on exact
  timesteps; also a teacher, on its card's DDIM grid): ``DDIMPipeline`` with a ``DDIMScheduler``.
  When the network is a diffusers ``UNet2DModel`` whose grid is diffusers' ``trailing`` grid of its own beta table
  (``N`` dividing ``num_train_timesteps``), no clipping and no ``w`` input, the folder holds that ``UNet2DModel``
  unchanged and a ``DDIMScheduler`` on the teacher's table (``timestep_spacing="trailing"``,
  ``set_alpha_to_one=True``): stock diffusers loads it, nothing of distill is needed. Otherwise the UNet is
  :class:`DistilledUNet` (below) and the scheduler's table (``trained_betas``) holds ``alpha_bar`` at the
  student's grid times, each interval split into ``table_stride`` equal factors of at least 1/2 (diffusers keeps
  ``1 - beta`` in float32, which would round away a cosine schedule's ``alpha_bar = 2e-9``), with
  ``prediction_type="sample"`` (the network returns the student's clean estimate, clipping and guidance
  included), so DDIM with ``num_inference_steps=N`` walks exactly the student's grid down to clean data.
- **Consistency students**: ``ConsistencyModelPipeline`` with a ``CMStochasticIterativeScheduler``, whose VE Karras
  sigmas are the student's VE-equivalent noise levels ``sigma / alpha``: ``sigma_max`` is distill's prior scale over
  ``alpha`` at the grid's first time (so the pipeline's ``sigma_max * z`` is distill's starting state, and the
  network reads ``sigma_max`` as that first time), ``sigma_min`` and ``sigma_data`` the student's boundary-condition
  values, and the later grid times are the nearest of 10^6 Karras points (within 1e-5 relative), passed as the
  pipeline's ``timesteps``. The scheduler's own boundary scalings ``c_skip(sigma) x + c_out(sigma) F`` (EDM's, in VE
  coordinates, on its input scaling ``x / sqrt(sigma^2 + sigma_data^2)``) differ from the student's (its VP state
  ``x_t = alpha x_ve``): the network takes the scheduler's scaled VE sample and timestep ``250 ln sigma``, rebuilds
  the student's state at its exact grid time, and returns ``F = (D - c_skip x_ve) / c_out``, so the scheduler's step
  yields the student's own clean estimate ``D``. Clipping is the student's (``clip_denoised`` is off).

:class:`DistilledUNet` is a diffusers ``ModelMixin``/``ConfigMixin`` holding the student's distill model (its
metadata in ``config.json``, its weights in ``diffusion_pytorch_model.safetensors``): import this module before
``from_pretrained`` (diffusers imports no code a folder names). It takes ``class_labels`` and the guidance weight
``guidance`` (a ``w``-input student; default the card's ``w``). ``DDIMPipeline`` passes no class labels: a
class-conditional DDIM student is run with the scheduler loop written out (the README shows it).

Before anything is written, the pipeline is run against distill's own sampler on the same per-sample generators
(``parity`` in ``distill_export.json``, bound 1e-4 relative).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import Tensor

from distill.errors import UsageError

EXPORT_FILE = "distill_export.json"
EXPORT_FORMAT = "distill.diffusers-export/1"
CM_TRAIN_TIMESTEPS = 1_000_000  # Karras points the consistency scheduler's grid is chosen from
SNAP = 1e-4  # a scheduler sigma this close (relative) to a grid time's is that grid time
PARITY_BOUND = 1e-4
PARITY_SEEDS = tuple(range(4))
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _grid_sigmas(schedule, times: Tensor) -> Tensor:
    """VE-equivalent noise levels ``sigma / alpha`` at ``times`` (float64)."""
    alpha, sigma = schedule.alpha_sigma(times.to(torch.float64))
    return sigma / alpha


class DistilledUNet(ModelMixin, ConfigMixin):
    """A distill model as a diffusers UNet: ``unet(sample, timestep, class_labels=None, guidance=None)`` with
    ``.sample`` the output the exported scheduler expects (see the module docstring).

    Args:
        distill: the model file's metadata (``model``, ``diffusion``, ``card``), from which the network is rebuilt.
        interface: ``"ddim"`` (timestep ``(k + 1) table_stride - 1`` = the ``k``-th grid time from the clean
            end; returns the clean estimate) or ``"cm"`` (``CMStochasticIterativeScheduler``'s scaled input and
            ``250 ln sigma``).
        grid: the student's grid times in (0, 1], increasing (``ddim``: one per table entry; ``cm``: every time a
            sigma snaps to).
    """

    @register_to_config
    def __init__(self, distill: dict[str, Any] | None = None, interface: str = "ddim",
                 grid: list[float] | None = None, sample_size: int = 32, in_channels: int = 3,
                 out_channels: int = 3, num_class_embeds: int | None = None, guidance: float = 0.0,
                 sigma_min: float = 0.002, sigma_data: float = 0.5, sigma_max: float = 80.0,
                 table_stride: int = 1):
        super().__init__()
        from distill.checkpoint import build_denoiser

        if interface not in ("ddim", "cm"):
            raise ValueError(f"interface {interface!r}: ddim or cm")
        self.den = build_denoiser(distill or {}, "a DistilledUNet config")
        self.den.metadata = distill
        self._grid = torch.tensor(sorted(grid or []), dtype=torch.float64)
        self._sigmas = _grid_sigmas(self.den.schedule, self._grid)

    def _times(self, timestep, batch: int, device) -> Tensor:
        """The student's grid times (float64 ``(B,)``) of diffusers' timestep(s)."""
        tau = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        if self.config.interface == "ddim":
            stride = self.config.table_stride
            j = (tau + 1) / stride - 1  # table entry (k + 1) stride - 1 is grid time k
            k = j.round().long()
            if bool(((j - k).abs() > 1e-6).any() or (k < 0).any() or (k >= len(self._grid)).any()):
                raise ValueError(f"timestep {timestep}: not on this student's grid; pass "
                                 f"num_inference_steps={len(self._grid)}")
            t = self._grid[k]
        else:
            sigma = torch.exp(tau / 250.0)
            rel = (sigma[:, None] / self._sigmas[None, :] - 1.0).abs()
            best = rel.argmin(1)
            exact = rel.gather(1, best[:, None])[:, 0] < SNAP
            t = torch.where(exact, self._grid[best], self.den.schedule.t_of_sigma_ve(sigma))
            # the start: sigma_max stands for the grid's first time (where distill's prior is drawn)
            t = torch.where(sigma >= self.config.sigma_max * (1 - 1e-6), self._grid[-1], t)
        return t.expand(batch).to(device)

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None,
                guidance: float | Tensor | None = None, return_dict: bool = True):
        from distill.denoiser import Cond
        from distill.parameterization import append_dims, consistency_scalings
        from distill.samplers import clean_alpha_sigma

        t = self._times(timestep, sample.shape[0], sample.device)
        labels = class_labels.to(sample.device).long() if class_labels is not None else None
        w = self.config.guidance if guidance is None else guidance
        cond = Cond(labels, w if labels is not None else 0.0)
        if self.config.interface == "ddim":
            out = self.den(sample, t, cond)
        else:
            # the scheduler's float32 sigma (its step recomputes the scalings from it): the same boundary scalings
            # as distill's consistency models, at the scheduler's sigma
            sigma = torch.exp(torch.as_tensor(timestep, dtype=torch.float64) / 250.0).to(torch.float32)
            sigma = append_dims(sigma.reshape(-1).to(sample.device), sample.ndim)
            c_skip, c_out, c_in = consistency_scalings(sigma, self.config.sigma_min, self.config.sigma_data)
            x_ve = sample / c_in
            alpha, _ = clean_alpha_sigma(self.den.schedule, t)
            d = self.den(x_ve * append_dims(alpha.to(sample), sample.ndim), t, cond)
            out = (d - c_skip * x_ve) / c_out
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _sampling(den, steps: int | None, where: str) -> tuple[str, list[float]]:
    """``(interface, timesteps)``: the student's sampler family and its exact grid (``steps + 1`` times to 0)."""
    from distill.checkpoint import card_sampling
    from distill.samplers import make_timesteps

    meta = den.metadata or {}
    card_sampler = (meta.get("card") or {}).get("sampler")
    interface = "cm" if den.consistency is not None or card_sampler == "consistency" else "ddim"
    sampler = "consistency" if interface == "cm" else "ddim"
    _, steps, spacing, times = card_sampling(meta, sampler, steps)
    if times is None:
        try:
            times = make_timesteps(den.schedule, steps, spacing or "uniform").tolist()
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None
    return interface, [float(t) for t in times]


def _stock_unet2d(den, times: list[float]) -> bool:
    """Whether the student is a plain diffusers UNet on diffusers' own DDIM grid of its table (then the folder
    needs nothing of distill)."""
    from distill.models.diffusers_unet import DiffusersUNet
    from distill.schedules import DiscreteSchedule

    s = den.schedule
    if not (isinstance(den.net, DiffusersUNet) and den.net.config.kind == "UNet2DModel"
            and isinstance(s, DiscreteSchedule) and s.set_alpha_to_one and den.clip_x0 is None
            and not den.guidance_input and den.consistency is None and den.time_input == "index"):
        return False
    steps = len(times) - 1
    if s.num_train_timesteps % steps:
        return False
    return bool(np.allclose(times, s.diffusers_grid(steps, "trailing").numpy(), rtol=0, atol=1e-12))


def build_pipeline(den, interface: str, times: list[float], all_times: list[list[float]]):
    """The diffusers pipeline object of the student (not yet saved) and the call arguments that reproduce
    ``times``."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDIMPipeline, DDIMScheduler

    from distill.samplers import alpha_sigma_at, prior_scale

    c = den.net.config
    steps = len(times) - 1
    common = {"sample_size": int(c.image_size), "in_channels": int(c.in_channels),
              "out_channels": int(c.in_channels), "num_class_embeds": int(den.num_classes) or None,
              "guidance": float((den.metadata.get("card") or {}).get("guidance", 0.0))}
    if interface == "ddim" and _stock_unet2d(den, times):
        s = den.schedule
        unet = den.net.unet
        scheduler = DDIMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                                  beta_start=s.beta_start, beta_end=s.beta_end,
                                  prediction_type=PREDICTION_TYPES[den.prediction], clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0)
        return DDIMPipeline(unet=unet, scheduler=scheduler), {"num_inference_steps": steps}, "UNet2DModel"
    if interface == "ddim":
        grid = sorted(times[:-1])  # the student's grid times from the clean end
        abar = np.array([alpha_sigma_at(den.schedule, t)[0] ** 2 for t in grid], dtype=np.float64)
        ratio = abar / np.concatenate([[1.0], abar[:-1]])
        # diffusers keeps 1 - beta in float32: a beta near 1 (alpha_bar 2e-9 at a cosine schedule's end) would
        # round it away, so each interval is split into `per` equal factors >= 1/2, and the grid is every
        # `per`-th table entry (DDIM's trailing grid of `steps` steps on the longer table)
        per = max(1, math.ceil(math.log(float(ratio.min())) / math.log(0.5)))
        betas = np.repeat(1.0 - ratio ** (1.0 / per), per)
        unet = DistilledUNet(distill=den.metadata, interface="ddim", grid=grid, table_stride=per, **common)
        unet.den.load_state_dict(den.state_dict())
        scheduler = DDIMScheduler(num_train_timesteps=steps * per, trained_betas=betas.tolist(),
                                  prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="trailing", steps_offset=0)
        return DDIMPipeline(unet=unet, scheduler=scheduler), {"num_inference_steps": steps}, "DistilledUNet"
    cons = den.consistency or {"sigma_min": 0.002, "sigma_data": 0.5}
    grid = sorted({t for ts in all_times for t in ts[:-1]})
    # the pipeline starts from sigma_max * z, in VE coordinates: distill's prior (prior_scale * z) over alpha
    sigma_max = prior_scale(den.schedule, max(grid)) / alpha_sigma_at(den.schedule, max(grid))[0]
    unet = DistilledUNet(distill=den.metadata, interface="cm", grid=grid, sigma_min=cons["sigma_min"],
                         sigma_data=cons["sigma_data"], sigma_max=sigma_max, **common)
    unet.den.load_state_dict(den.state_dict())
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=CM_TRAIN_TIMESTEPS, sigma_min=cons["sigma_min"],
                                               sigma_max=sigma_max, sigma_data=cons["sigma_data"], rho=7.0,
                                               clip_denoised=False)
    return ConsistencyModelPipeline(unet=unet, scheduler=scheduler), \
        {"num_inference_steps": None, "timesteps": cm_timesteps(scheduler, den.schedule, times)}, "DistilledUNet"


def cm_timesteps(scheduler, schedule, times: list[float]) -> list[int]:
    """The scheduler's integer timesteps (Karras-ramp indices) whose sigmas are nearest to the student's grid
    times' VE-equivalent noise levels."""
    from distill.schedules import karras_u

    cfg = scheduler.config
    sigmas = _grid_sigmas(schedule, torch.tensor(times[:-1], dtype=torch.float64))
    u = karras_u(sigmas, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    index = (u * (cfg.num_train_timesteps - 1)).round().long().clamp(0, cfg.num_train_timesteps - 1)
    index[0] = 0  # the grid's first time is sigma_max exactly
    if bool((index[1:] <= index[:-1]).any()):
        raise UsageError(f"timesteps {times}: two grid times fall on the same scheduler sigma")
    # set_timesteps takes them in descending order and reverses them into its ramp: the last is sigma_max
    return index.flip(0).tolist()


def _load_quietly(pipeline_class, folder: Path):
    """``pipeline_class.from_pretrained(folder)`` without its progress bar and its warning that a DistilledUNet
    is not the UNet2DModel the pipeline's type hints name."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        return pipeline_class.from_pretrained(str(folder))
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def run_pipeline(pipe, call: dict[str, Any], seeds, labels: Tensor | None = None) -> np.ndarray:
    """The diffusers pipeline's images (NHWC float in [0, 1]) for per-sample generators seeded ``seeds``. A
    class-conditional DDIM student runs the scheduler loop (``DDIMPipeline`` passes no class labels)."""
    from diffusers import ConsistencyModelPipeline
    from diffusers.utils.torch_utils import randn_tensor

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, ConsistencyModelPipeline):
        return pipe(batch_size=len(seeds), generator=gens, class_labels=labels, output_type="np", **call).images
    if labels is None:
        return pipe(batch_size=len(seeds), generator=gens, eta=0.0, output_type="np", **call).images
    c = pipe.unet.config
    x = randn_tensor((len(seeds), c.in_channels, c.sample_size, c.sample_size), generator=gens)
    pipe.scheduler.set_timesteps(call["num_inference_steps"])
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            out = pipe.unet(x, t, class_labels=labels).sample
            x = pipe.scheduler.step(out, t, x, eta=0.0, generator=gens).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ours(den, interface: str, times: list[float], seeds, labels: Tensor | None) -> np.ndarray:
    """distill's own sampler on the same grid and per-sample generators (NHWC float in [0, 1])."""
    from distill.checkpoint import card_guidance
    from distill.denoiser import Cond
    from distill.samplers import generate

    w = card_guidance(den.metadata or {}) if labels is not None else 0.0
    with torch.no_grad():
        x = generate(den, den.image_shape, list(seeds), sampler="consistency" if interface == "cm" else "ddim",
                     steps=len(times) - 1, timesteps=times, cond=Cond(labels, w))
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def export_diffusers(model: str, out: Path, *, steps: int | None = None, command: str = "", log=print) -> dict:
    """Write ``out`` (a diffusers pipeline directory and ``distill_export.json``); returns the record. Every check
    (the pipeline against distill's sampler included) runs before ``out`` is touched."""
    import diffusers

    from distill.checkpoint import file_sha256, load_denoiser, resolve_model_path
    from export.artifact import check_export_out, library_versions, staged_dir

    out = Path(out)
    check_export_out(out, marker=EXPORT_FILE, what="a diffusers export")
    path = resolve_model_path(model)
    den = load_denoiser(model).float()
    if den.latent:
        raise UsageError(f"{model}: a latent model; diffusers' DDIM and consistency pipelines have no autoencoder, so "
                         "export it with 'distill export onnx' (the decoder is written beside the denoiser)")
    interface, times = _sampling(den, steps, str(model))
    if times[-1] != 0.0:
        raise UsageError(f"{model}: its grid ends on training timestep 0 (set_alpha_to_one false); the exported "
                         "pipelines end on clean data, so they would not reproduce it")
    if interface == "ddim" and den.schedule.variance != "vp":
        raise UsageError(f"{model}: a variance-exploding (EDM) model has no DDIM alpha_bar table; export it with "
                         "'distill export onnx'")
    card = (den.metadata or {}).get("card") or {}
    all_times = [times, *[[float(t) for t in ts] for ts in (card.get("timesteps_by_steps") or {}).values()]] \
        if interface == "cm" else [times]
    pipe, call, unet_class = build_pipeline(den, interface, times, all_times)
    seeds = list(PARITY_SEEDS)
    labels = torch.arange(len(seeds)) % den.num_classes if den.num_classes else None
    log(f"exporting {model} to diffusers ({type(pipe).__name__}, {unet_class}, {len(times) - 1} steps); checking "
        "the pipeline against distill's sampler ...")
    with staged_dir(out) as stage:
        pipe.save_pretrained(str(stage))
        reloaded = _load_quietly(type(pipe), stage)  # what a user loads, not the object in memory
        ref = ours(den, interface, times, seeds, labels)
        got = run_pipeline(reloaded, call, seeds, labels)
        err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        if not math.isfinite(err) or err > PARITY_BOUND:
            raise UsageError(f"{model}: the exported diffusers pipeline differs from distill's sampler by {err:.2e} "
                             f"relative (bound {PARITY_BOUND:g}); nothing was written")
        other = {}
        if interface == "cm":
            for ts in all_times[1:]:
                other[str(len(ts) - 1)] = {"timesteps": cm_timesteps(pipe.scheduler, den.schedule, ts)}
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        record = {"format": EXPORT_FORMAT, "kind": "diffusers", "pipeline": type(pipe).__name__,
                  "unet": unet_class, "scheduler": type(pipe.scheduler).__name__, "interface": interface,
                  "steps": len(times) - 1, "timesteps": times, "call": call, "calls_by_steps": other,
                  "loads_with": ("stock diffusers" if unet_class == "UNet2DModel" else
                                 "diffusers after 'import export.diffusers_pipeline'"),
                  "parity": {"against": "distill's sampler, same per-sample generators", "seeds": seeds,
                             "max_rel_err": err, "tolerance": PARITY_BOUND},
                  "source": {"model": str(model), "path": str(path), "sha256": file_sha256(path)},
                  "command": command, "versions": {**library_versions(), "diffusers": diffusers.__version__},
                  "sha256": {f: file_sha256(stage / f) for f in files}}
        (stage / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
