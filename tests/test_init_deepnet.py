"""Tests of companion.init, section deepnet-why-residual: residual_branch_scale,
deepnorm_constants (the DeepNet paper's Table 1 and the update bound it is built on),
ResidualMLP (against a loop written out with torch.nn.functional) and first_update_change
(against a step worked out by hand)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.init import (ResidualMLP, deepnorm_constants, first_update_change,
                            residual_branch_scale)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- residual_branch_scale -------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_residual_branch_scale_values(n):
    assert residual_branch_scale(n) == pytest.approx(n ** -0.5, rel=1e-15)
    assert residual_branch_scale(n, kind="linear") == pytest.approx(1 / n, rel=1e-15)
    # the defining property: N * eps^2 = 1 for "sqrt", N * eps = 1 for "linear"
    assert n * residual_branch_scale(n) ** 2 == pytest.approx(1.0, rel=1e-12)
    assert n * residual_branch_scale(n, "linear") == pytest.approx(1.0, rel=1e-12)


def test_residual_branch_scale_bad_input():
    with pytest.raises(ValueError, match=r"num_layers: expected a value in \[1, inf\]"):
        residual_branch_scale(0)
    with pytest.raises(TypeError, match="num_layers: expected an int, got float"):
        residual_branch_scale(4.0)
    with pytest.raises(TypeError, match="num_layers: expected an int, got bool"):
        residual_branch_scale(True)
    with pytest.raises(ValueError, match="kind: expected one of 'sqrt' | 'linear'"):
        residual_branch_scale(4, kind="log")


# ---- deepnorm_constants ----------------------------------------------------------------------
# DeepNet (Wang et al. 2022), Table 1, typed from the paper:
#   encoder-only / decoder-only: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
#   encoder-decoder: encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16),
#                    decoder alpha = (3M)^(1/4), beta = (12M)^(-1/4)
@pytest.mark.parametrize("n", [1, 6, 18, 100, 1000])
def test_deepnorm_single_stack(n):
    enc = deepnorm_constants(num_encoder_layers=n)
    dec = deepnorm_constants(num_decoder_layers=n)
    assert set(enc) == {"encoder"} and set(dec) == {"decoder"}
    for alpha, beta in (enc["encoder"], dec["decoder"]):
        assert alpha == pytest.approx(math.sqrt(math.sqrt(2 * n)), rel=1e-14)
        assert beta == pytest.approx(1 / math.sqrt(math.sqrt(8 * n)), rel=1e-14)
        # DeepNet's design condition: over the 2N sublayers, each contributing
        # (v^2 + w^2) / alpha^2 with v = w = beta, the update bound sums to exactly one
        assert 2 * n * (2 * beta ** 2) / alpha ** 2 == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("n, m", [(1, 1), (6, 6), (100, 100), (18, 6), (200, 100)])
def test_deepnorm_encoder_decoder(n, m):
    c = deepnorm_constants(num_encoder_layers=n, num_decoder_layers=m)
    assert set(c) == {"encoder", "decoder"}
    (a_e, b_e), (a_d, b_d) = c["encoder"], c["decoder"]
    g = n ** 4 * m
    assert a_e == pytest.approx(0.81 * g ** 0.0625, rel=1e-14)
    assert b_e == pytest.approx(0.87 / g ** 0.0625, rel=1e-14)
    assert a_d == pytest.approx((3 * m) ** 0.25, rel=1e-14)
    assert b_d == pytest.approx((12 * m) ** -0.25, rel=1e-14)
    # the decoder has 3M sublayers (self-attention, cross-attention, FFN): bound = 1
    assert 3 * m * (2 * b_d ** 2) / a_d ** 2 == pytest.approx(1.0, rel=1e-12)
    # torchscale divides these encoder weights by (N^4 M)^(1/16) / 1.15: a factor 1.15 where
    # the paper has 0.87 (= 1 / 1.15), so the two differ by 1.15 / 0.87 = 1.32
    torchscale_beta = 1 / (g ** 0.0625 / 1.15)
    assert torchscale_beta / b_e == pytest.approx(1.15 / 0.87, rel=1e-12)


def test_deepnorm_bad_input():
    with pytest.raises(ValueError, match="expected at least one of them to be positive"):
        deepnorm_constants()
    with pytest.raises(ValueError, match=r"num_encoder_layers: expected a value in \[0, inf\]"):
        deepnorm_constants(num_encoder_layers=-1)
    with pytest.raises(TypeError, match="num_decoder_layers: expected an int, got float"):
        deepnorm_constants(num_decoder_layers=6.0)


# ---- ResidualMLP ---------------------------------------------------------------------------
def mlp_reference(model, x):
    """The same network written out with torch.nn.functional, one block at a time."""
    h = F.linear(x, model.embed.weight, model.embed.bias)
    for lin, norm in zip(model.layers, model.norms):
        z = F.linear(h, lin.weight, lin.bias)
        if model.norm == "layer":
            mu = z.mean(-1, keepdim=True)
            var = (z - mu).square().mean(-1, keepdim=True)
            z = (z - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        phi = torch.tanh(z)
        h = h + model.branch_scale * phi if model.residual else phi
    return F.linear(h, model.head.weight, model.head.bias)


@pytest.mark.parametrize("residual, eps", [(False, 1.0), (True, 1.0), (True, 0.25), (True, 0.0)])
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_residual_mlp_matches_reference(residual, eps, norm):
    torch.manual_seed(0)
    model = ResidualMLP(5, 8, 4, 3, residual=residual, branch_scale=eps, norm=norm).double()
    with torch.no_grad():      # non-trivial LayerNorm gains and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen(1), dtype=F64))
    x = torch.randn(2, 7, 5, generator=gen(2), dtype=F64)
    out = model(x)
    assert out.shape == (2, 7, 3) and out.dtype == F64
    torch.testing.assert_close(out, mlp_reference(model, x), rtol=1e-12, atol=1e-12)


def test_residual_mlp_zero_branch_scale_is_embed_then_head():
    torch.manual_seed(0)
    model = ResidualMLP(5, 8, 6, 3, branch_scale=0.0).double()
    x = torch.randn(4, 5, generator=gen(3), dtype=F64)
    expected = model.head(model.embed(x))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_residual_mlp_init_is_forward_stable():
    torch.manual_seed(0)
    model = ResidualMLP(64, 256, 2, 10)
    for lin in (model.embed, *model.layers, model.head):
        std = lin.weight.std().item()
        assert abs(std * math.sqrt(lin.in_features) - 1) < 0.05
        assert torch.count_nonzero(lin.bias) == 0


def test_residual_mlp_gradcheck():
    torch.manual_seed(0)
    model = ResidualMLP(3, 4, 3, 2, branch_scale=0.5).double()
    x = torch.randn(2, 3, generator=gen(4), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))
    plain = ResidualMLP(3, 4, 3, 2, residual=False, norm="none").double()
    assert torch.autograd.gradcheck(plain, (x,))


def test_residual_mlp_extreme_inputs():
    # up to 1e15 in float32: LayerNorm squares its input, and (1e30)^2 overflows float32
    torch.manual_seed(0)
    for residual in (False, True):
        model = ResidualMLP(6, 8, 5, 3, residual=residual)
        for scale in (0.0, 1e-30, 1e6, 1e15):
            x = scale * torch.randn(4, 6, generator=gen(5))
            out = model(x)
            assert torch.isfinite(out).all(), (residual, scale)
            out.sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            model.zero_grad()


def test_residual_mlp_inference_mode_and_compile():
    torch.manual_seed(0)
    model = ResidualMLP(6, 8, 4, 3, branch_scale=0.5)
    x = torch.randn(5, 6, generator=gen(6))
    eager = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    for batch in (5, 9):
        xb = torch.randn(batch, 6, generator=gen(batch))
        torch.testing.assert_close(compiled(xb), model(xb), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-6, atol=1e-6)


def test_residual_mlp_bad_input():
    with pytest.raises(ValueError, match=r"width: expected a value in \[1, inf\]"):
        ResidualMLP(4, 0, 2, 3)
    with pytest.raises(TypeError, match="depth: expected an int, got float"):
        ResidualMLP(4, 8, 2.0, 3)
    with pytest.raises(ValueError, match="norm: expected one of 'layer' | 'none', got 'batch'"):
        ResidualMLP(4, 8, 2, 3, norm="batch")
    with pytest.raises(ValueError, match=r"branch_scale: expected a value in \[0.0, inf\]"):
        ResidualMLP(4, 8, 2, 3, branch_scale=-0.1)
    with pytest.raises(ValueError, match="branch_scale: only a residual stack"):
        ResidualMLP(4, 8, 2, 3, residual=False, branch_scale=0.5)
    with pytest.raises(TypeError, match="residual: expected a bool"):
        ResidualMLP(4, 8, 2, 3, residual=1)


# ---- first_update_change -------------------------------------------------------------------
def linear_problem():
    g = gen(7)
    model = nn.Linear(5, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=F64))
    x = torch.randn(16, 5, generator=g, dtype=F64)
    t = torch.randn(16, 3, generator=g, dtype=F64)
    return model, x, t


def test_first_update_change_sgd_by_hand():
    """One SGD step on a least-squares problem, worked out in closed form."""
    model, x, t = linear_problem()
    W0, b0, lr = model.weight.detach().clone(), model.bias.detach().clone(), 0.05
    r = first_update_change(model, F.mse_loss, (x, t),
                            lambda p: torch.optim.SGD(p, lr=lr))
    n = t.numel()
    res0 = x @ W0.T + b0 - t                       # residual at theta_0
    gW, gb = 2 / n * res0.T @ x, 2 / n * res0.sum(0)
    W1, b1 = W0 - lr * gW, b0 - lr * gb
    out0, out1 = x @ W0.T + b0, x @ W1.T + b1
    grad_sq = gW.square().sum() + gb.square().sum()
    assert r["loss_before"] == pytest.approx(res0.square().mean().item(), rel=1e-12)
    assert r["loss_after"] == pytest.approx((out1 - t).square().mean().item(), rel=1e-12)
    assert r["loss_change"] == pytest.approx(r["loss_after"] - r["loss_before"], rel=1e-12)
    assert r["predicted_loss_change"] == pytest.approx(-lr * grad_sq.item(), rel=1e-12)
    assert r["grad_norm"] == pytest.approx(grad_sq.sqrt().item(), rel=1e-12)
    assert r["update_norm"] == pytest.approx(lr * grad_sq.sqrt().item(), rel=1e-12)
    assert r["output_change"] == pytest.approx(
        (out1 - out0).square().mean().sqrt().item(), rel=1e-12)
    assert r["output_rms"] == pytest.approx(out0.square().mean().sqrt().item(), rel=1e-12)
    # the model itself is untouched: same weights, no gradient left behind
    assert torch.equal(model.weight, W0) and torch.equal(model.bias, b0)
    assert model.weight.grad is None


def test_first_update_change_adam_first_step_is_sign_like():
    """Adam's first step is -lr g / (|g| + eps'), so its norm is lr sqrt(#entries)."""
    model, x, t = linear_problem()
    lr = 1e-3
    r = first_update_change(model, F.mse_loss, (x, t),
                            lambda p: torch.optim.Adam(p, lr=lr, eps=1e-12))
    num = sum(p.numel() for p in model.parameters())
    assert r["update_norm"] == pytest.approx(lr * math.sqrt(num), rel=1e-6)
    # and <g, dtheta> = -lr ||g||_1
    model.zero_grad()
    F.mse_loss(model(x), t).backward()
    l1 = sum(p.grad.abs().sum() for p in model.parameters()).item()
    assert r["predicted_loss_change"] == pytest.approx(-lr * l1, rel=1e-6)


def test_first_update_change_first_order_for_small_steps():
    torch.manual_seed(0)
    model = ResidualMLP(6, 16, 8, 4, branch_scale=0.5).double()
    x = torch.randn(32, 6, generator=gen(8), dtype=F64)
    y = torch.randint(0, 4, (32,), generator=gen(9))
    r = first_update_change(model, F.cross_entropy, (x, y),
                            lambda p: torch.optim.SGD(p, lr=1e-5))
    assert r["loss_change"] < 0
    assert r["loss_change"] == pytest.approx(r["predicted_loss_change"], rel=1e-3)


def test_first_update_change_under_no_grad_and_float32():
    torch.manual_seed(0)
    model = ResidualMLP(6, 16, 3, 4)
    x = torch.randn(8, 6, generator=gen(10))
    y = torch.randint(0, 4, (8,), generator=gen(11))
    make = lambda p: torch.optim.SGD(p, lr=0.1)
    r = first_update_change(model, F.cross_entropy, (x, y), make)
    with torch.no_grad():
        r2 = first_update_change(model, F.cross_entropy, (x, y), make)
    assert r == r2 and all(isinstance(v, float) and math.isfinite(v) for v in r.values())


def test_first_update_change_bad_input():
    model, x, t = linear_problem()
    make = lambda p: torch.optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        first_update_change(lambda z: z, F.mse_loss, (x, t), make)
    with pytest.raises(ValueError, match=r"batch: expected a pair \(inputs, target\)"):
        first_update_change(model, F.mse_loss, (x,), make)
    with pytest.raises(TypeError, match="make_optimizer: expected it to return"):
        first_update_change(model, F.mse_loss, (x, t), lambda p: None)
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        first_update_change(model, "mse", (x, t), make)
    with pytest.raises(ValueError, match="loss_fn: expected a scalar tensor loss"):
        first_update_change(model, lambda o, y: (o - y).square(), (x, t), make)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="cannot run under torch.inference_mode"):
            first_update_change(model, F.mse_loss, (x, t), make)
    frozen = nn.Linear(5, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="at least one parameter with requires_grad"):
        first_update_change(frozen, F.mse_loss, (x.float(), t.float()), make)
