"""Tests of companion.diffusion, section ddpm-demolish-rebuild / ddpm-bayes-denoise: the schedule,
the forward process, both losses, the reverse step and the exact denoisers, each against an
independent reference (Gaussian conditioning, Monte Carlo, autograd of a log-density, a naive
[N, M] softmax) and the reverse step against ``diffusers.DDPMScheduler``.

Where ours differs from diffusers' DDPMScheduler (checked below on shared inputs):
- notation: our ``alpha, beta, alpha_bar, beta_bar`` are the square roots of diffusers'
  ``alphas``, ``betas``, ``alphas_cumprod`` and ``1 - alphas_cumprod``; the scheduler is built
  with ``trained_betas = beta[1:] ** 2`` (its default linear schedule is not the book's);
- time: our t runs 1..T with index 0 the clean data; diffusers' timestep k = t - 1;
- precision: diffusers stores the schedule in float32, ours in float64 (cast to the data's dtype
  at use), so the comparison holds to float32 rounding;
- the last step: diffusers never adds noise at k = 0, whatever ``variance_type``; with
  ``sigma="beta"`` we add ``beta_1 z`` there as the derivation says (``"posterior"`` has
  variance exactly 0 at t = 1, so the two agree). The test compares t = 1 with ``"posterior"``.
- diffusers clamps the posterior variance at 1e-20 before a log; we never take its log.
"""
import math

import pytest
import torch

from companion.diffusion import (DiffusionSchedule, TimeMLP, ddpm_eps_loss, ddpm_reverse_step,
                                 ddpm_sample, ddpm_two_noise_loss, empirical_denoiser,
                                 gmm_denoiser, gmm_denoiser_vp, linear_schedule, q_posterior,
                                 q_sample, sinusoidal_embedding, x0_from_eps)
from tests._helpers import LargestTensor

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mixture(K=3, D=2, seed=0, dtype=F64):
    g = gen(seed)
    means = 2 * torch.randn(K, D, generator=g, dtype=dtype)
    stds = 0.1 + torch.rand(K, generator=g, dtype=dtype)
    w = torch.rand(K, generator=g, dtype=dtype) + 0.2
    return means, stds, w / w.sum()


def log_mixture_density(x, sigma, means, stds, w):
    """log p_sigma(x) of the noisy mixture, written out independently of the module."""
    D = x.shape[-1]
    var = stds**2 + sigma**2
    d2 = ((x[:, None, :] - means) ** 2).sum(-1)
    return torch.logsumexp(w.log() - 0.5 * D * torch.log(2 * math.pi * var) - 0.5 * d2 / var, -1)


# ---- schedule -------------------------------------------------------------------------------
def test_linear_schedule_identities():
    s = linear_schedule(1000)
    assert s.alpha.dtype == F64 and s.alpha.shape == (1001,) and s.T == 1000
    assert s.alpha_bar[0] == 1 and s.beta_bar[0] == 0 and s.beta[0] == 0
    torch.testing.assert_close(s.alpha**2 + s.beta**2, torch.ones(1001, dtype=F64))
    torch.testing.assert_close(s.alpha_bar**2 + s.beta_bar**2, torch.ones(1001, dtype=F64))
    torch.testing.assert_close(s.alpha[1:] ** 2, 1 - 0.02 * torch.arange(1, 1001, dtype=F64) / 1000)
    # beta_bar_t^2 = beta_t^2 + alpha_t^2 beta_bar_{t-1}^2 (two steps merge into one)
    torch.testing.assert_close(s.beta_bar[1:] ** 2,
                               s.beta[1:] ** 2 + s.alpha[1:] ** 2 * s.beta_bar[:-1] ** 2,
                               rtol=0, atol=1e-12)
    # alpha_bar by an explicit product loop
    prod = 1.0
    for t in range(1, 1001):
        prod *= math.sqrt(1 - 0.02 * t / 1000)
    assert abs(s.alpha_bar[-1].item() - prod) < 1e-15
    assert abs(math.log(prod) + 5.04) < 0.01 and prod < math.exp(-0.005 * 1001)


@pytest.mark.parametrize("T", [1, 10, 50, 1000])
def test_linear_schedule_alpha_bar_T(T):
    s = linear_schedule(T, alpha_bar_T=math.exp(-5))
    assert abs(s.alpha_bar[-1].item() - math.exp(-5)) < 1e-12 if T > 1 else True
    assert bool((s.alpha[1:] > 0).all())


