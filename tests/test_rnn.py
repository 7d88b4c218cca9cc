"""Tests of companion.rnn, section parallel-nonlinear-rnn: linear_scan, the tanh-RNN iterations,
deer_solve (values and implicit gradients) and ParallelIterRNN, each against a naive loop."""
import warnings

import pytest
import torch

from companion.rnn import (ParallelIterRNN, deer_solve, linear_scan, rnn_fixed_point_iterate,
                           tanh_rnn_sequential)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def scan_loop(a, b, h0=None):
    """x_t = a_t x_{t-1} + b_t by a Python loop over t (a: [d], [..., T, d] or [..., T, d, d])."""
    T, d = b.shape[-2:]
    dense = a.dim() == b.dim() + 1
    x = torch.zeros(b.shape[:-2] + (d,), dtype=torch.promote_types(a.dtype, b.dtype))
    if h0 is not None:
        x = x + h0
    out = []
    for t in range(T):
        a_t = a if a.dim() == 1 else a[..., t, :, :] if dense else a[..., t, :]
        x = (a_t @ x.unsqueeze(-1)).squeeze(-1) if dense else a_t * x
        x = x + b[..., t, :]
        out.append(x)
    return torch.stack(out, dim=-2)


def random_A(d, norm, g, dtype=F64):
    A = torch.randn(d, d, generator=g, dtype=dtype)
    return norm * A / torch.linalg.matrix_norm(A, 2)


def gru_loop(cell, x, h0):
    h, out = h0, []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        out.append(h)
    return torch.stack(out, 1)


# ---- linear_scan -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["const", "diag", "dense"])
@pytest.mark.parametrize("T", [1, 2, 5, 33])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_matches_loop(kind, T, with_h0):
    g, B, d = gen(T), 3, 4
    b = torch.randn(B, T, d, generator=g, dtype=F64)
    a = {"const": torch.rand(d, generator=g, dtype=F64),
         "diag": torch.rand(B, T, d, generator=g, dtype=F64),
         "dense": 0.5 * torch.randn(B, T, d, d, generator=g, dtype=F64)}[kind]
    h0 = torch.randn(B, d, generator=g, dtype=F64) if with_h0 else None
    torch.testing.assert_close(linear_scan(a, b, h0), scan_loop(a, b, h0), rtol=1e-12, atol=1e-12)


def test_linear_scan_complex_long():
    """Complex diagonal, T=1000: float64 to 1e-10; float32 to rtol 1e-5 with atol 1e-5."""
    g, B, T, d = gen(1), 2, 1000, 16
    r = 0.9 + 0.099 * torch.rand(d, generator=g, dtype=F64)
    lam = torch.polar(r, 6.283 * torch.rand(d, generator=g, dtype=F64))  # |lambda| < 1
    b = torch.complex(torch.randn(B, T, d, generator=g, dtype=F64),
                      torch.randn(B, T, d, generator=g, dtype=F64))
    h0 = torch.randn(B, d, generator=g, dtype=F64).to(torch.complex128)
    ref = scan_loop(lam, b, h0)
    torch.testing.assert_close(linear_scan(lam, b, h0), ref, rtol=1e-10, atol=1e-10)
    per_step = lam.expand(B, T, d)
    torch.testing.assert_close(linear_scan(per_step, b, h0), ref, rtol=1e-10, atol=1e-10)
    # complex64: |lambda| up to 0.999 lets the states reach ~30, so the error is measured against
    # the largest state, and against the complex64 loop
    args32 = (lam.to(torch.complex64), b.to(torch.complex64), h0.to(torch.complex64))
    err_scan = (linear_scan(*args32) - ref).abs().max() / ref.abs().max()
    err_loop = (scan_loop(*args32) - ref).abs().max() / ref.abs().max()
    assert err_scan < 1e-5 and err_scan <= 3 * err_loop + 1e-7


