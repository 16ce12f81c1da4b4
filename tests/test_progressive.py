"""Progressive and guidance distillation: the targets, the students' start, the student card, the command and its
exact resume after a kill."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import card_sampling, load_denoiser, read_metadata
from distill.data import load_dataset
from distill.denoiser import Cond, Denoiser
from distill.distillation import ProgressiveOptions, make_student
from distill.errors import UsageError
from distill.hardware import native_bf16
from distill.methods.progressive import GuidanceLoss, ProgressiveLoss, ddim_x_target, truncated_snr_weight
from distill.models.unet import UNet, UNetConfig
from distill.samplers import clean_alpha_sigma, ddim_step, sample_ddim, sample_dpmpp_2m
from distill.schedules import CosineSchedule

# the recipes say precision: auto, bf16 only where the CPU runs it natively
NATIVE_BF16 = native_bf16()

TEACHER_ARGS = ["--data", "digits", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
                "--batch-size", "16", "--warmup", "0", "--attn", "", "--steps", "30", "--lr", "2e-3"]
PD_ARGS = ["--start-steps", "8", "--target-steps", "2", "--round-steps", "4,3", "--guidance-range", "0,2",
           "--guidance-steps", "3", "--batch-size", "16", "--ckpt-every", "2"]


def _tiny_denoiser(seed=0, guidance_embed=False):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          num_classes=10, guidance_embed=guidance_embed))
    for p in net.parameters():  # zero-initialised output layers would make every prediction trivial
        torch.nn.init.normal_(p, std=0.05)
    return Denoiser(net, CosineSchedule(), "v", "t1000", null_label=10, guidance_input=guidance_embed).eval()


def _batch(n=6):
    data = load_dataset("digits")
    return data.images[:n], data.labels[:n]


# -- the targets ---------------------------------------------------------------------------------------------------


def test_the_x_target_makes_one_ddim_step_land_where_two_teacher_steps_land():
    g = torch.Generator().manual_seed(0)
    sched = CosineSchedule()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.125])
    s = torch.tensor([0.5, 0.5, 0.25, 0.0, 0.0])
    a_t, s_t = clean_alpha_sigma(sched, t)
    a_s, s_s = clean_alpha_sigma(sched, s)
    z_t, z_s = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    x = ddim_x_target(z_t, z_s, a_t, s_t, a_s, s_s)
    torch.testing.assert_close(ddim_step(z_t, x, a_t, s_t, a_s, s_s), z_s, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x[3:], z_s[3:])  # a step to clean data: the target is the teacher's own x


@pytest.mark.parametrize("student_steps", [1, 4])
def test_progressive_targets_match_two_ddim_steps_of_the_teacher_sampler(student_steps):
    """On the sampler's own grid (t = i / N, midpoint, t - 1/N), for a guided teacher with w per example."""
    teacher, student = _tiny_denoiser(0), _tiny_denoiser(1, guidance_embed=True)
    loss = ProgressiveLoss(teacher, student_steps, guidance=(0.0, 2.0))
    x0, labels = _batch()
    z_t, t, cond, target, a_t, s_t = loss.targets(student, x0, labels, torch.Generator().manual_seed(3))
    assert isinstance(cond.guidance, torch.Tensor) and float(cond.guidance.min()) >= 0.0
    for k in range(len(x0)):
        i = round(float(t[k]) * student_steps)
        ts = torch.tensor([i, i - 0.5, i - 1], dtype=torch.float64) / student_steps
        two = sample_ddim(teacher, z_t[k:k + 1], ts, cond=Cond(labels[k:k + 1], cond.guidance[k:k + 1]))
        a_s, s_s = clean_alpha_sigma(teacher.schedule, torch.tensor([float(ts[2])]))
        one = ddim_step(z_t[k:k + 1], target[k:k + 1], a_t[k:k + 1], s_t[k:k + 1], a_s, s_s)
        torch.testing.assert_close(one, two, atol=5e-5, rtol=1e-4)


