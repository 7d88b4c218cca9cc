"""Tests of companion.gan, section idempotent-generative-network: the gradient routing of the
three IGN losses (which parameters each term trains), the frozen-copy form against the
stop-gradient form, a linear f against hand-computed gradients, the single-loss GAN against
the alternating pair, and IGNMLP."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from companion.gan import IGNMLP, gan_single_loss_sg, ign_losses, ign_losses_sg

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_f(seed=0, dim=3, hidden=8, residual=True, dtype=F64):
    torch.manual_seed(seed)
    return IGNMLP(dim, hidden=hidden, depth=2, residual=residual).to(dtype)


def frozen_copy(f):
    f_copy = copy.deepcopy(f)
    f_copy.load_state_dict(f.state_dict())
    return f_copy.requires_grad_(False)


def data(seed=0, B=16, dim=3, dtype=F64):
    g = gen(seed)
    return (torch.randn(B, dim, generator=g, dtype=dtype),
            torch.randn(B + 3, dim, generator=g, dtype=dtype))


def grads(f, scalar):
    params = [p for p in f.parameters()]
    gs = torch.autograd.grad(scalar, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def dist(a, b, kind):
    d = a - b
    return (d.abs() if kind == "l1" else d.square()).mean(1).mean()


# ---- routing against a two-argument reference built with torch.func ---------------------------
def split_reference(f, x, z, kind, lam, clamp):
    """Gradients of each term from g(th_in, th_out) = D(f_out(f_in(z)), f_in(z)): L_idem trains
    th_in only, L_tight th_out only; computed with torch.func, independent of companion's code."""
    theta = {k: v.detach() for k, v in f.named_parameters()}

    def rec_fn(th):
        return dist(functional_call(f, th, (x,)), x, kind)

    def g_fn(th_in, th_out):
        u = functional_call(f, th_in, (z,))
        return dist(functional_call(f, th_out, (u,)), u, kind)

    rec = rec_fn(theta)
    raw = g_fn(theta, theta)
    g_rec = grad(rec_fn)(theta)
    g_idem = grad(g_fn, argnums=0)(theta, theta)
    g_out = grad(g_fn, argnums=1)(theta, theta)
    if clamp is None:
        slope = torch.ones((), dtype=x.dtype)
    else:  # d/draw of -s tanh(raw / s) is -sech^2(raw / s); s = a rec is a constant
        s = clamp * rec
        slope = 1 - torch.tanh(raw / s) ** 2
    g_tight = {k: -slope * v for k, v in g_out.items()}
    lr, li, lt = lam
    total = {k: lr * g_rec[k] + li * g_idem[k] + lt * g_tight[k] for k in theta}
    return {"rec": g_rec, "idem": g_idem, "tight": g_tight, "loss": total}


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("clamp", [None, 1.5, 0.2])
@pytest.mark.parametrize("form", ["copy", "sg"])
def test_each_term_routes_gradient_to_the_right_f(kind, clamp, form):
    f = make_f(1)
    x, z = data(2)
    lam = (3.0, 2.0, 0.7)
    kw = dict(lam_rec=lam[0], lam_idem=lam[1], lam_tight=lam[2], dist=kind, tight_clamp=clamp)
    out = (ign_losses(f, frozen_copy(f), x, z, **kw) if form == "copy"
           else ign_losses_sg(f, x, z, **kw))
    ref = split_reference(f, x, z, kind, lam, clamp)
    names = [k for k, _ in f.named_parameters()]
    for term in ("rec", "idem", "tight", "loss"):
        got = grads(f, out[term])
        for name, gv in zip(names, got):
            torch.testing.assert_close(gv, ref[term][name], rtol=1e-9, atol=1e-11,
                                       msg=f"{term} {name}")


