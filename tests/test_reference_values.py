"""Schedules and samplers pinned against independent values: closed forms from the papers, numbers computed by
hand and written out here, and diffusers' own schedulers (a separate implementation of the same maths).

Conventions used to line diffusers up with us: diffusers' discrete index ``i`` sits at our time ``t = (i + 1) / T``
(so ``alpha_t^2 = alphas_cumprod[i]``), and diffusers' models predict eps, which we form from our denoiser's x0 as
``eps = (x_t - alpha_t x0) / sigma_t``. diffusers keeps its tables in float32, hence float32-level tolerances.
"""

import math

import pytest
import torch

from distill import samplers
from distill.oracles import GaussianDenoiser, example_gaussian
from distill.schedules import CosineSchedule, DiscreteSchedule, KarrasSchedule

T = 1000
DISCRETE = [
    ("linear", 1e-4, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 1e-4, 0.02),  # beta_start/end unused by this one
]


# --- schedules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta_start,beta_end", DISCRETE, ids=[d[0] for d in DISCRETE])
def test_discrete_schedules_match_diffusers_alphas_cumprod(kind, beta_start, beta_end):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=kind, beta_start=beta_start, beta_end=beta_end)
    ac = ref.alphas_cumprod.double()  # float32 in diffusers
    ours = DiscreteSchedule(kind, num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end)
    idx = torch.tensor([0, 1, 10, 100, 250, 499, 500, 750, 900, 998, 999])
    alpha, sigma = ours.alpha_sigma((idx + 1).double() / T)
    # Relative on alpha^2, which spans 1 down to 2e-9 (squaredcos_cap_v2 at i = 999, where diffusers' beta is the
    # float32 0.999, so its 1 - beta is off by 1.3e-5 relative: the loosest point of this comparison).
    assert torch.allclose(alpha**2, ac[idx], rtol=2e-5, atol=0), (alpha**2 / ac[idx] - 1).abs().max()
    # sigma^2 = 1 - alphas_cumprod; absolute, as float32's 1 - 0.9999 has no relative accuracy to speak of.
    assert torch.allclose(sigma**2, 1 - ac[idx], rtol=0, atol=1e-6), (sigma**2 - (1 - ac[idx])).abs().max()


def test_cosine_schedule_is_the_cosine():
    """Salimans & Ho's clipped cosine, lambda(t) = -2 log tan(a t + b), is within ~1e-4 of Nichol & Dhariwal's
    unclipped alpha = cos(pi t / 2), sigma = sin(pi t / 2) (s = 0); a straight line in log-SNR from 20 to -20
    agrees at t = 1/2 only (at t = 1/4 it gives alpha = 0.99998 instead of cos(pi / 8) = 0.924)."""
    s = CosineSchedule()
    ts = [0.1, 0.25, 0.5, 0.75, 0.9]
    alpha, sigma = s.alpha_sigma(torch.tensor(ts, dtype=torch.float64))
    lam = s.logsnr(torch.tensor(ts, dtype=torch.float64))
    for t, a, sg, la in zip(ts, alpha.tolist(), sigma.tolist(), lam.tolist()):
        assert a == pytest.approx(math.cos(math.pi * t / 2), abs=2e-4), t
        assert sg == pytest.approx(math.sin(math.pi * t / 2), abs=2e-4), t
        # and the log-SNR itself (not only alpha/sigma): -2 log tan(pi t / 2), within 5e-4 at t = 0.1 and 0.9
        assert la == pytest.approx(-2 * math.log(math.tan(math.pi * t / 2)), abs=2e-3), t
    lam = s.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam.tolist() == pytest.approx([20.0, -20.0], abs=1e-9)