def test_linear_schedule_bad_inputs():
    with pytest.raises(TypeError, match="T: expected an int"):
        linear_schedule(10.0)
    with pytest.raises(ValueError, match="T: expected a value"):
        linear_schedule(0)
    with pytest.raises(ValueError, match="beta_sq_max"):
        linear_schedule(10, beta_sq_max=1.5)
    with pytest.raises(ValueError, match="alpha_bar_T"):
        linear_schedule(10, alpha_bar_T=1.0)
    with pytest.raises(ValueError, match="alpha_bar_T"):
        linear_schedule(2, alpha_bar_T=1e-30)


def test_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = linear_schedule(1000)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                  trained_betas=(s.beta[1:] ** 2).tolist())
    torch.testing.assert_close(sch.alphas_cumprod.double(), s.alpha_bar[1:] ** 2,
                               rtol=1e-5, atol=1e-7)
    # diffusers' default linear schedule (1e-4 .. 0.02) is not the book's
    default = diffusers.DDPMScheduler(num_train_timesteps=1000)
    assert (default.alphas_cumprod.double() - s.alpha_bar[1:] ** 2).abs().max() > 1e-3


# ---- forward process ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 10, 200])
def test_q_sample_matches_step_by_step_chain(t):
    s, n = linear_schedule(1000), 10_000
    g = gen(t)
    x0 = torch.full((n, 1), 1.5, dtype=F64)
    x = x0.clone()
    for k in range(1, t + 1):
        x = s.alpha[k] * x + s.beta[k] * torch.randn(n, 1, generator=g, dtype=F64)
    xt, _ = q_sample(x0, torch.full((n,), t), s, generator=g)
    for sample in (x, xt):
        se_mean = s.beta_bar[t].item() / math.sqrt(n)
        assert abs(sample.mean().item() - s.alpha_bar[t].item() * 1.5) < 4 * se_mean
        var_se = math.sqrt(2 / n) * s.beta_bar[t].item() ** 2
        assert abs(sample.var().item() - s.beta_bar[t].item() ** 2) < 4 * var_se


def test_q_sample_and_x0_from_eps_invert():
    s = linear_schedule(100)
    g = gen(1)
    x0 = torch.randn(8, 3, 2, generator=g, dtype=F64)
    t = torch.randint(1, 101, (8,), generator=g)
    xt, eps = q_sample(x0, t, s, generator=g)
    torch.testing.assert_close(x0_from_eps(xt, eps, t, s), x0, rtol=0, atol=1e-10)
    xt2, eps2 = q_sample(x0, t, s, eps=eps)
    assert torch.equal(xt, xt2) and eps2 is eps


def test_q_sample_bad_inputs():
    s = linear_schedule(10)
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="t: expected every value in 1..10"):
        q_sample(x0, torch.tensor([0, 1, 2, 3]), s)
    with pytest.raises(ValueError, match="t: expected shape"):
        q_sample(x0, torch.tensor([1, 2]), s)
    with pytest.raises(TypeError, match="t: expected an integer tensor"):
        q_sample(x0, torch.ones(4), s)
    with pytest.raises(ValueError, match="eps: expected the shape of x0"):
        q_sample(x0, torch.ones(4, dtype=torch.long), s, eps=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="sched: expected a DiffusionSchedule"):
        q_sample(x0, torch.ones(4, dtype=torch.long), {"alpha": 1})
    with pytest.raises(TypeError, match="x0: expected a floating-point"):
        q_sample(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, dtype=torch.long), s)


# ---- posterior ------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2, 37, 500, 1000])
def test_q_posterior_matches_gaussian_conditioning(t):
    """(x_{t-1}, x_t) | x0 is jointly Gaussian: condition it with the Schur complement."""
    s, x0v, xtv = linear_schedule(1000), 0.7, -0.3
    ab_p, bb_p = s.alpha_bar[t - 1].item(), s.beta_bar[t - 1].item()
    a, b = s.alpha[t].item(), s.beta[t].item()
    mean = torch.tensor([ab_p * x0v, a * ab_p * x0v], dtype=F64)
    v_prev = bb_p**2
    cov = torch.tensor([[v_prev, a * v_prev], [a * v_prev, a * a * v_prev + b * b]], dtype=F64)
    cond_mean = mean[0] + cov[0, 1] / cov[1, 1] * (xtv - mean[1])
    cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    m, v = q_posterior(torch.tensor([[xtv]], dtype=F64), torch.tensor([[x0v]], dtype=F64),
                       torch.tensor([t]), s)
    assert abs(m.item() - cond_mean.item()) < 1e-10
    assert abs(v.item() - cond_var.item()) < 1e-10