def test_swapped_routing_is_detected():
    """The reference separates the two roles: the inner and outer gradients differ, so a loss
    that trained the outer f by L_idem would fail the routing test above."""
    f = make_f(3)
    x, z = data(4)
    ref = split_reference(f, x, z, "l2", (1.0, 1.0, 1.0), None)
    diff = max((ref["idem"][k] + ref["tight"][k]).abs().max().item() for k in ref["idem"])
    assert diff > 1e-3


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("clamp", [None, 1.5])
def test_copy_and_sg_forms_agree(kind, clamp):
    f = make_f(5, dim=4, hidden=16)
    x, z = data(6, dim=4)
    kw = dict(lam_rec=20.0, lam_idem=20.0, lam_tight=2.5, dist=kind, tight_clamp=clamp)
    a = ign_losses(f, frozen_copy(f), x, z, **kw)
    b = ign_losses_sg(f, x, z, **kw)
    for term in ("loss", "rec", "idem", "tight", "tight_raw"):
        torch.testing.assert_close(a[term], b[term], rtol=1e-12, atol=1e-12)
        for ga, gb in zip(grads(f, a[term]), grads(f, b[term])):
            torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_linear_f_hand_computed():
    """f(v) = W v + c, squared distance, no clamp: gradients written out by hand."""
    g = gen(7)
    d, B = 2, 5
    lin = nn.Linear(d, d).to(F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g, dtype=F64))
        lin.bias.copy_(torch.randn(d, generator=g, dtype=F64))
    x, z = torch.randn(B, d, generator=g, dtype=F64), torch.randn(B, d, generator=g, dtype=F64)
    W, c = lin.weight.detach(), lin.bias.detach()
    eye = torch.eye(d, dtype=F64)
    k = 2.0 / (B * d)
    # rec = mean (W x + c - x)^2
    r_x = x @ W.T + c - x
    gW_rec, gc_rec = k * r_x.T @ x, k * r_x.sum(0)
    # idem: u = W z + c, residual r_u = W u + c - u with the outer W frozen;
    # dL/du = k (W - I)^T r_u, then du/dW = z, du/dc = 1
    u = z @ W.T + c
    r_u = u @ W.T + c - u
    dL_du = k * r_u @ (W - eye)
    gW_idem, gc_idem = dL_du.T @ z, dL_du.sum(0)
    # tight = -mean (W u + c - u)^2 with u fixed: only the outer W, c
    gW_tight, gc_tight = -k * r_u.T @ u, -k * r_u.sum(0)
    for fn in ("copy", "sg"):
        out = (ign_losses(lin, frozen_copy(lin), x, z, dist="l2", tight_clamp=None)
               if fn == "copy" else ign_losses_sg(lin, x, z, dist="l2", tight_clamp=None))
        torch.testing.assert_close(out["rec"], r_x.square().mean())
        torch.testing.assert_close(out["idem"], r_u.square().mean())
        torch.testing.assert_close(out["tight"], -r_u.square().mean())
        for term, (gW, gc) in {"rec": (gW_rec, gc_rec), "idem": (gW_idem, gc_idem),
                               "tight": (gW_tight, gc_tight)}.items():
            got_W, got_c = grads(lin, out[term])
            torch.testing.assert_close(got_W, gW, rtol=1e-12, atol=1e-14, msg=f"{fn} {term}")
            torch.testing.assert_close(got_c, gc, rtol=1e-12, atol=1e-14, msg=f"{fn} {term}")
        total = 20 * gW_rec + 20 * gW_idem + 2.5 * gW_tight
        torch.testing.assert_close(grads(lin, out["loss"])[0], total, rtol=1e-12, atol=1e-13)


def test_clamp_value_and_bound():
    f = make_f(8)
    x, z = data(9)
    out = ign_losses_sg(f, x, z, tight_clamp=1.5)
    s = 1.5 * out["rec"].detach()
    torch.testing.assert_close(out["tight"], -s * torch.tanh(out["tight_raw"] / s))
    assert -s <= out["tight"] < 0
    free = ign_losses_sg(f, x, z, tight_clamp=None)
    torch.testing.assert_close(free["tight"], -free["tight_raw"])
    assert free["tight"] < out["tight"]


def test_clamp_sends_no_gradient_to_reconstruction_path():
    """With lam_rec = lam_idem = 0, the clamped loss's gradient is the tight term's alone, a
    multiple of the outer gradient; L_rec (detached inside the clamp) adds nothing."""
    f = make_f(10)
    x, z = data(11)
    out = ign_losses_sg(f, x, z, lam_rec=0.0, lam_idem=0.0, lam_tight=1.0, tight_clamp=1.5)
    ref = split_reference(f, x, z, "l1", (0.0, 0.0, 1.0), 1.5)
    for (name, _), gv in zip(f.named_parameters(), grads(f, out["loss"])):
        torch.testing.assert_close(gv, ref["tight"][name], rtol=1e-9, atol=1e-12)