# Karras et al. (2022) Eq. 5, sigma_i = (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7 for i = 0..17 (N = 18,
# EDM's CIFAR-10 step count), computed once in float64 with plain Python and pasted here.
KARRAS_SIGMAS_18 = [
    80.0, 57.58598472124816, 40.78557379650796, 28.374584604156844, 19.35245298032523, 12.91008238075732,
    8.400935309099816, 5.315194521796382, 3.256821519765537, 1.9233398370400518, 1.088170636545279,
    0.5853481231945422, 0.29644228447915727, 0.13951646873101678, 0.05994731123547159, 0.022934518372333384,
    0.0075280199627840785, 0.002,
]


def test_karras_schedule_uniform_t_gives_karras_sigmas():
    from diffusers import EDMEulerScheduler

    # EDMEulerScheduler.set_timesteps(N) evaluates exactly Eq. 5 on linspace(0, 1, N) (in float32), then appends
    # a final sigma = 0 (final_sigmas_type="zero").
    edm = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    edm.set_timesteps(18)
    assert float(edm.sigmas[-1]) == 0.0
    assert torch.allclose(edm.sigmas[:-1].double(), torch.tensor(KARRAS_SIGMAS_18, dtype=torch.float64),
                          rtol=1e-6, atol=0)

    _, sigma = KarrasSchedule().alpha_sigma(torch.linspace(1, 0, 18, dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor(KARRAS_SIGMAS_18, dtype=torch.float64), rtol=1e-12, atol=0)


# --- DPM-Solver++(2M) with a varying step ratio ----------------------------------------------------------------


def test_dpmpp_2m_matches_diffusers_on_a_nonuniform_logsnr_grid():
    """diffusers' timesteps are uniform in the discrete index, so the log-SNR steps h vary (step ratio
    r = h_prev / h runs from 1.15 down to 0.74 here), which exercises the variable-step branch."""
    from diffusers import DPMSolverMultistepScheduler

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = DiscreteSchedule(num_train_timesteps=T, **kw)
    # Last step: diffusers with final_sigmas_type="zero" takes a first-order step to sigma = 0, whose limit is
    # x = x0_hat, exactly what ours does at t = 0; the steps before it are all second order (solver_order=2,
    # lower_order_final only lowers the very last one).
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="dpmsolver++", solver_order=2,
                                      solver_type="midpoint", prediction_type="epsilon", final_sigmas_type="zero",
                                      lower_order_final=True, thresholding=False, **kw)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    ts = torch.cat([(ref.timesteps.double() + 1) / T, torch.zeros(1, dtype=torch.float64)])

    half_lam = 0.5 * sched.logsnr(ts[:-1])
    h = half_lam[1:] - half_lam[:-1]
    r = h[:-1] / h[1:]
    assert (r - 1).abs().max() > 0.2  # the point of this test: steps of unequal log-SNR length

    mu, cov = example_gaussian()
    den = GaussianDenoiser(sched, mu, cov)
    g = torch.Generator().manual_seed(0)
    _, sigma_max = sched.alpha_sigma(ts[:1])
    x_T = float(sigma_max) * torch.randn(64, 3, generator=g, dtype=torch.float64)

    ours = []
    samplers.sample_dpmpp_2m(den, x_T.clone(), ts, callback=lambda d: ours.append(d["x"].clone()))

    theirs, x = [], x_T.clone()
    for index in ref.timesteps.tolist():
        t = torch.full((x.shape[0],), (index + 1) / T, dtype=torch.float64)
        a, s = sched.alpha_sigma(t[:1])
        eps = (x - a * den(x, t)) / s
        x = ref.step(eps, index, x).prev_sample
        theirs.append(x.clone())

    assert len(ours) == len(theirs) == 10
    for k, (o, th) in enumerate(zip(ours, theirs)):
        # diffusers steps in float32 (|x| ~ 3 here); observed agreement is ~6e-7 on every step.
        assert torch.allclose(o, th.double(), rtol=0, atol=5e-6), (k, float((o - th).abs().max()))


# --- DDIM with 0 < eta <= 1 -------------------------------------------------------------------------------------


def _ddim_reference_setup():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        set_alpha_to_one=True, prediction_type="epsilon", clip_sample=False)
    ref.set_timesteps(50)  # "leading" spacing: 980, 960, ..., 0, each stepping 20 indices down
    sched = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    return ref, sched


