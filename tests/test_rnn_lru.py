"""Tests of companion.rnn, section lra-pretraining: DiagonalLinearRNN (the LRU layer) against a
Python loop over time, its gradients, its initialisation ring and its stability."""
import math

import pytest
import torch

from companion.rnn import DiagonalLinearRNN

F64 = torch.float64


def make(d_model=3, d_state=5, seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    return DiagonalLinearRNN(d_model, d_state, **kw).to(dtype)


def lru_loop(m, x):
    """The layer written out independently: one step at a time, from the raw parameters."""
    lam = torch.polar(torch.exp(-torch.exp(m.nu_log)), torch.exp(m.theta_log))
    gamma = torch.exp(m.gamma_log)
    B = torch.complex(m.B_re, m.B_im)
    C = torch.complex(m.C_re, m.C_im)
    h = torch.zeros(x.shape[0], m.d_state, dtype=B.dtype)
    out = []
    for t in range(x.shape[1]):
        u = x[:, t].to(B.dtype)
        h = lam * h + gamma * (u @ B.T)
        out.append((h @ C.T).real + m.D * x[:, t])
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 513])
def test_matches_loop_values_and_gradients(T):
    m = make(seed=T)
    x = torch.randn(2, T, 3, dtype=F64, generator=torch.Generator().manual_seed(T),
                    requires_grad=True)
    w = torch.randn(2, T, 3, dtype=F64)  # a random cotangent
    y, y_ref = m(x), lru_loop(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    params = [x] + list(m.parameters())
    # T = 1 never multiplies by lambda (h_0 = 0): its gradient is then exactly zero
    g = torch.autograd.grad((y * w).sum(), params, materialize_grads=True)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params, materialize_grads=True)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_close_to_float64():
    m64 = make(d_model=4, d_state=8, seed=1)
    m32 = make(d_model=4, d_state=8, seed=1, dtype=torch.float32)
    x = torch.randn(2, 300, 4, dtype=F64)
    y32 = m32(x.float())
    assert y32.dtype == torch.float32
    ref = m64(x)
    assert ((y32.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_keeps_the_recurrence_in_float32(dtype):
    m32 = make(d_model=4, d_state=8, seed=10, dtype=torch.float32)
    m16 = make(d_model=4, d_state=8, seed=10, dtype=dtype)
    x = torch.randn(2, 200, 4)
    y = m16(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    # the reference: float32 arithmetic on the same rounded weights and inputs, so that only
    # the final rounding of the output to ``dtype`` separates the two
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    ref = m32(x.to(dtype).float())
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 0.01
    y.float().square().mean().backward()
    assert all(p.grad.dtype == dtype for p in m16.parameters())


def test_gradcheck_float64():
    m = make(d_model=2, d_state=3, seed=2)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(1, 5, 2, dtype=F64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params)


def test_initial_eigenvalues_fill_the_ring():
    r_min, r_max, max_phase = 0.4, 0.95, math.pi
    m = make(d_model=2, d_state=20000, seed=3, dtype=torch.float32, r_min=r_min, r_max=r_max,
             max_phase=max_phase)
    lam = m.eigenvalues().detach().to(torch.complex128)
    r, phase = lam.abs(), lam.angle()
    assert r.min() >= r_min - 1e-6 and r.max() <= r_max + 1e-6
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-5
    # uniform in area: |lambda|^2 uniform on [r_min^2, r_max^2]; compare deciles (N = 20000:
    # each sample decile has standard error about 0.002 of the interval)
    q = torch.linspace(0.1, 0.9, 9, dtype=F64)
    expected = r_min ** 2 + q * (r_max ** 2 - r_min ** 2)
    torch.testing.assert_close(torch.quantile(r ** 2, q), expected, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.quantile(phase, q), q * max_phase, rtol=0, atol=0.03)
    # the normalisation starts at gamma = sqrt(1 - |lambda|^2)
    gamma = torch.exp(m.gamma_log.detach().double())
    torch.testing.assert_close(gamma, torch.sqrt(1 - r ** 2), rtol=1e-4, atol=1e-6)


def test_gamma_keeps_the_state_variance():
    """White-noise input: the stationary E|h_j|^2 equals E|(B u)_j|^2 (gamma's purpose)."""
    m = make(d_model=1, d_state=4, seed=4, r_min=0.9, r_max=0.99)
    with torch.no_grad():
        m.B_re.fill_(1.0), m.B_im.zero_()
        m.C_re.copy_(torch.eye(1, 4)), m.C_im.zero_(), m.D.zero_()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3000, 1, dtype=F64, generator=gen)
    lam = m.eigenvalues().detach()
    gamma = torch.exp(m.gamma_log.detach())
    from companion.rnn import linear_scan
    h = linear_scan(lam, gamma * x.to(lam.dtype))[:, 1000:]  # after the transient
    var = h.abs().square().mean((0, 1))
    torch.testing.assert_close(var, torch.ones(4, dtype=F64), rtol=0.1, atol=0)


def test_causal():
    m = make(seed=6)
    x = torch.randn(2, 40, 3, dtype=F64)
    x2 = x.clone()
    x2[:, 25:] += torch.randn(2, 15, 3, dtype=F64)
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :25], y2[:, :25])
    assert not torch.allclose(y[:, 25:], y2[:, 25:])


def test_stable_for_extreme_parameters():
    m = make(d_model=2, d_state=64, seed=7)
    with torch.no_grad():
        m.nu_log.copy_(torch.linspace(-50, 50, 64, dtype=F64))
        m.theta_log.copy_(torch.linspace(50, -50, 64, dtype=F64))
    lam = m.eigenvalues()
    assert (-torch.exp(m.nu_log) < 0).all()  # log|lambda| < 0 for every real nu
    assert (lam.abs() <= 1).all() and torch.isfinite(lam).all()
    x = torch.randn(1, 4096, 2, dtype=F64)
    y = m(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_inference_mode_and_no_grad():
    m = make(seed=8, dtype=torch.float32)
    x = torch.randn(2, 33, 3)
    ref = m(x)
    with torch.inference_mode():
        y = m(x)
    with torch.no_grad():
        z = m(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)


def test_torch_compile():
    """aot_eager traces the forward and the backward graph (the training path)."""
    m = make(seed=9, dtype=torch.float32)
    compiled = torch.compile(m, backend="aot_eager")
    x = torch.randn(2, 8, 3, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(m(x).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r_min=0.99, r_max=0.9), "r_min, r_max: expected 0 < r_min < r_max < 1"),
    (dict(r_min=0.0), r"r_min: expected a value in \(0.0, 1.0\)"),
    (dict(r_max=1.0), r"r_max: expected a value in \(0.0, 1.0\)"),
    (dict(max_phase=0.0), "max_phase: expected a value in"),
    (dict(d_model=0), "d_model: expected a value in"),
])
def test_bad_arguments(kwargs, match):
    args = dict(d_model=3, d_state=4) | kwargs
    with pytest.raises(ValueError, match=match):
        DiagonalLinearRNN(**args)


def test_bad_input():
    m = make(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: expected a real tensor of shape \(B, n, d_model=3\)"):
        m(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="x: expected a real tensor"):
        m(torch.randn(5, 3))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        m(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="d_state: expected an int"):
        DiagonalLinearRNN(3, 4.0)
