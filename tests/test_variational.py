"""Tests of companion.variational (section extremum-variation): the discretised functional, the
first variation, the Euler-Lagrange residual and the direct minimiser, each against a naive loop,
a closed form or a library (scipy's quad, torch.func.hessian with torch.linalg.solve)."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from companion.variational import (discretize_functional, euler_lagrange_residual,
                                   first_variation, minimize_path)

F64 = torch.float64
L_cat = lambda x, y, p: y * torch.sqrt(1 + p**2)            # surface of revolution / 2 pi
L_arc = lambda x, y, p: torch.sqrt(1 + p**2)
L_mixed = lambda x, y, p: torch.exp(0.3 * x) * (0.5 * p**2 + torch.sin(y)) + x * y * p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def naive_S(L, x, y, rule="midpoint"):
    """The discretised functional by a Python loop over segments (floats, math module)."""
    total = 0.0
    for k in range(len(x) - 1):
        h = x[k + 1] - x[k]
        s = (y[k + 1] - y[k]) / h
        if rule == "midpoint":
            total += h * L((x[k] + x[k + 1]) / 2, (y[k] + y[k + 1]) / 2, s)
        else:
            total += h * (L(x[k], y[k], s) + L(x[k + 1], y[k + 1], s)) / 2
    return total


# ---- discretize_functional -------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["midpoint", "trapezoid"])
def test_discretize_matches_loop_on_uneven_grid(rule):
    g = gen(1)
    x = torch.sort(torch.rand(12, generator=g, dtype=F64)).values * 3 - 1
    y = 1.5 + torch.rand(12, generator=g, dtype=F64)
    ours = discretize_functional(L_cat, x, y[1:-1], (y[0].item(), y[-1].item()), rule=rule)
    ref = naive_S(lambda a, b, p: b * math.sqrt(1 + p * p), x.tolist(), y.tolist(), rule)
    assert abs(ours.item() - ref) < 1e-12 * abs(ref)


def test_discretize_batched_and_tensor_ends():
    g = gen(2)
    x = torch.linspace(0, 1, 9, dtype=F64)
    y_int = torch.randn(4, 3, 7, generator=g, dtype=F64)
    ya, yb = torch.randn(4, 3, generator=g, dtype=F64), 0.5
    out = discretize_functional(L_mixed, x, y_int, (ya, yb))
    assert out.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            one = discretize_functional(L_mixed, x, y_int[i, j], (ya[i, j].item(), yb))
            torch.testing.assert_close(out[i, j], one, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("rule", ["midpoint", "trapezoid"])
def test_discretize_second_order_against_quad(rule):
    """S_h - S = O(h^2): the error falls by 4 per halving (a smooth, non-extremal path)."""
    y_fn = lambda t: 2 + 0.5 * np.sin(2 * t)
    S = quad(lambda t: y_fn(t) * math.sqrt(1 + math.cos(2 * t)**2), -1, 1, epsabs=1e-13)[0]
    errs = []
    for n in (32, 64, 128):
        x = torch.linspace(-1, 1, n + 1, dtype=F64)
        y = torch.as_tensor(y_fn(x.numpy()))
        errs.append(abs(discretize_functional(L_cat, x, y[1:-1], (y[0].item(), y[-1].item()),
                                              rule=rule).item() - S))
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    assert all(3.8 < r < 4.2 for r in ratios), ratios


def test_discretize_gradient_is_discrete_euler_lagrange():
    """dS_h/dy_k / h -> R(x_k) at O(h^2) (eq. ev-del), on the catenary functional."""
    errs = []
    for n in (50, 100):
        x = torch.linspace(-1, 1, n + 1, dtype=F64)
        y = 1 + x**2
        y_int = y[1:-1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(discretize_functional(L_cat, x, y_int, (2.0, 2.0)), y_int)
        p, xi = 2 * x[1:-1], x[1:-1]
        R = (1 + p**2 - (1 + xi**2) * 2) / (1 + p**2)**1.5
        errs.append((grad * n / 2 - R).abs().max().item())
    assert 3.7 < errs[0] / errs[1] < 4.3


def test_discretize_gradcheck():
    g = gen(3)
    x = torch.sort(torch.rand(8, generator=g, dtype=F64)).values
    y_int = torch.randn(2, 6, generator=g, dtype=F64, requires_grad=True)
    for rule in ("midpoint", "trapezoid"):
        assert torch.autograd.gradcheck(
            lambda v: discretize_functional(L_mixed, x, v, (0.2, -0.4), rule=rule), (y_int,))
        assert torch.autograd.gradgradcheck(
            lambda v: discretize_functional(L_mixed, x, v, (0.2, -0.4), rule=rule), (y_int,))


def test_discretize_singular_end_midpoint_finite():
    """The brachistochrone integrand is infinite at y = 0; the midpoint rule never evaluates
    it there, and steep or huge values stay finite."""
    L_b = lambda x, y, p: torch.sqrt((1 + p**2) / (2 * 9.81 * y))
    x = torch.linspace(0, 1, 201, dtype=F64)
    y_int = 1e-300 + x[1:-1] ** 0.5
    assert torch.isfinite(discretize_functional(L_b, x, y_int, (0.0, 1.0)))
    assert torch.isfinite(discretize_functional(L_b, x, 1e150 * (1 + x[1:-1]), (0.0, 1e150)))
    assert torch.isinf(discretize_functional(L_b, x, y_int, (0.0, 1.0), rule="trapezoid"))


def test_discretize_float32_and_modes():
    x = torch.linspace(0, 1, 17)
    y_int = torch.linspace(0, 1, 17)[1:-1] ** 2
    ref = discretize_functional(L_cat, x.double(), y_int.double(), (0.0, 1.0))
    out = discretize_functional(L_cat, x, y_int, (0.0, 1.0))
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(discretize_functional(L_cat, x, y_int, (0.0, 1.0)), out)
    with torch.inference_mode():
        torch.testing.assert_close(discretize_functional(L_cat, x, y_int, (0.0, 1.0)), out)


def test_discretize_compiles():
    f = torch.compile(lambda x, v: discretize_functional(L_cat, x, v, (1.0, 2.0)),
                      backend="eager", dynamic=True)
    for n in (9, 17):
        x = torch.linspace(0, 1, n, dtype=F64)
        v = (1 + x[1:-1]).requires_grad_(True)
        out = f(x, v)
        torch.testing.assert_close(out, discretize_functional(L_cat, x, v, (1.0, 2.0)))
        (grad,) = torch.autograd.grad(out, v)
        assert torch.isfinite(grad).all()


def test_discretize_bad_input():
    x = torch.linspace(0, 1, 5, dtype=F64)
    v = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="x: expected a strictly increasing grid"):
        discretize_functional(L_cat, x.flip(0), v, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"x: expected a 1-D grid"):
        discretize_functional(L_cat, x[:2], v, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"y_interior: expected shape \[\.\.\., N-1\] = "):
        discretize_functional(L_cat, x, torch.zeros(4, dtype=F64), (0.0, 1.0))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        discretize_functional(L_cat, torch.arange(5), v, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"y_ends: expected a pair"):
        discretize_functional(L_cat, x, v, (0.0,))
    with pytest.raises(TypeError, match=r"y_ends\[1\]: expected a number or a tensor"):
        discretize_functional(L_cat, x, v, (0.0, "1"))
    with pytest.raises(ValueError, match=r"rule: expected one of 'midpoint' \| 'trapezoid'"):
        discretize_functional(L_cat, x, v, (0.0, 1.0), rule="simpson")
    with pytest.raises(TypeError, match="L: expected a callable"):
        discretize_functional(None, x, v, (0.0, 1.0))
    with pytest.raises(ValueError, match="L: expected L\\(x, y, p\\) to act entry by entry"):
        discretize_functional(lambda a, b, p: (b * p)[..., :2], x, v,
                              (0.0, 1.0))


# ---- first_variation -------------------------------------------------------------------------
def test_first_variation_matches_quad_integral():
    """delta S on the grid vs int (L_y - d/dx L_y') eta dx from quad (eq. ev-ibp)."""
    n = 2000
    x = torch.linspace(-1, 1, n + 1, dtype=F64)
    y = 2 + 0.5 * torch.sin(2 * x)
    eta_fn = lambda t: (1 - t**2) * np.exp(t)
    S = lambda v: discretize_functional(L_cat, x, v, (y[0].item(), y[-1].item()))
    dS = first_variation(S, y[1:-1], torch.as_tensor(eta_fn(x[1:-1].numpy()))).item()
    R = lambda t: (1 + np.cos(2 * t)**2 + 2 * np.sin(2 * t) * (2 + 0.5 * np.sin(2 * t))) \
        / (1 + np.cos(2 * t)**2)**1.5
    ref = quad(lambda t: R(t) * eta_fn(t), -1, 1, epsabs=1e-13)[0]
    assert abs(dS - ref) < 1e-5 * abs(ref)


def test_first_variation_matches_finite_difference_and_backward():
    g = gen(4)
    x = torch.linspace(0, 2, 21, dtype=F64)
    y = torch.randn(3, 19, generator=g, dtype=F64)
    eta = torch.randn(3, 19, generator=g, dtype=F64)
    S = lambda v: discretize_functional(L_mixed, x, v, (0.0, 1.0))
    dS = first_variation(S, y, eta)
    eps = 1e-6
    fd = (S(y + eps * eta) - S(y - eps * eta)) / (2 * eps)
    torch.testing.assert_close(dS, fd, rtol=1e-7, atol=1e-8)
    yg = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(S(yg).sum(), yg)
    torch.testing.assert_close(dS, (grad * eta).sum(-1), rtol=1e-12, atol=1e-12)


def test_first_variation_gradcheck_and_modes():
    g = gen(5)
    x = torch.linspace(0, 1, 9, dtype=F64)
    y = torch.randn(7, generator=g, dtype=F64, requires_grad=True)
    eta = torch.randn(7, generator=g, dtype=F64)
    S = lambda v: discretize_functional(L_mixed, x, v, (0.0, 1.0))
    assert torch.autograd.gradcheck(lambda v: first_variation(S, v, eta), (y,))
    ref = first_variation(S, y.detach(), eta)
    with torch.no_grad():
        torch.testing.assert_close(first_variation(S, y.detach(), eta), ref)
    with torch.inference_mode():
        torch.testing.assert_close(first_variation(S, y.detach(), eta), ref)


def test_first_variation_bad_input():
    y = torch.zeros(3, dtype=F64)
    with pytest.raises(TypeError, match="S: expected a callable"):
        first_variation(1.0, y, y)
    with pytest.raises(ValueError, match=r"eta: expected the shape of y \(3,\)"):
        first_variation(lambda v: v.sum(), y, torch.zeros(4, dtype=F64))
    with pytest.raises(TypeError, match="eta: expected a floating-point tensor"):
        first_variation(lambda v: v.sum(), y, torch.zeros(3, dtype=torch.long))


# ---- euler_lagrange_residual -----------------------------------------------------------------
def naive_residual(x, y):
    """R for the catenary Lagrangian by the hand-derived eq. ev-catenary, with y', y'' from
    numpy.gradient on the same grid (uniform): (1 + y'^2 - y y'') / (1 + y'^2)^1.5."""
    h = x[1] - x[0]
    p = (y[2:] - y[:-2]) / (2 * h)
    ypp = (y[2:] - 2 * y[1:-1] + y[:-2]) / h**2
    return (1 + p**2 - y[1:-1] * ypp) / (1 + p**2)**1.5


def test_residual_matches_hand_formula_and_is_second_order():
    errs = []
    for n in (100, 200):
        x = torch.linspace(-1, 1, n + 1, dtype=F64)
        y = 2 + 0.5 * torch.sin(2 * x)
        R = euler_lagrange_residual(L_cat, x, y)
        torch.testing.assert_close(R, naive_residual(x, y), rtol=1e-12, atol=1e-12)
        xi = x[1:-1]
        p, ypp, yi = torch.cos(2 * xi), -2 * torch.sin(2 * xi), 2 + 0.5 * torch.sin(2 * xi)
        exact = (1 + p**2 - yi * ypp) / (1 + p**2)**1.5
        errs.append((R - exact).abs().max().item())
    assert 3.7 < errs[0] / errs[1] < 4.3


def test_residual_zero_on_extremals():
    t = torch.linspace(0, 3, 3001, dtype=F64)
    L_osc = lambda t, y, v: 0.5 * v**2 - 0.5 * y**2
    L_fall = lambda t, y, v: 0.5 * v**2 - 9.81 * y
    assert euler_lagrange_residual(L_osc, t, torch.cos(t) + 2 * torch.sin(t)).abs().max() < 1e-6
    assert euler_lagrange_residual(L_fall, t, 4.905 * t * (3 - t)).abs().max() < 1e-7  # rounding
    x = torch.linspace(-1, 1, 1001, dtype=F64)
    assert euler_lagrange_residual(L_cat, x, 2 * torch.cosh(x / 2)).abs().max() < 1e-6
    # an explicit x dependence (L_{y'x} term): L = e^x (y'^2/2 + y^2/2) has extremals
    # y'' + y' - y = 0, solved by exp(r x) with r = (-1 + sqrt 5) / 2
    L_x = lambda x, y, p: torch.exp(x) * (0.5 * p**2 + 0.5 * y**2)
    r = (-1 + math.sqrt(5)) / 2
    assert euler_lagrange_residual(L_x, x, torch.exp(r * x)).abs().max() < 1e-5
    assert euler_lagrange_residual(L_x, x, torch.exp(0.5 * x)).abs().max() > 0.1


def test_residual_uneven_grid_batched_gradcheck_and_modes():
    g = gen(6)
    x = torch.sort(torch.rand(10, generator=g, dtype=F64)).values
    y = torch.randn(2, 10, generator=g, dtype=F64, requires_grad=True)
    R = euler_lagrange_residual(L_mixed, x, y)
    assert R.shape == (2, 8)
    torch.testing.assert_close(R[1], euler_lagrange_residual(L_mixed, x, y[1]))
    assert torch.autograd.gradcheck(lambda v: euler_lagrange_residual(L_mixed, x, v), (y,))
    with torch.inference_mode():
        torch.testing.assert_close(euler_lagrange_residual(L_mixed, x, y.detach()), R.detach())
    # on an uneven grid a quadratic path still gives the exact residual of a quadratic path
    yq = 1 + x**2
    p, ypp = 2 * x[1:-1], torch.full_like(x[1:-1], 2.0)
    exact = (1 + p**2 - yq[1:-1] * ypp) / (1 + p**2)**1.5
    torch.testing.assert_close(euler_lagrange_residual(L_cat, x, yq), exact, rtol=1e-10,
                               atol=1e-10)


def test_residual_extreme_inputs_finite():
    x = torch.linspace(0, 1, 101, dtype=F64)
    for y in (1e150 * (1 + x), 1e-150 * (1 + x), 1e3 * torch.sin(50 * x) + 1e4):
        assert torch.isfinite(euler_lagrange_residual(L_arc, x, y)).all()


def test_residual_bad_input():
    x = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"y: expected shape \[\.\.\., N\+1\] = \[\.\.\., 5\]"):
        euler_lagrange_residual(L_cat, x, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="x: expected a strictly increasing grid"):
        euler_lagrange_residual(L_cat, torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64))
    with pytest.raises(TypeError, match="L: expected a callable"):
        euler_lagrange_residual("L", x, torch.zeros(5, dtype=F64))