def test_dpmpp_map_targets_lie_on_the_teachers_dpmpp_trajectory():
    """With ``teacher_map="dpmpp_2m"``, a batch of N pairs is one trajectory of the teacher's DPM-Solver++(2M) on
    the grid of 2N from prior noise: every pair's state is that trajectory's state at its time, its target's
    DDIM step lands on the trajectory's state one student interval later (the final sample at s = 0), and the
    student gets the trajectory's label."""
    n = 4
    teacher, student = _tiny_denoiser(0), _tiny_denoiser(1)
    loss = ProgressiveLoss(teacher, n, teacher_map="dpmpp_2m")
    assert loss.describe()["teacher_map"] == "dpmpp_2m" and "teacher_map" not in ProgressiveLoss(teacher, n).describe()
    x0, labels = _batch(n)
    z_t, t, cond, target, a_t, s_t = loss.targets(student, x0, labels, torch.Generator().manual_seed(3))
    assert sorted(round(float(v) * n) for v in t) == [1, 2, 3, 4]  # one pair per interval of the trajectory
    assert torch.equal(cond.labels, labels[:1].expand(n))
    start = z_t[int(torch.argmax(t))][None]
    states = [start]
    sample_dpmpp_2m(teacher, start, torch.linspace(1.0, 0.0, 2 * n + 1, dtype=torch.float64),
                    cond=Cond(labels[:1]), callback=lambda step: states.append(step["x"]))
    for k in range(n):
        i = round(float(t[k]) * n)
        torch.testing.assert_close(z_t[k:k + 1], states[2 * (n - i)], atol=1e-5, rtol=1e-5)
        a_s, s_s = clean_alpha_sigma(teacher.schedule, torch.tensor([(i - 1) / n]))
        landed = ddim_step(z_t[k:k + 1], target[k:k + 1], a_t[k:k + 1], s_t[k:k + 1], a_s, s_s)
        torch.testing.assert_close(landed, states[2 * (n - i) + 2], atol=5e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="teacher map"):
        ProgressiveLoss(teacher, n, teacher_map="heun")


def test_a_student_that_already_matches_has_zero_loss_and_the_weighting_is_truncated_snr():
    teacher = _tiny_denoiser(0)
    x0, labels = _batch()
    g = torch.Generator().manual_seed(1)
    loss = GuidanceLoss(teacher, (0.0, 0.0))  # w = 0: the teacher's own output, which a copy reproduces
    student = make_student(teacher, guidance_input=True, prediction="v").eval()
    with torch.no_grad():
        assert float(loss(student, x0, labels, g).abs().max()) < 1e-10
    a, s = torch.tensor([0.999, 0.6, 0.01]), torch.tensor([0.045, 0.8, 0.99995])
    torch.testing.assert_close(truncated_snr_weight(a, s), torch.tensor([(0.999 / 0.045) ** 2, 1.0, 1.0]))


def test_guidance_targets_are_the_teachers_classifier_free_guided_output():
    teacher = _tiny_denoiser(0)
    student = make_student(teacher, guidance_input=True, prediction="v")
    x0, labels = _batch()
    z_t, t, cond, target, _, _ = GuidanceLoss(teacher, (0.5, 3.0)).targets(student, x0, labels,
                                                                             torch.Generator().manual_seed(2))
    w = cond.guidance
    assert float(w.min()) >= 0.5 and float(w.max()) <= 3.0 and float(t.min()) > 0
    with torch.no_grad():
        cond_x = teacher(z_t, t, Cond(labels))
        null_x = teacher(z_t, t, Cond(torch.full_like(labels, 10)))
    torch.testing.assert_close(target, cond_x + w[:, None, None, None] * (cond_x - null_x), atol=1e-5, rtol=1e-5)


def test_a_student_starts_as_its_teacher_for_every_w_without_dropout():
    teacher = _tiny_denoiser(0)
    teacher.net.config.dropout = 0.1
    student = make_student(teacher, guidance_input=True, prediction="v")
    assert student.net.config.dropout == 0.0 and student.net.config.guidance_embed and student.guidance_input
    assert all(m.p == 0.0 for m in student.net.modules() if isinstance(m, torch.nn.Dropout))
    x0, labels = _batch()
    t = torch.full((len(x0),), 0.4)
    with torch.no_grad():
        for w in (0.0, 1.0, 2.5):
            want = teacher(x0, t, Cond(labels, torch.full((len(x0),), w)))
            got = student.eval()(x0, t, Cond(labels, w))
            if w == 0.0:
                torch.testing.assert_close(got, want)
            else:  # an untrained w embedding gives the conditional output, not yet the guided one
                torch.testing.assert_close(got, teacher(x0, t, Cond(labels)))


