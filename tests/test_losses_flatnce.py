"""Tests of companion.losses, section flatnce: infonce_loss, flatnce_loss, nt_xent_scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.losses import flatnce_loss, infonce_loss, nt_xent_scores


def _scores(B=5, K=7, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(B, K, generator=g, dtype=dtype)
    t = torch.randint(0, K, (B,), generator=g)
    return s, t


def _infonce_loop(s, t):
    """-log softmax(s)[t] row by row, with Python floats."""
    out = []
    for row, ti in zip(s.tolist(), t.tolist()):
        m = max(row)
        out.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[ti])
    return torch.tensor(out, dtype=torch.float64)


def _flatnce_loop(s, t):
    """log sum_{i != t} exp(s_i - s_t) row by row, with Python floats."""
    out = []
    for row, ti in zip(s.tolist(), t.tolist()):
        neg = [v - row[ti] for i, v in enumerate(row) if i != ti]
        m = max(neg)
        out.append(m + math.log(sum(math.exp(v - m) for v in neg)))
    return torch.tensor(out, dtype=torch.float64)


# --- reference values ------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_infonce_equals_loop_and_cross_entropy(reduction):
    s, t = _scores()
    ref = _infonce_loop(s, t)
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    got = infonce_loss(s, t, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, F.cross_entropy(s, t, reduction=reduction), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_flatnce_equals_loop(reduction):
    s, t = _scores(seed=1)
    ref = _flatnce_loop(s, t)
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    torch.testing.assert_close(flatnce_loss(s, t, reduction=reduction), ref, rtol=1e-12, atol=1e-12)


def test_default_positive_is_column_zero():
    s, _ = _scores(seed=2)
    zeros = torch.zeros(s.shape[0], dtype=torch.long)
    torch.testing.assert_close(infonce_loss(s), infonce_loss(s, zeros), rtol=0, atol=0)
    torch.testing.assert_close(flatnce_loss(s), flatnce_loss(s, zeros), rtol=0, atol=0)


def test_single_negative():
    s, t = _scores(B=4, K=2, seed=3)
    s_t = s.gather(1, t[:, None]).squeeze(1)
    s_neg = s.gather(1, (1 - t)[:, None]).squeeze(1)
    # K = 2: log xi = s_neg - s_t exactly, InfoNCE = softplus(s_neg - s_t)
    torch.testing.assert_close(flatnce_loss(s, t, "none"), s_neg - s_t, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(infonce_loss(s, t, "none"), F.softplus(s_neg - s_t), rtol=1e-12, atol=1e-12)


def test_flatnce_is_infonce_minus_log_one_minus_p():
    # log xi = log(1 + xi) + log(xi / (1 + xi)) = InfoNCE + log(1 - p_t)
    s, t = _scores(seed=4)
    p_t = s.softmax(1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(flatnce_loss(s, t, "none"), infonce_loss(s, t, "none") + torch.log1p(-p_t),
                               rtol=1e-12, atol=1e-12)


# --- gradients ---------------------------------------------------------------------------------
def test_flatnce_gradient_equals_stop_gradient_form_and_analytic():
    s, t = _scores(seed=5)
    s1 = s.clone().requires_grad_()
    flatnce_loss(s1, t, "sum").backward()
    # the paper's form: xi / sg(xi), xi = sum_{i != t} exp(s_i - s_t)
    s2 = s.clone().requires_grad_()
    mask = F.one_hot(t, s.shape[1]).bool()
    xi = torch.where(mask, 0.0, torch.exp(s2 - s2.gather(1, t[:, None]))).sum(1)
    (xi / xi.detach()).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=1e-12)
    # analytic: -1 on the positive, the softmax over the negatives elsewhere
    analytic = s.masked_fill(mask, float("-inf")).softmax(1) - mask.double()
    torch.testing.assert_close(s1.grad, analytic, rtol=0, atol=1e-12)


def test_flatnce_gradient_is_infonce_gradient_times_one_plus_xi_over_xi():
    s, t = _scores(seed=6)
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    infonce_loss(a, t, "sum").backward()
    flatnce_loss(b, t, "sum").backward()
    xi = torch.exp(flatnce_loss(s, t, "none"))
    torch.testing.assert_close(b.grad, a.grad * ((1 + xi) / xi)[:, None], rtol=1e-12, atol=1e-12)
    # same direction row by row (cosine 1), different length
    cos = F.cosine_similarity(a.grad, b.grad, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [infonce_loss, flatnce_loss])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_losses(fn, reduction):
    s, t = _scores(B=3, K=5, seed=7, scale=1.0)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, t, reduction=reduction), (s,))


def test_gradcheck_nt_xent_scores():
    g = torch.Generator().manual_seed(8)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_scores(a, b, 0.5)[0], (z1, z2))


# --- nt_xent_scores ----------------------------------------------------------------------------
def test_nt_xent_scores_equals_loop():
    g = torch.Generator().manual_seed(9)
    B, d, tau = 4, 6, 0.3
    z1, z2 = torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(B, d, generator=g, dtype=torch.float64)
    scores, positive = nt_xent_scores(z1, z2, tau)
    assert scores.shape == (2 * B, 2 * B - 1) and positive.shape == (2 * B,)
    assert positive.dtype == torch.long
    views = [v / v.norm() for v in torch.cat([z1, z2])]
    for r in range(2 * B):
        others = [c for c in range(2 * B) if c != r]
        ref = torch.stack([views[r] @ views[c] / tau for c in others])
        torch.testing.assert_close(scores[r], ref, rtol=1e-12, atol=1e-12)
        assert others[positive[r]] == (r + B) % (2 * B)  # the other view of the same example


def test_nt_xent_matches_masked_diagonal_simclr():
    # the usual SimCLR code: full [2B, 2B] matrix, diagonal set to -inf, target (r + B) mod 2B
    g = torch.Generator().manual_seed(10)
    B, tau = 6, 0.1
    z1, z2 = torch.randn(B, 8, generator=g, dtype=torch.float64), torch.randn(B, 8, generator=g, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * B) + B) % (2 * B)
    ref = F.cross_entropy(sim, target)
    torch.testing.assert_close(infonce_loss(*nt_xent_scores(z1, z2, tau)), ref, rtol=1e-12, atol=1e-12)


# --- extreme inputs and low precision -------------------------------------------------------------
@pytest.mark.parametrize("fn", [infonce_loss, flatnce_loss])
def test_extreme_scores_are_finite(fn):
    s = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, 1e4]], requires_grad=True)
    t = torch.tensor([0, 3])
    loss = fn(s, t, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    ref = fn(s.detach().double(), t, "none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", [infonce_loss, flatnce_loss])
def test_low_precision_close_to_float32(fn, dtype):
    s, t = _scores(B=16, K=31, dtype=torch.float32, seed=11, scale=2.0)
    lo = s.to(dtype).requires_grad_()
    hi = s.to(dtype).float().requires_grad_()  # the same rounded inputs, computed in float32
    fn(lo, t).backward()
    fn(hi, t).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(fn(lo, t).float(), fn(hi, t), rtol=tol, atol=tol)
    torch.testing.assert_close(lo.grad.float(), hi.grad, rtol=tol, atol=tol / 16)


def test_bf16_infonce_loses_positive_gradient_flatnce_keeps_it():
    # an easy positive: xi = 15 e^{-10} ~ 7e-4, below bf16's resolution of 1 + xi
    s = torch.full((1, 16), -10.0)
    s[0, 0] = 0.0
    a = s.bfloat16().requires_grad_()
    b = s.bfloat16().requires_grad_()
    infonce_loss(a).backward()
    flatnce_loss(b).backward()
    assert a.grad[0, 0].item() == 0.0                 # exact value -xi/(1+xi) ~ -6.8e-4 is lost
    assert b.grad[0, 0].item() == -1.0                # FlatNCE's positive gradient is exactly -1
    # bf16 rounds the log-sum-exp (-7.29, spacing 2^-5), so the softmax is within ~3% of 1/15
    torch.testing.assert_close(b.grad[0, 1:].float(), torch.full((15,), 1 / 15), rtol=3e-2, atol=0)
    # in float32 the InfoNCE positive gradient is still resolved
    c = s.clone().requires_grad_()
    infonce_loss(c).backward()
    exact = -15 * math.exp(-10) / (1 + 15 * math.exp(-10))
    assert abs(c.grad[0, 0].item() - exact) < 1e-3 * abs(exact)


# --- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [infonce_loss, flatnce_loss])
def test_bad_inputs(fn):
    s = torch.randn(3, 4)
    with pytest.raises(TypeError, match="scores: expected a floating-point tensor"):
        fn(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scores: expected a 2-D tensor \[B, K\]"):
        fn(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="scores: expected K >= 2"):
        fn(torch.randn(3, 1))
    with pytest.raises(ValueError, match=r"positive: expected indices in \[0, 3\]"):
        fn(s, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"positive: expected indices in \[0, 3\]"):
        fn(s, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"positive: expected shape \(3,\)"):
        fn(s, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="positive: expected an integer tensor"):
        fn(s, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="positive: expected a LongTensor"):
        fn(s, [0, 1, 2])
    with pytest.raises(ValueError, match="reduction: expected one of"):
        fn(s, reduction="avg")


def test_nt_xent_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="tau: expected a value in"):
        nt_xent_scores(z, z, 0.0)
    with pytest.raises(ValueError, match="tau: expected a value in"):
        nt_xent_scores(z, z, -0.1)
    with pytest.raises(ValueError, match=r"z2: expected the shape of z1 \(4, 3\)"):
        nt_xent_scores(z, torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match=r"z1: expected a 2-D tensor \[B, d\]"):
        nt_xent_scores(torch.randn(4), torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="z1: expected B >= 2"):
        nt_xent_scores(torch.randn(1, 3), torch.randn(1, 3), 0.1)
    with pytest.raises(TypeError, match="z2: expected a floating-point tensor"):
        nt_xent_scores(z, torch.ones(4, 3, dtype=torch.long), 0.1)


def test_flatnce_second_derivatives():
    """Double backward (gradient penalties) gives the right second derivatives."""
    torch.manual_seed(0)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 2, 5, 1])
    assert torch.autograd.gradgradcheck(lambda x: flatnce_loss(x, pos), (s,))