def _alpha_sigma_pair(sched, index):
    """Our (alpha, sigma) at diffusers' index and at its DDIM predecessor (index - 20; clean data below 0)."""
    prev = index - T // 50
    a_t, s_t = sched.alpha_sigma(torch.tensor((index + 1) / T, dtype=torch.float64))
    if prev < 0:
        return float(a_t), float(s_t), 1.0, 0.0
    a_s, s_s = sched.alpha_sigma(torch.tensor((prev + 1) / T, dtype=torch.float64))
    return float(a_t), float(s_t), float(a_s), float(s_s)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_ddim_step_matches_diffusers(eta):
    ref, sched = _ddim_reference_setup()
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for index in (980, 500, 20, 0):  # 0 steps to clean data, where the noise term vanishes
        a_t, s_t, a_s, s_s = _alpha_sigma_pair(sched, index)
        x0 = (x - s_t * eps) / a_t
        ours = samplers.ddim_step(x, x0, a_t, s_t, a_s, s_s, eta=eta, noise=z)
        theirs = ref.step(eps, index, x, eta=eta, variance_noise=z).prev_sample
        assert torch.allclose(ours, theirs.double(), rtol=1e-5, atol=1e-5), (index, (ours - theirs).abs().max())
    # The noise really enters: a different z gives a different step away from the last one.
    a_t, s_t, a_s, s_s = _alpha_sigma_pair(sched, 500)
    x0 = (x - s_t * eps) / a_t
    assert not torch.allclose(samplers.ddim_step(x, x0, a_t, s_t, a_s, s_s, eta=eta, noise=z),
                              samplers.ddim_step(x, x0, a_t, s_t, a_s, s_s, eta=eta, noise=-z))


@pytest.mark.parametrize("shape", [(-1,), (-1, 1, 1, 1)], ids=["B", "B111"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_with_per_sample_tensors_equals_per_sample_floats(eta, shape):
    _, sched = _ddim_reference_setup()
    indices = [980, 500, 20, 0]  # one sample each, the last stepping to clean data (s_s = 0)
    pairs = [_alpha_sigma_pair(sched, i) for i in indices]
    g = torch.Generator().manual_seed(1)
    x, x0, z = (torch.randn(len(indices), 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    per_sample = torch.stack([
        samplers.ddim_step(x[b:b + 1], x0[b:b + 1], *pairs[b], eta=eta, noise=z[b:b + 1])[0]
        for b in range(len(indices))
    ])
    a_t, s_t, a_s, s_s = (torch.tensor([p[j] for p in pairs], dtype=torch.float64).reshape(shape)
                          for j in range(4))
    batched = samplers.ddim_step(x, x0, a_t, s_t, a_s, s_s, eta=eta, noise=z)
    assert batched.shape == x.shape
    assert torch.allclose(batched, per_sample, rtol=1e-12, atol=1e-12)


def test_ddim_eta_half_reproduces_gaussian_moments():
    mu, cov = example_gaussian()
    schedule = CosineSchedule()
    n = 2000  # each stochastic step draws n per-sample generator calls: this is the test's cost
    x = samplers.generate(GaussianDenoiser(schedule, mu, cov), (3,), range(n), sampler="ddim", steps=128,
                          dtype=torch.float64, eta=0.5)
    m, c = x.mean(0), torch.cov(x.T)
    # Standard errors of a mean and a covariance entry from n samples, plus a small discretization allowance.
    se_mean = (torch.diag(cov) / n).sqrt()
    se_cov = ((torch.diag(cov)[:, None] * torch.diag(cov)[None, :] + cov**2) / n).sqrt()
    assert torch.all((m - mu).abs() < 4 * se_mean + 0.01 * cov.diag().sqrt()), m - mu
    assert torch.all((c - cov).abs() < 4 * se_cov + 0.02 * cov.abs().max()), c - cov