def test_the_guidance_stage_trains_the_new_w_embedding_at_a_scaled_learning_rate(tmp_path):
    from distill.training import TrainConfig, Trainer

    teacher = _tiny_denoiser(0)
    student = make_student(teacher, guidance_input=True, prediction="v")
    before = {k: v.clone() for k, v in student.net.state_dict().items()}
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3, warmup=0, ema_decay=0.0, grad_clip=0.0,
                      lr_scale={"guidance_mlp.": 10.0})
    meta = {"model": {"arch": "unet", "config": student.net.config.to_dict()},
            "diffusion": {"schedule": student.schedule.config(), "prediction": "v", "time_input": "t1000"}}
    trainer = Trainer(student, GuidanceLoss(teacher, (0.0, 2.0)), load_dataset("digits"), cfg, tmp_path / "g", meta)
    trainer.run(progress=False)
    assert sorted(g["lr_scale"] for g in trainer.optimizer.param_groups) == [1.0, 10.0]
    # Adam's first step moves every parameter with a gradient by about lr in size: 10 x lr for the w embedding.
    moved = {k: float((v - before[k]).abs().max()) for k, v in trainer.inference_net().state_dict().items()}
    assert moved["guidance_mlp.2.weight"] == pytest.approx(1e-2, rel=0.05)
    assert moved["conv_in.weight"] == pytest.approx(1e-3, rel=0.05)


def test_options_are_checked():
    with pytest.raises(UsageError, match="power of 2"):
        ProgressiveOptions(start_steps=48, target_steps=1).validate()
    with pytest.raises(UsageError, match="power of 2"):
        ProgressiveOptions(start_steps=4, target_steps=4).validate()
    with pytest.raises(UsageError, match="eps-prediction"):
        ProgressiveOptions(prediction="eps").validate()
    assert ProgressiveOptions(start_steps=64, target_steps=4).rounds() == [32, 16, 8, 4]
    opts = ProgressiveOptions(round_steps=(10, 20))
    assert [opts.steps_of_round(k) for k in range(4)] == [10, 20, 20, 20]


# -- the student card and sampling by it ------------------------------------------------------------------------


def test_card_sampling_uses_a_students_own_sampler_and_exact_timesteps_unless_overridden():
    card = {"card": {"sampler": "ddim", "steps": 4, "spacing": "uniform", "timesteps": [1, 0.75, 0.5, 0.25, 0]}}
    assert card_sampling(card) == ("ddim", 4, "uniform", [1, 0.75, 0.5, 0.25, 0])
    assert card_sampling(card, steps=8) == ("ddim", 8, None, None)
    assert card_sampling(card, sampler="heun") == ("heun", 20, None, None)
    # Every sampler that walks a given grid takes the student's own grid.
    assert card_sampling(card, sampler="stochastic") == ("stochastic", 4, "uniform", [1, 0.75, 0.5, 0.25, 0])
    assert card_sampling(card, sampler="ddpm") == ("ddpm", 4, "uniform", [1, 0.75, 0.5, 0.25, 0])
    assert card_sampling(card, spacing="logsnr") == ("ddim", 4, "logsnr", None)
    assert card_sampling({}) == ("dpmpp_2m", 20, None, None)  # a teacher without a sampler on its card