# ---- losses ---------------------------------------------------------------------------------
class FixedMLP(torch.nn.Module):
    def __init__(self, D=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(D + 1, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, D)).double()

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / 1000], -1))


@pytest.mark.parametrize("t", [2, 100, 900])
def test_two_noise_loss_equals_eps_loss_plus_constant(t):
    """E two-noise = E eps-loss + D alpha_t^2 beta_bar_{t-1}^2 / beta_t^2 for any model."""
    s, n, D = linear_schedule(1000), 200_000, 4
    model = FixedMLP(D)
    x0 = torch.randn(n, D, generator=gen(5), dtype=F64)
    tt = torch.full((n,), t)
    with torch.no_grad():
        a = ddpm_two_noise_loss(model, x0, s, tt, reduction="none", generator=gen(6))
        b = ddpm_eps_loss(model, x0, s, tt, reduction="none", generator=gen(7))
    const = D * (s.alpha[t] ** 2 * s.beta_bar[t - 1] ** 2 / s.beta[t] ** 2).item()
    se = a.std().item() / math.sqrt(n) + b.std().item() / math.sqrt(n)
    assert abs(a.mean().item() - (b.mean().item() + const)) < max(4 * se, 0.02 * const)


def test_eps_loss_zero_for_oracle_and_reductions():
    s = linear_schedule(50)
    x_star = torch.tensor([0.3, -1.2], dtype=F64)
    x0 = x_star.expand(16, 2).clone()

    def oracle(x_t, t):
        return (x_t - s.alpha_bar[t][:, None] * x_star) / s.beta_bar[t][:, None]

    loss = ddpm_eps_loss(oracle, x0, s, generator=gen(0), reduction="none")
    assert loss.shape == (16,) and loss.abs().max() < 1e-20
    model = FixedMLP(2)
    t = torch.randint(1, 51, (16,), generator=gen(1))
    none = ddpm_eps_loss(model, x0, s, t, reduction="none", generator=gen(2))
    torch.testing.assert_close(ddpm_eps_loss(model, x0, s, t, generator=gen(2)), none.mean())
    torch.testing.assert_close(ddpm_eps_loss(model, x0, s, t, "sum", generator=gen(2)), none.sum())
    with pytest.raises(ValueError, match="reduction"):
        ddpm_eps_loss(model, x0, s, reduction="avg")
    with pytest.raises(TypeError, match="model: expected a callable"):
        ddpm_two_noise_loss(3, x0, s)


def test_eps_loss_compile_and_gradients():
    s = linear_schedule(100)
    model = TimeMLP(2, hidden=16, depth=2, t_dim=8)
    x0 = torch.randn(32, 2, generator=gen(0))
    t = torch.randint(1, 101, (32,), generator=gen(1))
    eager = ddpm_eps_loss(model, x0, s, t, generator=gen(2))
    compiled = torch.compile(ddpm_eps_loss, backend="aot_eager")(model, x0, s, t, generator=gen(2))
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- reverse step ---------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type,sigma", [("fixed_small", "posterior"),
                                                 ("fixed_large", "beta")])
@pytest.mark.parametrize("t", [1, 2, 300, 1000])
def test_reverse_step_matches_diffusers(variance_type, sigma, t):
    diffusers = pytest.importorskip("diffusers")
    if t == 1 and sigma == "beta":
        sigma = "posterior"  # diffusers adds no noise at its k = 0 (see the module docstring)
    s = linear_schedule(1000)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                  trained_betas=(s.beta[1:] ** 2).tolist(),
                                  variance_type=variance_type, clip_sample=False,
                                  prediction_type="epsilon")
    sch.set_timesteps(1000)
    g = gen(t)
    x_t = torch.randn(64, 3, generator=g)
    eps_hat = torch.randn(64, 3, generator=g)
    ref = sch.step(eps_hat, t - 1, x_t, generator=gen(99)).prev_sample
    tt = torch.full((64,), t)
    ours = ddpm_reverse_step(x_t, tt, x0_from_eps(x_t, eps_hat, tt, s), s, sigma,
                             generator=gen(99))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_reverse_step_zero_and_bad_sigma():
    s = linear_schedule(20)
    x_t, x0 = torch.randn(5, 2, generator=gen(0)), torch.randn(5, 2, generator=gen(1))
    mean, _ = q_posterior(x_t, x0, 7, s)
    assert torch.equal(ddpm_reverse_step(x_t, 7, x0, s, "zero"), mean)
    with pytest.raises(ValueError, match="sigma: expected one of"):
        ddpm_reverse_step(x_t, 7, x0, s, "large")


