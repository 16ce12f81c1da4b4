"""Teachers from diffusers directories: the adapter against diffusers' own schedulers, our samplers against
diffusers' pipelines on the same noise, distillation and export of a diffusers teacher, and what is refused.
The tests create (and briefly train) the small diffusers models they use; nothing is downloaded."""

import json

import numpy as np
import pytest
import torch

from distill.data import load_dataset

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _unet():
    from diffusers import UNet2DModel

    # two levels, one block each, no attention: the smallest UNet2DModel that still down- and upsamples (its ONNX
    # trace is what the export test pays for)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def _save(path, unet, **scheduler):
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(str(path))
    return path


def _save_with(path, unet, scheduler):
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


def _train_briefly(unet, scheduler, steps: int = 30) -> None:
    """A few Adam steps of diffusers' own objective on the 8x8 digits, so the samples are not noise."""
    images = load_dataset("digits").images
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (32,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=g)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A briefly trained DDPM pipeline directory (diffusers' default scheduler: linear betas, epsilon, clipping)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet = _unet()
    _train_briefly(unet, DDPMScheduler())
    return _save(tmp_path_factory.mktemp("diffusers") / "ddpm", unet)


def _uint8(images01: np.ndarray) -> np.ndarray:
    return (images01 * 255).round().astype(int)


# every prediction type and every beta table, each once (a Latin square; the full 3 x 3 cross passed too)
@pytest.mark.parametrize("prediction, beta_schedule", [("epsilon", "linear"), ("v_prediction", "scaled_linear"),
                                                       ("sample", "squaredcos_cap_v2")])
def test_the_adapter_gives_the_schedulers_pred_original_sample_at_every_training_timestep(tmp_path, prediction,
                                                                                         beta_schedule):
    from diffusers import DDPMScheduler

    from distill.checkpoint import load_denoiser

    torch.manual_seed(0)
    unet = _unet()
    for p in unet.parameters():  # far from zero, so every part of the network and of the mapping counts
        torch.nn.init.normal_(p, std=0.05)
    kw = {"beta_schedule": beta_schedule, "prediction_type": prediction, "clip_sample": False}
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    path = _save(tmp_path / "m", unet, **kw)
    den = load_denoiser(path)
    assert den.prediction == PREDICTIONS[prediction] and den.time_input == "index" and den.clip_x0 is None
    sched = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 1, 8, 8, generator=g)
    index = torch.arange(T)
    with torch.no_grad():
        ours = den(x, (index + 1).float() / T)  # training timestep i sits at t = (i + 1) / T
        out = unet(x, index).sample
        ref = torch.stack([sched.step(out[i:i + 1], int(i), x[i:i + 1]).pred_original_sample[0] for i in index])
    scale = ref.flatten(1).abs().amax(1)  # per timestep: x0 reaches 1/alpha times the noise at the noisy end
    err = ((ours - ref).flatten(1).abs().amax(1) / scale)
    assert float(err.max()) < 1e-4, (float(err.max()), int(err.argmax()))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_edm_scheduler_maps_onto_the_preconditioned_karras_denoiser(tmp_path, prediction):
    """EDMEulerScheduler: the x0 estimate is the scheduler's precondition_outputs of the UNet on its preconditioned
    input and noise, at sigmas from sigma_min to sigma_max; Euler on the Karras grid walks its sampling loop."""
    from diffusers import EDMEulerScheduler

    from distill.checkpoint import load_denoiser
    from distill.samplers import generate

    torch.manual_seed(0)
    unet = _unet()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = _save_with(tmp_path / "edm", unet, EDMEulerScheduler(prediction_type=prediction, sigma_data=0.5))
    den = load_denoiser(path)
    assert den.prediction == {"epsilon": "edm", "v_prediction": "edm_v"}[prediction]
    sched = EDMEulerScheduler.from_pretrained(str(path / "scheduler"))
    sigmas = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[:, None, None, None]
    with torch.no_grad():
        ours = den(x, den.schedule.t_of_logsnr(-2 * torch.log(sigmas.double())).float())
        ref = torch.cat([sched.precondition_outputs(x[i:i + 1], unet(sched.precondition_inputs(x[i:i + 1], s),
                                                                      sched.precondition_noise(s)).sample, s)
                         for i, s in enumerate(sigmas)])
    assert float(((ours - ref).flatten(1).abs().amax(1) / ref.flatten(1).abs().amax(1)).max()) < 1e-5
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens]) * sched.init_noise_sigma
    sched.set_timesteps(10)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        ours = generate(den, (1, 8, 8), range(4), sampler="euler", steps=10, spacing="karras")
    # the grids differ by distill's sigma_min floor (1e-4 of t) and the start by sqrt(1 + 1/sigma_max^2)
    assert float((ours - x).abs().max()) < 1e-3 * float(x.abs().max())