def test_linear_scan_dense_long():
    g, T, d = gen(2), 256, 8
    a = torch.randn(2, T, d, d, generator=g, dtype=F64) / d ** 0.5
    b = torch.randn(2, T, d, generator=g, dtype=F64)
    torch.testing.assert_close(linear_scan(a, b), scan_loop(a, b), rtol=1e-8, atol=1e-12)


def test_linear_scan_matches_torch_associative_scan():
    """An independent reference: torch's (private) generic associative scan, where it exists."""
    try:
        from torch._higher_order_ops.associative_scan import associative_scan
    except ImportError:
        pytest.skip("torch has no associative_scan")
    g = gen(3)
    a = 0.5 * torch.randn(2, 50, 3, 3, generator=g, dtype=F64)
    b = torch.randn(2, 50, 3, generator=g, dtype=F64)

    def combine(left, right):  # (a1, b1) then (a2, b2): (a2 a1, a2 b1 + b2)
        (a1, b1), (a2, b2) = left, right
        return a2 @ a1, (a2 @ b1.unsqueeze(-1)).squeeze(-1) + b2

    try:
        _, ref = associative_scan(combine, (a, b), dim=1, combine_mode="generic")
    except Exception as err:  # pragma: no cover - a private API that may change
        pytest.skip(f"torch's associative_scan is unavailable here: {err}")
    torch.testing.assert_close(linear_scan(a, b), ref, rtol=1e-12, atol=1e-12)


def test_linear_scan_broadcasting_and_dtype_promotion():
    g, B, T, d = gen(4), 3, 9, 5
    a = torch.rand(T, d, generator=g, dtype=F64).unsqueeze(0)  # [1, T, d] shared by the batch
    b = torch.randn(B, T, d, generator=g, dtype=F64)
    h0 = torch.randn(d, generator=g, dtype=F64)  # one h0 for every sequence
    torch.testing.assert_close(linear_scan(a, b, h0), scan_loop(a.expand(B, T, d), b, h0))
    lam = torch.polar(torch.full((d,), 0.9, dtype=F64), torch.rand(d, generator=g, dtype=F64))
    out = linear_scan(lam, b)  # complex a, real b -> complex result
    assert out.dtype == torch.complex128
    torch.testing.assert_close(out, scan_loop(lam, b.to(torch.complex128)))
    assert linear_scan(torch.rand(d), b[:, :0]).shape == (B, 0, d)