def test_reverse_step_variances_are_exact_for_their_data():
    """sigma="beta" keeps N(0, 1) data N(0, 1); "posterior" brings a point mass back exactly."""
    s, n = linear_schedule(50), 20_000
    g = gen(3)
    means = torch.zeros(1, 1, dtype=F64)
    stds = w = torch.ones(1, dtype=F64)
    x = ddpm_sample(lambda x, t: gmm_denoiser_vp(x, t, s, means, stds, w), (n, 1), s, "beta",
                    prediction="x0", generator=g, dtype=F64)
    assert abs(x.var().item() - 1) < 4 * math.sqrt(2 / n) and abs(x.mean().item()) < 0.03
    point = torch.zeros(1, 1, dtype=F64)
    x = ddpm_sample(lambda x, t: gmm_denoiser_vp(x, t, s, point, torch.zeros(1, dtype=F64), w),
                    (1000, 1), s, "posterior", prediction="x0", generator=g, dtype=F64)
    assert x.abs().max() < 1e-6


def test_ddpm_sample_oracle_and_strided():
    s = linear_schedule(1000)
    x_star = torch.tensor([0.5, -1.0], dtype=F64)

    def oracle(x_t, t):
        return (x_t - s.alpha_bar[t][:, None] * x_star) / s.beta_bar[t][:, None]

    x = ddpm_sample(oracle, (16, 2), s, "zero", generator=gen(0), dtype=F64)
    torch.testing.assert_close(x, x_star.expand(16, 2), rtol=0, atol=1e-4)
    ts = torch.arange(20, 1001, 20)
    x = ddpm_sample(oracle, (16, 2), s, "posterior", timesteps=ts, generator=gen(0), dtype=F64)
    torch.testing.assert_close(x, x_star.expand(16, 2), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="timesteps"):
        ddpm_sample(oracle, (4, 2), s, timesteps=[5, 3])
    with pytest.raises(ValueError, match="prediction"):
        ddpm_sample(oracle, (4, 2), s, prediction="v")


# ---- exact denoisers ------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_gmm_denoiser_is_tweedie(sigma):
    """E[x0|x] = x + sigma^2 grad log p_sigma(x), the gradient by autograd."""
    means, stds, w = mixture()
    x = torch.randn(50, 2, generator=gen(1), dtype=F64).mul(2).requires_grad_()
    (grad,) = torch.autograd.grad(log_mixture_density(x, sigma, means, stds, w).sum(), x)
    torch.testing.assert_close(gmm_denoiser(x.detach(), sigma, means, stds, w),
                               x.detach() + sigma**2 * grad, rtol=1e-10, atol=1e-10)


def test_gmm_denoiser_monte_carlo():
    """Self-normalised importance sampling of E[x0 | x] from mixture draws."""
    means, stds, w = mixture()
    g, n, sigma = gen(2), 400_000, 0.6
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x0 = means[comp] + stds[comp, None] * torch.randn(n, 2, generator=g, dtype=F64)
    x = x0[:3] + sigma * torch.randn(3, 2, generator=g, dtype=F64)  # typical noisy points
    logw = -((x[:, None, :] - x0) ** 2).sum(-1) / (2 * sigma**2)
    p = torch.softmax(logw, -1)
    mc = p @ x0
    ess = 1 / (p**2).sum(-1)
    spread = (p @ x0**2 - mc**2).clamp_min(0).sqrt().max(-1).values  # posterior std
    tol = (5 * spread / ess.sqrt()).max().item()
    assert tol < 0.05
    torch.testing.assert_close(gmm_denoiser(x, sigma, means, stds, w), mc, rtol=0, atol=tol)


