"""Tests of companion.losses, section multitask-loss-weighting: multitask_loss, prior losses,
normalized_gradient_combine."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from companion.losses import (
    multitask_loss,
    normalized_gradient_combine,
    prior_loss_classification,
    prior_loss_regression,
)


def _toy(seed=0, scale_b=1.0, shift_b=0.0, dtype=torch.float64):
    """Parameters theta and two task losses of it: a 3-way cross-entropy and a squared error."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (12,), generator=g)
    t = torch.randn(12, generator=g, dtype=dtype)
    W = (0.3 * torch.randn(4, 3, generator=g, dtype=dtype)).requires_grad_()
    v = (0.3 * torch.randn(4, generator=g, dtype=dtype)).requires_grad_()
    def losses():
        shared = torch.tanh(x @ W)                                      # both tasks use W
        l_a = F.cross_entropy(shared, y)
        l_b = scale_b * ((shared.sum(1) * (x @ v) - t) ** 2).mean() + shift_b
        return [l_a, l_b]
    return [W, v], losses


def _grads(params, loss):
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


# --- reference values -------------------------------------------------------------------------
def test_values_equal_loops():
    L = [0.3, 2.0, 7.5]
    t = torch.tensor(L, dtype=torch.float64)
    ref = [0.5, 1.0, 3.0]
    assert multitask_loss(t, "sum").item() == pytest.approx(sum(L), rel=1e-14)
    for mode in ("initial", "prior"):
        got = multitask_loss(t, mode, ref=torch.tensor(ref, dtype=torch.float64)).item()
        assert got == pytest.approx(sum(a / b for a, b in zip(L, ref)), rel=1e-14)
    assert multitask_loss(t, "realtime").item() == pytest.approx(3.0, rel=1e-14)
    for gamma in (-3.0, -1.0, 0.5, 1.0, 2.0):
        ref_mean = (sum(v ** gamma for v in L) / 3) ** (1 / gamma)
        assert multitask_loss(t, "generalized_mean", gamma=gamma).item() == pytest.approx(ref_mean, rel=1e-12)
    assert multitask_loss(t, "generalized_mean").item() == pytest.approx(math.prod(L) ** (1 / 3), rel=1e-12)


def test_sequence_and_tensor_inputs_agree():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)  # shape [1] is accepted as a scalar
    out = multitask_loss([a, b], "generalized_mean", gamma=2.0)
    out.backward()
    t = torch.tensor([0.7, 3.0], dtype=torch.float64, requires_grad=True)
    multitask_loss(t, "generalized_mean", gamma=2.0).backward()
    torch.testing.assert_close(torch.stack([a.grad, b.grad[0]]), t.grad, rtol=1e-14, atol=0)


# "realtime" is left out: its value is the constant n (a stop-gradient form), so finite differences
# are 0 by design; its gradient is checked against sum_i grad L_i / L_i below.
@pytest.mark.parametrize("mode,kw", [("sum", {}), ("initial", {"ref": [0.5, 2.0, 4.0]}),
                                     ("generalized_mean", {"gamma": 0.0}), ("generalized_mean", {"gamma": 2.0}),
                                     ("generalized_mean", {"gamma": -1.5})])
def test_gradcheck(mode, kw):
    L = torch.tensor([0.4, 1.7, 5.0], dtype=torch.float64, requires_grad=True)
    kw = {k: (torch.tensor(v, dtype=torch.float64) if k == "ref" else v) for k, v in kw.items()}
    assert torch.autograd.gradcheck(lambda x: multitask_loss(x, mode, **kw), (L,))


def test_realtime_gradient_is_gradient_of_sum_of_logs():
    params, losses = _toy()
    g_rt = _grads(params, multitask_loss(losses(), "realtime"))
    g_log = _grads(params, sum(torch.log(l) for l in losses()))
    # the loop: sum_i grad L_i / L_i
    g_loop = [torch.zeros_like(p) for p in params]
    for l in losses():
        for acc, gi in zip(g_loop, _grads(params, l)):
            acc += gi / l.item()
    for a, b, c in zip(g_rt, g_log, g_loop):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


