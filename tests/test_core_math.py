"""Schedules, parameterizations and samplers against closed forms."""

import math

import pytest
import torch

from distill.denoiser import Cond, Denoiser, cfg_combine, time_input
from distill.oracles import GaussianDenoiser, example_gaussian, gaussian_flow_map
from distill.parameterization import PREDICTIONS, from_x0, to_x0
from distill.samplers import (
    DEFAULT_SPACING,
    SAMPLERS,
    PerSampleGenerator,
    alpha_sigma_at,
    ddim_step,
    generate,
    make_timesteps,
    nfe,
    prior_sample,
)
from distill.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    KarrasSchedule,
    schedule_from_config,
)

ALL_SCHEDULES = [
    CosineSchedule(),
    DiscreteSchedule("linear"),
    DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012),
    DiscreteSchedule("squaredcos_cap_v2"),
    KarrasSchedule(),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: s.config().get("beta_schedule", s.name))
def test_t_of_logsnr_inverts_logsnr(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    assert torch.allclose(schedule.t_of_logsnr(lam), t, atol=1e-9)


def test_discrete_schedule_hits_the_table_at_its_knots():
    s = DiscreteSchedule("linear")
    ac = s.alphas_cumprod()
    idx = torch.tensor([0, 10, 499, 999])
    t = (idx + 1).double() / 1000
    alpha, _ = s.alpha_sigma(t)
    assert torch.allclose(alpha**2, ac[idx], rtol=1e-10)
    assert torch.allclose(s.index_of_t(t), idx.double())
    # diffusers' linear table: alphas_cumprod[-1] of the standard DDPM run.
    assert math.isclose(float(ac[-1]), 4.0358e-5, rel_tol=1e-3)


def test_schedule_config_round_trip():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in ALL_SCHEDULES:
        rebuilt = schedule_from_config(s.config())
        assert type(rebuilt) is type(s) and rebuilt.config() == s.config()
        assert torch.equal(rebuilt.logsnr(t), s.logsnr(t))


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("variance", ["vp", "ve"])
def test_parameterization_round_trip(kind, variance):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    if variance == "vp":
        lam = torch.linspace(-15, 15, 16, dtype=torch.float64).reshape(-1, 1, 1, 1)
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    else:
        alpha, sigma = torch.ones(16, 1, 1, 1, dtype=torch.float64), torch.logspace(-3, 2, 16).double().reshape(
            -1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    pred = from_x0(x0, kind, x_t, alpha, sigma)
    assert torch.allclose(to_x0(pred, kind, x_t, alpha, sigma), x0, rtol=1e-9, atol=1e-9)
    if kind == "eps":
        assert torch.allclose(pred, eps, rtol=1e-8, atol=1e-8)
    if kind == "v" and variance == "vp":
        assert torch.allclose(pred, alpha * eps - sigma * x0, atol=1e-12)


def _moments(x):
    return x.mean(0), torch.cov(x.T)


@pytest.mark.parametrize("sampler,steps", [("ddim", 512), ("heun", 64), ("dpmpp_2m", 64), ("euler", 512)])
@pytest.mark.parametrize("schedule", [CosineSchedule(), DiscreteSchedule("linear"), KarrasSchedule()],
                         ids=["cosine", "discrete", "karras"])
def test_deterministic_samplers_reproduce_gaussian_moments(sampler, steps, schedule):
    mu, cov = example_gaussian()
    den = GaussianDenoiser(schedule, mu, cov)
    n = 20000
    x = generate(den, (3,), range(n), sampler=sampler, steps=steps, dtype=torch.float64)
    # The same prior noise pushed through the exact flow map: its moments are the data's up to sampling error,
    # which cancels in the comparison, so what remains is the solver's own error.
    t_start = float(make_timesteps(schedule, steps, DEFAULT_SPACING[sampler])[0])
    x_T = prior_sample(schedule, PerSampleGenerator(range(n)), (3,), t_start, dtype=torch.float64)
    x_ref = gaussian_flow_map(schedule, mu, cov, x_T, t_start)
    (m, c), (m_ref, c_ref) = _moments(x), _moments(x_ref)
    scale = torch.linalg.norm(cov)
    assert torch.linalg.norm(m - m_ref) / torch.linalg.norm(mu) < 0.02
    assert torch.linalg.norm(c - c_ref) / scale < 0.02
    # And against the true moments, allowing for the sampling error of n draws.
    assert torch.linalg.norm(c - cov) / scale < 0.02 + 4 * (2 / n) ** 0.5
    assert den.calls == nfe(sampler, steps, schedule)


def test_ddpm_ancestral_matches_moments_within_sampling_error():
    mu, cov = example_gaussian()
    schedule = CosineSchedule()
    n = 2500  # ancestral steps draw per-sample noise, so this test costs n * steps generator calls
    x = generate(GaussianDenoiser(schedule, mu, cov), (3,), range(n), sampler="ddpm", steps=128, dtype=torch.float64)
    m, c = _moments(x)
    # Standard errors of a mean and a covariance entry from n samples.
    se_mean = (torch.diag(cov) / n).sqrt()
    se_cov = ((torch.diag(cov)[:, None] * torch.diag(cov)[None, :] + cov**2) / n).sqrt()
    assert torch.all((m - mu).abs() < 4 * se_mean + 0.01 * cov.diag().sqrt())
    assert torch.all((c - cov).abs() < 4 * se_cov + 0.02 * cov.abs().max())


def test_stochastic_sampler_matches_moments_and_costs_one_evaluation_per_step():
    mu, cov = example_gaussian()
    schedule = CosineSchedule()
    n = 3000
    den = GaussianDenoiser(schedule, mu, cov)
    x = generate(den, (3,), range(n), sampler="stochastic", steps=128, dtype=torch.float64)
    assert den.calls == 128
    m, c = _moments(x)
    se_mean = (torch.diag(cov) / n).sqrt()
    se_cov = ((torch.diag(cov)[:, None] * torch.diag(cov)[None, :] + cov**2) / n).sqrt()
    assert torch.all((m - mu).abs() < 4 * se_mean + 0.01 * cov.diag().sqrt())
    assert torch.all((c - cov).abs() < 4 * se_cov + 0.02 * cov.abs().max())
    # One step has no interval to renoise into: it is DDIM's single deterministic step.
    one = generate(den, (3,), range(5), sampler="stochastic", steps=1, dtype=torch.float64)
    assert torch.equal(one, generate(den, (3,), range(5), sampler="ddim", steps=1, dtype=torch.float64))


def test_renoise_is_the_forward_transition():
    from distill.samplers import renoise

    schedule = CosineSchedule()
    a_k, s_k = alpha_sigma_at(schedule, 0.3)
    a_s, s_s = alpha_sigma_at(schedule, 0.6)
    x0 = torch.full((200000,), 0.7, dtype=torch.float64)  # a point mass: x_k's spread is s_k alone
    x_k = a_k * x0 + s_k * torch.randn_like(x0)
    x_s = renoise(x_k, a_k, s_k, a_s, s_s, torch.randn_like(x0))
    assert float(x_s.mean()) == pytest.approx(a_s * 0.7, abs=5e-3)
    assert float(x_s.std()) == pytest.approx(s_s, rel=5e-3)


def test_ddim_converges_as_steps_grow():
    mu, cov = example_gaussian()
    schedule = CosineSchedule()
    errs = []
    for steps in (4, 16, 64):
        den = GaussianDenoiser(schedule, mu, cov)
        x = generate(den, (3,), range(4000), sampler="ddim", steps=steps, dtype=torch.float64)
        errs.append(float(torch.linalg.norm(torch.cov(x.T) - cov)))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_per_sample_seeds_do_not_depend_on_batch(sampler):
    mu, cov = example_gaussian()
    den = GaussianDenoiser(CosineSchedule(), mu, cov)
    full = generate(den, (3,), range(10, 18), sampler=sampler, steps=5, dtype=torch.float64)
    part = torch.cat([generate(den, (3,), range(10, 13), sampler=sampler, steps=5, dtype=torch.float64),
                      generate(den, (3,), range(13, 18), sampler=sampler, steps=5, dtype=torch.float64)])
    assert torch.equal(full, part)
    assert torch.equal(PerSampleGenerator([3]).randn((4,)), PerSampleGenerator([7, 3]).randn((4,))[1:])


@pytest.mark.parametrize("spacing", ["uniform", "karras", "logsnr"])
def test_timesteps_decrease_to_zero(spacing):
    for s in ALL_SCHEDULES:
        ts = make_timesteps(s, 10, spacing)
        assert len(ts) == 11 and ts[-1] == 0.0 and (ts[0] == 1.0 or spacing == "karras")
        assert torch.all(ts[1:] < ts[:-1])


def test_karras_grid_on_a_vp_schedule_starts_at_the_true_start_then_follows_edm():
    from distill.samplers import SIGMA_MAX_VE, sigma_ve_at

    cosine = CosineSchedule()
    ts = make_timesteps(cosine, 8, "karras")
    sigmas = [sigma_ve_at(cosine, t) for t in ts]
    assert ts[0] == 1.0 and sigmas[0] > 1e3  # pure noise there, unlike at sigma 80
    assert sigmas[1] == pytest.approx(SIGMA_MAX_VE, rel=1e-6)
    # Heun: Euler (no correction) from above sigma 80 and on the last step, corrections in between.
    assert nfe("heun", 8, cosine) == 8 + 6
    ve = KarrasSchedule()  # starts at 80 itself: EDM's grid unchanged, every step but the last corrected
    assert nfe("heun", 8, ve) == 2 * 8 - 1


class _EchoNet(torch.nn.Module):
    """Returns a fixed prediction of the requested type for known (x0, eps), and records its time input."""

    def __init__(self, schedule, kind, x0, eps):
        super().__init__()
        self.schedule, self.kind, self.x0, self.eps = schedule, kind, x0, eps
        self.t_in = None

    def forward(self, x, t_in, labels):
        self.t_in, self.x_in = t_in, x
        alpha, sigma = self.schedule.alpha_sigma(self._t.double())
        a, s = alpha.reshape(-1, 1).to(x), sigma.reshape(-1, 1).to(x)
        return from_x0(self.x0, self.kind, self.x_t, a, s)  # relative to the state (an EDM input is scaled)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_denoiser_adapter_recovers_x0_for_every_prediction(kind):
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    t = torch.linspace(0.1, 0.9, 5)
    alpha, sigma = schedule.alpha_sigma(t.double())
    x_t = alpha.float()[:, None] * x0 + sigma.float()[:, None] * eps
    net = _EchoNet(schedule, kind, x0, eps)
    net._t, net.x_t = t, x_t
    den = Denoiser(net, schedule, prediction=kind, time_input="t1000")
    assert torch.allclose(den(x_t, t), x0, atol=1e-5)
    if kind in ("edm", "edm_v"):  # EDM's input scaling c_in on the VE-equivalent state
        s_ve = (sigma / alpha).float()[:, None]
        assert torch.allclose(net.x_in, x_t / alpha.float()[:, None] / (s_ve**2 + 0.25).sqrt(), atol=1e-5)
    else:
        assert torch.equal(net.x_in, x_t)
    assert torch.allclose(net.t_in, 1000 * t)
    assert torch.allclose(den.eps(x_t, t), eps, atol=1e-4)


def test_time_input_conventions():
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    d = DiscreteSchedule("linear")
    assert torch.allclose(time_input(d, t, "index"), torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))
    k = KarrasSchedule()
    assert torch.allclose(time_input(k, t, "log_sigma"), 0.25 * torch.log(k.sigma(t)))
    with pytest.raises(ValueError, match="discrete"):
        time_input(k, t, "index")


class _LabelNet(torch.nn.Module):
    """x0 prediction = label value, so guidance arithmetic is visible."""

    def forward(self, x, t_in, labels):
        return labels.to(x.dtype)[:, None].expand_as(x)


def test_classifier_free_guidance():
    den = Denoiser(_LabelNet(), CosineSchedule(), prediction="x0", null_label=10)
    x = torch.zeros(3, 2)
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(den(x, 0.5, Cond(labels, 0.0)), torch.tensor([[1.0] * 2, [2.0] * 2, [3.0] * 2]))
    # (1 + w) c - w null with null = 10, w = 2: 3c - 20
    assert torch.allclose(den(x, 0.5, Cond(labels, 2.0))[:, 0], torch.tensor([-17.0, -14.0, -11.0]))
    w = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(den(x, 0.5, Cond(labels, w))[:, 0], torch.tensor([1.0, -6.0, -11.0]))
    assert torch.allclose(cfg_combine(torch.tensor(2.0), torch.tensor(1.0), 0.5), torch.tensor(2.5))
    with pytest.raises(ValueError, match="null class"):
        Denoiser(_LabelNet(), CosineSchedule(), prediction="x0")(x, 0.5, Cond(labels, 1.0))


def test_ddim_step_matches_diffusers_on_a_discrete_table():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                        beta_end=0.012, set_alpha_to_one=True, prediction_type="epsilon", clip_sample=False)
    ref.set_timesteps(50)
    sched = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    for k in (0, 25, 49):
        index = int(ref.timesteps[k])
        prev = index - 1000 // 50
        t, s = torch.tensor((index + 1) / 1000.0), torch.tensor((prev + 1) / 1000.0)
        a_t, s_t = sched.alpha_sigma(t.double())
        a_s, s_s = (1.0, 0.0) if prev < 0 else sched.alpha_sigma(s.double())
        x0 = (x - s_t * eps) / a_t
        ours = ddim_step(x, x0, float(a_t), float(s_t), float(a_s), float(s_s))
        theirs = ref.step(eps, index, x).prev_sample
        # diffusers keeps its table in float32, hence a float32-level tolerance
        assert torch.allclose(ours, theirs.double(), rtol=1e-5, atol=1e-5), index