# ---- gan_single_loss_sg --------------------------------------------------------------------
def test_gan_single_loss_matches_alternating_pair():
    torch.manual_seed(12)
    D = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    g = gen(13)
    x, z = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64)
    loss = gan_single_loss_sg(D, G, x, z)
    # reference: the critic loss with frozen G, the generator loss with frozen D (copies)
    G_copy = frozen_copy(G)
    D_copy = frozen_copy(D)
    critic = D(x).mean() - D(G_copy(z)).mean()
    gen_loss = D_copy(G(z)).mean()
    torch.testing.assert_close(loss, critic)
    for got, want in zip(grads(D, loss), grads(D, critic)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads(G, loss), grads(G, gen_loss)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # and the plain single loss without the stop-gradient routes differently
    plain = D(x).mean() - D(G(z)).mean()
    assert max((a - b).abs().max() for a, b in zip(grads(G, plain), grads(G, loss))) > 1e-4


def test_gan_single_loss_bad_input():
    D = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="G: expected samples shaped like x"):
        gan_single_loss_sg(D, nn.Linear(3, 3), torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        gan_single_loss_sg(D, nn.Linear(3, 2), torch.ones(4, 2, dtype=torch.long),
                           torch.randn(4, 3))


# ---- gradcheck, extremes, bad input, inference mode, compile ------------------------------
def test_gradcheck_in_the_data():
    f = make_f(14)
    _, z = data(15)
    x = torch.randn(6, 3, generator=gen(16), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_: ign_losses_sg(f, x_, z, dist="l2", tight_clamp=None)["loss"], (x,))
    assert torch.autograd.gradcheck(lambda x_: f(x_), (x,))
    D = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    assert torch.autograd.gradcheck(lambda x_: gan_single_loss_sg(D, f, x_, z), (x,))


def test_exact_identity_and_huge_inputs_stay_finite():
    f = make_f(17)
    with torch.no_grad():       # f = identity: L_rec = 0 and every distance is 0
        f.net[-1].weight.zero_()
        f.net[-1].bias.zero_()
    x, z = data(18)
    for clamp in (1.5, None):
        out = ign_losses_sg(f, x, z, tight_clamp=clamp)
        assert float(out["loss"].detach()) == 0.0
        assert all(torch.isfinite(gv).all() for gv in grads(f, out["loss"]))
    f = make_f(19, dtype=torch.float32)
    big = 1e15 * torch.randn(8, 3, generator=gen(20))
    out = ign_losses_sg(f, big, big.flip(0), dist="l2")
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["tight"])
    assert all(torch.isfinite(gv).all() for gv in grads(f, out["loss"]))


def test_bad_input_messages():
    f = make_f(21)
    x, z = data(22)
    live_copy = copy.deepcopy(f)
    with pytest.raises(ValueError, match="f_copy: expected parameters with requires_grad=False"):
        ign_losses(f, live_copy, x, z)
    with pytest.raises(ValueError, match="f_copy: expected a frozen copy of f, got f itself"):
        ign_losses(f, f, x, z)
    with pytest.raises(ValueError, match="dist: expected one of 'l1' | 'l2'"):
        ign_losses_sg(f, x, z, dist="l3")
    with pytest.raises(ValueError, match=r"z: expected shape \[B', 3\]"):
        ign_losses_sg(f, x, z[:, :2])
    with pytest.raises(ValueError, match="tight_clamp: expected a value in"):
        ign_losses_sg(f, x, z, tight_clamp=0.0)
    with pytest.raises(ValueError, match="lam_tight: expected a value in"):
        ign_losses_sg(f, x, z, lam_tight=-1.0)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        ign_losses_sg(f, x.long(), z)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 3\]"):
        f(torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="hidden: expected a value in"):
        IGNMLP(2, hidden=0)


def test_inference_mode_and_no_grad():
    f = make_f(23, dtype=torch.float32)
    x, z = data(24, dtype=torch.float32)
    ref = ign_losses_sg(f, x, z)
    with torch.inference_mode():
        a = ign_losses_sg(f, x, z)
        b = ign_losses(f, frozen_copy(f), x, z)
    with torch.no_grad():
        c = ign_losses_sg(f, x, z)
    for term in ref:
        torch.testing.assert_close(a[term], ref[term].detach())
        torch.testing.assert_close(b[term], ref[term].detach())
        torch.testing.assert_close(c[term], ref[term].detach())


def test_torch_compile_training_step():
    f = make_f(25, dtype=torch.float32)
    compiled = torch.compile(ign_losses_sg, backend="aot_eager", dynamic=True)
    for B in (16, 9):
        x, z = data(26 + B, B=B, dtype=torch.float32)
        want = ign_losses_sg(f, x, z)
        got = compiled(f, x, z)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
        params = list(f.parameters())   # one backward each: aot_eager donates buffers
        g_got = torch.autograd.grad(got["loss"], params)
        g_want = torch.autograd.grad(want["loss"], params)
        for ga, gb in zip(g_got, g_want):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_ignmlp_shape_and_residual():
    f = IGNMLP(2, hidden=128, depth=2)
    assert sum(p.numel() for p in f.parameters()) == (2 * 128 + 128) + (128 * 128 + 128) \
        + (128 * 2 + 2)
    x = torch.randn(5, 2)
    torch.testing.assert_close(f(x), x + f.net(x))
    plain = IGNMLP(2, hidden=4, depth=3, residual=False)
    torch.testing.assert_close(plain(x), plain.net(x))
    assert sum(isinstance(m, nn.Tanh) for m in plain.net) == 3