def test_gmm_denoiser_per_point_sigma_and_vp():
    means, stds, w = mixture()
    x = torch.randn(6, 2, generator=gen(3), dtype=F64)
    sig = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 5.0], dtype=F64)
    rows = torch.stack([gmm_denoiser(x[i:i + 1], sig[i].item(), means, stds, w)[0]
                        for i in range(6)])
    torch.testing.assert_close(gmm_denoiser(x, sig, means, stds, w), rows)
    torch.testing.assert_close(gmm_denoiser(x, sig[:, None], means, stds, w), rows)
    s = linear_schedule(100)
    t = torch.tensor([1, 5, 20, 50, 80, 100])
    ab, bb = s.alpha_bar[t][:, None], s.beta_bar[t][:, None]
    torch.testing.assert_close(gmm_denoiser_vp(x, t, s, means, stds, w),
                               gmm_denoiser(x / ab, (bb / ab)[:, 0], means, stds, w))
    # against Tweedie in the VP form: E[x0|x_t] = (x_t + beta_bar^2 grad log p(x_t)) / alpha_bar
    xr = x.clone().requires_grad_()
    var = (ab**2) * stds**2 + bb**2
    d2 = ((xr[:, None, :] - ab[:, :, None] * means) ** 2).sum(-1)
    logp = torch.logsumexp(w.log() - torch.log(var) - 0.5 * d2 / var, -1)
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    torch.testing.assert_close(gmm_denoiser_vp(x, t, s, means, stds, w), (x + bb**2 * grad) / ab)


def test_gmm_denoiser_extremes():
    means, stds, w = mixture(dtype=torch.float32)
    x = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    for sigma in (0.0, 1e-8, 1e-3, 1e3, 1e8):
        out = gmm_denoiser(x, sigma, means, stds, w)
        assert torch.isfinite(out).all(), sigma
    torch.testing.assert_close(gmm_denoiser(x, 0.0, means, stds, w), x)
    torch.testing.assert_close(gmm_denoiser(x[1:], 1e8, means, stds, w), (w @ means)[None])
    point = gmm_denoiser(x, 1e-8, means, torch.zeros(3), w)  # delta mixture: nearest mean
    assert torch.isfinite(point).all()
    nearest = means[((x[:, None] - means) ** 2).sum(-1).argmin(-1)]
    torch.testing.assert_close(point, nearest)


def test_gmm_denoiser_bad_inputs():
    means, stds, w = mixture()
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="weights: expected positive weights summing to 1"):
        gmm_denoiser(x, 1.0, means, stds, w * 2)
    with pytest.raises(ValueError, match="stds: expected every std >= 0"):
        gmm_denoiser(x, 1.0, means, -stds, w)
    with pytest.raises(ValueError, match=r"means: expected shape \[K, 3\]"):
        gmm_denoiser(torch.zeros(4, 3, dtype=F64), 1.0, means, stds, w)
    with pytest.raises(ValueError, match="stds: expected shape"):
        gmm_denoiser(x, 1.0, means, stds[:2], w)
    with pytest.raises(ValueError, match="sigma: expected every noise level >= 0"):
        gmm_denoiser(x, -1.0, means, stds, w)
    with pytest.raises(ValueError, match="sigma: expected a scalar or shape"):
        gmm_denoiser(x, torch.ones(3), means, stds, w)
    with pytest.raises(TypeError, match="sigma: expected a number"):
        gmm_denoiser(x, "1", means, stds, w)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        gmm_denoiser(torch.zeros(4, 2, dtype=torch.long), 1.0, means, stds, w)


def test_gmm_denoiser_gradcheck_inference_compile():
    means, stds, w = mixture()
    x = torch.randn(5, 2, generator=gen(4), dtype=F64, requires_grad=True)
    m = means.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: gmm_denoiser(x, 0.7, m, stds, w), (x, m))
    with torch.inference_mode():
        out = gmm_denoiser(x.detach(), 0.7, means, stds, w)
    compiled = torch.compile(gmm_denoiser, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x.detach(), 0.7, means, stds, w), out)


