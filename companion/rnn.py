"""Recurrences: parallel linear scans and the parallel (Newton / DEER) solution of non-linear RNNs.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ._validate import (check_choice, check_floating, check_int, check_range, check_same_shape)

__all__: list[str] = []


# === parallel-nonlinear-rnn ===
__all__ += ["linear_scan", "tanh_rnn_sequential", "rnn_fixed_point_iterate", "deer_solve",
            "ParallelIterRNN"]


# ---- the linear recurrence x_t = a_t x_{t-1} + b_t, solved by a log-depth scan ---------------
def _time_slice(a: torch.Tensor, kind: str, start: int, stop: int) -> torch.Tensor:
    """Every second step of ``a`` in [start, stop); a time-invariant ``a`` is returned as is."""
    if kind in ("const", "const_dense"):
        return a
    if kind == "diag":
        return a[..., start:stop:2, :]
    return a[..., start:stop:2, :, :]


def _compose(a2: torch.Tensor, a1: torch.Tensor, kind: str) -> torch.Tensor:
    """The a-part of (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2)."""
    return a2 * a1 if kind in ("const", "diag") else a2 @ a1


def _apply(a: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """a x for a diagonal (element-wise) or dense (matrix-vector) a."""
    if kind in ("const", "diag"):
        return a * x
    if kind == "const_dense":
        return x @ a.mT  # one matrix product for all steps
    return (a @ x.unsqueeze(-1)).squeeze(-1)


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """All x_t of x_t = a_t x_{t-1} + b_t with x_{-1} = 0, by odd-even (Blelloch-style) reduction.

    Pairs (t, t+1) = (2k, 2k+1) are combined with the associative operator
    (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2), which leaves a recurrence of half the length for the
    odd steps; it is solved recursively, and each even step is then one update from its odd
    neighbour. Work O(T) (matrix products for a dense a), depth O(log T). ``kind``: "const"
    ([d]), "diag" ([..., T, d]), "dense" ([..., T, d, d]) or "const_dense" ([d, d], internal).
    """
    T = b.shape[-2]
    if T == 1:
        return b
    n = T // 2
    a_even, a_odd = _time_slice(a, kind, 0, 2 * n), _time_slice(a, kind, 1, 2 * n)
    b_even, b_odd = b[..., 0:2 * n:2, :], b[..., 1:2 * n:2, :]
    # x_{2k+1} = (a_{2k+1} a_{2k}) x_{2k-1} + (a_{2k+1} b_{2k} + b_{2k+1})
    x_odd = _odd_even_scan(_compose(a_odd, a_even, kind), _apply(a_odd, b_even, kind) + b_odd, kind)
    # x_0 = b_0 and x_{2k} = a_{2k} x_{2k-1} + b_{2k}
    x_even = torch.cat([b[..., :1, :],
                        _apply(_time_slice(a, kind, 2, T), x_odd[..., :(T - 1) // 2, :], kind)
                        + b[..., 2::2, :]], dim=-2)
    out = torch.stack([x_even[..., :n, :], x_odd], dim=-2).flatten(-3, -2)  # interleave
    return torch.cat([out, x_even[..., n:, :]], dim=-2) if T % 2 else out


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of the linear recurrence x_t = a_t x_{t-1} + b_t, t = 1..T, with x_0 = ``h0``.

    ``b``: ``[..., T, d]`` (time is dim -2). ``a`` is one of
      * ``[d]``            a time-invariant diagonal (the LRU / diagonal linear RNN);
      * ``[..., T, d]``    a diagonal per step (same number of dims as ``b``);
      * ``[..., T, d, d]`` a dense matrix per step (one more dim than ``b``; DEER's Jacobians).
    ``h0``: ``[..., d]`` or None (zeros). Leading dims of ``a``, ``b``, ``h0`` broadcast. Real or
    complex; the result has the promoted dtype and shape ``[..., T, d]``.

    Parallel over time: odd-even reduction with the associative operator
    (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2); O(T) work, O(log T) sequential depth, written in
    plain torch ops so that it runs on any device and is differentiable by autograd.
    """
    check_floating("a", a)
    check_floating("b", b)
    if b.dim() < 2:
        raise ValueError(f"b: expected shape [..., T, d], got {tuple(b.shape)}")
    T, d = b.shape[-2:]
    forms = f"[d] = [{d}], [..., T, d] = [..., {T}, {d}] or [..., T, d, d] = [..., {T}, {d}, {d}]"
    if a.dim() == 1 and a.shape[0] == d:
        kind, a_batch = "const", ()
    elif a.dim() == b.dim() and a.shape[-2:] == (T, d):
        kind, a_batch = "diag", a.shape[:-2]
    elif a.dim() == b.dim() + 1 and a.shape[-3:] == (T, d, d):
        kind, a_batch = "dense", a.shape[:-3]
    else:
        raise ValueError(f"a: expected shape {forms} for b of shape {tuple(b.shape)}, "
                         f"got {tuple(a.shape)}")
    try:
        batch = torch.broadcast_shapes(a_batch, b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"a: leading dims {tuple(a_batch)} do not broadcast with those of b "
                         f"{tuple(b.shape[:-2])}") from None
    dtype = torch.promote_types(a.dtype, b.dtype)
    if h0 is not None:
        check_floating("h0", h0)
        try:
            if h0.dim() < 1 or h0.shape[-1] != d:
                raise RuntimeError
            batch = torch.broadcast_shapes(batch, h0.shape[:-1])
        except RuntimeError:
            raise ValueError(f"h0: expected shape [..., d] = [..., {d}] broadcasting with the "
                             f"leading dims {tuple(batch)} of a and b, "
                             f"got {tuple(h0.shape)}") from None
        dtype = torch.promote_types(dtype, h0.dtype)
    a, b = a.to(dtype), b.to(dtype).expand(*batch, T, d)
    if T == 0:
        return b.clone()
    return _scan(a, b, None if h0 is None else h0.to(dtype), kind)


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, kind: str) -> torch.Tensor:
    """``linear_scan`` without the checks; ``kind`` as in ``_odd_even_scan``; ``b`` has the full
    batch shape. The initial state is folded into the first input: b_1 <- b_1 + a_1 x_0."""
    if h0 is not None:
        a_first = a[..., 0, :] if kind == "diag" else a[..., 0, :, :] if kind == "dense" else a
        b_first = b[..., 0, :] + _apply(a_first, h0, kind)
        b = torch.cat([b_first.unsqueeze(-2).expand(b.shape[:-2] + (1, b.shape[-1])),
                       b[..., 1:, :]], dim=-2)
    return _odd_even_scan(a, b, kind)