def test_generalized_mean_effective_weights():
    # d M / d L_i = (1/n) (L_i / M)^(gamma - 1)
    L = torch.tensor([0.4, 1.7, 5.0], dtype=torch.float64, requires_grad=True)
    for gamma in (-2.0, 0.0, 0.5, 3.0):
        M = multitask_loss(L, "generalized_mean", gamma=gamma)
        (g,) = torch.autograd.grad(M, L)
        torch.testing.assert_close(g, (L.detach() / M.detach()) ** (gamma - 1) / 3, rtol=1e-12, atol=0)


# --- invariances ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["initial", "prior", "realtime"])
def test_scale_invariance(mode):
    c = 1000.0
    params, losses = _toy()
    params_c, losses_c = _toy(scale_b=c)
    ref = torch.tensor([1.1, 0.8], dtype=torch.float64)
    kw = {"ref": ref} if mode != "realtime" else {}
    kw_c = {"ref": ref * torch.tensor([1.0, c], dtype=torch.float64)} if mode != "realtime" else {}
    g = _grads(params, multitask_loss(losses(), mode, **kw))
    g_c = _grads(params_c, multitask_loss(losses_c(), mode, **kw_c))
    for a, b in zip(g, g_c):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_sum_is_not_scale_invariant():
    params, losses = _toy()
    params_c, losses_c = _toy(scale_b=1000.0)
    g = torch.cat([x.flatten() for x in _grads(params, multitask_loss(losses(), "sum"))])
    g_c = torch.cat([x.flatten() for x in _grads(params_c, multitask_loss(losses_c(), "sum"))])
    assert F.cosine_similarity(g, g_c, dim=0) < 0.99


def test_geometric_mean_direction_is_scale_invariant_power_mean_is_not():
    def direction(gamma, scale_b):
        params, losses = _toy(scale_b=scale_b)
        g = torch.cat([x.flatten() for x in _grads(params, multitask_loss(losses(), "generalized_mean", gamma=gamma))])
        return g / g.norm()
    torch.testing.assert_close(direction(0.0, 1.0), direction(0.0, 1000.0), rtol=0, atol=1e-10)
    assert (direction(2.0, 1.0) - direction(2.0, 1000.0)).norm() > 1e-2


def test_generalized_mean_homogeneous_limits_monotone():
    g = torch.Generator().manual_seed(3)
    L = torch.rand(7, generator=g, dtype=torch.float64) * 10 + 0.1
    geo = L.log().mean().exp()
    torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=1e-6), geo, rtol=1e-5, atol=0)
    # continuous through gamma = 0: no cancellation for tiny |gamma|
    for gamma in (1e-12, -1e-12):
        torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=gamma), geo, rtol=1e-10, atol=0)
    for gamma in (1e-3, -0.05, 0.3, 2.5):
        direct = ((L ** gamma).mean()) ** (1 / gamma)
        torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=gamma), direct, rtol=1e-9, atol=0)
    torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=200.0), L.max(), rtol=1e-2, atol=0)
    torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=-200.0), L.min(), rtol=1e-2, atol=0)
    torch.testing.assert_close(multitask_loss(L, "generalized_mean", gamma=1.0), L.mean(), rtol=1e-12, atol=0)
    grid = torch.linspace(-20, 20, 81, dtype=torch.float64)
    means = torch.stack([multitask_loss(L, "generalized_mean", gamma=float(gm)) for gm in grid])
    assert (means.diff() >= -1e-12).all()
    for gamma in (-2.0, 0.0, 3.0):   # M(c L) = c M(L)
        torch.testing.assert_close(multitask_loss(5.0 * L, "generalized_mean", gamma=gamma),
                                   5.0 * multitask_loss(L, "generalized_mean", gamma=gamma), rtol=1e-12, atol=0)