# ---- minimize_path ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lbfgs", "scipy"])
def test_minimize_recovers_catenary_at_second_order(method):
    Y = 2 * math.cosh(0.5)
    errs = []
    for n in (16, 32):
        x = torch.linspace(-1, 1, n + 1, dtype=F64)
        y = minimize_path(L_cat, x, (Y, Y), method=method)
        assert y.shape == (n + 1,) and y[0] == Y and y[-1] == Y
        errs.append((y - 2 * torch.cosh(x / 2)).abs().max().item())
        # the minimum satisfies the discrete Euler-Lagrange equation (eq. ev-del)
        v = y[1:-1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(discretize_functional(L_cat, x, v, (Y, Y)), v)
        assert (grad * n / 2).abs().max() < 1e-9
    assert 3.8 < errs[0] / errs[1] < 4.2


def test_minimize_matches_dense_newton_reference():
    """The discrete minimum of a convex quadratic functional is the solution of one linear
    system built from torch.func.hessian (an independent path)."""
    L_q = lambda t, y, v: 0.5 * v**2 + 0.5 * (1 + t) * y**2 - torch.sin(3 * t) * y
    t = torch.linspace(0, 2, 41, dtype=F64)
    S = lambda v: discretize_functional(L_q, t, v, (1.0, -0.5))
    z = torch.zeros(39, dtype=F64)
    H = torch.func.hessian(S)(z)
    g = torch.func.grad(S)(z)
    ref = -torch.linalg.solve(H, g)
    y0 = torch.randn(39, generator=gen(7), dtype=F64)
    y = minimize_path(L_q, t, (1.0, -0.5), y0)
    torch.testing.assert_close(y[1:-1], ref, rtol=1e-9, atol=1e-9)


def test_minimize_free_fall_and_brachistochrone_in_depth():
    t = torch.linspace(0, 1, 65, dtype=F64)
    y = minimize_path(lambda t, y, v: 0.5 * v**2 - 9.81 * y, t, (0.0, 0.0))
    torch.testing.assert_close(y, 4.905 * t * (1 - t), rtol=0, atol=1e-9)
    # brachistochrone to (1, 1) with x as a function of depth on a graded grid
    g = 9.81
    th1 = 2.412011143913456                       # (th - sin th) = (1 - cos th)
    r = 1 / (1 - math.cos(th1))
    yg = torch.linspace(0, 1, 101, dtype=F64)**2
    xs = minimize_path(lambda y, x, q: torch.sqrt((1 + q**2) / (2 * g * y)), yg, (0.0, 1.0))
    th = torch.arccos(1 - yg / r)
    assert (xs - r * (th - torch.sin(th))).abs().max() < 1e-3


def test_minimize_float32_inference_mode_and_warning():
    x = torch.linspace(-1, 1, 17)
    Y = 2 * math.cosh(0.5)
    with torch.inference_mode():
        y = minimize_path(L_cat, x, (Y, Y), tol=1e-4)
    assert y.dtype == torch.float32
    assert (y - 2 * torch.cosh(x / 2)).abs().max() < 2e-3
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        minimize_path(L_cat, x.double(), (Y, Y), max_iter=1, newton_iter=0, tol=1e-12)


def test_minimize_bad_input():
    x = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"method: expected one of 'lbfgs' \| 'scipy'"):
        minimize_path(L_arc, x, (0.0, 1.0), method="adam")
    with pytest.raises(ValueError, match=r"tol: expected a value in \(0, inf\]"):
        minimize_path(L_arc, x, (0.0, 1.0), tol=0.0)
    with pytest.raises(ValueError, match=r"y0: expected the interior values \[N-1\] = \[3\]"):
        minimize_path(L_arc, x, (0.0, 1.0), y0=torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match=r"y_ends: expected a pair of numbers"):
        minimize_path(L_arc, x, (0.0, torch.tensor(1.0)))
    with pytest.raises(TypeError, match="max_iter: expected an int"):
        minimize_path(L_arc, x, (0.0, 1.0), max_iter=1.5)
