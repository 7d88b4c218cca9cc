"""Tests of companion.gan's designing-gans section: mode_coverage, the dual designs, their
pointwise optimum and d(r), the two losses and the density ratio read from a critic."""
import math

import numpy as np
import pytest
import torch

from companion.data import gaussian_ring
from companion.gan import mode_coverage


# ---------------------------------------------------------------------------------------------
# mode_coverage
# ---------------------------------------------------------------------------------------------
def naive_mode_coverage(samples, centers, std, num_std=3.0, min_share=0.01):
    """Loop over samples, plain Python floats."""
    counts, good = [0] * len(centers), 0
    for s in samples.tolist():
        d = [math.dist(s, c) for c in centers.tolist()]
        j = min(range(len(d)), key=d.__getitem__)
        if d[j] <= num_std * std:
            good += 1
            counts[j] += 1
    return sum(c >= min_share * len(samples) for c in counts), good / len(samples)


def test_mode_coverage_matches_loop():
    g = torch.Generator().manual_seed(0)
    x, centers = gaussian_ring(300, generator=g)
    # a generator's typical output: most of the ring, a few modes missing, some blur
    fake = torch.cat([x[:200] * 1.02, 0.5 * torch.randn(100, 2, generator=g)])
    fake = fake[(fake[:, 1] > -1.0) | (fake[:, 0] > 0)]
    for std in (0.02, 0.05, 0.2):
        for min_share in (0.0, 0.01, 0.1):
            got = mode_coverage(fake, centers, std, min_share=min_share)
            want = naive_mode_coverage(fake, centers, std, min_share=min_share)
            assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-12)


def test_mode_coverage_true_ring_and_collapse():
    g = torch.Generator().manual_seed(1)
    x, centers = gaussian_ring(4000, std=0.05, generator=g)
    num, hq = mode_coverage(x, centers, 0.05)
    assert num == 8
    assert hq == pytest.approx(1 - math.exp(-4.5), abs=0.01)  # chi distribution, 2 dof
    collapsed = centers[2] + 0.05 * torch.randn(500, 2, generator=g)
    assert mode_coverage(collapsed, centers, 0.05)[0] == 1
    # a stray sample or two below the 1% share does not cover a mode
    two = torch.cat([collapsed, centers[5:6].expand(4, 2)])
    assert mode_coverage(two, centers, 0.05)[0] == 1
    assert mode_coverage(two, centers, 0.05, min_share=0.005)[0] == 2


def test_mode_coverage_dtypes_and_modes():
    g = torch.Generator().manual_seed(2)
    x, centers = gaussian_ring(1000, num_modes=5, generator=g)
    ref = mode_coverage(x, centers, 0.05)
    assert mode_coverage(x.double(), centers, 0.05) == ref
    assert mode_coverage(x.half(), centers.half(), 0.05)[0] == ref[0]
    with torch.inference_mode():
        assert mode_coverage(x, centers, 0.05) == ref
    x.requires_grad_(True)
    assert mode_coverage(x, centers, 0.05) == ref
    assert isinstance(ref[0], int) and isinstance(ref[1], float)


def test_mode_coverage_bad_input():
    x, centers = gaussian_ring(10)
    with pytest.raises(ValueError, match="samples: expected shape"):
        mode_coverage(x[0], centers, 0.05)
    with pytest.raises(ValueError, match=r"centers: expected shape \[K, 2\]"):
        mode_coverage(x, centers[:, :1], 0.05)
    with pytest.raises(ValueError, match="std: expected a value in"):
        mode_coverage(x, centers, 0.0)
    with pytest.raises(ValueError, match="min_share"):
        mode_coverage(x, centers, 0.05, min_share=2.0)
    with pytest.raises(TypeError, match="samples: expected a floating-point tensor"):
        mode_coverage(x.long(), centers, 0.05)


# ---------------------------------------------------------------------------------------------
# dual designs
# ---------------------------------------------------------------------------------------------
from scipy.integrate import quad  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402

from companion.gan import (  # noqa: E402
    DualDesign, d_of_r, density_ratio_from_critic, design_from_omega_rho, designs,
    discriminator_loss, generator_loss, pointwise_optimum,
)

SMOOTH = ["vanilla", "vanilla_prob", "exp_half_log", "lsgan"]
R = np.logspace(-2, 2, 41)


def _scalar(f, t):
    return float(f(torch.tensor(t, dtype=torch.float64)))


def test_registry_names():
    assert set(designs) == {"total_variation", "vanilla", "vanilla_prob", "exp_half_log", "lsgan"}
    for name, d in designs.items():
        assert isinstance(d, DualDesign) and d.name == name