def test_realtime_is_not_shift_invariant():
    params, losses = _toy()
    params_s, losses_s = _toy(shift_b=5.0)
    g = torch.cat([x.flatten() for x in _grads(params, multitask_loss(losses(), "realtime"))])
    g_s = torch.cat([x.flatten() for x in _grads(params_s, multitask_loss(losses_s(), "realtime"))])
    assert F.cosine_similarity(g, g_s, dim=0) < 0.999


# --- normalized_gradient_combine -------------------------------------------------------------
def test_normalized_gradient_combine_equals_loop_and_unit_norms():
    params, losses = _toy()
    got = normalized_gradient_combine(losses(), params)
    ref = [torch.zeros_like(p) for p in params]
    for l in losses():
        gs = _grads(params, l)
        norm = math.sqrt(sum(float((gi ** 2).sum()) for gi in gs))
        assert norm > 0
        contrib = [gi / norm for gi in gs]
        assert math.sqrt(sum(float((c ** 2).sum()) for c in contrib)) == pytest.approx(1.0, abs=1e-12)
        for acc, c in zip(ref, contrib):
            acc += c
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_normalized_gradient_combine_scale_and_shift_invariant():
    params, losses = _toy()
    params_c, losses_c = _toy(scale_b=1e4, shift_b=-3.0)
    for a, b in zip(normalized_gradient_combine(losses(), params), normalized_gradient_combine(losses_c(), params_c)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_normalized_gradient_combine_unused_params_and_tensor_losses():
    params, losses = _toy()
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = normalized_gradient_combine(torch.stack(losses()), params + [unused])
    assert out[-1].abs().max() == 0 and len(out) == 3
    for a, b in zip(out[:2], normalized_gradient_combine(losses(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


# --- prior losses ----------------------------------------------------------------------------
def test_prior_loss_classification_is_entropy_and_constant_predictor_ce():
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 3, 1, 0, 3])       # class 2 never occurs
    H = prior_loss_classification(labels, 4)
    freq = torch.bincount(labels, minlength=4).double() / labels.numel()
    p = [c / 10 for c in (3, 2, 0, 5)]
    assert H.dtype == torch.float64
    assert H.item() == pytest.approx(-sum(q * math.log(q) for q in p if q > 0), rel=1e-14)
    # CE of the constant predictor whose logits are log(freq) (-inf for the empty class is fine)
    logits = freq.log().expand(10, 4)
    torch.testing.assert_close(F.cross_entropy(logits, labels), H, rtol=0, atol=1e-10)


def test_prior_loss_regression_is_variance_and_mean_predictor_mse():
    g = torch.Generator().manual_seed(4)
    y = 3 + 2 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    V = prior_loss_regression(y)
    mse_of_mean = ((y - y.mean(0)) ** 2).sum(1).mean()
    torch.testing.assert_close(V, mse_of_mean, rtol=0, atol=1e-10)
    assert V.item() == pytest.approx(float(np.var(y.numpy(), axis=0).sum()), rel=1e-12)
    y1 = y[:, 0]
    assert prior_loss_regression(y1).item() == pytest.approx(float(np.var(y1.numpy())), rel=1e-12)
    # the mean is the best constant: any other constant has a larger squared error
    assert ((y - y.mean(0) - 0.1) ** 2).sum(1).mean() > V


# --- extreme inputs and low precision -----------------------------------------------------------
def test_extreme_losses_are_finite():
    L = torch.tensor([1e-30, 1.0, 1e30], dtype=torch.float64, requires_grad=True)
    for mode, kw in [("realtime", {}), ("generalized_mean", {"gamma": 200.0}),
                     ("generalized_mean", {"gamma": -200.0}), ("generalized_mean", {"gamma": 0.0})]:
        out = multitask_loss(L, mode, **kw)
        (g,) = torch.autograd.grad(out, L)
        assert torch.isfinite(out) and torch.isfinite(g).all(), (mode, kw)
    zero = torch.tensor([0.0, 2.0], requires_grad=True)   # a loss of exactly 0: clamped by eps
    out = multitask_loss(zero, "realtime")
    (g,) = torch.autograd.grad(out, zero)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    big = torch.tensor([3e38, 1e-3])                       # float32: L^gamma would overflow
    assert torch.isfinite(multitask_loss(big, "generalized_mean", gamma=2.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype):
    L32 = torch.tensor([0.37, 2.5, 11.0])
    for mode, kw in [("sum", {}), ("realtime", {}), ("initial", {"ref": torch.tensor([1.0, 2.0, 4.0])}),
                     ("generalized_mean", {"gamma": 0.0}), ("generalized_mean", {"gamma": 2.0})]:
        lo = L32.to(dtype).requires_grad_()
        hi = L32.to(dtype).float().requires_grad_()
        out_lo, out_hi = multitask_loss(lo, mode, **kw), multitask_loss(hi, mode, **kw)
        (g_lo,), (g_hi,) = torch.autograd.grad(out_lo, lo), torch.autograd.grad(out_hi, hi)
        assert out_lo.dtype == dtype
        torch.testing.assert_close(out_lo.float(), out_hi, rtol=2e-2, atol=0)
        torch.testing.assert_close(g_lo.float(), g_hi, rtol=2e-2, atol=1e-3)


# --- bad inputs ---------------------------------------------------------------------------------
def test_multitask_loss_bad_inputs():
    L = torch.tensor([0.5, 2.0])
    with pytest.raises(ValueError, match="mode: expected one of"):
        multitask_loss(L, "geometric")
    with pytest.raises(ValueError, match="ref: mode 'initial' needs the reference losses"):
        multitask_loss(L, "initial")
    with pytest.raises(ValueError, match="ref: expected every reference loss > 0"):
        multitask_loss(L, "prior", ref=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"ref: expected shape \(2,\)"):
        multitask_loss(L, "prior", ref=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="ref: only used by modes 'initial' and 'prior'"):
        multitask_loss(L, "realtime", ref=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="gamma: only used by mode 'generalized_mean'"):
        multitask_loss(L, "realtime", gamma=2.0)
    with pytest.raises(ValueError, match="losses: mode 'realtime' takes logs"):
        multitask_loss(torch.tensor([0.5, -0.1]), "realtime")
    with pytest.raises(ValueError, match="losses: mode 'generalized_mean' takes logs"):
        multitask_loss(torch.tensor([0.5, -0.1]), "generalized_mean", gamma=1.0)
    with pytest.raises(TypeError, match="losses: expected a floating-point tensor"):
        multitask_loss(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"losses: expected a 1-D tensor \[n\]"):
        multitask_loss(torch.ones(2, 2))
    with pytest.raises(TypeError, match="losses: expected a 1-D tensor or a non-empty sequence"):
        multitask_loss([])
    with pytest.raises(ValueError, match=r"losses\[1\]: expected a scalar loss"):
        multitask_loss([torch.tensor(1.0), torch.ones(3)])
    with pytest.raises(TypeError, match=r"losses\[0\]: expected a torch.Tensor"):
        multitask_loss([1.0, torch.tensor(2.0)])
    with pytest.raises(ValueError, match="eps: expected a value in"):
        multitask_loss(L, eps=0.0)
    # sum accepts negative losses
    assert multitask_loss(torch.tensor([0.5, -0.1]), "sum").item() == pytest.approx(0.4)


def test_prior_and_combine_bad_inputs():
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        prior_loss_classification(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 2\]"):
        prior_loss_classification(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="labels: expected at least one label"):
        prior_loss_classification(torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_classes: expected a value in"):
        prior_loss_classification(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="y: expected a floating-point tensor"):
        prior_loss_regression(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"y: expected a non-empty tensor \[N\] or \[N, d\]"):
        prior_loss_regression(torch.ones(2, 2, 2))
    params, losses = _toy()
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        normalized_gradient_combine(losses(), [])
    with pytest.raises(ValueError, match=r"params\[0\]: expected a tensor with requires_grad=True"):
        normalized_gradient_combine(losses(), [torch.zeros(2)])
    with pytest.raises(ValueError, match="losses: expected losses computed from params"):
        normalized_gradient_combine(torch.tensor([1.0, 2.0]), params)
