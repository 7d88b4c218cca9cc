"""The calculus of variations, discretised: functionals, first variations, the Euler-Lagrange
residual and direct minimisation of a path.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# === extremum-variation ===
# The notebook's symbols: a grid x_0 < x_1 < ... < x_N with steps h_k = x_{k+1} - x_k, a path
# y_k = y(x_k) with fixed ends y_0 = y_a, y_N = y_b, and a Lagrangian L(x, y, y') given as a
# torch callable that acts entry by entry (L(x, y, p)[..., k] depends on x[k], y[..., k],
# p[..., k] only) and broadcasts, e.g. ``lambda x, y, p: y * torch.sqrt(1 + p**2)``.
import warnings
from typing import Callable

from ._validate import check_choice, check_floating, check_int, check_range

__all__ += ["discretize_functional", "first_variation", "euler_lagrange_residual",
            "minimize_path"]

Lagrangian = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_RULES = ("midpoint", "trapezoid")
_METHODS = ("lbfgs", "scipy")


def _check_grid(x) -> torch.Tensor:
    """``x`` must be a 1-D floating tensor of at least 3 strictly increasing points."""
    check_floating("x", x)
    if x.dim() != 1 or x.shape[0] < 3:
        raise ValueError(f"x: expected a 1-D grid [N+1] with N+1 >= 3 points, "
                         f"got shape {tuple(x.shape)}")
    if not bool((x[1:] > x[:-1]).all()):
        raise ValueError("x: expected a strictly increasing grid")
    return x


def _check_lagrangian(L) -> None:
    if not callable(L):
        raise TypeError(f"L: expected a callable L(x, y, p), got {type(L).__name__}")


def _call_lagrangian(L: Lagrangian, x, y, p) -> torch.Tensor:
    """L(x, y, p) broadcast to the shape of ``y``: one value per grid point or segment."""
    out = L(x, y, p)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"L: expected L(x, y, p) to return a tensor, got {type(out).__name__}")
    try:
        return out.expand_as(y) if out.shape != y.shape else out
    except RuntimeError:
        raise ValueError(f"L: expected L(x, y, p) to act entry by entry and return the shape "
                         f"{tuple(y.shape)} of y, got {tuple(out.shape)}") from None


def _full_path(y_interior: torch.Tensor, y_ends) -> torch.Tensor:
    """[..., N-1] interior values and the two fixed ends -> the path [..., N+1]."""
    if not isinstance(y_ends, (tuple, list)) or len(y_ends) != 2:
        raise ValueError(f"y_ends: expected a pair (y_a, y_b), got {y_ends!r}")
    batch = y_interior.shape[:-1]
    ends = []
    for name, v in zip(("y_ends[0]", "y_ends[1]"), y_ends):
        if isinstance(v, torch.Tensor):
            try:
                v = v.to(y_interior).expand(batch)
            except RuntimeError:
                raise ValueError(f"{name}: expected a number or a tensor broadcasting to the "
                                 f"leading dims {tuple(batch)} of y_interior, "
                                 f"got shape {tuple(v.shape)}") from None
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = y_interior.new_full(batch, float(v))
        else:
            raise TypeError(f"{name}: expected a number or a tensor, got {type(v).__name__}")
        ends.append(v.unsqueeze(-1))
    return torch.cat([ends[0], y_interior, ends[1]], dim=-1)


def discretize_functional(L: Lagrangian, x: torch.Tensor, y_interior: torch.Tensor,
                          y_ends, *, rule: str = "midpoint") -> torch.Tensor:
    """The functional S[y] = int L(x, y, y') dx on a grid, as a function of the interior values.

    Each segment [x_k, x_{k+1}] carries the straight-line slope s_k = (y_{k+1} - y_k) / h_k and
    (eq. ``ev-discrete``)
      * ``"midpoint"``:  S_h = sum_k h_k L(x_{k+1/2}, (y_k + y_{k+1}) / 2, s_k);
      * ``"trapezoid"``: S_h = sum_k h_k [L(x_k, y_k, s_k) + L(x_{k+1}, y_{k+1}, s_k)] / 2.
    For a smooth path both are second order, S_h = S[y] + O(h^2) (checked in the notebook); the
    midpoint rule never evaluates L at a node, so it also copes with an integrable singularity at
    an end (the brachistochrone's y = 0). Its gradient divided by the cell width,
    dS_h/dy_k / ((h_{k-1} + h_k) / 2), is the discrete Euler-Lagrange residual (eq. ``ev-del``).

    ``L``: callable L(x, y, p) -> tensor, entry by entry (see the module header). ``x``: grid
    ``[N+1]``, strictly increasing (steps may differ). ``y_interior``: ``[..., N-1]``, the
    values at x_1..x_{N-1}. ``y_ends``: (y_a, y_b), numbers or tensors broadcasting to the
    leading dims. Returns ``[...]`` in the dtype of ``y_interior``; differentiable.
    """
    _check_lagrangian(L)
    _check_grid(x)
    check_floating("y_interior", y_interior)
    check_choice("rule", rule, _RULES)
    n = x.shape[0] - 1
    if y_interior.dim() < 1 or y_interior.shape[-1] != n - 1:
        raise ValueError(f"y_interior: expected shape [..., N-1] = [..., {n - 1}] for a grid "
                         f"x of {n + 1} points, got {tuple(y_interior.shape)}")
    x = x.to(device=y_interior.device, dtype=y_interior.dtype)
    y = _full_path(y_interior, y_ends)                              # [..., N+1]
    h = x[1:] - x[:-1]                                              # [N]
    s = (y[..., 1:] - y[..., :-1]) / h                              # slope of each segment
    if rule == "midpoint":
        xm, ym = (x[1:] + x[:-1]) / 2, (y[..., 1:] + y[..., :-1]) / 2
        return (h * _call_lagrangian(L, xm, ym, s)).sum(-1)
    left = _call_lagrangian(L, x[:-1], y[..., :-1], s)
    right = _call_lagrangian(L, x[1:], y[..., 1:], s)
    return (h * (left + right) / 2).sum(-1)


def first_variation(S: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
                    eta: torch.Tensor) -> torch.Tensor:
    """delta S[y; eta] = d/d eps S(y + eps eta) at eps = 0 (eq. ``ev-first-variation``).

    One forward-mode pass, ``torch.func.jvp``: exact to rounding for the discretised S, at the
    cost of about one evaluation of S. ``S``: callable on tensors shaped like ``y`` (e.g.
    ``lambda y: discretize_functional(L, x, y, ends)``); ``y``, ``eta``: same shape, floating.
    Returns a tensor shaped like S(y). Works under ``no_grad`` and ``inference_mode``.
    """
    if not callable(S):
        raise TypeError(f"S: expected a callable S(y), got {type(S).__name__}")
    check_floating("y", y)
    check_floating("eta", eta)
    if eta.shape != y.shape:
        raise ValueError(f"eta: expected the shape of y {tuple(y.shape)}, "
                         f"got {tuple(eta.shape)}")
    return torch.func.jvp(S, (y,), (eta.to(y.dtype),))[1]


def euler_lagrange_residual(L: Lagrangian, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R(x_k) = L_y - d/dx L_{y'} along a given path, at the interior nodes (eq. ``ev-el``).

    The total derivative is taken along the path, d/dx L_{y'} = L_{y'x} + L_{y'y} y' +
    L_{y'y'} y'' (eq. ``ev-el-expanded``): the partial derivatives of L are exact (nested
    forward-mode autograd, ``torch.func.jvp``), and y', y'' are three-point differences at each
    interior node (``torch.gradient`` with the grid as coordinates, and the second difference).
    Error O(h^2) on a uniform (or smoothly graded) grid for a smooth path; zero up to that error
    exactly on the extremals.

    ``L``: callable L(x, y, p), entry by entry. ``x``: grid ``[N+1]``. ``y``: the whole path,
    ends included, ``[..., N+1]``. Returns ``[..., N-1]``; differentiable in ``y``.
    """
    _check_lagrangian(L)
    _check_grid(x)
    check_floating("y", y)
    if y.dim() < 1 or y.shape[-1] != x.shape[0]:
        raise ValueError(f"y: expected shape [..., N+1] = [..., {x.shape[0]}] (the whole path "
                         f"on the grid x), got {tuple(y.shape)}")
    x = x.to(device=y.device, dtype=y.dtype)
    h_l, h_r = x[1:-1] - x[:-2], x[2:] - x[1:-1]                     # steps left and right
    p = torch.gradient(y, spacing=(x,), dim=-1)[0][..., 1:-1]         # y' at x_1..x_{N-1}
    ypp = 2 * ((y[..., 2:] - y[..., 1:-1]) / h_r
               - (y[..., 1:-1] - y[..., :-2]) / h_l) / (h_l + h_r)   # y''
    xi, yi = x[1:-1], y[..., 1:-1]
    ones = torch.ones_like(yi)
    # L acts entry by entry, so a tangent of ones returns every partial derivative at once
    L_y = torch.func.jvp(lambda v: _call_lagrangian(L, xi, v, p), (yi,), (ones,))[1]

    def L_p(a, b, c):
        return torch.func.jvp(lambda v: _call_lagrangian(L, a, b, v), (c,), (ones,))[1]

    # d/dx L_{y'}: the derivative of L_{y'}(x, y, y') along the tangent (1, y', y'') of the path
    dL_p = torch.func.jvp(L_p, (xi, yi, p), (torch.ones_like(xi), p, ypp))[1]
    return L_y - dL_p


def _tridiagonal_hessian(grad_fn, y: torch.Tensor) -> torch.Tensor:
    """The three diagonals of the Hessian of a functional whose terms couple only neighbours,
    from three Hessian-vector products (tangents 1[k = c mod 3], c = 0, 1, 2): rows
    [upper (H_{k,k+1} at k+1), diagonal, lower (H_{k+1,k} at k)], the layout of
    ``scipy.linalg.solve_banded``."""
    n = y.shape[0]
    k = torch.arange(n, device=y.device)
    cols = torch.stack([torch.func.jvp(grad_fn, (y,), ((k % 3 == c).to(y.dtype),))[1]
                        for c in range(3)])                          # [3, n]: (H e_c)_i
    diag = cols[k % 3, k]
    upper = cols[(k[:-1] + 1) % 3, k[:-1]]                          # H_{i, i+1}
    lower = cols[(k[1:] - 1) % 3, k[1:]]                            # H_{i, i-1}
    zero = y.new_zeros(1)
    return torch.stack([torch.cat([zero, upper]), diag, torch.cat([lower, zero])])


def minimize_path(L: Lagrangian, x: torch.Tensor, y_ends, y0: torch.Tensor | None = None,
                  method: str = "lbfgs", tol: float = 1e-10, *,
                  max_iter: int = 200, newton_iter: int = 50) -> torch.Tensor:
    """The path that minimises the discretised functional, ends fixed (the direct method).

    Minimises F(y_int) = S_h(y_int) / h_mean (eq. ``ev-discrete``, midpoint rule) over the
    interior values; dividing by the mean step h_mean makes dF/dy_k the discrete Euler-Lagrange
    residual on a uniform grid (eq. ``ev-del``), so ``tol`` bounds that residual, whatever N.
    Two stages:
      1. a quasi-Newton search, at most ``max_iter`` iterations: ``"lbfgs"``,
         ``torch.optim.LBFGS`` with a strong-Wolfe line search, or ``"scipy"``,
         ``scipy.optimize.minimize(method="L-BFGS-B")`` with the autograd gradient. A line
         search compares values of F, whose rounding (about 1e-16 |F|) stalls it once F changes
         by less than that: typically at max |dF/dy_k| ~ 1e-5, a path ~ 1e-7 off for N ~ 500;
      2. Newton's method on dF = 0, at most ``newton_iter`` steps, with the exact tridiagonal
         Hessian (three Hessian-vector products) factorised by ``scipy.linalg.solveh_banded``
         (Cholesky: it refuses a Hessian that is not positive definite, so it never walks to
         a saddle); each step is halved until F falls enough (Armijo) or, once F is down to
         its rounding, until the residual falls (the gradient stays accurate there). It
         stops at max |dF/dy_k| <= ``tol``, or where rounding stops the residual from
         falling (about eps |y| / h^2: a ``tol`` below that is not reachable).
    A RuntimeWarning says when the residual stays above both. A local method: it finds the
    minimum nearest ``y0`` (default: the straight line between the ends); for a convex L the
    Newton stage alone converges from anywhere, for others stage 1 must bring it close.

    ``x``: grid ``[N+1]`` (strictly increasing; graded grids are fine); ``y_ends``: (y_a, y_b),
    numbers; ``y0``: starting interior values ``[N-1]`` or None. Returns the whole path
    ``[N+1]`` (ends included), detached, in the dtype of ``y0`` (of ``x`` when None).
    """
    _check_lagrangian(L)
    _check_grid(x)
    check_choice("method", method, _METHODS)
    check_range("tol", tol, 0, None, low_open=True)
    check_int("max_iter", max_iter, 1)
    check_int("newton_iter", newton_iter, 0)
    if (not isinstance(y_ends, (tuple, list)) or len(y_ends) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in y_ends)):
        raise ValueError(f"y_ends: expected a pair of numbers (y_a, y_b), got {y_ends!r}")
    import numpy as np
    from scipy.linalg import LinAlgError, solveh_banded

    n = x.shape[0] - 1
    ya, yb = float(y_ends[0]), float(y_ends[1])
    if y0 is None:
        y0 = ya + (yb - ya) * (x[1:-1] - x[0]) / (x[-1] - x[0])
    else:
        check_floating("y0", y0)
        if y0.shape != (n - 1,):
            raise ValueError(f"y0: expected the interior values [N-1] = [{n - 1}], "
                             f"got {tuple(y0.shape)}")
    dtype, device = y0.dtype, y0.device

    with torch.enable_grad(), torch.inference_mode(False):
        x = x.to(device=device, dtype=dtype).clone()   # a normal tensor, even from inference
        scale = n / (x[-1] - x[0]).item()                           # 1 / h_mean

        def objective(y_int):
            return discretize_functional(L, x, y_int, (ya, yb)) * scale

        grad_fn = torch.func.grad(objective)
        if method == "lbfgs":
            y_int = y0.detach().clone().requires_grad_(True)
            opt = torch.optim.LBFGS([y_int], lr=1, max_iter=max_iter, max_eval=2 * max_iter,
                                    tolerance_grad=tol, tolerance_change=1e-16,
                                    history_size=50, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                value = objective(y_int)
                value.backward()
                return value

            opt.step(closure)
            y_int = y_int.detach()
        else:
            from scipy.optimize import minimize

            def fun(v):
                y_int = torch.as_tensor(v, dtype=dtype, device=device).requires_grad_(True)
                value = objective(y_int)
                (grad,) = torch.autograd.grad(value, y_int)
                return value.item(), grad.detach().cpu().numpy().astype(np.float64)

            res = minimize(fun, y0.detach().cpu().numpy().astype(np.float64), jac=True,
                           method="L-BFGS-B",
                           options=dict(gtol=tol, ftol=1e-15, maxiter=max_iter,
                                        maxfun=2 * max_iter, maxcor=50))
            y_int = torch.as_tensor(res.x, dtype=dtype, device=device)

        # Newton polish on dF = 0 with the exact Hessian; a step is halved until F falls
        # enough (Armijo) or, once F is at its rounding level, until the residual falls
        g = grad_fn(y_int)
        with torch.no_grad():
            f = objective(y_int).item()
        for _ in range(newton_iter):
            g_max = g.abs().max().item()
            if not g_max > tol:                                     # done (or NaN: give up)
                break
            bands = _tridiagonal_hessian(grad_fn, y_int)
            try:                                                    # Cholesky: H must be > 0
                step = solveh_banded(bands[1:].cpu().numpy(), g.cpu().numpy(), lower=True)
            except (LinAlgError, ValueError):
                break
            step = torch.as_tensor(step, dtype=dtype, device=device)
            decrease = (g * step).sum().item()                      # -g.dy > 0
            slack = 1e-12 * max(abs(f), 1.0)
            for _ in range(30):
                y_new = y_int - step
                with torch.no_grad():
                    f_new = objective(y_new).item()
                g_new = grad_fn(y_new)
                g_new_max = g_new.abs().max().item()
                if f_new <= f - 1e-4 * decrease or (f_new <= f + slack and g_new_max < g_max):
                    break
                step, decrease = step / 2, decrease / 2
            else:
                break
            y_int, g, f = y_new, g_new, f_new
        g_max = g.abs().max().item()
        # the residual is a second difference of y: rounding alone leaves ~ eps |y| / h^2
        h_min = (x[1:] - x[:-1]).min().item()
        y_scale = max(abs(ya), abs(yb), y0.abs().max().item(), 1.0)
        floor = 100 * torch.finfo(dtype).eps * y_scale / h_min ** 2
        if not g_max <= max(tol, floor):
            warnings.warn(f"minimize_path: the residual max |dF/dy_k| = {g_max:.3g} did not "
                          f"reach tol = {tol:.3g} (N = {n}); the path may not be converged",
                          RuntimeWarning, stacklevel=2)
    return _full_path(y_int.detach(), (ya, yb))
