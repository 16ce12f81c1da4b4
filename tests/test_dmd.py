"""Distribution matching distillation (DMD2) on the tiny 8x8 digits teacher: exact resume of the generator, the
fake score, the discriminator head and their optimizer; the distribution-matching gradient; the card; the CLI's
mistakes; a recipe stage."""

import json

import pytest
import torch
from resume_check import killed_run_resumes

from distill.checkpoint import load_denoiser
from distill.denoiser import Cond
from distill.methods.dmd import DMDLoss

ARGS = ["--steps", "4", "--batch-size", "4", "--ckpt-every", "2", "--fake-updates", "2", "--ema-decay", "0.9"]


def test_a_killed_dmd_run_resumes_to_the_same_weights(tmp_path, teacher_file, distill_main, monkeypatch):
    """Killed inside generator step 3 (last checkpoint at step 2), the same command continues and ends with the
    generator, its EMA, the fake score, the head and both optimizers of an uninterrupted run."""
    a = killed_run_resumes(distill_main, monkeypatch, tmp_path, ["dmd", teacher_file, *ARGS], DMDLoss,
                           kill_at=3, saved_step=2)
    assert any(k.startswith("loss.fake.") for k in a) and any(k.startswith("loss.head.") for k in a)
    assert any(k.startswith("loss.opt.") for k in a) and not any(k.startswith("loss.teacher.") for k in a)
    # the card: a one-step student of the teacher; the log has every part of the loss
    den = load_denoiser(tmp_path / "whole")
    card = den.metadata["card"]
    assert card["method"] == "dmd2" and card["steps"] == 1 and card["timesteps"] == [1.0, 0.0]
    assert card["sampler"] == "ddim" and card["compute"]["fake_updates_per_step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert {"dm_loss", "gan_loss", "fake_loss", "disc_loss"} <= set(lines[-1])
    code, _, err = distill_main("sample", tmp_path / "whole", "--seeds", "0-3", "--out", tmp_path / "s")
    assert code == 0, err
    # more steps continue the same run
    code, stdout, err = distill_main("dmd", teacher_file, "--out", tmp_path / "whole", *ARGS[2:], "--steps", "5")
    assert code == 0 and "resuming" in stdout, err


def test_the_matching_gradient_vanishes_when_the_fake_score_is_the_real_one(teacher_file):
    """Before the fake score has moved away from its copy of the teacher, fake and real scores agree: the
    distribution-matching term and its gradient are zero; the GAN term alone moves the generator."""
    teacher = load_denoiser(teacher_file)
    student = load_denoiser(teacher_file)
    loss = DMDLoss(teacher, image_shape=(1, 8, 8), fake_updates=1, fake_lr=1e-30, gan_weight=0.0, disc_weight=0.0)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    out = loss(student, x0, torch.arange(6), torch.Generator().manual_seed(0))
    assert out.shape == (6,) and float(out.detach().abs().max()) < 1e-10
    out.sum().backward()
    grads = [p.grad for p in student.net.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-8
    assert loss.metrics["dm_loss"] < 1e-10 and "gan_loss" not in loss.metrics


@pytest.mark.parametrize("args, needle", [
    (["--t-min", "0.9", "--t-max", "0.5"], "need --t-min < --t-max"),
    (["--guidance", "1", "--init", "nonexistent.safetensors"], "nonexistent"),
    (["--fake-updates", "0"], "--fake-updates"),
    (["--disc-weight", "0"], "the discriminator would never train"),
])
def test_bad_dmd_options_are_one_line(tmp_path, teacher_file, distill_main, args, needle):
    code, _, err = distill_main("dmd", teacher_file, "--out", tmp_path / "d", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d" / "train_state.safetensors").exists()


def test_a_recipe_dmd_stage_starts_from_an_earlier_stage(tmp_path, teacher_file, distill_main):
    from distill.app.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: dmd-test
teacher: {teacher_file}
stages:
  - name: pd
    kind: progressive
    start_steps: 4
    target_steps: 1
    round_steps: 2
  - name: dmd
    kind: dmd
    init: pd
    steps: 3
""")
    r = load_recipe(recipe, out=tmp_path / "runs")
    entry = next(e for e in r.stages if e.name == "dmd")
    assert entry.config.init.endswith("pd/steps-1/model.safetensors") and "pd" in entry.needs
    assert entry.config.command(tmp_path / "runs/dmd").startswith(f"distill dmd {teacher_file} --out")
    # run: the generator is trained from the progressive student and gets a model card like every student
    code, _, err = distill_main("run", recipe, "--out", tmp_path / "runs", "--no-progress")
    assert code == 0, err
    card = (tmp_path / "runs" / "dmd" / "MODEL_CARD.md").read_text()
    assert "distribution matching distillation" in card and "pd/steps-1" in card
    # its limits are its method's: not bounded by the teacher's ODE (a progressive student's card says it is)
    assert "nearest-neighbour" in card and "probability-flow ODE" not in card
    assert "probability-flow ODE" in (tmp_path / "runs" / "pd" / "steps-1" / "MODEL_CARD.md").read_text()


def test_a_multistep_generator_trains_on_its_own_earlier_steps(teacher_file):
    """K = 2: each sample's step is drawn; the step-2 inputs come from the generator's own step 1 (no gradient)
    re-noised to t = 0.5, the step-1 inputs are the prior noise; the gradient flows through the last evaluation."""
    teacher = load_denoiser(teacher_file)
    student = load_denoiser(teacher_file)
    loss = DMDLoss(teacher, image_shape=(1, 8, 8), generator_steps=2, gan_weight=0.0, disc_weight=0.0)
    assert loss.generator_times == [1.0, 0.5] and loss.describe()["generator_steps"] == 2
    calls = []
    student.net.register_forward_hook(
        lambda m, args, out: calls.append((args[0].detach().clone(), args[1].detach().clone(), out.requires_grad)))
    z = torch.randn(16, 1, 8, 8)
    with torch.enable_grad():
        g = loss.generate(student, z, Cond(torch.arange(16) % 10), torch.Generator().manual_seed(0))
    assert len(calls) == 2 and g.requires_grad
    (x_sim, t_sim, grad_sim), (x_in, t_in, grad_in) = calls
    assert not grad_sim and grad_in and set(t_sim.tolist()) == {1000.0}  # the network reads t scaled by 1000
    first = t_in == 1000.0
    assert set(t_in.tolist()) == {1000.0, 500.0} and 0 < int(first.sum()) < 16
    assert torch.equal(x_in[first], x_sim[first])  # step 1: from the prior
    assert not torch.allclose(x_in[~first], x_sim[~first])  # step 2: the re-noised step-1 estimate
    assert float(x_in[~first].std()) < float(x_sim.std())  # the state at t = 0.5 is less noisy than the prior


def test_a_multistep_dmd_run_samples_on_its_grid(tmp_path, teacher_file, distill_main):
    out = tmp_path / "ms"
    code, _, err = distill_main("dmd", teacher_file, "--out", out, *ARGS, "--gen-steps", "2", "--gan-weight", "0",
                                "--disc-weight", "0")
    assert code == 0, err
    den = load_denoiser(out)
    card = den.metadata["card"]
    assert card["sampler"] == "consistency" and card["steps"] == 2 and card["timesteps"] == [1.0, 0.5, 0.0]
    assert card["timesteps_by_steps"]["1"] == [1.0, 0.0] and den.metadata["method"]["gen_steps"] == 2
    for steps in ("2", "1"):
        code, _, err = distill_main("sample", out, "--seeds", "0-3", "--steps", steps, "--out", tmp_path / steps)
        assert code == 0, err
