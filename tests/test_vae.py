"""Tests of companion.vae: gaussian_kl, the BN posteriors and their KL floor, active_units,
TextVAE, knn_entropy (against known entropies and independent computations), EntropicAE,
eae_loss and gaussianity_report."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.distributions import Normal, kl_divergence

from companion.vae import (BNMeanPosterior, BNPosterior, EntropicAE, TextVAE, active_units,
                           eae_loss, gaussian_kl, gaussianity_report, kl_lower_bound,
                           knn_entropy)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- gaussian_kl ---------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    g = gen()
    mu = 2 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    sigma = 0.1 + 3 * torch.rand(64, 8, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, sigma), ref, atol=1e-6, rtol=0)
    # eps = 0 is exact
    torch.testing.assert_close(gaussian_kl(mu, sigma, eps=0.0), ref, atol=1e-12, rtol=1e-12)


def test_gaussian_kl_negative_sigma_and_batch_dims():
    g = gen(1)
    mu, sigma = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    out = gaussian_kl(mu, sigma)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, gaussian_kl(mu, sigma.abs()))


def test_gaussian_kl_gradcheck_and_extremes():
    g = gen(2)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = (0.5 + torch.rand(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(gaussian_kl, (mu, sigma))
    zero = gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))     # sigma = 0: finite
    assert torch.isfinite(zero).all()
    big = gaussian_kl(torch.full((2, 3), 1e18), torch.ones(2, 3))
    assert torch.isfinite(big).all()


def test_gaussian_kl_bad_input():
    with pytest.raises(ValueError, match="sigma: expected the shape of mu"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="mu: expected a floating-point tensor"):
        gaussian_kl(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_gaussian_kl_inference_mode_and_compile():
    x = torch.randn(5, 4)
    with torch.inference_mode():
        a = gaussian_kl(x, x.exp())
    b = torch.compile(gaussian_kl, backend="eager", dynamic=True)(x, x.exp())
    torch.testing.assert_close(a, b)


# ---- BN posteriors and the KL floor ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["mean", "su"])
def test_kl_floor_against_measured_kl(kind):
    """Measured batch KL in training mode >= kl_lower_bound; tight where the floor is."""
    torch.manual_seed(0)
    head = (BNMeanPosterior(12, 8, gamma=0.7) if kind == "mean"
            else BNPosterior(12, 8, tau=0.3)).double().train()
    if kind == "su":
        with torch.no_grad():
            head.theta.fill_(-30.0)       # gamma_mu^2 -> tau: the floor is tight
    floor = kl_lower_bound(head)
    assert floor == pytest.approx(0.5 * 8 * (0.49 if kind == "mean" else 0.3))
    g = gen(3)
    for _ in range(20):
        h = torch.randn(32, 12, generator=g, dtype=torch.float64) * 5
        with torch.no_grad():
            mu, sigma = head(h)
        kl = gaussian_kl(mu, sigma).mean().item()
        mean_part = 0.5 * mu.pow(2).mean(0).sum().item()
        assert kl >= mean_part >= floor * (1 - 1e-6)
        assert mean_part == pytest.approx(floor, rel=1e-6)


def test_kl_floor_textvae_and_bad_module():
    assert kl_lower_bound(TextVAE(10, 4, 8, 8, 6, "bn_mean", gamma=0.5)) == pytest.approx(0.75)
    assert kl_lower_bound(TextVAE(10, 4, 8, 8, 6, "bn_su", tau=0.5)) == pytest.approx(1.5)
    assert kl_lower_bound(TextVAE(10, 4, 8, 8, 6)) == 0.0
    with pytest.raises(TypeError, match="module: expected"):
        kl_lower_bound(torch.nn.Linear(2, 2))


def test_bn_posterior_moments_and_theta_gradient():
    torch.manual_seed(1)
    head = BNPosterior(6, 5, tau=0.5).double().train()
    with torch.no_grad():
        head.theta.normal_(0, 3)
    h = torch.randn(50, 6, dtype=torch.float64)
    mu, sigma = head(h)
    torch.testing.assert_close(mu.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-7,
                               rtol=0)
    torch.testing.assert_close(mu.pow(2).mean(0) + sigma.pow(2).mean(0),
                               torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    # float64 gradcheck of the batch KL with respect to theta
    theta = head.theta.detach().clone().requires_grad_()

    def kl_of(t):
        g_mu = torch.sqrt(0.5 + 0.5 * torch.sigmoid(t))
        g_s = torch.sqrt(0.5 * torch.sigmoid(-t))
        m = g_mu * head.bn_mu(head.mu(h))
        s = g_s * head.bn_sigma(head.sigma(h))
        return gaussian_kl(m, s).mean()

    assert torch.autograd.gradcheck(kl_of, (theta,))
    head.zero_grad()
    gaussian_kl(*head(h)).mean().backward()
    theta.grad = None
    kl_of(theta).backward()
    torch.testing.assert_close(head.theta.grad, theta.grad)   # module = the formula


def test_bn_posteriors_bad_input():
    with pytest.raises(ValueError, match="gamma: expected a value in"):
        BNMeanPosterior(4, 2, gamma=0.0)
    with pytest.raises(ValueError, match="tau: expected a value in"):
        BNPosterior(4, 2, tau=1.0)
    with pytest.raises(ValueError, match="batch >= 2"):
        BNPosterior(4, 2)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="posterior: expected one of"):
        TextVAE(10, 4, 8, 8, 2, posterior="ln")


# ---- active units, TextVAE ---------------------------------------------------------------------
def test_active_units_against_numpy():
    g = gen(4)
    mu = torch.randn(300, 6, generator=g) * torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01, 0.0])
    ref = int((np.var(mu.numpy().astype(np.float64), axis=0) > 0.01).sum())
    assert ref == 3
    assert active_units(lambda x: x, mu) == ref
    assert active_units(lambda x: x, mu.split(64)) == ref
    assert active_units(lambda x: x, mu, threshold=1e-3) == 4
    with pytest.raises(TypeError, match="mu_fn: expected a callable"):
        active_units(3, mu)


def test_textvae_shapes_loss_and_compile():
    torch.manual_seed(0)
    x = torch.randint(0, 11, (6, 9))
    for kind in ("vanilla", "bn_mean", "bn_su"):
        m = TextVAE(11, 8, 12, 10, 4, kind)
        logits, mu, sigma = m(x, generator=gen())
        assert logits.shape == (6, 9, 11) and mu.shape == sigma.shape == (6, 4)
        loss, recon, kl = m.loss(x, generator=gen())
        assert torch.isclose(loss, recon + kl)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # teacher forcing: logits at t depend on x[:, :t] only
    m = TextVAE(11, 8, 12, 10, 4).eval()
    z = torch.randn(6, 4)
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % 11
    torch.testing.assert_close(m.decode(z, x)[:, :6], m.decode(z, x2)[:, :6])
    with torch.inference_mode():
        m.loss(x)
    compiled = torch.compile(m.decode, backend="eager")
    torch.testing.assert_close(compiled(z, x), m.decode(z, x))
    with pytest.raises(ValueError, match="x: expected a \\[B, T\\] tensor"):
        m.encode(x.float())


# ---- knn_entropy --------------------------------------------------------------------------------
def gaussian_entropy(d):
    return 0.5 * d * math.log(2 * math.pi * math.e)


def sklearn_knn_entropy(z, k):
    """Independent computation: scikit-learn's KD-tree neighbours, scipy's digamma and gamma."""
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    log_vd = 0.5 * d * math.log(math.pi) - special.gammaln(0.5 * d + 1)
    return d * np.log(dist[:, k]).mean() + log_vd + special.digamma(n) - special.digamma(k)


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_entropy_matches_sklearn(d, k):
    z = torch.randn(700, d, generator=gen(d + 10 * k), dtype=torch.float64)
    # eps = 1e-200: the default 1e-12 moves pairs closer than about 1e-6 (see docstring)
    assert knn_entropy(z, k, eps=1e-200).item() == pytest.approx(sklearn_knn_entropy(z, k),
                                                                 abs=1e-6)


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_knn_entropy_gaussian_known_entropy(d):
    """n = 4000: within 5 standard errors (about 0.023 per dimension) plus the measured bias."""
    z = torch.randn(4000, d, generator=gen(d), dtype=torch.float64)
    assert knn_entropy(z).item() == pytest.approx(gaussian_entropy(d), abs=0.12 + 0.02 * d)


@pytest.mark.parametrize("d", [1, 2])
def test_knn_entropy_uniform_known_entropy(d):
    a = 3.0
    z = a * torch.rand(4000, d, generator=gen(20 + d), dtype=torch.float64)
    assert knn_entropy(z).item() == pytest.approx(d * math.log(a), abs=0.12 + 0.02 * d)


def test_knn_entropy_scaling_and_ranking():
    z = torch.randn(500, 3, generator=gen(5), dtype=torch.float64)
    assert knn_entropy(2.5 * z).item() == pytest.approx(knn_entropy(z).item() + 3 * math.log(2.5),
                                                        abs=1e-6)
    g = gen(6)  # at unit variance the Gaussian has the largest entropy
    gauss = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    unif = (torch.rand(4000, 2, generator=g, dtype=torch.float64) - 0.5) * math.sqrt(12)
    lap = torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample((4000, 2)).double()
    h = {n: knn_entropy(v, 3).item() for n, v in (("g", gauss), ("u", unif), ("l", lap))}
    assert h["g"] > h["u"] + 0.05 and h["g"] > h["l"] + 0.05


def test_knn_entropy_gradcheck_duplicates_and_extremes():
    z = torch.randn(12, 3, generator=gen(7), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: knn_entropy(t, 2), (z,))
    dup = torch.randn(16, 4, generator=gen(8))
    dup[1] = dup[0]
    dup.requires_grad_()
    knn_entropy(dup).backward()
    assert torch.isfinite(dup.grad).all()
    far = torch.randn(64, 2, generator=gen(9)) * 1e6 + 1e7   # large offset: centred first
    ref = knn_entropy((far.double() - far.double().mean(0)))
    assert knn_entropy(far).item() == pytest.approx(ref.item(), abs=1e-3)


def test_knn_entropy_bad_input_inference_compile():
    with pytest.raises(ValueError, match="k: expected 1 <= k < n"):
        knn_entropy(torch.randn(5, 2), k=5)
    with pytest.raises(ValueError, match="z: expected a 2-D tensor"):
        knn_entropy(torch.randn(5))
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        knn_entropy(torch.zeros(5, 2, dtype=torch.long))
    z = torch.randn(40, 3, generator=gen(10))
    with torch.inference_mode():
        a = knn_entropy(z, 2)
    fn = torch.compile(knn_entropy, backend="eager", dynamic=True)
    torch.testing.assert_close(fn(z, 2), a)
    fn(torch.randn(50, 3), 2)


def test_digamma_constant_matches_scipy():
    from companion.vae import _digamma_int

    for n in (1, 2, 10, 64, 65, 100, 1797, 10**6):
        assert _digamma_int(n) == pytest.approx(special.digamma(n), abs=1e-12)


# ---- EntropicAE, eae_loss, gaussianity_report ------------------------------------------------------
def make_eae(d=3):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, d))
    dec = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    return EntropicAE(enc, dec, d)


def test_eae_bn_code_loss_and_sample():
    m = make_eae()
    x = torch.randn(64, 8, generator=gen(11))
    x_hat, z = m(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    loss, recon, ent = eae_loss(m, x, lam=0.3, k=2)
    torch.testing.assert_close(recon, ((x_hat - x) ** 2).sum(1).mean())
    torch.testing.assert_close(ent, knn_entropy(z, 2))
    torch.testing.assert_close(loss, recon - 0.3 * ent)
    loss.backward()
    s = m.sample(10, generator=gen(12))
    assert s.shape == (10, 8) and m.decoder.training
    with pytest.raises(ValueError, match="lam: expected a value in"):
        eae_loss(m, x, lam=-1.0)
    with pytest.raises(ValueError, match="encoder: expected an output"):
        EntropicAE(torch.nn.Linear(8, 4), torch.nn.Linear(3, 8), 3)(x)


def test_gaussianity_report_against_scipy_and_monte_carlo():
    z = torch.randn(500, 3, generator=gen(13), dtype=torch.float64) * 1.3 + 0.2
    rep = gaussianity_report(z)
    ks = [stats.kstest(z[:, j].numpy(), "norm").statistic for j in range(3)]
    assert rep["ks_mean"] == pytest.approx(np.mean(ks), abs=1e-10)
    assert rep["ks_max"] == pytest.approx(np.max(ks), abs=1e-10)
    assert rep["entropy_max"] == pytest.approx(gaussian_entropy(3))
    # MMD: the closed-form N(0, I) expectations against a large reference sample
    from sklearn.metrics.pairwise import rbf_kernel

    y = torch.randn(6000, 3, generator=gen(14), dtype=torch.float64).numpy()
    gamma = 1 / (2 * 3)
    kxx = rbf_kernel(z.numpy(), gamma=gamma)
    kxx = (kxx.sum() - np.trace(kxx)) / (500 * 499)
    kxy = rbf_kernel(z.numpy(), y, gamma=gamma).mean()
    kyy = rbf_kernel(y[:2000], gamma=gamma)
    kyy = (kyy.sum() - np.trace(kyy)) / (2000 * 1999)
    assert rep["mmd2"] == pytest.approx(kxx + kyy - 2 * kxy, abs=6e-3)
    assert rep["mmd2"] > 0.02
    near = gaussianity_report(torch.randn(500, 3, generator=gen(15)))
    assert abs(near["mmd2"]) < 0.01 and near["ks_max"] < 0.08
    with pytest.raises(ValueError, match="z: expected a 2-D tensor"):
        gaussianity_report(torch.randn(5))