@pytest.mark.parametrize("name", list(designs))
def test_pointwise_optimum_matches_scipy(name):
    """argmax and max of phi + r psi over the domain by a bounded scalar search."""
    d = designs[name]
    t_star, dr = pointwise_optimum(d, R)
    lo, hi = d.domain
    lo, hi = max(lo, -30.0), min(hi, 30.0)
    for r, ts, dv in zip(R, t_star, dr):
        res = minimize_scalar(lambda t: -(_scalar(d.phi, t) + r * _scalar(d.psi, t)),
                              bounds=(lo + 1e-12, hi - 1e-12), method="bounded",
                              options={"xatol": 1e-10})
        assert -res.fun == pytest.approx(dv, abs=1e-7, rel=1e-7)
        if abs(r - 1) > 1e-9:
            assert res.x == pytest.approx(ts, abs=1e-4)


@pytest.mark.parametrize("name", list(designs))
def test_d_prime_is_psi_of_omega_and_min_at_one(name):
    d = designs[name]
    r = torch.tensor(R, dtype=torch.float64)
    h = 1e-6 * r
    fd = (d_of_r(d, r + h) - d_of_r(d, r - h)) / (2 * h)
    mask = (r - 1).abs() > 1e-3  # total variation has a kink at r = 1
    torch.testing.assert_close(fd[mask], d.psi(d.omega(r))[mask], atol=1e-5, rtol=1e-6)
    grid = np.linspace(0.2, 5, 48001)
    assert abs(grid[np.argmin(d_of_r(d, grid))] - 1.0) < 1e-3


def test_closed_forms_of_d():
    r = np.logspace(-3, 3, 61)
    s = np.sqrt(r)
    np.testing.assert_allclose(d_of_r(designs["total_variation"], r), np.abs(r - 1), atol=1e-12)
    np.testing.assert_allclose(d_of_r(designs["exp_half_log"], r), (s - 1) ** 2 - 1, atol=1e-9)
    np.testing.assert_allclose(d_of_r(designs["lsgan"], r), r * (r - 3) / (r + 1), atol=1e-9)
    np.testing.assert_allclose(d_of_r(designs["vanilla"], r, beta=lambda t: t), r * np.log(r),
                               atol=1e-9)
    sp = torch.nn.functional.softplus
    np.testing.assert_allclose(d_of_r(designs["vanilla"], r, alpha=sp, beta=sp),
                               (1 + r) * np.log1p(r), atol=1e-9)
    # r = 0: the limit, no 0 * inf
    assert d_of_r(designs["vanilla"], np.array([0.0]))[0] == pytest.approx(0.0, abs=1e-15)