def test_linear_scan_extreme_values():
    """float32, T=4096, decays near 1 and a growing factor: finite, and as accurate (against
    float64) as the float32 loop, up to a factor 3."""
    g, T, d = gen(5), 4096, 4
    b = torch.randn(2, T, d, generator=g, dtype=F64)
    for a in (torch.tensor([0.0, 0.5, 0.999, 1.0], dtype=F64),
              torch.tensor([1.001, 0.9, -0.999, 0.0], dtype=F64)):
        ref = scan_loop(a, b)
        out = linear_scan(a.float(), b.float())
        assert torch.isfinite(out).all()
        err_scan = (out.double() - ref).abs().amax(dim=(0, 1))
        err_loop = (scan_loop(a.float(), b.float()).double() - ref).abs().amax(dim=(0, 1))
        assert (err_scan <= 3 * err_loop + 1e-6).all(), (err_scan, err_loop)
        assert (err_scan <= 1e-3 * ref.abs().amax(dim=(0, 1))).all()
    zero = linear_scan(torch.zeros(2, T, d, d, dtype=F64), b)  # a = 0: x = b exactly
    assert torch.equal(zero, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_scan_half_precision(dtype):
    """bf16/fp16 (for training the diagonal models): finite, and as accurate as the loop in the
    same dtype, up to a factor 3."""
    g, T, d = gen(20), 512, 8
    a = 0.5 + 0.49 * torch.rand(3, T, d, generator=g, dtype=F64)
    b = torch.randn(3, T, d, generator=g, dtype=F64)
    for a_, kind in ((a, "diag"), (a[0, 0], "const")):
        ref = scan_loop(a_, b)
        out = linear_scan(a_.to(dtype), b.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all(), kind
        err_scan = (out.double() - ref).abs().max()
        err_loop = (scan_loop(a_.to(dtype), b.to(dtype)).double() - ref).abs().max()
        assert err_scan <= 3 * err_loop, (kind, err_scan, err_loop)
        assert err_scan <= 0.05 * ref.abs().max(), (kind, err_scan)


def test_linear_scan_gradcheck():
    g = gen(6)
    a = (0.5 * torch.randn(2, 6, 3, 3, generator=g, dtype=F64)).requires_grad_()
    b = torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))
    lam = torch.complex(torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)).mul(0.6)
    lam.requires_grad_()
    bc = torch.randn(2, 7, 3, generator=g, dtype=F64).to(torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(linear_scan, (lam, bc))


def test_linear_scan_bad_inputs():
    b = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"a: expected shape \[d\] = \[3\]"):
        linear_scan(torch.rand(4), b)
    with pytest.raises(ValueError, match=r"a: expected shape .* got \(2, 5, 4\)"):
        linear_scan(torch.rand(2, 5, 4), b)
    with pytest.raises(ValueError, match=r"a: expected shape .* got \(2, 4, 3, 3\)"):
        linear_scan(torch.rand(2, 4, 3, 3), b)
    with pytest.raises(ValueError, match=r"a: leading dims \(4,\) do not broadcast"):
        linear_scan(torch.rand(4, 5, 3), b)
    with pytest.raises(ValueError, match=r"b: expected shape \[\.\.\., T, d\]"):
        linear_scan(torch.rand(3), torch.randn(3))
    with pytest.raises(ValueError, match=r"h0: expected shape \[\.\.\., d\] = \[\.\.\., 3\]"):
        linear_scan(torch.rand(3), b, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"h0: .* got \(7, 3\)"):
        linear_scan(torch.rand(3), b, torch.zeros(7, 3))
    with pytest.raises(TypeError, match=r"a: expected a floating-point tensor"):
        linear_scan(torch.ones(3, dtype=torch.long), b)


# ---- the tanh RNN and its parallel iterations ------------------------------------------------
def test_tanh_rnn_sequential_matches_nn_rnn():
    """x_t = tanh(A x_{t-1} + u_t) is nn.RNN with W_ih = I, W_hh = A and no biases."""
    g, d = gen(7), 5
    A, u = random_A(d, 0.9, g), torch.randn(3, 20, d, generator=g, dtype=F64)
    h0 = torch.randn(3, d, generator=g, dtype=F64)
    rnn = torch.nn.RNN(d, d, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.eye(d))
        rnn.weight_hh_l0.copy_(A)
        ref, _ = rnn(u, h0.unsqueeze(0))
    torch.testing.assert_close(tanh_rnn_sequential(A, u, h0), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["picard", "sech_u", "newton"])
def test_fixed_point_finite_termination(mode):
    """After n iterations the first n steps are exact, even where the iteration is far off."""
    g, T, d = gen(8), 32, 6
    A, u = random_A(d, 1.2, g), torch.randn(2, T, d, generator=g, dtype=F64)
    h0 = 0.5 * torch.randn(2, d, generator=g, dtype=F64)
    ref = tanh_rnn_sequential(A, u, h0)
    iterates = rnn_fixed_point_iterate(A, u, 10, mode, return_all=True, h0=h0)
    assert iterates.shape == (10, 2, T, d)
    for n in range(1, 11):
        err = (iterates[n - 1] - ref)[..., :n, :].abs().max()
        assert err < 1e-12, (n, err)
    assert (iterates[0] - ref).abs().max() > 1e-3  # ... while the rest is not yet exact
    full = rnn_fixed_point_iterate(A, u, T, mode, h0=h0)  # T iterations: exact everywhere
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-10)


