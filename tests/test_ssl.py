"""Tests of companion.ssl (section simsiam-dynamics): simsiam_loss against torch's cosine
similarity, scalar_simsiam_flow against autograd and its conserved quantities under scipy's
solve_ivp, SimSiamHead's layout, and output_std against a numpy reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp

from companion.ssl import SimSiamHead, output_std, scalar_simsiam_flow, simsiam_loss

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- simsiam_loss ----------------------------------------------------------------------------
def naive_loss(p1, z2, p2=None, z1=None):
    one = -F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
    if p2 is None:
        return one
    return 0.5 * (one - F.cosine_similarity(p2, z1.detach(), dim=-1).mean())


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6), (1, 1)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_simsiam_loss_matches_cosine_similarity(shape, symmetric):
    g = gen(len(shape))
    p1, z2, p2, z1 = (torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
                      for _ in range(4))
    args = (p1, z2, p2, z1) if symmetric else (p1, z2)
    ours, ref = simsiam_loss(*args), naive_loss(*args)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    inputs = (p1, p2) if symmetric else (p1,)
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_simsiam_loss_stops_the_gradient_on_the_targets():
    g = gen(1)
    p1, z2, p2, z1 = (torch.randn(8, 4, generator=g, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, z2, p2, z1)
    grads = torch.autograd.grad(loss, (p1, z2, p2, z1), allow_unused=True)
    assert grads[1] is None and grads[3] is None          # no path from the loss to z
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    # a shared encoder: z depends on the same weight as p; only the p path carries gradient
    w = torch.randn(4, 4, generator=g, dtype=F64, requires_grad=True)
    x1, x2 = torch.randn(2, 8, 4, generator=g, dtype=F64)
    pred = torch.randn(4, 4, generator=g, dtype=F64)
    gw = torch.autograd.grad(simsiam_loss((x1 @ w) @ pred, x2 @ w), w)[0]
    gw_ref = torch.autograd.grad(naive_loss((x1 @ w) @ pred, (x2 @ w).detach()), w)[0]
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_simsiam_loss_gradcheck():
    g = gen(2)
    p1, p2 = (torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    z1, z2 = (torch.randn(5, 3, generator=g, dtype=F64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: simsiam_loss(a, z2, b, z1), (p1, p2))
    assert torch.autograd.gradgradcheck(lambda a: simsiam_loss(a, z2), (p1,))


def test_simsiam_loss_extreme_inputs():
    g = gen(3)
    p, z = torch.randn(2, 6, 16, generator=g)
    ref = simsiam_loss(p, z)
    for scale in (1e30, 1e-30, 1e-40):       # float32: overflow / underflow of ||p||^2
        pairs = [(p * scale, z), (p, z * scale)] + [(p * scale, z / scale)] * (scale > 1e-38)
        for a, b in pairs:
            a = a.clone().requires_grad_()
            out = simsiam_loss(a, b)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            (ga,) = torch.autograd.grad(out, a)
            # the true gradient scales like 1/||p||: beyond float32's range below ~1e-38
            assert torch.isfinite(ga).all() or scale < 1e-38
    zero = torch.zeros(6, 16, requires_grad=True)        # a dead output: cosine 0, no NaN
    out = simsiam_loss(zero, z)
    (gz,) = torch.autograd.grad(out, zero)
    assert out.item() == 0.0 and torch.isfinite(gz).all()
    half = simsiam_loss(p.bfloat16(), z.bfloat16())
    assert abs(half.float().item() - ref.item()) < 2e-2


def test_simsiam_loss_bad_inputs():
    p = torch.randn(4, 3)
    with pytest.raises(TypeError, match="p1: expected a floating-point tensor"):
        simsiam_loss(p.long(), p)
    with pytest.raises(TypeError, match="z2: expected a torch.Tensor"):
        simsiam_loss(p, p.tolist())
    with pytest.raises(ValueError, match=r"z2: expected the shape of p1 \(4, 3\), got \(4, 2\)"):
        simsiam_loss(p, p[:, :2])
    with pytest.raises(ValueError, match="p2, z1: give both"):
        simsiam_loss(p, p, p2=p)
    with pytest.raises(ValueError, match="z1: expected the shape of p1"):
        simsiam_loss(p, p, p, p[:2])
    with pytest.raises(ValueError, match="p1: expected shape"):
        simsiam_loss(torch.randn(()), torch.randn(()))


def test_simsiam_loss_inference_mode_and_compile():
    g = gen(4)
    p1, z2, p2, z1 = (torch.randn(8, 5, generator=g) for _ in range(4))
    ref = simsiam_loss(p1, z2, p2, z1)
    with torch.inference_mode():
        torch.testing.assert_close(simsiam_loss(p1, z2, p2, z1), ref)
    compiled = torch.compile(simsiam_loss, backend="aot_eager", dynamic=True)
    for b in (8, 3):
        args = [t[:b].clone().requires_grad_() for t in (p1, z2, p2, z1)]
        out = compiled(*args)
        torch.testing.assert_close(out, simsiam_loss(*[t[:b] for t in (p1, z2, p2, z1)]))
        out.backward()
        assert args[1].grad is None and args[0].grad is not None


# ---- scalar_simsiam_flow ---------------------------------------------------------------------
def autograd_flow(phi, theta, mode, rate):
    """-dl/d(phi, theta) by autograd on l = (phi theta - sg?(theta))^2 / 2, branch by branch."""
    phi = torch.tensor(phi, dtype=F64, requires_grad=True)
    th = torch.tensor(theta, dtype=F64, requires_grad=True)
    pred_branch = phi * th               # predictor branch: h(f(x)) = phi theta
    target = {"full": th.detach(), "no_sg": th, "target_only": th}[mode]
    if mode == "target_only":
        pred_branch = phi * th.detach()  # the encoder gets gradient from the target only
    loss = 0.5 * (pred_branch - target) ** 2
    g_phi, g_th = torch.autograd.grad(loss, (phi, th))
    return np.array([-rate * g_phi.item(), -g_th.item()])


@pytest.mark.parametrize("mode", ["full", "no_sg", "target_only"])
@pytest.mark.parametrize("rate", [1.0, 0.1, 25.0])
def test_flow_matches_autograd(mode, rate):
    rng = np.random.default_rng(0)
    states = rng.uniform(-2, 2, size=(2, 20))
    vec = scalar_simsiam_flow(0.0, states, mode, predictor_rate=rate)
    assert vec.shape == (2, 20) and vec.dtype == np.float64
    for j in range(20):
        ref = autograd_flow(states[0, j], states[1, j], mode, rate)
        one = scalar_simsiam_flow(0.0, states[:, j], mode, predictor_rate=rate)
        np.testing.assert_allclose(one, ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(vec[:, j], ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode, invariant, limit", [
    # conserved quantities and the limits they imply, from (phi, theta) = (0.6, 0.1)
    ("full", lambda p, t: p**2 - t**2, (1.0, math.sqrt(0.65))),
    ("no_sg", lambda p, t: t**2 - (1 - p) ** 2, (1 - math.sqrt(0.15), 0.0)),
    ("target_only", lambda p, t: t**2 + 2 * p, (0.605, 0.0)),
])
def test_flow_invariants_under_solve_ivp(mode, invariant, limit):
    sol = solve_ivp(scalar_simsiam_flow, (0, 200), [0.6, 0.1], args=(mode,), rtol=1e-11,
                    atol=1e-13, method="DOP853", dense_output=True)
    phi, theta = sol.sol(np.linspace(0, 200, 400))
    drift = np.abs(invariant(phi, theta) - invariant(0.6, 0.1)).max()
    assert drift < 1e-8
    np.testing.assert_allclose([phi[-1], theta[-1]], limit, atol=1e-6)


def test_flow_predictor_rate_scales_the_invariant():
    # with SG and rate k, phi^2 - k theta^2 is conserved: theta_inf^2 = theta0^2 + (1-phi0^2)/k
    for k in (0.5, 4.0):
        sol = solve_ivp(lambda t, y: scalar_simsiam_flow(t, y, predictor_rate=k),
                        (0, 400), [0.6, 0.1], rtol=1e-11, atol=1e-13, method="DOP853")
        assert abs(sol.y[1, -1] - math.sqrt(0.01 + 0.64 / k)) < 1e-6


def test_flow_bad_inputs():
    with pytest.raises(ValueError, match="mode: expected one of 'full' | 'no_sg'"):
        scalar_simsiam_flow(0, [0.6, 0.1], "sg")
    with pytest.raises(ValueError, match=r"state: expected \(phi, theta\)"):
        scalar_simsiam_flow(0, [0.6, 0.1, 0.0])
    with pytest.raises(ValueError, match="predictor_rate: expected a value in"):
        scalar_simsiam_flow(0, [0.6, 0.1], predictor_rate=0.0)


# ---- SimSiamHead -----------------------------------------------------------------------------
def test_head_layout_and_shapes():
    head = SimSiamHead(16, 4, in_dim=10, hidden_dim=32)
    z, p = head(torch.randn(6, 10, generator=gen(5)))
    assert z.shape == (6, 16) and p.shape == (6, 16)
    assert isinstance(head.projector[-1], torch.nn.BatchNorm1d)
    assert not head.projector[-1].affine
    assert isinstance(head.predictor[-1], torch.nn.Linear)       # no BN on the predictor output
    assert head.predictor[0].out_features == 4                   # the bottleneck
    plain = SimSiamHead(8, 2, output_bn=False)
    assert isinstance(plain.projector[-1], torch.nn.Linear) and plain.in_dim == 8
    # with the output BN (train mode) every output dim has zero batch mean
    assert z.mean(0).abs().max() < 1e-5


def test_head_trains_under_compile_and_inference_mode():
    torch.manual_seed(0)
    head = SimSiamHead(8, 4)
    x1, x2 = torch.randn(2, 12, 8, generator=gen(6))
    compiled = torch.compile(head, backend="aot_eager")
    (z1, p1), (z2, p2) = compiled(x1), compiled(x2)
    simsiam_loss(p1, z2, p2, z1).backward()
    assert all(q.grad is not None for q in head.parameters())
    head.eval()
    with torch.inference_mode():
        z, p = head(x1)
    assert torch.isfinite(p).all() and not z.requires_grad


def test_head_bad_inputs():
    with pytest.raises(ValueError, match=r"pred_dim: expected a value in \[1, inf\]"):
        SimSiamHead(8, 0)
    with pytest.raises(TypeError, match="dim: expected an int"):
        SimSiamHead(8.0, 2)
    with pytest.raises(ValueError, match=r"h: expected shape \[B, 8\], got \(3, 5\)"):
        SimSiamHead(8, 2)(torch.randn(3, 5))


# ---- output_std ------------------------------------------------------------------------------
def test_output_std_matches_numpy_and_the_reference():
    z = torch.randn(500, 32, generator=gen(7), dtype=F64) * torch.linspace(0.1, 3, 32, dtype=F64)
    u = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    assert abs(output_std(z) - u.std(axis=0, ddof=1).mean()) < 1e-12
    iso = torch.randn(20000, 64, generator=gen(8))
    assert abs(output_std(iso) - 1 / 8) < 0.002            # isotropic: about 1/sqrt(d)
    c = torch.randn(64, generator=gen(9))
    collapsed = c + 1e-3 * torch.randn(1000, 64, generator=gen(10))
    assert output_std(collapsed) < 2e-3                    # one direction: about 0


def test_output_std_extreme_inputs_and_dtypes():
    z = torch.randn(100, 16, generator=gen(11))
    ref = output_std(z)
    for scale in (1e30, 1e-30):
        assert abs(output_std(z * scale) - ref) < 1e-6
    assert abs(output_std(z.half()) - ref) < 2e-3
    with torch.inference_mode():
        assert output_std(z.requires_grad_()) == ref
    assert isinstance(ref, float)


def test_output_std_bad_inputs():
    with pytest.raises(ValueError, match=r"z: expected shape \[B, d\] with B >= 2"):
        output_std(torch.randn(1, 8))
    with pytest.raises(ValueError, match="z: expected shape"):
        output_std(torch.randn(8))
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        output_std(torch.ones(4, 3, dtype=torch.long))