def test_the_command_writes_students_with_cards_that_sample_by_default(tmp_path, teacher_file, distill_main):
    out = tmp_path / "pd"
    code, stdout, err = distill_main("progressive", teacher_file, "--out", out, *PD_ARGS)
    assert code == 0, err
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == ["guidance", "steps-2", "steps-4"]
    parent_sha = None
    for stage, steps in (("guidance", 8), ("steps-4", 4), ("steps-2", 2)):
        meta = read_metadata(out / stage / "model.safetensors")
        card = meta["card"]
        assert card["method"] == ("guidance" if stage == "guidance" else "progressive")
        assert card["round"] == {"guidance": 0, "steps-4": 1, "steps-2": 2}[stage]
        assert card["sampler"] == "ddim" and card["steps"] == steps and card["guidance_range"] == [0.0, 2.0]
        assert card["timesteps"] == [1 - i / steps for i in range(steps + 1)]
        assert card["parameterization"] == "v" and card["schedule"]["name"] == "cosine"
        assert meta["model"]["config"]["guidance_embed"] and meta["model"]["config"]["dropout"] == 0.0
        assert parent_sha is None or card["parent_sha256"] == parent_sha
        parent_sha = __import__("distill.distillation", fromlist=["x"]).file_sha256(out / stage / "model.safetensors")
        assert meta["train"]["ema_decay"] == 0.0 and meta["train"]["lr_decay"] == "linear"
        assert (out / stage / "metrics.jsonl").read_text().strip()
    assert "steps-2/model.safetensors" in stdout
    den = load_denoiser(out / "steps-2")
    assert den.guidance_input
    code, _, err = distill_main("sample", out / "steps-2", "--seeds", "0-9", "--guidance", "1.5",
                                "--out", tmp_path / "s")
    assert code == 0, err
    info = json.loads(str(np.load(tmp_path / "s" / "samples.npz")["info"]))
    assert (info["sampler"], info["steps"], info["guidance"]) == ("ddim", 2, 1.5)
    # Running the finished command again trains nothing and changes nothing.
    before = load_file(out / "steps-2" / "model.safetensors")
    code, stdout, err = distill_main("progressive", teacher_file, "--out", out, *PD_ARGS)
    assert code == 0 and stdout.count(": done") == 3, (stdout, err)
    after = load_file(out / "steps-2" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_killed_distillation_resumes_to_the_same_weights(tmp_path, teacher_file, distill_main, monkeypatch):
    """Killed mid-round (the process dies inside a step of round 1; its last checkpoint is at step 2), the same
    command continues and ends with every stage's weights equal to an uninterrupted run's."""
    code, _, err = distill_main("progressive", teacher_file, "--out", tmp_path / "whole", *PD_ARGS)
    assert code == 0, err

    calls = {"n": 0}
    original = ProgressiveLoss.forward

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # round 1 (4 steps, checkpoints every 2): dies in its 4th step
            raise KeyboardInterrupt  # a kill: no save happens inside a step
        return original(self, *args)

    monkeypatch.setattr(ProgressiveLoss, "forward", dying)
    code, _, err = distill_main("progressive", teacher_file, "--out", tmp_path / "cut", *PD_ARGS)
    assert code == 130
    state = read_metadata(tmp_path / "cut" / "steps-4" / "train_state.safetensors")
    assert state["step"] == 2 and not (tmp_path / "cut" / "steps-2").exists()
    monkeypatch.setattr(ProgressiveLoss, "forward", original)
    code, stdout, err = distill_main("progressive", teacher_file, "--out", tmp_path / "cut", *PD_ARGS)
    assert code == 0, err
    assert "guidance" in stdout and ": done" in stdout and "resuming" in stdout
    for stage in ("guidance", "steps-4", "steps-2"):
        a = load_file(tmp_path / "whole" / stage / "train_state.safetensors")
        b = load_file(tmp_path / "cut" / stage / "train_state.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)


@pytest.mark.parametrize("change, needle", [
    (["--lr", "3e-4"], "holds a distillation with lr"),
    (["--round-steps", "5"], "holds a distillation with round_steps"),
    (["--first-map", "dpmpp_2m"], "holds a distillation with first_map"),
])
def test_a_run_directory_is_continued_only_with_the_same_settings(tmp_path, teacher_file, distill_main, change,
                                                                   needle):
    out = tmp_path / "pd"
    args = ["--start-steps", "4", "--target-steps", "2", "--round-steps", "1", "--batch-size", "8"]
    assert distill_main("progressive", teacher_file, "--out", out, *args)[0] == 0
    code, _, err = distill_main("progressive", teacher_file, "--out", out, *args, *change)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    # a smaller target adds rounds to the same directory
    code, stdout, err = distill_main("progressive", teacher_file, "--out", out, *args[:2], "--target-steps", "1",
                                     *args[4:])
    assert code == 0 and (out / "steps-1" / "model.safetensors").exists(), err


def test_the_dpmpp_first_map_runs_from_the_command_and_is_on_the_first_rounds_card(tmp_path, teacher_file,
                                                                                   distill_main):
    out = tmp_path / "pd"
    code, _, err = distill_main("progressive", teacher_file, "--out", out, "--start-steps", "4", "--target-steps",
                                "1", "--round-steps", "2", "--batch-size", "8", "--first-map", "dpmpp_2m")
    assert code == 0, err
    first, second = (read_metadata(out / s / "model.safetensors") for s in ("steps-2", "steps-1"))
    assert first["card"]["teacher_map"] == "dpmpp_2m on the 4-step uniform grid"
    assert first["method"]["teacher_map"] == "dpmpp_2m"
    assert "teacher_map" not in second["card"] and "teacher_map" not in second["method"]  # later rounds: DDIM


@pytest.mark.parametrize("args, needle", [
    (["--start-steps", "12"], "power of 2"),
    (["--guidance-range", "2,1"], "--guidance-range"),
    (["--guidance-range", "0,nan"], "--guidance-range"),
    (["--guidance-range", "0,1", "--guidance", "1"], "drop --guidance"),
    (["--round-steps", "0"], "--round-steps"),
    (["--data", "mnist"], "distill on the teacher's own data"),
])
def test_bad_options_are_one_line(tmp_path, teacher_file, distill_main, args, needle):
    code, _, err = distill_main("progressive", teacher_file, "--out", tmp_path / "pd", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pd" / "plan.json").exists()


def test_a_folder_that_holds_something_else_is_refused(tmp_path, teacher_file, distill_main):
    (tmp_path / "pd").mkdir()
    (tmp_path / "pd" / "notes.txt").write_text("mine")
    code, _, err = distill_main("progressive", teacher_file, "--out", tmp_path / "pd", "--start-steps", "2")
    assert code == 2 and "holds no distillation plan" in err
    assert (tmp_path / "pd" / "notes.txt").read_text() == "mine"


def test_an_unconditional_teacher_cannot_be_guidance_distilled(tmp_path, distill_main):
    code, _, err = distill_main("teacher", "train", *TEACHER_ARGS[:-4], "--steps", "1", "--unconditional",
                                "--out", tmp_path / "u")
    assert code == 0, err
    code, _, err = distill_main("progressive", tmp_path / "u", "--out", tmp_path / "pd", "--guidance-range", "0,1")
    assert code == 2 and "unconditional" in err


@pytest.mark.parametrize("recipe, want", [
    ("mnist-students.yaml", dict(start_steps=64, target_steps=1, guidance_range=None, lr=1e-4, bf16=NATIVE_BF16)),
    ("mnist-guided.yaml", dict(start_steps=64, target_steps=4, guidance_range=(0.0, 2.0), guidance_steps=800,
                               guidance_lr_scale=30.0, bf16=NATIVE_BF16)),
])
def test_the_recipes_are_valid_configs_of_the_command(tmp_path, distill_main, monkeypatch, recipe, want):
    import distill.distillation

    seen = {}

    def fake(teacher, out, opts, **kw):
        seen.update(teacher=teacher, out=out, opts=opts)
        return [out / "steps-1" / "model.safetensors"]

    monkeypatch.setattr(distill.distillation, "distill_progressive", fake)
    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    code, _, err = distill_main("progressive", "--config", path, "--out", tmp_path / "run")
    assert code == 0, err
    assert seen["teacher"] == "mnist" and seen["out"] == tmp_path / "run"
    assert {k: getattr(seen["opts"], k) for k in want} == want


# -- the benchmark's bookkeeping ----------------------------------------------------------------------------------


def test_benchmark_checks_and_compute_are_computed_from_the_rows(tmp_path, teacher_file, distill_main):
    import pandas as pd

    from benchmarks.progressive import compute, guidance_checks, step_checks

    rows = pd.DataFrame([
        {"model": "steps-4", "kind": "student", "sampler": "ddim", "steps": 4, "nfe": 4, "guidance": 0.0, "fd": 0.19},
        {"model": "steps-4", "kind": "student", "sampler": "stochastic", "steps": 4, "nfe": 4, "guidance": 0.0,
         "fd": 0.15},
        {"model": "steps-1", "kind": "student", "sampler": "ddim", "steps": 1, "nfe": 1, "guidance": 0.0, "fd": 0.5},
        {"model": "teacher", "kind": "teacher", "sampler": "ddpm", "steps": 4, "nfe": 4, "guidance": 0.0, "fd": 0.6},
        {"model": "teacher", "kind": "teacher", "sampler": "ddim", "steps": 4, "nfe": 4, "guidance": 0.0, "fd": 0.9},
        {"model": "teacher", "kind": "teacher", "sampler": "ddim", "steps": 1, "nfe": 1, "guidance": 0.0, "fd": 90.},
    ])
    checks = step_checks(rows, 0.128)
    got = {re.sub(r" \([^)]*\)", "", c["check"]): (c["value"], c["bound"], c["pass"]) for c in checks}
    assert checks[0]["check"].startswith("4-step student (stochastic)")  # each step count's best sampler counts
    assert got["4-step student FD <= 1.25 x the teacher's best"] == (0.15, 0.16, True)
    assert got["1-step student FD <= 3.0 x the teacher's best"] == (0.5, 0.384, False)
    assert got["4-step student FD <= 1/3 of the best training-free sampler at NFE 4"] == (0.15, 0.2, True)
    assert got["1-step student FD <= 1/3 of the best training-free sampler at NFE 1"][2]
    g = pd.DataFrame([
        {"model": "steps-4", "sampler": "ddim", "steps": 4, "guidance": 1.0, "fd": 0.30, "acc": 0.990, "n_fake": 10},
        {"model": "teacher", "sampler": "dpmpp_2m", "steps": 20, "guidance": 1.0, "fd": 0.25, "acc": 0.995,
         "n_fake": 10},
        {"model": "steps-4", "sampler": "ddim", "steps": 4, "guidance": 2.0, "fd": 0.40, "acc": 0.97, "n_fake": 10},
        {"model": "teacher", "sampler": "dpmpp_2m", "steps": 20, "guidance": 2.0, "fd": 0.30, "acc": 0.999,
         "n_fake": 10},
    ])
    assert [c["pass"] for c in guidance_checks(g, "steps-4", ("dpmpp_2m", 20))] == [True, False]
    more = pd.DataFrame([  # a second sampler per w: the student's best FD at each w is checked, and named
        {"model": "steps-4", "sampler": "stochastic", "steps": 4, "guidance": 1.0, "fd": 0.50, "acc": 0.995,
         "n_fake": 10},
        {"model": "steps-4", "sampler": "stochastic", "steps": 4, "guidance": 2.0, "fd": 0.36, "acc": 0.995,
         "n_fake": 10},
    ])
    checks = guidance_checks(pd.concat([g, more], ignore_index=True), "steps-4", ("dpmpp_2m", 20))
    assert [c["pass"] for c in checks] == [True, True]
    assert "steps-4 (ddim)" in checks[0]["check"] and "steps-4 (stochastic)" in checks[1]["check"]
    out = tmp_path / "pd"
    assert distill_main("progressive", teacher_file, "--out", out, *PD_ARGS)[0] == 0
    comp = compute(out)
    by_stage = {s["stage"]: s for s in comp["stages"]}
    # guidance stage: one guided teacher call (2 branches) per step; rounds: two calls of a w-input teacher
    assert by_stage["guidance"]["teacher_forwards_per_step"] == 2 and by_stage["steps-4"][
        "teacher_forwards_per_step"] == 2
    assert by_stage["steps-2"]["teacher_step_equivalents"] == round(3 * (1 + 2 / 3))
    assert comp["teacher_step_equivalents"] == round(sum(s["train_steps"] * (1 + s["teacher_forwards_per_step"] / 3)
                                                         for s in comp["stages"]))
    assert comp["seconds"] > 0


def test_any_teacher_behind_the_denoiser_interface_distills_into_any_student():
    """The exact denoiser of Gaussian data (no network at all) teaches a linear x0-predicting student: after a
    round of 1-step distillation, the student's one DDIM step from noise is the teacher's two-step DDIM map."""
    from distill.oracles import GaussianDenoiser, example_gaussian

    torch.manual_seed(0)
    sched = CosineSchedule()
    mu, cov = example_gaussian()
    teacher = GaussianDenoiser(sched, mu, cov)

    class Linear(torch.nn.Module):  # x0 = A z + b: exact for the affine two-step map at t = 1
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, t_in, labels=None):
            return self.lin(x)

    student = Denoiser(Linear(), sched, "x0", "t")
    loss = ProgressiveLoss(teacher, 1)
    data = (mu + torch.randn(4096, 3, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        batch = data[torch.randint(0, len(data), (256,), generator=g)]
        opt.zero_grad()
        loss(student, batch, None, g).mean().backward()
        opt.step()
    z = torch.randn(64, 3, generator=g)
    ts = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    two = sample_ddim(teacher, z.double(), ts).float()
    one = sample_ddim(student, z, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert float((one - two).norm() / two.norm()) < 0.02


def test_a_plain_student_without_the_null_class_refuses_guidance(tmp_path, teacher_file, distill_main):
    out = tmp_path / "pd"
    args = ["--start-steps", "2", "--round-steps", "1", "--batch-size", "8"]
    assert distill_main("progressive", teacher_file, "--out", out, *args).returncode == 0
    card = read_metadata(out / "steps-1" / "model.safetensors")["card"]
    assert card["guidance_range"] is None and card["label_dropout"] == 0.0 and card["sampler"] == "ddim"
    res = distill_main("sample", out / "steps-1", "--seeds", "0-3", "--guidance", "1", "--out", tmp_path / "s")
    assert res.returncode == 2 and "--guidance-range" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert distill_main("sample", out / "steps-1", "--seeds", "0-3", "--out", tmp_path / "s").returncode == 0


def test_publish_records_a_students_default_sampler_on_its_own_grid(tmp_path, teacher_file, distill_main):
    out = tmp_path / "pd"
    assert distill_main("progressive", teacher_file, "--out", out, "--start-steps", "4", "--target-steps", "2",
                        "--round-steps", "1", "--batch-size", "8").returncode == 0
    dest = tmp_path / "student.safetensors"
    res = distill_main("teacher", "publish", out / "steps-2", dest, "--sampler", "heun")
    assert res.returncode == 2 and "own 2-step grid" in res.stderr and not dest.exists()
    assert distill_main("teacher", "publish", out / "steps-2", dest, "--sampler", "stochastic").returncode == 0
    meta = read_metadata(dest)
    assert meta["card"]["sampler"] == "stochastic" and meta["card"]["distilled_sampler"] == "ddim"
    assert card_sampling(meta) == ("stochastic", 2, "uniform", [1.0, 0.5, 0.0])
    res = distill_main("eval", dest, "--seeds", "0-7", "--metrics", "fd", "--data", "digits")
    assert res.returncode == 0 and "stochastic 2 steps" in res.stdout


def test_the_shipped_guided_student_samples_any_w_in_its_range_and_warns_outside_it():
    import warnings

    from distill.sampling import draw_samples

    den = load_denoiser("mnist-4step-guided")
    card = den.metadata["card"]
    assert den.guidance_input and card["guidance_range"] == [0.0, 2.0] and card["steps"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = draw_samples(den, seeds=[0, 1], guidance=1.5, progress=False)
    assert images.shape == (2, 32, 32, 1) and labels.tolist() == [0, 1]  # MNIST padded to 32
    with pytest.warns(UserWarning, match=r"--guidance 3: .* w in \[0, 2\]"):
        draw_samples(den, seeds=[0], guidance=3.0, progress=False)


def test_the_command_line_shows_the_out_of_range_warning_as_one_line(tmp_path, distill_main):
    code, _, err = distill_main("sample", "mnist-4step-guided", "--seeds", "0", "--guidance", "2.5",
                                "--out", tmp_path / "s")
    assert code == 0
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert lines == ["warning: --guidance 2.5: mnist-4step-guided was distilled for w in [0, 2]; outside it the "
                     "student extrapolates, untested"]
