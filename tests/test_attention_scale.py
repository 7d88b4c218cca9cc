"""Tests of the attention-scale functions in companion.attention (notebook: attention-scale-gradient)."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special

from companion.attention import (cosine_mgf, log_cosine_mgf, optimal_scale_cosine,
                                 optimal_scale_gaussian, softmax_jacobian_l1)


def _half_l1_of_jacobian(s, alpha):
    """The naive reference: the full Jacobian by autograd, then half its entrywise L1 norm."""
    jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(alpha * x, -1), s)
    return 0.5 * jac.abs().sum()


# --- softmax_jacobian_l1 ----------------------------------------------------------------------
def test_jacobian_l1_equals_autograd_jacobian():
    g = torch.Generator().manual_seed(0)
    for n, alpha in ((2, 0.7), (17, 2.5), (64, 1.0), (64, 9.0)):
        s = torch.randn(n, generator=g, dtype=torch.float64)
        p = torch.softmax(alpha * s, -1)
        jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(alpha * x, -1), s)
        torch.testing.assert_close(jac, alpha * (torch.diag(p) - torch.outer(p, p)), rtol=0, atol=1e-12)
        torch.testing.assert_close(softmax_jacobian_l1(s, alpha), _half_l1_of_jacobian(s, alpha),
                                   rtol=1e-12, atol=0)


def test_jacobian_l1_batched_and_tensor_alpha():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)
    alpha = torch.rand(3, 4, generator=g, dtype=torch.float64) * 4
    got = softmax_jacobian_l1(s, alpha)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = _half_l1_of_jacobian(s[i, j], alpha[i, j].item())
            torch.testing.assert_close(got[i, j], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(softmax_jacobian_l1(s, 1.5), softmax_jacobian_l1(s, torch.full((3, 4), 1.5,
                                                                                             dtype=torch.float64)))


def test_jacobian_l1_limits():
    s = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)
    assert softmax_jacobian_l1(s, 0.0) == 0                      # alpha = 0: no gradient
    assert softmax_jacobian_l1(s, 1e4) < 1e-100                  # one-hot: no gradient
    equal = torch.zeros(5, dtype=torch.float64)                  # uniform p: alpha (1 - 1/n)
    torch.testing.assert_close(softmax_jacobian_l1(equal, 3.0), torch.tensor(3.0 * 0.8, dtype=torch.float64))


def test_jacobian_l1_gradcheck():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.7, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax_jacobian_l1, (s, alpha))


def test_jacobian_l1_extreme_and_half_precision():
    g = torch.Generator().manual_seed(3)
    s = 1e4 * torch.randn(8, 50, generator=g, dtype=torch.float64)
    got = softmax_jacobian_l1(s, 1.0)
    assert torch.isfinite(got).all()
    # independent reference in log space: 1 - sum p_i^2 = sum_{i != j} p_i p_j
    lp = torch.log_softmax(s, -1)
    pair = lp[:, :, None] + lp[:, None, :]
    off = ~torch.eye(50, dtype=torch.bool)
    ref = torch.logsumexp(pair.masked_fill(~off, float("-inf")).flatten(1), -1).exp()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-300)
    s = torch.randn(8, 50, generator=g)
    want = softmax_jacobian_l1(s.double(), 2.5)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        out = softmax_jacobian_l1(s.to(dtype), 2.5)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.double() - want).abs().max() < tol


def test_jacobian_l1_bad_inputs():
    s = torch.randn(5)
    with pytest.raises(ValueError, match=r"alpha: expected a value in \[0.0, inf\]"):
        softmax_jacobian_l1(s, -1.0)
    with pytest.raises(ValueError, match="alpha: expected alpha >= 0"):
        softmax_jacobian_l1(s[None], torch.tensor([-0.5]))
    with pytest.raises(TypeError, match="s: expected a floating-point tensor"):
        softmax_jacobian_l1(torch.arange(5), 1.0)
    with pytest.raises(ValueError, match="s: expected scores of shape"):
        softmax_jacobian_l1(torch.tensor(1.0), 1.0)


# --- optimal_scale_gaussian -------------------------------------------------------------------
@pytest.mark.parametrize("n", [40, 512, 20000])
def test_gaussian_optimum_is_the_maximiser(n):
    a = optimal_scale_gaussian(n)
    assert math.isclose(math.exp(a * a) * (1 + 2 * a * a), n, rel_tol=1e-10)
    res = optimize.minimize_scalar(lambda x: -x * (1 - math.exp(x * x) / n), bounds=(0, 5),
                                   method="bounded", options={"xatol": 1e-9})
    assert abs(a - res.x) < 1e-5


def test_gaussian_optimum_against_fit():
    for n in (512, 1000, 2048, 5000, 20000):
        fit = 0.84 * math.sqrt(math.log(n))
        assert abs(optimal_scale_gaussian(n) / fit - 1) < 0.05
    scales = [optimal_scale_gaussian(n) for n in (2, 3, 40, 512, 20000)]
    assert scales == sorted(scales) and 2.0 < scales[-2] < scales[-1] < 2.7


def test_gaussian_optimum_bad_inputs():
    with pytest.raises(ValueError, match="n: expected a value in"):
        optimal_scale_gaussian(1)
    with pytest.raises(TypeError, match="n: expected an int"):
        optimal_scale_gaussian(512.0)


# --- cosine_mgf / log_cosine_mgf --------------------------------------------------------------
def _mgf_quad(alpha, d):
    """E[e^{alpha s}] by quadrature of the normalised density, as exp(alpha) times a scaled integral."""
    f = lambda s: math.exp(alpha * (s - 1)) * (1 - s * s) ** ((d - 3) / 2)
    val = integrate.quad(f, -1, 1, epsabs=0, epsrel=1e-13, limit=400)[0]
    return math.log(val) - math.log(special.beta(0.5, (d - 1) / 2)) + alpha


@pytest.mark.parametrize("d", [3, 8, 128])
@pytest.mark.parametrize("alpha", [0.3, 2.0, 10.0, 30.0, 100.0])
def test_cosine_mgf_equals_quadrature(alpha, d):
    assert math.isclose(log_cosine_mgf(alpha, d), _mgf_quad(alpha, d), rel_tol=1e-8, abs_tol=1e-12)
    if alpha <= 30:
        assert math.isclose(cosine_mgf(alpha, d), math.exp(_mgf_quad(alpha, d)), rel_tol=1e-8)


def test_cosine_mgf_monte_carlo():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(100_000, 128, generator=g, dtype=torch.float64), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(100_000, 128, generator=g, dtype=torch.float64), dim=-1)
    s = (u * w).sum(-1)
    for alpha in (1.0, 5.0, 10.0):
        mc = torch.exp(alpha * s).mean().item()
        assert math.isclose(cosine_mgf(alpha, 128), mc, rel_tol=0.02)


def test_cosine_mgf_small_large_and_symmetry():
    assert log_cosine_mgf(0.0, 64) == 0.0 and cosine_mgf(0.0, 64) == 1.0
    for d in (3, 128, 10_002):                                  # log M = alpha^2 / (2 d) + O(alpha^4)
        for a in (1e-6, 1e-3):
            assert math.isclose(log_cosine_mgf(a, d), a * a / (2 * d), rel_tol=1e-5)
    for d in (16, 10_002):                                      # continuous where the method switches
        assert math.isclose(log_cosine_mgf(1.0 - 1e-12, d), log_cosine_mgf(1.0, d), rel_tol=1e-9)
    assert log_cosine_mgf(-7.0, 32) == log_cosine_mgf(7.0, 32)
    big = log_cosine_mgf(1e5, 128)                               # ~ alpha - (d-1)/2 log(alpha) + const
    assert math.isfinite(big) and abs(big - _mgf_quad(1e5, 128)) < 1e-6 * big
    assert cosine_mgf(1e4, 128) == math.inf


def test_cosine_mgf_bad_inputs():
    with pytest.raises(ValueError, match="d: expected a value in"):
        log_cosine_mgf(1.0, 2)
    with pytest.raises(TypeError, match="d: expected an int"):
        cosine_mgf(1.0, 128.0)
    with pytest.raises(ValueError, match="alpha: expected a value in"):
        cosine_mgf(float("nan"), 16)


# --- optimal_scale_cosine ---------------------------------------------------------------------
def test_cosine_optimum_article_values():
    assert 20 <= optimal_scale_cosine(512, 128) <= 28
    assert 30 <= optimal_scale_cosine(20000, 128) <= 38


def test_cosine_optimum_equals_grid_maximiser():
    n, d = 300, 16
    grid = np.linspace(0.01, 40, 40001)
    obj = [a * (1 - math.exp(_mgf_quad(2 * a, d) - 2 * _mgf_quad(a, d)) / n) for a in grid[::40]]
    coarse = grid[::40][int(np.argmax(obj))]
    fine = np.linspace(coarse - 0.05, coarse + 0.05, 201)
    obj = [a * (1 - math.exp(_mgf_quad(2 * a, d) - 2 * _mgf_quad(a, d)) / n) for a in fine]
    assert abs(optimal_scale_cosine(n, d) - fine[int(np.argmax(obj))]) < 1e-3


def test_cosine_optimum_bad_inputs():
    with pytest.raises(ValueError, match="n: expected a value in"):
        optimal_scale_cosine(1, 128)
    with pytest.raises(ValueError, match="d: expected a value in"):
        optimal_scale_cosine(512, 2)


def test_softmax_jacobian_l1_accurate_in_the_tails():
    """One entry dominates: 1 - sum p^2 would cancel to 0 in float32 (true value ~8e-8)."""
    s = torch.tensor([0.0, -1.0, -2.0])
    ref = softmax_jacobian_l1(s.double(), 20.0).item()
    got = softmax_jacobian_l1(s, 20.0).item()
    assert 7e-8 < ref < 9e-8
    assert abs(got - ref) <= 1e-3 * ref, (got, ref)
    z = (20.0 * s.double())
    p = z.softmax(-1)
    jac = 20.0 * (torch.diag(p) - p[:, None] * p[None, :])
    assert abs(0.5 * jac.abs().sum().item() - ref) <= 1e-6 * ref