def test_fixed_point_continues_from_h_init():
    g = gen(9)
    A, u = random_A(4, 0.9, g), torch.randn(2, 30, 4, generator=g, dtype=F64)
    for mode in ("picard", "sech_u", "newton"):
        three = rnn_fixed_point_iterate(A, u, 3, mode)
        one = rnn_fixed_point_iterate(A, u, 1, mode, h_init=rnn_fixed_point_iterate(A, u, 2, mode))
        torch.testing.assert_close(one, three, rtol=1e-12, atol=1e-12)


def _errors(A, u, mode, num_iters):
    ref = tanh_rnn_sequential(A, u)
    its = rnn_fixed_point_iterate(A, u, num_iters, mode, return_all=True)
    return [(x - ref).abs().max().item() for x in its]


def _local_order(errs):
    """p = log(e_{n+1}/e_n) / log(e_n/e_{n-1}) on the last three errors > 1e-13 (e_{n-1} < 0.1)."""
    ok = [e for e in errs if e > 1e-13]
    e0, e1, e2 = ok[-3:]
    assert e0 < 0.1
    return torch.tensor(e2 / e1).log().item() / torch.tensor(e1 / e0).log().item()


def _fitted_order(errs):
    """Least-squares slope of log e_{n+1} on log e_n over the errors in (1e-13, 1e-2)."""
    pts = torch.tensor([(a, b) for a, b in zip(errs, errs[1:]) if a < 1e-2 and b > 1e-13]).log()
    x, y = pts[:, 0] - pts[:, 0].mean(), pts[:, 1] - pts[:, 1].mean()
    return ((x * y).sum() / (x * x).sum()).item()


def test_picard_linear_and_newton_quadratic():
    g, d = gen(10), 8
    A, u = random_A(d, 0.5, g), 0.5 * torch.randn(2, 1000, d, generator=g, dtype=F64)
    errs = _errors(A, u, "picard", 30)
    n_picard = next(n for n, e in enumerate(errs, 1) if e < 1e-6)
    assert n_picard < 15  # far fewer than T = 1000
    assert 0.9 < _fitted_order(errs) < 1.1  # a linear rate (the local order is noisy here)
    A, u = random_A(d, 0.9, g), torch.randn(2, 512, d, generator=g, dtype=F64)
    errs = _errors(A, u, "newton", 12)
    assert errs[-1] < 1e-14
    assert 1.7 < _local_order(errs) < 2.3  # a quadratic rate


def test_fixed_point_gradcheck():
    g = gen(11)
    A = random_A(3, 0.9, g).requires_grad_()
    u = torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True)
    for mode in ("picard", "sech_u", "newton"):
        assert torch.autograd.gradcheck(lambda A, u: rnn_fixed_point_iterate(A, u, 3, mode), (A, u))


def test_fixed_point_extreme_inputs():
    """|u| = 1e4 saturates tanh (sech^2 underflows to 0, not NaN): the linearisations at u and at
    the previous iterate are exact after two steps, while Picard only advances its exact prefix."""
    g, T = gen(12), 50
    A, u = random_A(4, 0.9, g), 1e4 * torch.randn(2, T, 4, generator=g, dtype=F64)
    ref = tanh_rnn_sequential(A, u)
    for mode in ("sech_u", "newton"):
        out = rnn_fixed_point_iterate(A, u, 2, mode)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out = rnn_fixed_point_iterate(A, u, 5, "picard")
    assert torch.isfinite(out).all() and (out - ref)[:, :5].abs().max() < 1e-12
    torch.testing.assert_close(rnn_fixed_point_iterate(A, u, T, "picard"), ref, rtol=0, atol=1e-12)