def test_clip_sample_clamps_the_clean_estimate_as_diffusers_does(tmp_path):
    from diffusers import DDPMScheduler

    from distill.checkpoint import load_denoiser

    torch.manual_seed(0)
    unet = _unet()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = _save(tmp_path / "m", unet, clip_sample=True, clip_sample_range=0.8)
    den = load_denoiser(path)
    assert den.clip_x0 == 0.8
    sched = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 300, 700, 999])
    with torch.no_grad():
        ours = den(x, (index + 1).float() / 1000)
        out = unet(x, index).sample
    ref = torch.cat([sched.step(out[i:i + 1], int(t), x[i:i + 1]).pred_original_sample for i, t in enumerate(index)])
    assert float(ours.abs().max()) <= 0.8 + 1e-6 and torch.allclose(ours, ref, atol=1e-5)


def test_ddim_and_ddpm_sampling_reproduce_the_diffusers_pipelines(trained_dir, tmp_path, distill_main):
    """``distill sample DIR`` walks the scheduler's own timesteps; on the same per-sample generators it gives
    DDIMPipeline's and DDPMPipeline's images to within one uint8 level."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    seeds = list(range(8))
    for name, pipe_class, sampler in (("ddim", DDIMPipeline, "ddim"), ("ddim-alpha0", DDIMPipeline, "ddim"),
                                      ("ddpm", DDPMPipeline, "ddpm")):
        folder = trained_dir
        if name.startswith("ddim"):  # DDIM's direction term keeps the unclipped noise estimate (README): unclipped
            folder = tmp_path / name  # ddim-alpha0: set_alpha_to_one false, the last step lands on timestep 0
            pipe = DDPMPipeline.from_pretrained(str(trained_dir))
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                       set_alpha_to_one=name == "ddim")
            pipe.save_pretrained(str(folder))
        r = distill_main("sample", folder, "--sampler", sampler, "--steps", "10", "--seeds", "0-7", "--out",
                         tmp_path / name)
        assert r.returncode == 0, r.stderr
        ours = np.load(tmp_path / name / "samples.npz")["images"].astype(int)
        pipe = pipe_class.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        ref = _uint8(pipe(batch_size=len(seeds), generator=gens, num_inference_steps=10, output_type="np").images)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1, (name, np.abs(ours - ref).max())
        assert ref.std() > 10  # images, not a constant


def test_a_diffusers_teacher_runs_through_a_recipe_distills_exports_and_evaluates(trained_dir, tmp_path,
                                                                                  distill_main):
    """recipes/tiny-diffusers.yaml on the directory: progressive and consistency students that are diffusers UNets
    again, the progressive one's ONNX export within the parity bound, the benchmark and gates; then eval."""
    from pathlib import Path

    from distill.checkpoint import load_denoiser, read_metadata

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-diffusers.yaml"
    out = tmp_path / "run"
    r = distill_main("run", recipe, "--out", out, "--no-progress", "--set", f"teacher={trained_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    for student in (out / "pd" / "steps-2" / "model.safetensors", out / "cd" / "model.safetensors"):
        meta = read_metadata(student)
        assert meta["model"]["arch"] == "diffusers-unet2d" and meta["diffusion"]["time_input"] == "index"
        assert load_denoiser(student).clip_x0 == 1.0  # the teacher's clip_sample, kept
    assert read_metadata(out / "pd" / "steps-2" / "model.safetensors")["card"]["steps"] == 2
    manifest = json.loads((out / "pd-fp32" / "manifest.json").read_text())
    assert manifest["parity"]["max_rel_err"] <= 1e-5
    assert json.loads((out / "gates.json").read_text())["passed"]
    # both students back out as diffusers pipelines: the teacher clips, so the UNet is a DistilledUNet
    for folder, student, pipeline in (("pd-diffusers", out / "pd" / "steps-2", "DDIMPipeline"),
                                      ("cd-diffusers", out / "cd", "ConsistencyModelPipeline")):
        record = json.loads((out / folder / "distill_export.json").read_text())
        assert record["pipeline"] == pipeline and record["unet"] == "DistilledUNet"
        assert _pipeline_against_ours(out / folder, student / "model.safetensors") <= 1e-4
    r = distill_main("eval", trained_dir, "--data", "digits", "--seeds", "0-19", "--steps", "4", "--metrics", "fd",
                     "--out", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["fd"] > 0


def _pipeline_against_ours(folder, model, seeds=range(6), labels=None, guidance=0.0) -> float:
    """``DiffusionPipeline.from_pretrained(folder)`` against distill's sampler on the model's own grid, with the
    same per-sample generators: the largest difference relative to the largest pixel value (images in [0, 1])."""
    import diffusers

    import export.diffusers_pipeline  # noqa: F401  (a DistilledUNet folder names this module)
    from distill.checkpoint import card_sampling, load_denoiser
    from distill.denoiser import Cond
    from distill.samplers import generate

    seeds = list(seeds)
    record = json.loads((folder / "distill_export.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    call = {k: v for k, v in record["call"].items() if v is not None}
    if isinstance(pipe, diffusers.ConsistencyModelPipeline):
        ref = pipe(batch_size=len(seeds), generator=gens, class_labels=labels, output_type="np", **call).images
    elif labels is None:
        ref = pipe(batch_size=len(seeds), generator=gens, eta=0.0, output_type="np", **call).images
    else:  # DDIMPipeline passes no class labels: the scheduler loop, as the README writes it
        c = pipe.unet.config
        x = torch.stack([torch.randn(c.in_channels, c.sample_size, c.sample_size, generator=g) for g in gens])
        pipe.scheduler.set_timesteps(call["num_inference_steps"])
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                x = pipe.scheduler.step(pipe.unet(x, t, class_labels=labels, guidance=guidance).sample, t, x,
                                        eta=0.0).prev_sample
        ref = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    den = load_denoiser(model)
    sampler, steps, spacing, times = card_sampling(den.metadata, None, record["steps"])
    with torch.no_grad():
        x = generate(den, den.image_shape, seeds, sampler=sampler, steps=steps, spacing=spacing, timesteps=times,
                     cond=Cond(labels, guidance))
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape and ref.std() > 0.01
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_a_plain_unet_on_diffusers_own_grid_exports_for_stock_diffusers(trained_dir, tmp_path, distill_main):
    """No clipping, a trailing grid whose step count divides the table: the folder is a stock UNet2DModel and
    DDIMScheduler (nothing of distill needed to load it), and its pipeline gives distill's samples."""
    from diffusers import DDIMScheduler, DDPMPipeline

    folder = tmp_path / "trailing"
    pipe = DDPMPipeline.from_pretrained(str(trained_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="trailing")
    pipe.save_pretrained(str(folder))
    r = distill_main("export", "diffusers", folder, "--steps", "10", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "UNet2DModel" in r.stdout and "num_inference_steps=10" in r.stdout
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert _pipeline_against_ours(tmp_path / "out", folder) <= 1e-4
    # the export folder is itself a diffusers teacher again; an export over a non-export folder is refused
    r = distill_main("export", "diffusers", folder, "--steps", "10", "--out", folder)
    assert r.returncode == 2 and "not a diffusers export" in r.stderr


def _native(tmp_path, name, consistency=None, guidance_embed=False, card=None):
    """A tiny class-conditional native UNet model file (random weights far from zero) with a student's card."""
    from distill.checkpoint import model_metadata, save_model
    from distill.denoiser import Denoiser
    from distill.models.unet import UNet, UNetConfig
    from distill.schedules import CosineSchedule

    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          num_classes=10, guidance_embed=guidance_embed))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net, CosineSchedule(), "v", "t1000", null_label=10, guidance_input=guidance_embed,
                   consistency=consistency)
    path = tmp_path / f"{name}.safetensors"
    save_model(path, net, {**model_metadata(den), "card": card})
    return path


def test_native_students_export_through_the_distilled_unet(tmp_path, distill_main):
    """A guided (w-input) DDIM student on an uneven grid and a consistency student, both class-conditional native
    UNets: the DistilledUNet folders reproduce distill's sampler on the same noise, labels and w."""
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    guided = _native(tmp_path, "guided", guidance_embed=True,
                     card={"method": "guidance", "sampler": "ddim", "steps": 3, "timesteps": [1.0, 0.6, 0.25, 0.0],
                           "guidance": 1.5, "guidance_range": [0.0, 3.0]})
    cm = _native(tmp_path, "cm", consistency={"sigma_min": 0.002, "sigma_data": 0.5},
                 card={"method": "consistency-distillation", "sampler": "consistency", "steps": 2,
                       "timesteps": [1.0, 0.45, 0.0]})
    for model, w in ((guided, 2.0), (cm, 0.0)):
        out = tmp_path / f"{model.stem}-diffusers"
        r = distill_main("export", "diffusers", model, "--out", out)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "model_index.json").read_text())["unet"][1] == "DistilledUNet"
        assert _pipeline_against_ours(out, model, labels=labels, guidance=w) <= 1e-4


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """A latent teacher: a small AutoencoderKL (8x8 digits -> 2x4x4 latents, scaling_factor 0.5) and a UNet2DModel
    on its latents, each briefly trained, saved as a pipeline directory with vae/, unet/ and scheduler/."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=2, norm_num_groups=8, sample_size=8, scaling_factor=0.5)
    images = load_dataset("digits").images
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(60):
        x = images[torch.randint(0, len(images), (64,), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.sample(generator=g)).sample - x).pow(2).mean() + 1e-4 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * 0.5
    unet = UNet2DModel(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    scheduler = DDPMScheduler(clip_sample=False)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(40):
        z0 = latents[torch.randint(0, len(latents), (32,), generator=g)]
        noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (32,), generator=g)
        loss = (unet(scheduler.add_noise(z0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("latent") / "ldm"
    for name, part in (("vae", vae), ("unet", unet), ("scheduler", scheduler)):
        part.save_pretrained(str(path / name))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiffusionPipeline", "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def test_a_latent_teacher_distills_samples_evaluates_and_exports_with_its_decoder(latent_dir, tmp_path,
                                                                                    distill_main):
    """The denoiser works on latents, the samples are decoded images; the student inherits the autoencoder; its
    export writes decoder.onnx (parity in ONNX Runtime), its FP16 export's decoder is finite and in range on the
    data's own latents, and a fused graph ends in the decode."""
    import onnxruntime as ort

    from distill.checkpoint import load_denoiser, read_metadata
    from distill.denoiser import Cond
    from distill.latent import Decoder, load_autoencoder
    from distill.samplers import generate
    from export.fused import FusedSampler, fused_noise

    r = distill_main("sample", latent_dir, "--steps", "4", "--seeds", "0-7", "--out", tmp_path / "teacher")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "teacher" / "samples.npz")["images"].shape == (8, 8, 8, 1)  # decoded, not 2x4x4
    r = distill_main("progressive", latent_dir, "--data", "digits", "--out", tmp_path / "pd", "--start-steps", "2",
                     "--target-steps", "1", "--round-steps", "6", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    student = tmp_path / "pd" / "steps-1" / "model.safetensors"  # one step: the fused graph traces it once
    latent = read_metadata(student)["latent"]
    assert latent["scaling_factor"] == 0.5 and latent["latent_shape"] == [2, 4, 4]
    assert latent["image_shape"] == [1, 8, 8]
    r = distill_main("eval", student, "--data", "digits", "--seeds", "0-19", "--metrics", "fd", "--out",
                     tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["fd"] > 0

    ae = load_autoencoder(latent)
    real = ae.encode(load_dataset("digits").images[:64])  # the data's own latents
    with torch.no_grad():
        ref = Decoder(ae)(real).numpy()
    for precision in ("fp32", "fp16"):
        out = tmp_path / f"x-{precision}"
        r = distill_main("export", "onnx", student, "--precision", precision, "--out", out)
        assert r.returncode == 0, r.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["decoder"]["graph"] == "decoder.onnx"
        got = ort.InferenceSession(str(out / "decoder.onnx")).run(None, {"latents": real.numpy()})[0]
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        assert np.isfinite(got).all() and np.abs(got).max() <= 1.05 * np.abs(ref).max()
        assert manifest["decoder"]["precision"] == precision and err <= (1e-5 if precision == "fp32" else 1e-2)
        r = distill_main("sample", out, "--seeds", "0-7", "--out", tmp_path / f"s-{precision}")
        assert r.returncode == 0, r.stderr
    # INT8 where it holds quality: measured on other sampled latents, shipped only within its bound
    r = distill_main("export", "onnx", student, "--precision", "int8", "--calib-samples", "8", "--out",
                     tmp_path / "x-int8")
    assert r.returncode == 0, r.stderr
    decoder = json.loads((tmp_path / "x-int8" / "manifest.json").read_text())["decoder"]
    check = decoder["int8"]["check"]
    assert check["finite"] and decoder["precision"] == ("int8" if check["rel_err"] <= 2e-2 else "fp32")
    assert decoder["precision"] == "int8" or "the fp32 decoder is shipped" in decoder["int8"]["why_fp32"]
    r = distill_main("sample", student, "--seeds", "0-7", "--out", tmp_path / "s-torch")
    ours = np.load(tmp_path / "s-torch" / "samples.npz")["images"].astype(int)
    onnx = np.load(tmp_path / "s-fp32" / "samples.npz")["images"].astype(int)  # decoded by decoder.onnx
    assert ours.shape == (8, 8, 8, 1) and np.abs(ours - onnx).max() <= 1
    den = load_denoiser(student)
    assert den.latent == latent
    # the fused graph's module ends in the decode: noise in, the decoded images of the sampling loop out (its ONNX
    # export, `--fused`, is checked against this at export like any fused graph)
    fused = FusedSampler(den, "ddim", [1.0, 0.0], den.image_shape, labels=False, decoder=Decoder(ae)).eval()
    with torch.no_grad():
        got = fused(fused_noise(range(3), den.image_shape, fused.slots))
        want = Decoder(ae)(generate(den, den.image_shape, range(3), sampler="ddim", steps=1, timesteps=[1.0, 0.0],
                                    cond=Cond()))
    assert got.shape == (3, 1, 8, 8) and torch.allclose(got, want, atol=1e-5)


def _conditional_dir(path, rows: int = 10, null: bool = True):
    """A UNet2DConditionModel (cross-attention on 3 x 8 conditioning) with a precomputed conditioning table of
    ``rows`` rows (and a null row), random weights far from zero."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
                                norm_num_groups=8, cross_attention_dim=8, attention_head_dim=4)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    unet.save_pretrained(str(path / "unet"))
    DDPMScheduler(clip_sample=False).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    g = torch.Generator().manual_seed(0)
    tensors = {"encoder_hidden_states": torch.randn(rows, 3, 8, generator=g)}
    if null:
        tensors["null"] = torch.zeros(3, 8)
    save_file(tensors, str(path / "conditioning.safetensors"))
    return unet, tensors


def test_a_conditional_unet_takes_its_precomputed_conditioning_rows_as_classes(tmp_path, distill_main):
    """Row k of conditioning.safetensors is class k: the x0 estimate is the scheduler's own with that row's
    encoder_hidden_states, guidance runs against the null row (diffusers' guidance_scale = 1 + w), and the teacher
    samples and distills on the digits (ten rows, ten classes)."""
    from diffusers import DDPMScheduler

    from distill.checkpoint import load_denoiser
    from distill.denoiser import Cond

    path = tmp_path / "cond"
    unet, tensors = _conditional_dir(path)
    den = load_denoiser(path)
    assert den.num_classes == 10 and den.null_label == 10
    sched = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    g = torch.Generator().manual_seed(1)
    x, index = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 300, 700, 999])
    labels = torch.tensor([0, 3, 5, 9])
    rows, w = tensors["encoder_hidden_states"], 1.5
    with torch.no_grad():
        cond_eps = unet(x, index, encoder_hidden_states=rows[labels]).sample
        null_eps = unet(x, index, encoder_hidden_states=tensors["null"].expand(4, 3, 8)).sample
        for eps, cond in ((cond_eps, Cond(labels)), (null_eps + (1 + w) * (cond_eps - null_eps), Cond(labels, w))):
            ref = torch.cat([sched.step(eps[i:i + 1], int(t), x[i:i + 1]).pred_original_sample
                             for i, t in enumerate(index)])
            ours = den(x, (index + 1).float() / 1000, cond)
            assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5
    r = distill_main("sample", path, "--steps", "4", "--classes", "3", "--guidance", "1", "--seeds", "0-3", "--out",
                     tmp_path / "s")
    assert r.returncode == 0, r.stderr
    r = distill_main("progressive", path, "--data", "digits", "--out", tmp_path / "pd", "--start-steps", "4",
                     "--target-steps", "2", "--round-steps", "4", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    student = load_denoiser(tmp_path / "pd" / "steps-2")
    assert student.num_classes == 10 and torch.equal(student.net.conditioning[:10], rows)
    # what the conditioning must be: one line naming the file
    (path / "conditioning.safetensors").unlink()
    r = distill_main("sample", path, "--steps", "2", "--seeds", "0", "--out", tmp_path / "s2")
    assert r.returncode == 2 and "conditioning.safetensors: missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_python_factory_teacher_samples_distills_and_runs_only_when_named(tmp_path, distill_main, monkeypatch):
    """factory:MODULE:FUNCTION builds any network: it samples and distills like any teacher; a student file of it
    rebuilds its network with the factory, which runs only when named or trusted (DISTILL_TRUSTED_FACTORIES)."""
    import sys

    from distill import factory
    from distill.checkpoint import read_metadata

    spec = "factory:factory_teacher:build"
    monkeypatch.setenv("DISTILL_TRUSTED_FACTORIES", "")  # naming the factory sets it; restored after the test
    r = distill_main("sample", spec, "--seeds", "0-3", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    r = distill_main("progressive", spec, "--out", tmp_path / "pd", "--start-steps", "4", "--target-steps", "2",
                     "--round-steps", "4", "--batch-size", "8")  # --data from the factory's FactoryModel(data=)
    assert r.returncode == 0, r.stderr
    student = tmp_path / "pd" / "steps-2" / "model.safetensors"
    assert read_metadata(student)["model"]["arch"] == "factory"
    # a later process that did not name the factory: refused in one line, then trusted by the environment
    monkeypatch.setattr(factory, "_NAMED", set())
    monkeypatch.delitem(sys.modules, "factory_teacher")
    monkeypatch.delenv("DISTILL_TRUSTED_FACTORIES", raising=False)
    r = distill_main("sample", student, "--seeds", "0-1", "--out", tmp_path / "s2")
    assert r.returncode == 2 and "DISTILL_TRUSTED_FACTORIES=factory_teacher" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s2").exists()
    monkeypatch.setenv("DISTILL_TRUSTED_FACTORIES", "factory_teacher")
    r = distill_main("sample", student, "--seeds", "0-1", "--out", tmp_path / "s2")
    assert r.returncode == 0, r.stderr
    for bad, needle in (("factory:nope", "factory:MODULE:FUNCTION"), ("factory:no_such_module:f", "cannot import"),
                        ("factory:factory_teacher:missing", "has no function missing")):
        r = distill_main("sample", bad, "--seeds", "0", "--out", tmp_path / "s3")
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("change, needle", [
    ({"thresholding": True}, "dynamic thresholding is not supported"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
])
def test_what_does_not_map_exactly_is_one_line(tmp_path, distill_main, change, needle):
    torch.manual_seed(0)
    path = _save(tmp_path / "m", _unet())
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    r = distill_main("sample", path, "--steps", "2", "--seeds", "0", "--out", tmp_path / "s")
    assert r.returncode == 2 and needle in r.stderr and str(config) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_converted_directory_is_reused_until_it_changes(tmp_path, monkeypatch):
    from distill.checkpoint import resolve_model_path
    from distill.rundir import cache_dir

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    path = _save(tmp_path / "m", _unet())
    first = resolve_model_path(path)
    assert first.parent == cache_dir() / "diffusers" and resolve_model_path(path) == first
    stamp = first.stat().st_mtime_ns
    assert resolve_model_path(path).stat().st_mtime_ns == stamp  # not converted again
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    second = resolve_model_path(path)
    assert second != first and json.loads(json.dumps(second.name))  # the edited directory converts anew


def test_pickle_weights_load_only_when_trusted(tmp_path, monkeypatch, distill_main):
    """A diffusers directory whose UNet weights are a pickle-based .bin: refused in one line; with
    DISTILL_TRUST_PICKLE=1 it loads (diffusers reads it with torch.load(weights_only=True)), and to the same model
    as its safetensors twin."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from distill.checkpoint import load_denoiser
    from distill.denoiser import Cond

    torch.manual_seed(0)
    unet = _unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    _save(tmp_path / "st", unet)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTILL_TRUST_PICKLE", raising=False)
    code, _, err = distill_main("inspect", tmp_path / "bin")
    assert code == 2 and "pickle-based" in err and "DISTILL_TRUST_PICKLE=1" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cache" / "diffusers").exists()
    monkeypatch.setenv("DISTILL_TRUST_PICKLE", "1")
    trusted, plain = load_denoiser(str(tmp_path / "bin")), load_denoiser(str(tmp_path / "st"))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(trusted(x, 0.5, Cond(None)), plain(x, 0.5, Cond(None)))