def test_vanilla_f_divergence_is_2js_minus_log2():
    from scipy.stats import norm
    p, q = norm(0, 1), norm(1, 1.5)
    d = designs["vanilla"]

    def integrand(x):
        return p.pdf(x) * float(d_of_r(d, np.array([q.pdf(x) / p.pdf(x)]))[0])

    lhs = quad(integrand, -12, 14, limit=200)[0]
    m = lambda x: 0.5 * (p.pdf(x) + q.pdf(x))  # noqa: E731
    js = 0.5 * quad(lambda x: p.pdf(x) * np.log(p.pdf(x) / m(x)), -12, 14, limit=200)[0] \
        + 0.5 * quad(lambda x: q.pdf(x) * np.log(q.pdf(x) / m(x)), -12, 14, limit=200)[0]
    assert lhs == pytest.approx(2 * js - math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", SMOOTH)
def test_design_from_omega_rho_matches_closed_forms(name):
    ref = designs[name]
    num = design_from_omega_rho(ref.omega, ref.omega_inv, ref.rho, ref.domain)
    r = torch.logspace(-4, 4, 301, dtype=torch.float64)
    t = ref.omega(r)
    t1 = ref.omega(torch.ones((), dtype=torch.float64))
    # psi is pinned by psi(omega(1)) = 0 in both; phi only up to a constant
    torch.testing.assert_close(num.psi(t), ref.psi(t), atol=1e-6, rtol=0)
    torch.testing.assert_close(num.phi(t) - num.phi(t1), ref.phi(t) - ref.phi(t1),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(pointwise_optimum(num, r)[1] - pointwise_optimum(ref, r)[1],
                               torch.full_like(r, float(num.phi(t1) - ref.phi(t1))),
                               atol=1e-6, rtol=0)


def test_design_from_omega_rho_by_quad_and_grad():
    """A design with no closed form in the registry: omega = r^(1/3), rho = 1 + t^2."""
    num = design_from_omega_rho(lambda r: r ** (1 / 3), lambda t: t ** 3,
                                lambda t: 1 + t ** 2, (0.0, math.inf))
    for tv in (0.2, 0.7, 1.0, 3.0, 20.0):
        psi_q = quad(lambda s: 1 + s * s, 1.0, tv)[0]
        phi_q = -quad(lambda s: s ** 3 * (1 + s * s), 1.0, tv)[0]
        assert _scalar(num.psi, tv) == pytest.approx(psi_q, abs=1e-6)
        assert _scalar(num.phi, tv) == pytest.approx(phi_q, abs=1e-6, rel=1e-9)
    t = torch.tensor([0.3, 1.1, 4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(num.phi, (t,))
    assert torch.autograd.gradcheck(num.psi, (t,))
    g, = torch.autograd.grad(num.psi(t).sum(), t)
    torch.testing.assert_close(g, 1 + t.detach() ** 2, atol=1e-6, rtol=0)


def test_design_from_omega_rho_bad_input():
    ok = dict(omega=torch.log, omega_inv=torch.exp, rho=lambda t: torch.sigmoid(-t),
              domain=(-math.inf, math.inf))
    with pytest.raises(ValueError, match="rho: expected rho"):
        design_from_omega_rho(**{**ok, "rho": lambda t: -torch.sigmoid(-t)})
    with pytest.raises(ValueError, match="omega: expected a strictly increasing"):
        design_from_omega_rho(**{**ok, "omega": lambda r: -torch.log(r),
                                 "omega_inv": lambda t: torch.exp(-t)})
    with pytest.raises(ValueError, match="omega_inv: expected the inverse"):
        design_from_omega_rho(**{**ok, "omega_inv": lambda t: torch.exp(2 * t)})
    with pytest.raises(ValueError, match="domain: omega"):
        design_from_omega_rho(**{**ok, "domain": (0.0, 1.0)})
    with pytest.raises(ValueError, match="domain: expected"):
        design_from_omega_rho(**{**ok, "domain": (1.0, 0.0)})
    with pytest.raises(TypeError, match="rho: expected a callable"):
        design_from_omega_rho(**{**ok, "rho": 1.0})


# ---- the losses ---------------------------------------------------------------------------
def _critic_outputs(name, n=64, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, n, generator=g, dtype=dtype)
    if name == "vanilla_prob":
        u = torch.sigmoid(u)
    elif name in ("lsgan", "total_variation"):
        u = 0.9 * torch.tanh(u)
    return u[0], u[1]


def test_losses_match_torch_library():
    t_real, t_fake = _critic_outputs("vanilla")
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ref = bce(t_real, torch.zeros_like(t_real)) + bce(t_fake, torch.ones_like(t_fake))
    torch.testing.assert_close(discriminator_loss(designs["vanilla"], t_real, t_fake),
                               ref - math.log(2))
    # the probability form is the same loss on sigmoid outputs
    torch.testing.assert_close(
        discriminator_loss(designs["vanilla_prob"], torch.sigmoid(t_real), torch.sigmoid(t_fake)),
        ref - math.log(2))
    # non-saturating generator: BCE of fakes against the real label 0
    torch.testing.assert_close(
        generator_loss(designs["vanilla"], t_fake, beta=torch.nn.functional.softplus),
        bce(t_fake, torch.zeros_like(t_fake)))
    # LSGAN with a = -1, b = 1: mse to the labels (minus psi's constant 1)
    mse = torch.nn.functional.mse_loss
    torch.testing.assert_close(
        discriminator_loss(designs["lsgan"], t_real, t_fake),
        mse(t_real, -torch.ones_like(t_real)) + mse(t_fake, torch.ones_like(t_fake)) - 1)
    torch.testing.assert_close(generator_loss(designs["lsgan"], t_fake, beta=torch.square),
                               mse(t_fake, torch.zeros_like(t_fake)))


@pytest.mark.parametrize("name", list(designs))
def test_losses_naive_and_gradcheck(name):
    d = designs[name]
    t_real, t_fake = _critic_outputs(name, n=8)
    naive = -(sum(_scalar(d.phi, v) for v in t_real.tolist()) / 8
              + sum(_scalar(d.psi, v) for v in t_fake.tolist()) / 8)
    assert float(discriminator_loss(d, t_real, t_fake)) == pytest.approx(naive, abs=1e-12)
    assert float(generator_loss(d, t_fake)) == pytest.approx(
        sum(_scalar(d.psi, v) for v in t_fake.tolist()) / 8, abs=1e-12)
    a, b = t_real.clone().requires_grad_(True), t_fake.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: discriminator_loss(d, x, y), (a, b))
    assert torch.autograd.gradcheck(lambda y: generator_loss(d, y), (b,))


def test_losses_extreme_inputs():
    big = torch.tensor([-1e4, -80.0, 0.0, 80.0, 1e4], requires_grad=True)
    for beta in (None, torch.nn.functional.softplus, lambda t: t):
        loss = discriminator_loss(designs["vanilla"], big, big) + generator_loss(
            designs["vanilla"], big, beta=beta)
        g, = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    tiny = torch.tensor([1e-30, 0.5, 1 - 1e-7], requires_grad=True)
    loss = discriminator_loss(designs["vanilla_prob"], tiny, tiny)
    assert torch.isfinite(loss)
    # exp_half_log: finite for |t| <= 80 in float32 (its phi = -exp(t) overflows beyond ~88)
    t80 = torch.tensor([-80.0, 80.0], requires_grad=True)
    loss = discriminator_loss(designs["exp_half_log"], t80, t80)
    g, = torch.autograd.grad(loss, t80)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # pointwise optimum at extreme ratios
    t_star, dv = pointwise_optimum(designs["vanilla"], np.array([0.0, 1e-300, 1e300]))
    assert np.isfinite(dv).all() and t_star[0] == -np.inf


@pytest.mark.parametrize("name", list(designs))
def test_density_ratio_from_critic(name):
    d = designs[name]
    r = torch.logspace(-3, 3, 25, dtype=torch.float64)
    got = density_ratio_from_critic(d, d.omega(r))
    if name == "total_variation":  # every interior critic value reads r = 1
        assert (density_ratio_from_critic(d, torch.tensor([-0.5, 0.0, 0.5])) == 1).all()
    else:
        torch.testing.assert_close(got, r, rtol=1e-9, atol=0)
        assert torch.autograd.gradcheck(lambda t: density_ratio_from_critic(d, t),
                                        (d.omega(r[8:12]).clone().requires_grad_(True),))


def test_inference_mode_and_compile():
    d = designs["vanilla"]
    t_real, t_fake = _critic_outputs("vanilla", dtype=torch.float32)
    ref_d = discriminator_loss(d, t_real, t_fake)
    ref_g = generator_loss(d, t_fake, beta=torch.nn.functional.softplus)
    with torch.inference_mode():
        torch.testing.assert_close(discriminator_loss(d, t_real, t_fake), ref_d)
        torch.testing.assert_close(density_ratio_from_critic(d, t_fake), t_fake.exp())

    def step(a, b):
        return (discriminator_loss(d, a, b)
                + generator_loss(d, b, beta=torch.nn.functional.softplus))

    compiled = torch.compile(step, backend="aot_eager", dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(t_real, t_fake), ref_d + ref_g)
    torch.testing.assert_close(compiled(t_real[:10], t_fake[:7]),
                               step(t_real[:10], t_fake[:7]))
    ls = designs["lsgan"]
    compiled_ls = torch.compile(lambda a, b: discriminator_loss(ls, a, b), backend="aot_eager")
    torch.testing.assert_close(compiled_ls(t_real, t_fake), discriminator_loss(ls, t_real, t_fake))


def test_bad_inputs():
    d = designs["vanilla"]
    t = torch.zeros(4)
    with pytest.raises(TypeError, match="design: expected a DualDesign"):
        discriminator_loss("vanilla", t, t)
    with pytest.raises(TypeError, match="t_fake: expected a floating-point tensor"):
        discriminator_loss(d, t, t.long())
    with pytest.raises(TypeError, match="t_real: expected a torch.Tensor"):
        discriminator_loss(d, [0.0], t)
    with pytest.raises(TypeError, match="beta: expected a callable"):
        generator_loss(d, t, beta=2.0)
    with pytest.raises(ValueError, match="r: expected density ratios"):
        pointwise_optimum(d, np.array([1.0, -0.5]))
    with pytest.raises(TypeError, match="r: expected a tensor or an array"):
        d_of_r(d, "abc")
    with pytest.raises(ValueError, match="t: expected critic outputs in the domain"):
        density_ratio_from_critic(designs["vanilla_prob"], torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t: expected critic outputs in the domain"):
        density_ratio_from_critic(designs["lsgan"], torch.tensor([float("nan")]))