def naive_empirical(x, sigma, data):
    """The [M, N] form: every pairwise distance at once."""
    d2 = ((x[:, None, :] - data[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), -1) @ data


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_empirical_denoiser_matches_naive(chunk):
    g = gen(5)
    data = torch.randn(300, 3, generator=g, dtype=F64)
    x = torch.randn(20, 3, generator=g, dtype=F64)
    for sigma in (0.01, 0.3, 5.0):
        torch.testing.assert_close(empirical_denoiser(x, sigma, data, chunk),
                                   naive_empirical(x, sigma, data), rtol=1e-10, atol=1e-10)
    # and it is the mixture denoiser with zero widths and equal weights
    torch.testing.assert_close(
        empirical_denoiser(x, 0.3, data, chunk),
        gmm_denoiser(x, 0.3, data, torch.zeros(300, dtype=F64),
                     torch.full((300,), 1 / 300, dtype=F64)))


def test_empirical_denoiser_extremes_and_shapes():
    g = gen(6)
    data = 10 * torch.randn(1000, 2, generator=g)
    x = torch.randn(2, 5, 2, generator=g)
    nearest = data[torch.cdist(x.reshape(-1, 2), data).argmin(-1)].reshape(2, 5, 2)
    torch.testing.assert_close(empirical_denoiser(x, 1e-3, data, 64), nearest)
    torch.testing.assert_close(empirical_denoiser(x, 1e6, data, 64),
                               data.mean(0).expand(2, 5, 2), rtol=1e-4, atol=1e-4)
    sig = torch.rand(2, 5, generator=g) + 0.1
    flat = torch.stack([empirical_denoiser(x.reshape(-1, 2)[i:i + 1], s.item(), data)[0]
                        for i, s in enumerate(sig.reshape(-1))]).reshape(2, 5, 2)
    torch.testing.assert_close(empirical_denoiser(x, sig, data), flat)


def test_empirical_denoiser_memory_is_bounded_by_chunk():
    data = torch.randn(5000, 4, generator=gen(7))
    x = torch.randn(100, 4, generator=gen(8))
    with LargestTensor() as probe:
        empirical_denoiser(x, 0.5, data, chunk=256)
    assert probe.largest <= max(100 * 256, data.numel())


def test_empirical_denoiser_bad_inputs_inference_compile():
    data = torch.randn(50, 2, generator=gen(9))
    x = torch.randn(4, 2, generator=gen(10))
    with pytest.raises(ValueError, match=r"data: expected shape \[N, 2\]"):
        empirical_denoiser(x, 1.0, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="sigma: expected every noise level > 0"):
        empirical_denoiser(x, 0.0, data)
    with pytest.raises(TypeError, match="chunk: expected an int"):
        empirical_denoiser(x, 1.0, data, chunk=2.5)
    with torch.inference_mode():
        out = empirical_denoiser(x, 0.4, data, 16)
    compiled = torch.compile(empirical_denoiser, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x, 0.4, data, 16), out)


# ---- embedding and network ------------------------------------------------------------------
def test_sinusoidal_embedding_naive():
    t = torch.tensor([0, 1, 17, 999])
    emb = sinusoidal_embedding(t, 8)
    ref = torch.tensor([[math.sin(tt * 10000 ** (-j / 4)) for j in range(4)]
                        + [math.cos(tt * 10000 ** (-j / 4)) for j in range(4)]
                        for tt in t.tolist()])
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-4)
    assert sinusoidal_embedding(t.double(), 8).dtype == F64
    with pytest.raises(ValueError, match="dim: expected an even number"):
        sinusoidal_embedding(t, 7)
    with pytest.raises(ValueError, match=r"t: expected shape \[B\]"):
        sinusoidal_embedding(t[None], 8)


def test_time_mlp_shapes_gradcheck_compile():
    net = TimeMLP(3, hidden=8, depth=3, t_dim=4).double()
    x = torch.randn(5, 3, generator=gen(11), dtype=F64, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4, 5])
    assert net(x, t).shape == (5, 3)
    assert torch.autograd.gradcheck(lambda x: net(x, t), (x,))
    with torch.inference_mode():
        out = net(x.detach(), t)
    torch.testing.assert_close(torch.compile(net, backend="aot_eager")(x.detach(), t), out)
    with pytest.raises(TypeError, match="hidden: expected an int"):
        TimeMLP(2, hidden=8.0)


def test_schedule_from_alpha_matches_linear():
    s = linear_schedule(30)
    r = DiffusionSchedule.from_alpha(s.alpha[1:])
    for a, b in zip((r.alpha, r.beta, r.alpha_bar, r.beta_bar),
                    (s.alpha, s.beta, s.alpha_bar, s.beta_bar)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="alpha: every alpha_t"):
        DiffusionSchedule.from_alpha(torch.tensor([0.5, 1.5]))