def test_fixed_point_bad_inputs():
    A, u = torch.eye(3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"num_iters: expected a value in \[1, inf\], got 0"):
        rnn_fixed_point_iterate(A, u, 0)
    with pytest.raises(ValueError, match=r"mode: expected one of 'picard' \| 'sech_u' \| 'newton'"):
        rnn_fixed_point_iterate(A, u, 2, mode="jacobi")
    with pytest.raises(ValueError, match=r"A: expected shape \(d, d\) = \(3, 3\)"):
        rnn_fixed_point_iterate(torch.eye(4), u, 2)
    with pytest.raises(ValueError, match=r"h_init: expected the shape of u"):
        rnn_fixed_point_iterate(A, u, 2, h_init=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 3\)"):
        tanh_rnn_sequential(A, u, torch.zeros(3))


# ---- deer_solve ------------------------------------------------------------------------------
def test_deer_tanh_matches_sequential():
    g, d = gen(13), 8
    A = random_A(d, 1.2, g)
    u = torch.randn(4, 300, d, generator=g, dtype=F64)
    h0 = torch.randn(4, d, generator=g, dtype=F64)
    out, num_iters = deer_solve(lambda h, x: torch.tanh(h @ A.T + x), h0, u,
                                return_num_iters=True)
    torch.testing.assert_close(out, tanh_rnn_sequential(A, u, h0), rtol=0, atol=1e-10)
    assert num_iters.shape == (4,) and num_iters.max() <= 12