# ---- the tanh RNN and the article's fixed-point iterations ----------------------------------
def _check_rnn_args(A: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None):
    check_floating("A", A)
    check_floating("u", u)
    if u.dim() < 2:
        raise ValueError(f"u: expected shape [..., T, d], got {tuple(u.shape)}")
    d = u.shape[-1]
    if A.shape != (d, d):
        raise ValueError(f"A: expected shape (d, d) = ({d}, {d}) for u of shape {tuple(u.shape)}, "
                         f"got {tuple(A.shape)}")
    if A.dtype != u.dtype:
        raise TypeError(f"A: expected the dtype of u ({u.dtype}), got {A.dtype}")
    if h0 is None:
        return u.new_zeros(*u.shape[:-2], d)
    check_floating("h0", h0)
    if h0.shape != u.shape[:-2] + (d,):
        raise ValueError(f"h0: expected shape {tuple(u.shape[:-2] + (d,))}, got {tuple(h0.shape)}")
    return h0.to(u.dtype)


def _shift(x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """x_{t-1} for t = 1..T: the states moved one step later in time, with x_0 = h0 first."""
    return torch.cat([h0.unsqueeze(-2), x[..., :-1, :]], dim=-2)


def _sech2(z: torch.Tensor) -> torch.Tensor:
    """sech^2 z = 1 / cosh^2 z, accurate for large |z| (where 1 - tanh^2 z cancels to 0)."""
    return torch.cosh(z).reciprocal().square()


def tanh_rnn_sequential(A: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """The reference loop x_t = tanh(A x_{t-1} + u_t), t = 1..T, x_0 = ``h0`` (zeros if None).

    ``A``: ``[d, d]``; ``u``: ``[..., T, d]``; ``h0``: ``[..., d]``. Returns ``[..., T, d]``.
    """
    x = _check_rnn_args(A, u, h0)
    out = []
    for t in range(u.shape[-2]):
        x = torch.tanh(x @ A.mT + u[..., t, :])
        out.append(x)
    return torch.stack(out, dim=-2) if out else u.clone()


_ITERATION_MODES = ("picard", "sech_u", "newton")


def rnn_fixed_point_iterate(A: torch.Tensor, u: torch.Tensor, num_iters: int, mode: str = "picard",
                            h_init: torch.Tensor | None = None, return_all: bool = False, *,
                            h0: torch.Tensor | None = None) -> torch.Tensor:
    """``num_iters`` parallel iterations towards the tanh RNN x_t = tanh(A x_{t-1} + u_t).

    Each iteration solves the linear recurrence (one ``linear_scan``)
        x^(n)_t - A_t x^(n)_{t-1} = tanh(A x^(n-1)_{t-1} + u_t) - A_t x^(n-1)_{t-1}
    with A_t = A (``"picard"``, the article's basic scheme), A_t = diag(sech^2 u_t) A
    (``"sech_u"``, linearised around x = 0) or A_t = diag(sech^2(A x^(n-1)_{t-1} + u_t)) A
    (``"newton"``, linearised around the previous iterate: Newton's method, i.e. DEER).

    ``A``: ``[d, d]``; ``u``: ``[..., T, d]``; ``h_init``: the starting iterate x^(0),
    ``[..., T, d]`` (zeros if None); ``h0``: the initial state x_0, ``[..., d]`` (zeros if None).
    Returns x^(num_iters), ``[..., T, d]``, or with ``return_all`` every iterate x^(1..num_iters)
    stacked on a new first dim, ``[num_iters, ..., T, d]``. Differentiable by autograd.
    """
    h0 = _check_rnn_args(A, u, h0)
    check_int("num_iters", num_iters, 1)
    check_choice("mode", mode, _ITERATION_MODES)
    if h_init is None:
        x = torch.zeros_like(u)
    else:
        check_floating("h_init", h_init)
        check_same_shape("u", u, "h_init", h_init)
        x = h_init
    if mode == "sech_u":
        s_u = _sech2(u)
        a = s_u.unsqueeze(-1) * A  # diag(sech^2 u_t) A
    iterates = []
    for _ in range(num_iters):
        Ax = _shift(x, h0) @ A.mT  # A x^(n-1)_{t-1}
        f = torch.tanh(Ax + u)
        if mode == "picard":
            b = f - Ax
        elif mode == "sech_u":
            b = f - s_u * Ax  # A_t x_{t-1} = sech^2(u_t) * (A x_{t-1})
        else:
            s = _sech2(Ax + u)
            a, b = s.unsqueeze(-1) * A, f - s * Ax
        x = _scan(A, b, h0, "const_dense") if mode == "picard" else _scan(a, b, h0, "dense")
        iterates.append(x)
    return torch.stack(iterates) if return_all else x


# ---- DEER: Newton's method for any cell, with an implicit-differentiation backward -----------
def _step_and_jacobian(step, h: torch.Tensor, u: torch.Tensor):
    """f = step(h, u), ``[N, H]``, and the per-row Jacobians J_n = d f_n / d h_n, ``[N, H, H]``.

    Rows are independent, so one vjp with the cotangent e_i in every row gives row i of all N
    Jacobians at once: H vjps in total, batched by vmap (autograd's ``is_grads_batched``, which
    runs on ``torch.func.vmap``; a loop over the H rows where an op has no batching rule).
    """
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        f = step(h, u)
        if not isinstance(f, torch.Tensor) or f.shape != h.shape:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"step: expected step(h, u) of shape {tuple(h.shape)} (the shape "
                             f"of h), got {got}")
        H = h.shape[-1]
        cotangents = torch.eye(H, dtype=f.dtype, device=f.device).unsqueeze(1).expand(H, *f.shape)
        try:  # rows[i, n] = e_i^T J_n
            (rows,) = torch.autograd.grad(f, h, cotangents, retain_graph=True,
                                          is_grads_batched=True)
        except RuntimeError:
            # vmap refuses some backward code, e.g. a custom autograd.Function whose backward
            # writes the (batched) gradient in place into an unbatched tensor: one vjp per row
            rows = torch.stack([torch.autograd.grad(f, h, cotangents[i], retain_graph=True)[0]
                                for i in range(H)])
    return f.detach(), rows.transpose(0, 1)


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on f = step(h*_{t-1}, u_t) in the forward pass; the backward maps the incoming
    gradient g to the adjoint lambda of the fixed-point equations,
        lambda_t = g_t + J_{t+1}^T lambda_{t+1},   lambda_T = g_T,
    a linear recurrence in reverse time (one ``linear_scan`` with the transposed Jacobians at the
    solution). Autograd then carries lambda through f's own graph: one vjp of ``step`` at the
    solution gives the gradients of the parameters, the inputs and h0."""

    @staticmethod
    def forward(ctx, f, h_prev, u, step):
        ctx.step = step
        ctx.save_for_backward(h_prev, u)
        return f.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the adjoint is not differentiated
            raise RuntimeError(
                "deer_solve: double backward (create_graph=True, e.g. a gradient penalty) is not "
                "supported: the implicit-adjoint gradient is first order only. Differentiate "
                "through the sequential loop instead.")
        h_prev, u = ctx.saved_tensors
        B, T, H = h_prev.shape
        _, J = _step_and_jacobian(ctx.step, h_prev.reshape(B * T, H), u.reshape(B * T, -1))
        J_T = J.reshape(B, T, H, H).transpose(-1, -2)
        # reversed time s = T+1-t: lambda'_s = J^T_{T+2-s} lambda'_{s-1} + g'_s (a'_1 is unused)
        a = torch.cat([torch.zeros_like(J_T[:, :1]), J_T[:, 1:].flip(1)], dim=1)
        lam = linear_scan(a, grad.flip(1)).flip(1)
        return lam, None, None, None


_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def deer_solve(step, h0: torch.Tensor, inputs: torch.Tensor, *, max_iter: int | None = None,
               tol: float | None = None, return_num_iters: bool = False,
               allow_unconverged: bool = False):
    """All states h_t = step(h_{t-1}, u_t), t = 1..T, of any recurrent cell, by Newton's method
    over the whole sequence (DEER, Lim et al. 2024), parallel in time.

    ``step(h, u)`` maps ``[N, H]``, ``[N, D]`` to ``[N, H]`` for any N (e.g. ``nn.GRUCell`` as
    ``lambda h, u: cell(u, h)``); ``h0``: ``[B, H]``; ``inputs``: ``[B, T, D]`` (batch first).
    Newton iteration n linearises every step around the previous iterate h^(n-1),
        h^(n)_t = J_t h^(n)_{t-1} + step(h^(n-1)_{t-1}, u_t) - J_t h^(n-1)_{t-1},
        J_t = d step / d h at (h^(n-1)_{t-1}, u_t),
    which is a linear recurrence with dense ``[B, T, H, H]`` matrices, solved by ``linear_scan``;
    ``step`` and its Jacobians (H vector-Jacobian products, batched by vmap) are evaluated on all
    B*T steps at once: no Python loop over time. Starts from h^(0) = 0; stops for each sequence when its largest change
    max_{t,i} |h^(n) - h^(n-1)| <= tol * max(1, max|h^(n)|); ``tol`` defaults to 1e-12 (float64),
    1e-5 (float32) or 1e-2 (otherwise), ``max_iter`` to min(T, 100) (T iterations are always
    enough in exact arithmetic: iteration n makes step n exact). One host sync per iteration.
    A sequence that has not converged, or non-finite states (an expanding cell), raise
    RuntimeError naming max_iter and the last change; with ``allow_unconverged=True`` the last
    iterate is returned with a RuntimeWarning instead. Works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.

    Returns ``[B, T, H]`` (and, with ``return_num_iters``, the iterations used per sequence,
    int64 ``[B]``). Gradients (to ``inputs``, ``h0`` and whatever ``step`` closes over, such as a
    module's parameters) come by implicit differentiation, not by unrolling the iterations: the
    returned states are one more evaluation of ``step`` at the solution, and its backward first
    solves the adjoint recurrence in reverse time (see ``_ImplicitAdjoint``). First order only.
    """
    if not callable(step):
        raise TypeError(f"step: expected a callable step(h, u), got {type(step).__name__}")
    if torch.is_inference_mode_enabled():  # the Jacobians need autograd: leave inference mode
        with torch.inference_mode(False), torch.no_grad():
            return deer_solve(step, h0.clone(), inputs.clone(), max_iter=max_iter, tol=tol,
                              return_num_iters=return_num_iters,
                              allow_unconverged=allow_unconverged)
    check_floating("inputs", inputs)
    check_floating("h0", h0)
    if inputs.dim() != 3:
        raise ValueError(f"inputs: expected shape (B, T, D), got {tuple(inputs.shape)}")
    B, T, D = inputs.shape
    if h0.dim() != 2 or h0.shape[0] != B:
        raise ValueError(f"h0: expected shape (B, H) with B = inputs.shape[0] = {B}, "
                         f"got {tuple(h0.shape)}")
    if h0.dtype != inputs.dtype:
        raise TypeError(f"h0: expected the dtype of inputs ({inputs.dtype}), got {h0.dtype}")
    H = h0.shape[1]
    max_iter = min(T, 100) if max_iter is None else check_int("max_iter", max_iter, 1)
    if tol is None:
        tol = _DEFAULT_TOL.get(h0.dtype, 1e-2)
    check_range("tol", tol, 0.0)
    num_iters = torch.zeros(B, dtype=torch.long, device=h0.device)
    if T == 0:
        out = inputs.new_zeros(B, 0, H)
        return (out, num_iters) if return_num_iters else out

    u = inputs.detach().reshape(B * T, D)
    h0_ = h0.detach()
    with torch.no_grad():
        h = h0_.new_zeros(B, T, H)
        done = torch.zeros(B, dtype=torch.bool, device=h0.device)
        for it in range(1, max_iter + 1):
            h_prev = _shift(h, h0_)
            f, J = _step_and_jacobian(step, h_prev.reshape(B * T, H), u)
            f, J = f.reshape(B, T, H), J.reshape(B, T, H, H).contiguous()
            h_new = linear_scan(J, f - _apply(J, h_prev, "dense"), h0_)  # the Newton update
            change = (h_new - h).abs().flatten(1).amax(1)
            scale = h_new.abs().flatten(1).amax(1).clamp(min=1.0)
            h = torch.where(done[:, None, None], h, h_new)  # a converged sequence stays put
            num_iters = torch.where(done, num_iters, it)
            # iteration T makes every step exact (finite termination), whatever the last change
            done = done | (change <= tol * scale) | (it >= T)
            if bool(done.all()):  # the one host sync of the iteration
                break
        finite = torch.isfinite(h).flatten(1).all(1)
        if not bool((done & finite).all()):
            bad = ~(done & finite)
            worst = change[bad].max().item()
            msg = (f"deer_solve: {int(bad.sum())} of {B} sequences did not converge in "
                   f"max_iter={max_iter} Newton iterations (last max change {worst:.3g} > "
                   f"tol={tol:.3g}{'; non-finite states' if not bool(finite.all()) else ''}); "
                   f"raise max_iter (T={T} always suffices in exact arithmetic; an expanding "
                   "cell may overflow first)")
            if not allow_unconverged:
                raise RuntimeError(msg + ", or pass allow_unconverged=True to get the last "
                                   "iterate with a warning")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    # One differentiable evaluation of step at the solution; the adjoint is attached to it.
    h_prev = _shift(h, h0)  # h is detached; h0 keeps its graph, for the gradient of h0
    f = step(h_prev.reshape(B * T, H), inputs.reshape(B * T, D)).reshape(B, T, H)
    if f.requires_grad:
        f = _ImplicitAdjoint.apply(f, h_prev.detach(), inputs.detach(), step)
    return (f, num_iters) if return_num_iters else f


# ---- the "why insist on convergence" model: K weight-shared linear-RNN layers --------------
class ParallelIterRNN(nn.Module):
    """``num_iters`` = K iterations of the parallel scheme, used as a model in its own right.

    ``diagonal=True`` (the diagonalised form, with free matrices P, Q and a real diagonal Lambda):
        y^(n)_t - Lambda y^(n)_{t-1} = P tanh(Q y^(n-1)_{t-1} + u_t) - Lambda y^(n-1)_{t-1},
        Lambda = sigmoid(theta) in (0, 1), initialised with P = I and Q = Lambda (so PQ = Lambda);
    ``diagonal=False``: the dense scheme with a trainable A (``rnn_fixed_point_iterate``, "picard"),
        x^(n)_t - A x^(n)_{t-1} = tanh(A x^(n-1)_{t-1} + u_t) - A x^(n-1)_{t-1},  A = Lambda at init
    Here u_t = W x_t + c and y^(0) = 0: each iteration is one linear-RNN layer with shared
    weights; with K = T it is exactly the non-linear RNN y_t = P tanh(Q y_{t-1} + u_t).
    ``forward(x [B, T, d_in], h0=None [B, d_hidden]) -> [B, T, d_hidden]``.
    """

    def __init__(self, d_in: int, d_hidden: int, num_iters: int = 2, diagonal: bool = True):
        super().__init__()
        check_int("d_in", d_in, 1)
        check_int("d_hidden", d_hidden, 1)
        self.num_iters = check_int("num_iters", num_iters, 1)
        self.diagonal = bool(diagonal)
        self.input = nn.Linear(d_in, d_hidden)
        lam = torch.linspace(0.5, 0.95, d_hidden)  # initial decays, spread over (0, 1)
        if self.diagonal:
            self.theta = nn.Parameter(torch.logit(lam))
            self.P = nn.Parameter(torch.eye(d_hidden))
            self.Q = nn.Parameter(torch.diag(lam))
        else:
            self.A = nn.Parameter(torch.diag(lam))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        check_floating("x", x)
        if x.dim() != 3 or x.shape[-1] != self.input.in_features:
            raise ValueError(f"x: expected shape (B, T, d_in={self.input.in_features}), "
                             f"got {tuple(x.shape)}")
        u = self.input(x)
        if not self.diagonal:
            return rnn_fixed_point_iterate(self.A, u, self.num_iters, "picard", h0=h0)
        h0 = _check_rnn_args(self.Q, u, h0)
        lam = torch.sigmoid(self.theta)  # Lambda
        y = torch.zeros_like(u)
        for _ in range(self.num_iters):
            y_prev = _shift(y, h0)
            b = torch.tanh(y_prev @ self.Q.mT + u) @ self.P.mT - lam * y_prev
            y = linear_scan(lam, b, h0)
        return y

# === end parallel-nonlinear-rnn ===


# === lra-pretraining ===
__all__ += ["DiagonalLinearRNN"]


class DiagonalLinearRNN(nn.Module):
    """An LRU-style diagonal linear recurrence (Orvieto et al. 2023), one ``linear_scan`` over time.

        h_t = lambda * h_{t-1} + gamma * (B x_t),   y_t = Re(C h_t) + D * x_t,   h_0 = 0
        lambda_j = exp(-exp(nu_j) + i exp(theta_j)),  gamma_j = exp(g_j)  (eq. lra-lru)

    ``lambda`` (``[d_state]``, complex) has |lambda_j| = exp(-exp(nu_j)) <= 1 for every real
    nu_j, so no training step can make the recurrence explode. At initialisation the
    eigenvalues are uniform on the ring r_min <= |lambda| <= r_max (uniform in area) with phases
    uniform in [0, max_phase], and g_j = log sqrt(1 - |lambda_j|^2) (trainable afterwards), the
    normalisation that keeps the stationary state variance of white-noise input equal to that of
    the input (eq. lra-gamma). B (``[d_state, d_model]``) and C (``[d_model, d_state]``) are
    complex, D (``[d_model]``) real. Parameters are real tensors; the complex ones are built in
    ``forward``, so ``.double()`` gives complex128 and the default float32 gives complex64.

    ``forward(x [B, n, d_model]) -> [B, n, d_model]`` (real, the dtype of the parameters; the
    recurrence itself runs in float32 or wider, also after ``.half()`` / ``.bfloat16()``).
    """

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 6.283):
        super().__init__()
        self.d_model = check_int("d_model", d_model, 1)
        self.d_state = check_int("d_state", d_state, 1)
        check_range("r_min", r_min, 0.0, 1.0, low_open=True, high_open=True)
        check_range("r_max", r_max, 0.0, 1.0, low_open=True, high_open=True)
        if not r_min < r_max:
            raise ValueError(f"r_min, r_max: expected 0 < r_min < r_max < 1, "
                             f"got r_min={r_min!r}, r_max={r_max!r}")
        check_range("max_phase", max_phase, 0.0, low_open=True)
        self.r_min, self.r_max, self.max_phase = float(r_min), float(r_max), float(max_phase)
        self.nu_log = nn.Parameter(torch.empty(d_state))
        self.theta_log = nn.Parameter(torch.empty(d_state))
        self.gamma_log = nn.Parameter(torch.empty(d_state))
        self.B_re = nn.Parameter(torch.empty(d_state, d_model))
        self.B_im = nn.Parameter(torch.empty(d_state, d_model))
        self.C_re = nn.Parameter(torch.empty(d_model, d_state))
        self.C_im = nn.Parameter(torch.empty(d_model, d_state))
        self.D = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The ring initialisation (draws from torch's global generator)."""
        u1, u2 = torch.rand(self.d_state), torch.rand(self.d_state)
        # |lambda|^2 uniform in [r_min^2, r_max^2]: uniform in the ring's area
        nu = -0.5 * torch.log(u1 * (self.r_max ** 2 - self.r_min ** 2) + self.r_min ** 2)
        self.nu_log.copy_(torch.log(nu))
        self.theta_log.copy_(torch.log(self.max_phase * u2.clamp(min=1e-6)))
        self.gamma_log.copy_(0.5 * torch.log(-torch.expm1(-2 * nu)))  # log sqrt(1 - |lambda|^2)
        nn.init.normal_(self.B_re, std=1 / math.sqrt(2 * self.d_model))
        nn.init.normal_(self.B_im, std=1 / math.sqrt(2 * self.d_model))
        nn.init.normal_(self.C_re, std=1 / math.sqrt(self.d_state))
        nn.init.normal_(self.C_im, std=1 / math.sqrt(self.d_state))
        nn.init.normal_(self.D)

    def eigenvalues(self) -> torch.Tensor:
        """lambda = exp(-exp(nu) + i exp(theta)), complex ``[d_state]``."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating("x", x)
        if x.is_complex() or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected a real tensor of shape (B, n, d_model={self.d_model}), "
                             f"got {tuple(x.shape)} of dtype {x.dtype}")
        # the recurrence runs in float32 at least (complex half precision is not supported
        # everywhere, and |lambda| near 1 needs the mantissa); the output has the layer's dtype
        out_dtype = self.D.dtype
        work = torch.promote_types(out_dtype, torch.float32)
        p = {name: t.to(work) for name, t in self.named_parameters(recurse=False)}
        x = x.to(work)
        B = torch.complex(p["B_re"], p["B_im"]) * torch.exp(p["gamma_log"]).unsqueeze(-1)
        C = torch.complex(p["C_re"], p["C_im"])
        lam = torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))
        h = linear_scan(lam, x.to(B.dtype) @ B.mT)  # [B, n, d_state], eq. lra-lru
        return ((h @ C.mT).real + p["D"] * x).to(out_dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, r_min={self.r_min}, "
                f"r_max={self.r_max}, max_phase={self.max_phase}")

# === end lra-pretraining ===
