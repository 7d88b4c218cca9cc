"""Tests of the TaiLr losses in companion.losses (notebook: tv-distance-overconfidence)."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.losses import gamma_crossentropy, tailr_loss

GAMMAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _data(n=7, c=5, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def _p_target(logits, target):
    return torch.softmax(logits, -1)[torch.arange(len(target)), target]


# --- gamma_crossentropy ---------------------------------------------------------------------
@pytest.mark.parametrize("gamma", GAMMAS + (0.3, 0.7))
def test_gamma_ce_matches_naive_loop(gamma):
    logits, target = _data()
    got = gamma_crossentropy(logits, target, gamma, reduction="none")
    for n in range(len(target)):
        p = math.exp(logits[n, target[n]]) / sum(math.exp(v) for v in logits[n].tolist())
        want = 1 - p if gamma == 1 else -math.log(gamma + (1 - gamma) * p) / (1 - gamma)
        assert abs(got[n].item() - want) <= 1e-12 * max(1.0, abs(want))
    torch.testing.assert_close(gamma_crossentropy(logits, target, gamma), got.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gamma_crossentropy(logits, target, gamma, reduction="sum"), got.sum(),
                               rtol=1e-12, atol=0)


def test_gamma_ce_limits_and_batched_shape():
    logits, target = _data(n=12)
    p = _p_target(logits, target)
    torch.testing.assert_close(gamma_crossentropy(logits, target, 0.0), F.cross_entropy(logits, target),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(gamma_crossentropy(logits, target, 1e-8), F.cross_entropy(logits, target),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(gamma_crossentropy(logits, target, 1 - 1e-6, reduction="none"), 1 - p,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(gamma_crossentropy(logits, target, 1.0, reduction="none"), 1 - p,
                               rtol=1e-12, atol=1e-15)
    batched = gamma_crossentropy(logits.reshape(3, 4, -1), target.reshape(3, 4), 0.4, reduction="none")
    torch.testing.assert_close(batched, gamma_crossentropy(logits, target, 0.4, reduction="none").reshape(3, 4),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gamma_ce_gradient_identity_and_gradcheck(gamma):
    logits, target = _data(n=4, c=4, seed=1)
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(gamma_crossentropy(logits, target, gamma, reduction="sum"), logits)
    probs = torch.softmax(logits.detach(), -1)
    p = probs[torch.arange(4), target]
    grad_p = p[:, None] * (F.one_hot(target, 4).double() - probs)       # ∇_z p_y = p_y (δ_y - p)
    want = -grad_p / (gamma + (1 - gamma) * p)[:, None]
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: gamma_crossentropy(z, target, gamma, reduction="none"),
                                    (logits,))


def test_gamma_ce_extreme_logits_and_half_precision():
    logits, target = _data(n=64, c=10, dtype=torch.float32, seed=2)
    big = (1e4 * torch.sign(logits)).requires_grad_(True)
    for gamma in (0.1, 0.5, 0.9):
        loss = gamma_crossentropy(big, target, gamma, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), big)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert loss.max().item() <= -math.log(gamma) / (1 - gamma) + 1e-5   # the cap of eq. L_γ
    assert torch.isfinite(gamma_crossentropy(big, target, 0.0))              # plain CE: large, finite
    for gamma in (0.0, 0.5, 1.0):
        ref = gamma_crossentropy(logits, target, gamma)
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            low = gamma_crossentropy(logits.to(dtype), target, gamma)
            assert low.dtype == dtype and abs(low.float().item() - ref.item()) < tol * max(1.0, ref.item())


def test_gamma_ce_bad_inputs():
    logits, target = _data(dtype=torch.float32)
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gamma: expected a value in \[0.0, 1.0\]"):
            gamma_crossentropy(logits, target, gamma)
    with pytest.raises(TypeError, match="gamma: expected a number"):
        gamma_crossentropy(logits, target, torch.tensor(0.5))
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        gamma_crossentropy(logits.long(), target, 0.5)
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 5\), got values in \[-100"):
        gamma_crossentropy(logits, torch.full_like(target, -100), 0.5)     # no ignore_index here
    with pytest.raises(ValueError, match=r"target: expected shape \(7,\)"):
        gamma_crossentropy(logits, target[:, None], 0.5)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        gamma_crossentropy(logits, target, 0.5, reduction="batchmean")


# --- tailr_loss -----------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,min_weight", [(0.0, 0.0), (0.3, 0.0), (0.6, 0.2), (1.0, 0.1), (0.9, 1.0)])
def test_tailr_matches_naive_loop_and_gradient(gamma, min_weight):
    logits, target = _data(n=6, c=5, seed=3)
    target[4] = -1
    logits.requires_grad_(True)
    loss = tailr_loss(logits, target, gamma, min_weight, ignore_index=-1)
    per, weights = [], []
    for n in range(6):
        if target[n] == -1:
            continue
        p = math.exp(logits[n, target[n]].item()) / sum(math.exp(v) for v in logits[n].tolist())
        w = max(min_weight, p / (gamma + (1 - gamma) * p))
        per.append(-w * math.log(p))
        weights.append(w)
    assert abs(loss.item() - sum(per) / len(per)) < 1e-12
    # gradient: max(b, w) ∇(-log p), averaged over the 5 counted positions
    (grad,) = torch.autograd.grad(loss, logits)
    keep = target != -1
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    w = torch.zeros(6, dtype=torch.float64)
    w[keep] = torch.tensor(weights, dtype=torch.float64)
    (want,) = torch.autograd.grad((w * ce).sum() / keep.sum(), logits)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", (0.1, 0.5, 0.9, 1.0))
def test_tailr_gradient_equals_gamma_ce_gradient(gamma):
    logits, target = _data(n=8, c=6, seed=4)
    logits.requires_grad_(True)
    (g_tailr,) = torch.autograd.grad(tailr_loss(logits, target, gamma), logits)
    (g_closed,) = torch.autograd.grad(gamma_crossentropy(logits, target, gamma), logits)
    torch.testing.assert_close(g_tailr, g_closed, rtol=0, atol=1e-12)


def test_tailr_gradcheck_where_the_weight_is_constant():
    # the detached weight makes the value's derivative differ from the gradient (by design), so
    # gradcheck applies where the weight is constant: γ = 0 (w = 1) and b = 1 (max(1, w) = 1)
    logits, target = _data(n=4, c=4, seed=5)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: tailr_loss(z, target, 0.0, reduction="none"), (logits,))
    assert torch.autograd.gradcheck(lambda z: tailr_loss(z, target, 0.7, 1.0, reduction="none"), (logits,))
    torch.testing.assert_close(tailr_loss(logits, target, 0.0), F.cross_entropy(logits, target),
                               rtol=1e-12, atol=0)


def test_tailr_extreme_logits_half_precision_and_bad_inputs():
    logits, target = _data(n=64, c=10, dtype=torch.float32, seed=6)
    big = (1e4 * torch.sign(logits)).requires_grad_(True)
    for gamma, b in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.1), (1.0, 0.0)):
        loss = tailr_loss(big, target, gamma, b)
        (g,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    ref = tailr_loss(logits, target, 0.5, 0.1)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        low = tailr_loss(logits.to(dtype), target, 0.5, 0.1)
        assert low.dtype == dtype and abs(low.float().item() - ref.item()) < tol * max(1.0, ref.item())
    all_ignored = tailr_loss(logits, torch.full_like(target, -100), 0.5)
    assert all_ignored.isnan()                                          # as F.cross_entropy
    with pytest.raises(ValueError, match=r"min_weight: expected a value in \[0.0, 1.0\], got 1.2"):
        tailr_loss(logits, target, 0.5, 1.2)
    with pytest.raises(ValueError, match=r"gamma: expected a value in \[0.0, 1.0\], got -0.5"):
        tailr_loss(logits, target, -0.5)
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 10\) or ignore_index=-100"):
        tailr_loss(logits, torch.full_like(target, 10), 0.5)
    with pytest.raises(TypeError, match="target: expected an integer tensor"):
        tailr_loss(logits, target.float(), 0.5)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        tailr_loss(logits, target, 0.5, reduction="avg")