def test_deer_gru_values_and_gradients_match_bptt():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 6).double()
    g = gen(14)
    x = torch.randn(3, 80, 3, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    ref = gru_loop(cell, x, h0)
    out = deer_solve(lambda h, u: cell(u, h), h0, x)  # a closure over an nn.GRUCell
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    w = torch.randn(ref.shape, generator=g, dtype=F64)
    wrt = [x, h0, *cell.parameters()]
    grads_ref = torch.autograd.grad((ref * w).sum(), wrt)
    grads = torch.autograd.grad((out * w).sum(), wrt)
    for name, gr, gd in zip(["inputs", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"],
                            grads_ref, grads):
        torch.testing.assert_close(gd, gr, rtol=1e-6, atol=1e-12, msg=name)


def test_deer_module_step_and_global_closure():
    """step may be an nn.Module with forward(h, u); its parameters receive gradients."""

    class TanhCell(torch.nn.Module):
        def __init__(self, d_in, d):
            super().__init__()
            self.lin_h = torch.nn.Linear(d, d, bias=False)
            self.lin_u = torch.nn.Linear(d_in, d)

        def forward(self, h, u):
            return torch.tanh(self.lin_h(h) + self.lin_u(u))

    torch.manual_seed(1)
    cell = TanhCell(2, 5).double()
    x = torch.randn(2, 40, 2, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)
    out = deer_solve(cell, h0, x)
    h, ref = h0, []
    for t in range(40):
        h = cell(h, x[:, t])
        ref.append(h)
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    params = list(cell.parameters())
    for gd, gr in zip(torch.autograd.grad(out.square().sum(), params),
                      torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(gd, gr, rtol=1e-6, atol=1e-12)


def test_deer_gradcheck():
    g = gen(15)
    W = (0.5 * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_()
    x = torch.randn(2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)

    def fn(W, h0, x):
        return deer_solve(lambda h, u: torch.tanh(h @ W.T + u), h0, x)

    assert torch.autograd.gradcheck(fn, (W, h0, x))


def test_deer_finite_termination_and_warning():
    """k Newton iterations make the first k steps exact; an unconverged solve warns."""
    g, d, T = gen(16), 4, 30
    A = random_A(d, 1.2, g)
    u = 2 * torch.randn(2, T, d, generator=g, dtype=F64)
    step = lambda h, x: torch.tanh(h @ A.T + x)  # noqa: E731
    ref = tanh_rnn_sequential(A, u)
    for k in (1, 2, 3):
        with pytest.raises(RuntimeError, match=rf"max_iter={k} Newton iterations .*allow_unc"):
            deer_solve(step, torch.zeros(2, d, dtype=F64), u, max_iter=k, tol=1e-30)
        with pytest.warns(RuntimeWarning, match=rf"max_iter={k} Newton iterations .*> tol=1e-30"):
            out = deer_solve(step, torch.zeros(2, d, dtype=F64), u, max_iter=k, tol=1e-30,
                             allow_unconverged=True)
        # the returned states are one step evaluation past iterate k: exact up to step k + 1
        assert (out - ref)[:, :k + 1].abs().max() < 1e-12
        assert (out - ref).abs().max() > 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default max_iter = min(T, 100) converges silently
        out = deer_solve(step, torch.zeros(2, d, dtype=F64), u)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_deer_float32_and_extreme_inputs():
    torch.manual_seed(2)
    cell = torch.nn.GRUCell(3, 5).double()
    x = torch.randn(2, 500, 3, dtype=F64)
    ref = gru_loop(cell, x, torch.zeros(2, 5, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out32 = deer_solve(lambda h, u: cell.float()(u, h), torch.zeros(2, 5), x.float())
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-5)
    cell.double()
    A = random_A(4, 0.9, gen(17))
    u = 1e4 * torch.randn(2, 100, 4, dtype=F64)  # saturated tanh: Jacobians underflow to 0
    out = deer_solve(lambda h, v: torch.tanh(h @ A.T + v), torch.zeros(2, 4, dtype=F64), u)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, tanh_rnn_sequential(A, u), rtol=0, atol=1e-12)


def test_deer_bad_inputs():
    step = lambda h, u: torch.tanh(h + u)  # noqa: E731
    x, h0 = torch.randn(2, 5, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"inputs: expected shape \(B, T, D\), got \(5, 3\)"):
        deer_solve(step, h0, x[0])
    with pytest.raises(ValueError, match=r"h0: expected shape \(B, H\) with B = .* got \(3, 3\)"):
        deer_solve(step, torch.zeros(3, 3), x)
    with pytest.raises(ValueError, match=r"h0: expected shape \(B, H\) .* got \(2,\)"):
        deer_solve(step, torch.zeros(2), x)
    with pytest.raises(TypeError, match=r"step: expected a callable"):
        deer_solve("tanh", h0, x)
    with pytest.raises(ValueError, match=r"step: expected step\(h, u\) of shape \(10, 3\)"):
        deer_solve(lambda h, u: h[:, :2], h0, x)
    with pytest.raises(ValueError, match=r"max_iter: expected a value in \[1, inf\], got 0"):
        deer_solve(step, h0, x, max_iter=0)
    with pytest.raises(ValueError, match=r"tol: expected a value in \[0.0, inf\], got -1"):
        deer_solve(step, h0, x, tol=-1)
    with pytest.raises(TypeError, match=r"h0: expected the dtype of inputs \(torch.float64\)"):
        deer_solve(step, h0, x.double())
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point tensor"):
        deer_solve(step, h0, torch.ones(2, 5, 3, dtype=torch.long))


# ---- ParallelIterRNN -------------------------------------------------------------------------
@pytest.mark.parametrize("diagonal", [True, False])
def test_parallel_iter_rnn_limits(diagonal):
    """K = T iterations: the non-linear RNN; K = 1: the linear RNN driven by P tanh(u_t)."""
    torch.manual_seed(3)
    T, d = 7, 5
    model = ParallelIterRNN(3, d, num_iters=T, diagonal=diagonal).double()
    with torch.no_grad():  # move away from the initialisation PQ = Lambda, A = Lambda
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, T, 3, dtype=F64)
    h0 = 0.3 * torch.randn(2, d, dtype=F64)
    u = model.input(x)
    if diagonal:
        lam, P, Q = torch.sigmoid(model.theta), model.P, model.Q
        y, ref = h0, []
        for t in range(T):
            y = torch.tanh(y @ Q.T + u[:, t]) @ P.T
            ref.append(y)
        ref = torch.stack(ref, 1)
        linear = linear_scan(lam, torch.tanh(u) @ P.T)
    else:
        ref = tanh_rnn_sequential(model.A, u, h0)
        linear = linear_scan(model.A.expand(1, T, d, d), torch.tanh(u))
    out = model(x, h0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    model.num_iters = 1
    torch.testing.assert_close(model(x), linear, rtol=1e-12, atol=1e-12)
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_parallel_iter_rnn_init_and_bad_inputs():
    model = ParallelIterRNN(4, 6)
    torch.testing.assert_close(model.P @ model.Q, torch.diag(torch.sigmoid(model.theta)))
    assert model(torch.randn(2, 9, 4)).shape == (2, 9, 6)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, d_in=4\), got \(2, 9, 3\)"):
        model(torch.randn(2, 9, 3))
    with pytest.raises(ValueError, match=r"num_iters: expected a value in \[1, inf\], got 0"):
        ParallelIterRNN(4, 6, num_iters=0)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_deer_short_sequences_do_not_warn(T, dtype):
    """T iterations are exact: no false 'did not converge' for short sequences."""
    g = gen(3)
    A = random_A(4, 0.9, g).to(dtype)
    u = torch.randn(2, T, 4, generator=g, dtype=F64).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = deer_solve(lambda h, x: torch.tanh(h @ A.T + x), torch.zeros(2, 4, dtype=dtype), u)
    ref = tanh_rnn_sequential(A.double(), u.double())
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)


def test_deer_expanding_cell_raises_instead_of_nan():
    g = gen(4)
    u = torch.randn(1, 200, 3, generator=g, dtype=F64)
    step = lambda h, x: 3.0 * h + x + h ** 3  # noqa: E731  (blows up: no finite solution path)
    with pytest.raises(RuntimeError, match="did not converge"):
        deer_solve(step, torch.ones(1, 3, dtype=F64), u)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_deer_under_no_grad_and_inference_mode(ctx):
    g = gen(5)
    A = random_A(3, 0.9, g)
    u = torch.randn(2, 6, 3, generator=g, dtype=F64)
    cell = torch.nn.GRUCell(3, 3).double()
    ref = deer_solve(lambda h, x: cell(x, h), torch.zeros(2, 3, dtype=F64), u).detach()
    with ctx():
        out = deer_solve(lambda h, x: cell(x, h), torch.zeros(2, 3, dtype=F64), u)
    torch.testing.assert_close(out, ref)
    assert A is not None


def test_deer_double_backward_raises():
    g = gen(6)
    A = random_A(3, 0.9, g).requires_grad_()
    u = torch.randn(1, 5, 3, generator=g, dtype=F64)
    out = deer_solve(lambda h, x: torch.tanh(h @ A.T + x), torch.zeros(1, 3, dtype=F64), u)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.pow(2).sum(), A, create_graph=True)
    (gA,) = torch.autograd.grad(out.pow(2).sum(), A)  # first order still works
    assert torch.isfinite(gA).all()


class _InPlaceTanh(torch.autograd.Function):
    """tanh whose backward multiplies in place into an unbatched tensor: vmap (and so the
    batched Jacobian) refuses it, and deer_solve takes one vjp per row instead."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (1 - y * y).mul_(g)


def test_deer_cell_that_vmap_refuses_uses_row_by_row_jacobians():
    g = gen(7)
    A = random_A(3, 0.9, g)
    u = torch.randn(2, 6, 3, generator=g, dtype=F64)
    h = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    f = _InPlaceTanh.apply(h @ A.T + u[:, 0])
    eye = torch.eye(3, dtype=F64).unsqueeze(1).expand(3, *f.shape)
    with pytest.raises(RuntimeError, match="vmap"):  # the batched path really is refused
        torch.autograd.grad(f, h, eye, is_grads_batched=True)
    out = deer_solve(lambda h, x: _InPlaceTanh.apply(h @ A.T + x), torch.zeros(2, 3, dtype=F64), u)
    torch.testing.assert_close(out, tanh_rnn_sequential(A, u), rtol=0, atol=1e-12)
