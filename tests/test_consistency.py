"""Consistency distillation and training: the boundary condition, the discretization and curriculum, the teacher's
ODE step, shared dropout masks, the consistency sampler, the command, its card and timestep search, and exact
resume after a kill."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_check import killed_run_resumes
from safetensors.torch import load_file

from distill.checkpoint import card_sampling, load_denoiser, read_metadata
from distill.data import load_dataset
from distill.denoiser import Cond, Denoiser
from distill.distillation import make_student
from distill.hardware import native_bf16
from distill.methods.consistency import (
    ConsistencyLoss,
    consistency_distance,
    consistency_sigmas,
    ict_scales,
    lognormal_interval_probs,
    same_random_state,
)
from distill.models.unet import UNet, UNetConfig
from distill.samplers import clean_alpha_sigma, generate, sample_consistency, sample_ddim, sample_heun
from distill.schedules import CosineSchedule, KarrasSchedule

# the recipes say precision: auto, bf16 only where the CPU runs it natively
NATIVE_BF16 = native_bf16()

BOUNDARY = {"sigma_min": 0.002, "sigma_data": 0.5}
CM_ARGS = ["--steps", "4", "--batch-size", "16", "--ckpt-every", "2", "--search-samples", "24"]


def _tiny(seed=0, dropout=0.0, consistency=None, schedule=None):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          num_classes=10, dropout=dropout))
    for p in net.parameters():  # zero-initialised output layers would make every prediction trivial
        torch.nn.init.normal_(p, std=0.05)
    return Denoiser(net, schedule or CosineSchedule(), "v", "t1000", null_label=10, consistency=consistency).eval()


def _batch(n=6):
    data = load_dataset("digits")
    return data.images[:n], data.labels[:n]


# -- the student ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [CosineSchedule(), KarrasSchedule()], ids=["vp-cosine", "ve-karras"])
def test_the_boundary_condition_holds_to_float_precision_and_the_student_starts_as_its_teacher(schedule):
    teacher = _tiny(0, schedule=schedule)
    student = make_student(teacher, guidance_input=False, prediction="v", consistency=BOUNDARY).eval()
    x, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    t_min = schedule.t_of_sigma_ve(torch.tensor(0.002, dtype=torch.float64)).float()
    with torch.no_grad():
        for t in (t_min, t_min * 0.5):  # at sigma_min, and below it (the identity there too)
            alpha, sigma = schedule.alpha_sigma(t)
            torch.testing.assert_close(student(x, t, Cond(labels)), x / alpha, atol=1e-6, rtol=1e-6)
        # well above sigma_min the boundary scalings agree with the teacher's own to within sigma_min / sigma
        t = schedule.t_of_sigma_ve(torch.tensor(20.0, dtype=torch.float64)).float()
        torch.testing.assert_close(student(x, t, Cond(labels)), teacher(x, t, Cond(labels)), atol=2e-3, rtol=2e-3)


def test_the_consistency_sampler_maps_to_data_then_renoises():
    den = _tiny(0, consistency=BOUNDARY)
    from distill.samplers import PerSampleGenerator

    ts = torch.tensor([0.99, 0.6, 0.3, 0.0], dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8)
    got = sample_consistency(den, x, ts, generator=PerSampleGenerator([0, 1, 2]), cond=Cond(torch.arange(3)))
    g, want = PerSampleGenerator([0, 1, 2]), x
    with torch.no_grad():
        for i in range(3):
            x0 = den(want, ts[i].float().expand(3), Cond(torch.arange(3)))
            a, s = clean_alpha_sigma(den.schedule, ts[i + 1])
            want = a.float() * x0 + s.float() * g.randn((1, 8, 8)) if i < 2 else x0
    torch.testing.assert_close(got, want)
    one = generate(den, (1, 8, 8), [5], sampler="consistency", steps=1, timesteps=[0.99, 0.0])
    with torch.no_grad():
        x_t = clean_alpha_sigma(den.schedule, torch.tensor(0.99))[1].float() * PerSampleGenerator([5]).randn((1, 8, 8))
        torch.testing.assert_close(one, den(x_t, torch.tensor([0.99])))


def test_a_card_serves_its_searched_timesteps_for_each_step_count():
    card = {"card": {"sampler": "consistency", "steps": 2, "spacing": "own", "timesteps": [0.99, 0.4, 0.0],
                     "timesteps_by_steps": {"1": [0.99, 0.0], "2": [0.99, 0.4, 0.0], "3": [0.99, 0.4, 0.2, 0.0]}}}
    assert card_sampling(card) == ("consistency", 2, "own", [0.99, 0.4, 0.0])
    assert card_sampling(card, steps=3) == ("consistency", 3, "own", [0.99, 0.4, 0.2, 0.0])
    assert card_sampling(card, steps=1, sampler="ddim") == ("ddim", 1, "own", [0.99, 0.0])
    assert card_sampling(card, steps=5) == ("consistency", 5, None, None)  # no searched grid: the sampler's own
    assert card_sampling(card, steps=3, spacing="karras") == ("consistency", 3, "karras", None)


def test_the_timestep_search_ranks_candidates_by_the_scorer_it_is_given():
    from distill.consistency import SEARCH_REF, search_timesteps
    from distill.errors import UsageError

    den, seen, logs = load_denoiser("mnist-cd"), {}, []

    class MeanScorer:  # any metric, lower is better; built outside the core
        metric = "kid"

        def __call__(self, data, ref):
            seen.update(data=data, ref=ref)
            return lambda images, labels: float(np.asarray(images, dtype=np.float64).mean())

    found = search_timesteps(den, "DATA", samples=2, max_steps=2, scorer=MeanScorer(), log=logs.append)
    assert seen == {"data": "DATA", "ref": SEARCH_REF}
    assert found["metric"] == "kid" and set(found["kid"]) == {"1", "2"} and "fd" not in found
    assert len(found["timesteps_by_steps"]["2"]) == 3 and "2 steps KID" in logs[-1]

    class Unfit:
        metric = "fd"

        def __call__(self, data, ref):
            raise UsageError("no domain classifier for this data")

    assert search_timesteps(den, None, samples=2, max_steps=2, scorer=Unfit(), log=logs.append) is None
    assert logs[-1].startswith("timestep search skipped (no domain classifier for this data)")


def test_a_search_without_a_scorer_is_refused_before_anything_runs(tmp_path):
    from distill.consistency import ConsistencyOptions, distill_consistency
    from distill.errors import UsageError

    with pytest.raises(UsageError, match=r"^search_samples 8: .*pass one .*, or set search_samples to 0$"):
        distill_consistency("mnist", tmp_path / "cm", ConsistencyOptions(search_samples=8))
    assert not (tmp_path / "cm").exists()


# -- discretization, curriculum, metric ----------------------------------------------------------------------------


def test_the_discretization_spans_sigma_min_to_80_and_the_curriculum_doubles():
    sig = consistency_sigmas(CosineSchedule(), 18)
    assert len(sig) == 18 and float(sig[0]) == pytest.approx(0.002) and float(sig[-1]) == pytest.approx(80.0)
    assert bool((sig[1:] > sig[:-1]).all())
    # Song & Dhariwal (2023): s0 = 10, s1 = 1280, K' = K / 8
    assert [ict_scales(k, 800, 10, 1280) for k in (0, 99, 100, 250, 700, 799)] == [11, 11, 21, 41, 1281, 1281]
    p = lognormal_interval_probs(consistency_sigmas(CosineSchedule(), 200))
    assert float(p.sum()) == pytest.approx(1.0)
    mid = 0.5 * (consistency_sigmas(CosineSchedule(), 200)[1:] + consistency_sigmas(CosineSchedule(), 200)[:-1])
    assert 0.1 < float(mid[p.argmax()]) < 1.0  # the mass sits around exp(-1.1) = 0.33


def test_the_pseudo_huber_distance_uses_c_of_improved_ct():
    a, b = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    b[1] = 0.1
    c = 0.00054 * 8.0
    d = consistency_distance(a, b, "pseudo_huber")
    assert float(d[0]) == 0.0 and float(d[1]) == pytest.approx((64 * 0.01 + c * c) ** 0.5 - c, rel=1e-5)
    assert float(consistency_distance(a, b, "l2")[1]) == pytest.approx(0.01)


# -- the loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver, sampler", [("ddim", sample_ddim), ("heun", sample_heun)])
def test_cd_targets_are_one_step_of_the_teachers_ode_sampler(solver, sampler):
    teacher = _tiny(0)
    student = make_student(teacher, guidance_input=False, prediction="v", consistency=BOUNDARY)
    loss = ConsistencyLoss(student, mode="cd", teacher=teacher, total_steps=10, scales=6, solver=solver)
    times, _, _ = loss.grid(teacher.schedule, 6)
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 7])
    for n in range(5):
        t_hi, t_lo = times[n + 1].float().expand(2), times[n].float().expand(2)
        with torch.no_grad():
            got = loss.teacher_step(x, t_hi, t_lo, Cond(labels), teacher.schedule)
        want = sampler(teacher, x, torch.stack([times[n + 1], times[n]]), cond=Cond(labels))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_online_and_target_evaluations_share_dropout_masks_and_the_target_follows_the_student():
    masks = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t_in, labels=None):
            m = self.drop(torch.ones_like(x))
            masks.append(m.detach().clone())
            return self.scale * m * 0.01

    student = Denoiser(Recorder(), CosineSchedule(), "v", "t1000", consistency=BOUNDARY).train()
    loss = ConsistencyLoss(student, mode="ct", total_steps=10, scales=8, target_decay=0.5)
    x0, _ = _batch(4)
    loss(student, x0, None, torch.Generator().manual_seed(0))
    assert len(masks) == 2 and torch.equal(masks[0], masks[1]) and 0 < float(masks[0].mean()) < 2
    loss(student, x0, None, torch.Generator().manual_seed(1))
    assert not torch.equal(masks[0], masks[2])  # a new step draws new masks
    with torch.no_grad():
        student.net.scale.fill_(3.0)
    loss.update(student.net, 1)  # EMA with decay 0.5: 1 -> 2
    assert float(loss.target.net.scale) == pytest.approx(2.0) and int(loss.step) == 1


def test_the_ct_loss_compares_one_noise_at_two_levels_weighted_by_the_gap():
    student = _tiny(0, consistency=BOUNDARY).train()
    loss = ConsistencyLoss(student, mode="ct", total_steps=10, scales=2, weighting="inverse_gap",
                           noise_sampling="uniform", metric="l2")
    x0, labels = _batch(4)
    per = loss(student, x0, labels, torch.Generator().manual_seed(0))
    assert per.shape == (4,) and bool(torch.isfinite(per).all()) and bool((per >= 0).all())
    # With 2 points, every pair is (sigma_min, 80): target x0 + 0.002 eps, weight 1 / 79.998.
    g = torch.Generator().manual_seed(0)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 4, replacement=True, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    times, _, _ = loss.grid(student.schedule, 2)
    a_hi, s_hi = clean_alpha_sigma(student.schedule, times[1].float())
    a_lo, s_lo = clean_alpha_sigma(student.schedule, times[0].float())
    with torch.no_grad():
        online = student(a_hi * x0 + s_hi * eps, times[1].float(), Cond(labels))
    want = (online - (a_lo * x0 + s_lo * eps) / a_lo).square().flatten(1).mean(1) / (80.0 - 0.002)
    torch.testing.assert_close(per, want, atol=1e-6, rtol=1e-4)


def test_same_random_state_repeats_draws_and_restores_the_stream():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with same_random_state(7, torch.device("cpu")):
        a = torch.rand(3)
    with same_random_state(7, torch.device("cpu")):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), before)


def test_the_loss_refuses_inconsistent_settings():
    student = _tiny(0, consistency=BOUNDARY)
    with pytest.raises(ValueError, match="needs a teacher"):
        ConsistencyLoss(student, mode="cd", total_steps=10)
    with pytest.raises(ValueError, match="boundary-condition"):
        ConsistencyLoss(_tiny(0), mode="ct", total_steps=10)
    with pytest.raises(ValueError, match="solver"):
        ConsistencyLoss(student, mode="ct", total_steps=10, solver="rk4")


# -- the command ---------------------------------------------------------------------------------------------------


def test_cd_writes_a_student_card_with_searched_timesteps_that_sample_by_default(tmp_path, teacher_file,
                                                                                 distill_main):
    out = tmp_path / "cd"
    code, stdout, err = distill_main("consistency", teacher_file, "--out", out, "--mode", "cd", *CM_ARGS)
    assert code == 0, err
    meta = read_metadata(out / "model.safetensors")
    card = meta["card"]
    assert card["method"] == "consistency_distillation" and card["sampler"] == "consistency" and card["steps"] == 2
    assert card["boundary"] == BOUNDARY and meta["diffusion"]["consistency"] == BOUNDARY
    assert sorted(card["timesteps_by_steps"]) == ["1", "2", "3"]
    assert card["timesteps"] == card["timesteps_by_steps"]["2"]
    three = card["timesteps_by_steps"]["3"]
    assert three[:2] == card["timesteps"][:2] and three[0] > three[1] > three[2] > three[3] == 0.0  # greedy
    search = card["timestep_search"]
    assert search["samples"] == 24 and search["reference"] == "real:B" and search["seeds"] == "1000000-1000023"
    assert set(search["fd"]) == {"1", "2", "3"} and "timestep search: 3 steps" in stdout
    assert meta["method"]["name"] == "consistency" and meta["method"]["scales"] == 18
    assert meta["method"]["solver"] == "heun" and card["compute"]["teacher_forwards_per_step"] == 2
    assert (out / "metrics.jsonl").read_text().strip()
    den = load_denoiser(out)
    assert den.consistency == BOUNDARY
    for steps in ("1", "3"):
        code, _, err = distill_main("sample", out, "--seeds", "0-9", "--steps", steps, "--out", tmp_path / steps)
        assert code == 0, err
        info = json.loads(str(np.load(tmp_path / steps / "samples.npz")["info"]))
        assert (info["sampler"], info["steps"]) == ("consistency", int(steps))
    code, _, err = distill_main("sample", out, "--seeds", "0-9", "--guidance", "1", "--out", tmp_path / "g")
    assert code == 2 and "consistency student" in err and len(err.strip().splitlines()) == 1
    # Running the finished command again trains and searches nothing and changes nothing.
    before = load_file(out / "model.safetensors")
    code, stdout, err = distill_main("consistency", teacher_file, "--out", out, "--mode", "cd", *CM_ARGS)
    assert code == 0 and "training done" in stdout and "timestep search" not in stdout, (stdout, err)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ct_uses_no_teacher_evaluations_and_from_scratch_does_not_start_from_the_teacher(tmp_path, teacher_file,
                                                                                        distill_main, monkeypatch):
    import distill.checkpoint

    calls = {"n": 0}
    original = Denoiser.forward

    def counting(self, *args, **kwargs):
        if not self.consistency:
            calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "forward", counting)
    out = tmp_path / "ct"
    code, _, err = distill_main("consistency", teacher_file, "--out", out, "--mode", "ct", *CM_ARGS[:-2],
                                "--search-samples", "0", "--ema-decay", "0")
    assert code == 0, err
    assert calls["n"] == 0
    meta = read_metadata(out / "model.safetensors")
    # from the teacher: ECT's continuous pairs by default (improved CT's recipe from scratch, below)
    assert meta["method"]["noise_sampling"] == "ect" and meta["method"]["curriculum"] is None
    assert meta["method"]["ect_q"] == 2.0 and meta["method"]["total_steps"] == 4
    assert meta["method"]["weighting"] == "inverse_gap" and meta["card"]["compute"]["teacher_forwards_per_step"] == 0
    assert meta["card"]["timestep_search"] is None and len(meta["card"]["timesteps"]) == 3
    code, _, err = distill_main("consistency", teacher_file, "--out", tmp_path / "scratch", "--mode", "ct",
                                "--from-scratch", "--steps", "1", "--batch-size", "4", "--search-samples", "0",
                                "--ema-decay", "0", "--lr", "1e-12")
    assert code == 0, err
    teacher = distill.checkpoint.load_tensors(teacher_file)[0]
    scratch = load_file(tmp_path / "scratch" / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    key = "out.weight" if "out.weight" in teacher else sorted(teacher)[-1]
    scratch_meta = read_metadata(tmp_path / "scratch" / "model.safetensors")
    assert not torch.allclose(scratch[key], teacher[key]) and scratch_meta["card"]["initialised_from"] is None
    assert scratch_meta["method"]["noise_sampling"] == "lognormal"
    assert scratch_meta["method"]["curriculum"] == [10, 1280]
    assert torch.allclose(tuned[key], teacher[key], atol=0.05)


def test_a_killed_consistency_run_resumes_to_the_same_weights(tmp_path, teacher_file, distill_main, monkeypatch):
    """Killed inside step 4 (last checkpoint at step 2), the same command continues and ends with the weights,
    EMA, target network, curriculum position and optimizer state of an uninterrupted run."""
    args = ["--mode", "ct", "--steps", "6", "--batch-size", "8", "--ckpt-every", "2", "--search-samples", "0",
            "--curriculum", "2,8", "--dropout", "0.1"]
    a = killed_run_resumes(distill_main, monkeypatch, tmp_path, ["consistency", teacher_file, *args],
                           ConsistencyLoss, kill_at=4, saved_step=2)
    assert "loss.step" in a and int(a["loss.step"]) == 6
    assert any(k.startswith("loss.target.") for k in a)


def test_a_guided_teacher_gives_a_student_that_takes_w(tmp_path, teacher_file, distill_main):
    code, _, err = distill_main("consistency", teacher_file, "--out", tmp_path / "g", "--guidance-range", "0,2",
                                "--solver", "ddim", *CM_ARGS[:-2], "--search-samples", "0")
    assert code == 0, err
    den = load_denoiser(tmp_path / "g")
    card = den.metadata["card"]
    assert den.guidance_input and card["guidance_range"] == [0.0, 2.0]
    assert card["compute"]["teacher_forwards_per_step"] == 2  # one DDIM step, two guidance branches
    assert den.metadata["train"]["lr_scale"] == {"guidance_mlp.": 30.0}
    code, _, err = distill_main("sample", tmp_path / "g", "--seeds", "0-3", "--guidance", "1.5",
                                "--out", tmp_path / "s")
    assert code == 0, err


@pytest.mark.parametrize("args, needle", [
    (["--mode", "ct", "--guidance-range", "0,1"], "no teacher to guide"),
    (["--mode", "cd", "--from-scratch"], "--from-scratch"),
    (["--scales", "8", "--curriculum", "10,80"], "give one"),
    (["--curriculum", "10"], "--curriculum"),
    (["--curriculum", "80,10"], "--curriculum"),
    (["--sample-steps", "4"], "--sample-steps"),
    (["--guidance-range", "0,1", "--guidance", "1"], "drop --guidance"),
    (["--data", "mnist"], "distill on the teacher's own data"),
    (["--mode", "cd", "--noise-sampling", "ect"], "ECT is consistency training"),
    (["--mode", "ct", "--noise-sampling", "ect", "--scales", "8"], "continuous pairs"),
])
def test_bad_options_are_one_line(tmp_path, teacher_file, distill_main, args, needle):
    code, _, err = distill_main("consistency", teacher_file, "--out", tmp_path / "cm", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cm" / "train_state.safetensors").exists()


def test_a_run_directory_is_continued_only_with_the_same_settings(tmp_path, teacher_file, distill_main):
    out = tmp_path / "cm"
    args = ["--steps", "2", "--batch-size", "4", "--search-samples", "0", "--scales", "4", "--solver", "ddim"]
    assert distill_main("consistency", teacher_file, "--out", out, *args)[0] == 0
    code, _, err = distill_main("consistency", teacher_file, "--out", out, *args[:-1], "heun", "--steps", "3")
    assert code == 2 and "different method config" in err and len(err.strip().splitlines()) == 1, err
    code, stdout, err = distill_main("consistency", teacher_file, "--out", out, *args[2:], "--steps", "3")
    assert code == 0 and "resuming" in stdout, err  # more steps continue the same run
    assert read_metadata(out / "train_state.safetensors")["step"] == 3


@pytest.mark.parametrize("recipe, want", [
    ("mnist-cd.yaml", dict(mode="cd", scales=18, solver="heun", target_decay=0.0, metric="pseudo_huber",
                           bf16=NATIVE_BF16, search_samples=500)),
    ("mnist-ct.yaml", dict(mode="ct", curriculum=(10, 160), metric="pseudo_huber", bf16=NATIVE_BF16)),
])
def test_the_recipes_are_valid_configs_of_the_command(tmp_path, distill_main, monkeypatch, recipe, want):
    import distill.consistency

    seen = {}

    def fake(teacher, out, opts, **kw):
        seen.update(teacher=teacher, out=out, opts=opts)
        return out / "model.safetensors"

    monkeypatch.setattr(distill.consistency, "distill_consistency", fake)
    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    code, _, err = distill_main("consistency", "--config", path, "--out", tmp_path / "run")
    assert code == 0, err
    assert seen["teacher"] == "mnist" and seen["out"] == tmp_path / "run"
    assert {k: getattr(seen["opts"], k) for k in want} == want


# -- the benchmark's bookkeeping ----------------------------------------------------------------------------------


def test_benchmark_checks_and_side_by_side_are_computed_from_the_rows(tmp_path):
    import pandas as pd

    from benchmarks.consistency import checks, run_compute, side_by_side

    def row(model, kind, sampler, nfe, fd):
        return {"model": model, "kind": kind, "sampler": sampler, "steps": nfe, "nfe": nfe, "fd": fd, "fid": 9.0}

    rows = pd.DataFrame([row("teacher", "teacher", "dpmpp_2m", 20, 0.2), row("teacher", "teacher", "ddim", 2, 5.0),
                         row("teacher", "teacher", "ddim", 1, 100.0), row("steps-1", "student", "ddim", 1, 0.7),
                         row("steps-2", "student", "ddim", 2, 0.4), row("cd", "student", "consistency", 1, 0.3),
                         row("cd", "student", "consistency", 2, 0.25), row("ct", "student", "consistency", 2, 0.5)])
    got = checks(rows, {"cd": "consistency_distillation", "ct": "consistency_training"}, 0.2)
    assert [(c["value"], c["bound"], c["pass"]) for c in got] == [(0.3, 0.32, True), (0.25, 0.26, True),
                                                                  (0.5, 0.26, False)]
    sbs = side_by_side(rows, ["cd", "ct"])
    assert [r["nfe"] for r in sbs] == [1, 2]
    assert sbs[0]["consistency"]["model"] == "cd" and sbs[0]["progressive"]["model"] == "steps-1"
    assert sbs[1]["training-free"]["fd"] == 5.0 and sbs[1]["better_student"] == "cd"
    run = tmp_path / "run"
    run.mkdir()
    from distill.checkpoint import save_tensors

    save_tensors(run / "model.safetensors", {"w": torch.zeros(1)},
                 {"card": {"compute": {"train_steps": 100, "teacher_forwards_per_step": 2}}})
    (run / "metrics.jsonl").write_text('{"step": 50, "sec_per_step": 1.0}\n{"step": 100, "sec_per_step": 2.0}\n')
    c = run_compute(run)
    assert c["teacher_step_equivalents"] == 200 and c["seconds"] == 150.0  # 100 x (1 + (1 + 2) / 3)


def test_the_shipped_consistency_student_samples_from_its_card_in_one_to_three_steps():
    from distill.sampling import draw_samples

    den = load_denoiser("mnist-cd")
    card = den.metadata["card"]
    assert den.consistency == BOUNDARY and card["method"] == "consistency_distillation"
    assert card_sampling(den.metadata)[:2] == ("consistency", 2) and card["timestep_search"]["reference"] == "real:B"
    for steps in (1, 3):
        images, labels = draw_samples(den, steps=steps, seeds=[0, 1], batch_size=2, progress=False)
        assert images.shape == (2, 32, 32, 1) and labels.tolist() == [0, 1]


def test_ect_pairs_shrink_stage_by_stage_and_end_on_the_data_below_sigma_min(teacher_file):
    """ECT (Geng et al. 2024): r = t (1 - n(t) / q^(s + 1)), n(t) = 1 + 8 sigmoid(-t), stage s of 8; a lower level
    below sigma_min means the target is the data itself."""
    from distill.methods.consistency import ECT_STAGES, ect_pair

    t = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    n = 1 + 8 * torch.sigmoid(-t)
    assert torch.allclose(ect_pair(t, 0, 800), t * (1 - n / 2))
    assert torch.allclose(ect_pair(t, 799, 800), t * (1 - n / 2 ** ECT_STAGES))
    gaps = [(t - ect_pair(t, step, 800)) for step in range(0, 800, 100)]
    assert all(bool((a > b).all()) for a, b in zip(gaps, gaps[1:]))  # each stage halves the gap (q = 2)
    assert bool((ect_pair(t[:1], 0, 800) < 0).all())  # at small t and early: below sigma_min, i.e. the data

    from distill.methods.consistency import ConsistencyLoss

    student = make_student(load_denoiser(teacher_file), guidance_input=False, prediction="v", seed=0, dropout=0.0,
                           consistency={"sigma_min": 0.002, "sigma_data": 0.5})
    loss = ConsistencyLoss(student, mode="ct", total_steps=800, scales=None, noise_sampling="ect",
                           weighting="inverse_gap")
    t_hi, t_lo, gap, clean = loss.pairs(student.schedule, 4096, torch.Generator().manual_seed(0))
    # early on most pairs end on the data (the stage-0 gap is wide), late few do
    assert bool((t_hi > t_lo).all()) and bool((gap > 0).all()) and 0.5 < float(clean.double().mean()) < 1
    loss.step.fill_(799)
    t_hi, t_lo, gap_late, clean_late = loss.pairs(student.schedule, 4096, torch.Generator().manual_seed(0))
    assert float(clean_late.double().mean()) < 0.2 and float(gap_late.median()) < float(gap.median())
    assert loss.describe()["noise_sampling"] == "ect" and loss.describe()["curriculum"] is None
