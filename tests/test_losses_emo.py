"""Tests of the EMO losses in companion.losses (notebook: emo-loss)."""
import numpy as np
import ot
import pytest
import torch
from _helpers import LargestTensor, OpsOnLargeTensors
import torch.nn.functional as F

from companion.losses import emo_loss, emo_mle_loss, transport_cost_upper_bound


def _data(n=6, v=9, d=4, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, v, generator=g, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g)
    emb = torch.randn(v, d, generator=g, dtype=dtype)
    return logits, target, emb


def _cost_matrix(emb):
    """The explicit cost c_ij = 1 - cos(e_i, e_j), by loops (the naive reference)."""
    v = emb.shape[0]
    c = torch.empty(v, v, dtype=emb.dtype)
    for i in range(v):
        for j in range(v):
            c[i, j] = 1 - torch.dot(emb[i], emb[j]) / (emb[i].norm() * emb[j].norm())
    return c


def _emo_naive(logits, target, emb):
    c = _cost_matrix(emb)
    p = torch.softmax(logits, -1)
    return torch.stack([sum(p[n, i] * c[i, target[n]] for i in range(p.shape[1]))
                        for n in range(p.shape[0])])


# --- emo_loss -------------------------------------------------------------------------------
def test_emo_matches_naive_sum_and_exact_ot():
    logits, target, emb = _data()
    got = emo_loss(logits, target, emb, reduction="none")
    torch.testing.assert_close(got, _emo_naive(logits, target, emb), rtol=1e-12, atol=0)
    cost = _cost_matrix(emb).numpy()
    p = torch.softmax(logits, -1).numpy()
    for n in range(logits.shape[0]):
        onehot = np.zeros(logits.shape[1])
        onehot[target[n]] = 1.0
        exact = ot.emd2(p[n] / p[n].sum(), onehot, cost)   # exact optimal transport (network simplex)
        assert abs(got[n].item() - exact) < 1e-10


def test_emo_zero_one_cost_is_one_minus_p_target():
    logits, target, _ = _data(v=7)
    got = emo_loss(logits, target, torch.eye(7, dtype=torch.float64), reduction="none")
    want = 1 - torch.softmax(logits, -1)[torch.arange(6), target]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_emo_reductions_ignore_index_and_batched_shape():
    logits, target, emb = _data(n=12)
    per = emo_loss(logits, target, emb, reduction="none")
    target_ig = target.clone()
    target_ig[[1, 4, 5]] = -1
    keep = target_ig != -1
    mean = emo_loss(logits, target_ig, emb, ignore_index=-1)
    torch.testing.assert_close(mean, per[keep].mean(), rtol=1e-12, atol=0)
    total = emo_loss(logits, target_ig, emb, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(total, per[keep].sum(), rtol=1e-12, atol=0)
    none = emo_loss(logits, target_ig, emb, ignore_index=-1, reduction="none")
    assert (none[~keep] == 0).all()
    batched = emo_loss(logits.reshape(3, 4, -1), target.reshape(3, 4), emb, reduction="none")
    torch.testing.assert_close(batched, per.reshape(3, 4), rtol=1e-12, atol=0)
    # every position ignored: NaN, as F.cross_entropy gives
    all_ig = torch.full_like(target, -100)
    assert emo_loss(logits, all_ig, emb).isnan()
    assert F.cross_entropy(logits, all_ig).isnan()


def test_emo_cost_embedding_is_fixed():
    logits, target, emb = _data()
    logits.requires_grad_(True)
    emb.requires_grad_(True)
    emo_loss(logits, target, emb).backward()
    assert emb.grad is None and logits.grad is not None


def test_emo_gradcheck_and_gradient_formula():
    logits, target, emb = _data(n=4, v=6, d=3)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: emo_loss(z, target, emb, reduction="none"), (logits,))
    # dC/dz_i = p_i (c_it - cbar), cbar = Σ_j p_j c_jt
    (grad,) = torch.autograd.grad(emo_loss(logits, target, emb, reduction="sum"), logits)
    p = torch.softmax(logits.detach(), -1)
    c_t = _cost_matrix(emb)[:, target].T                  # [N, V]: c_{i, t_n}
    want = p * (c_t - (p * c_t).sum(-1, keepdim=True))
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_emo_extreme_logits_and_half_precision():
    logits, target, emb = _data(n=32, v=50, d=8, dtype=torch.float32, seed=1)
    big = (1e4 * torch.sign(logits)).requires_grad_(True)
    loss = emo_loss(big, target, emb)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    ref = emo_loss(logits, target, emb)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        low = emo_loss(logits.to(dtype), target, emb.to(dtype))
        assert low.dtype == dtype and torch.isfinite(low)
        assert abs(low.float().item() - ref.item()) < tol * max(1.0, ref.item())




@pytest.mark.parametrize("fn", [emo_loss, lambda *a: emo_mle_loss(*a)[0]])
def test_emo_memory_never_v_squared(fn):
    # A vocabulary of 20k: a V x V cost would hold 4e8 elements; every tensor of the forward and
    # backward pass must stay within the logits' N x V (or the embedding's V x d).
    n, v, d = 8, 20_000, 16
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g)
    emb = torch.randn(v, d, generator=g)
    with LargestTensor() as mode:
        fn(logits, target, emb).backward()
    assert mode.largest <= max(n * v, v * d)
    assert torch.isfinite(logits.grad).all()


def test_emo_bad_inputs():
    logits, target, emb = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cost_embedding: expected shape \[V, d\] with V = 9"):
        emo_loss(logits, target, emb[:5])
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 9\)"):
        emo_loss(logits, torch.full_like(target, 9), emb)
    with pytest.raises(ValueError, match=r"target: expected shape \(6,\)"):
        emo_loss(logits, target[:3], emb)
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        emo_loss(logits.long(), target, emb)
    with pytest.raises(TypeError, match="target: expected an integer tensor"):
        emo_loss(logits, target.float(), emb)
    zero = emb.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match=r"cost_embedding: every row must have a nonzero norm.*\[3\]"):
        emo_loss(logits, target, zero)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        emo_loss(logits, target, emb, reduction="avg")


# --- emo_mle_loss ---------------------------------------------------------------------------
def test_emo_mle_value_is_ce_and_gradient_is_the_mix():
    logits, target, emb = _data(n=8, v=10, d=5, seed=3)
    target[2] = -100
    logits.requires_grad_(True)
    loss, ce, emo = emo_mle_loss(logits, target, emb)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target), rtol=1e-12, atol=0)
    torch.testing.assert_close(emo, emo_loss(logits, target, emb), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, ce, rtol=1e-12, atol=0)      # ½(CE + (CE/C)·C) = CE
    (g,) = torch.autograd.grad(loss, logits)
    keep = target != -100
    ce_n = F.cross_entropy(logits, target, reduction="none")[keep]
    emo_n = emo_loss(logits, target, emb, reduction="none")[keep]
    (g_ce,) = torch.autograd.grad(ce_n.sum(), logits, retain_graph=True)
    (g_emo,) = torch.autograd.grad(((ce_n / emo_n).detach() * emo_n).sum(), logits)
    torch.testing.assert_close(g, 0.5 * (g_ce + g_emo) / keep.sum(), rtol=0, atol=1e-12)


def test_emo_mle_gradcheck_extremes_and_bad_inputs():
    logits, target, emb = _data(n=4, v=6, d=3, seed=4)
    logits.requires_grad_(True)
    # the mixed loss has a stop-gradient (its value is CE, its gradient is not), so gradcheck
    # its two differentiable parts; its own gradient is checked against the formula above
    assert torch.autograd.gradcheck(
        lambda z: emo_mle_loss(z, target, emb, reduction="none")[1:], (logits,))
    big = (1e4 * torch.sign(logits.detach().float())).requires_grad_(True)
    loss, ce, emo = emo_mle_loss(big, target, emb.float())
    loss.backward()
    assert all(torch.isfinite(x) for x in (loss, ce, emo)) and torch.isfinite(big.grad).all()
    ref = emo_mle_loss(logits.detach().float(), target, emb.float())
    low = emo_mle_loss(logits.detach().bfloat16(), target, emb.bfloat16())
    for a, b in zip(low, ref):
        assert a.dtype == torch.bfloat16 and abs(a.float().item() - b.item()) < 2e-2 * max(1, b.item())
    with pytest.raises(ValueError, match=r"cost_embedding: expected shape \[V, d\]"):
        emo_mle_loss(logits, target, emb.T)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        emo_mle_loss(logits, target, emb, reduction="max")


# --- transport_cost_upper_bound -------------------------------------------------------------
def test_upper_bound_naive_and_exact_ot():
    g = torch.Generator().manual_seed(5)
    v = 12
    probs = torch.softmax(torch.randn(5, v, generator=g, dtype=torch.float64), -1)
    tau = torch.softmax(2 * torch.randn(5, v, generator=g, dtype=torch.float64), -1)
    cost = torch.rand(v, v, generator=g, dtype=torch.float64)
    got = transport_cost_upper_bound(probs, tau, cost)
    naive = torch.stack([sum(probs[n, i] * tau[n, j] * cost[i, j] for i in range(v) for j in range(v))
                         for n in range(5)])
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=0)
    for n in range(5):
        exact = ot.emd2(probs[n].numpy(), tau[n].numpy(), cost.numpy())
        assert got[n].item() >= exact - 1e-9             # the independent coupling is feasible
        assert got[n].item() > exact + 1e-3              # and, for a soft tau, not optimal
    onehot = F.one_hot(torch.tensor([3, 0, 7, 11, 5]), v).double()
    bound = transport_cost_upper_bound(probs, onehot, cost)
    for n in range(5):
        exact = ot.emd2(probs[n].numpy(), onehot[n].numpy(), cost.numpy())
        assert abs(bound[n].item() - exact) < 1e-10


def test_upper_bound_gradcheck_extremes_and_bad_inputs():
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    tau = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    cost = torch.rand(5, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, t: transport_cost_upper_bound(p, t, cost), (probs, tau))
    sharp = torch.softmax(1e4 * torch.randn(3, 5, generator=g), -1)       # one-hot up to rounding
    out = transport_cost_upper_bound(sharp, sharp.flip(0), cost.float())
    assert torch.isfinite(out).all()
    half = transport_cost_upper_bound(probs.detach().bfloat16(), tau.detach().bfloat16(),
                                      cost.bfloat16())
    torch.testing.assert_close(half.double(), transport_cost_upper_bound(probs, tau, cost).detach(),
                               rtol=3e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"cost: expected shape \[V, V\] = \[5, 5\]"):
        transport_cost_upper_bound(probs, tau, cost[:4])
    with pytest.raises(ValueError, match="tau: expected the shape of probs"):
        transport_cost_upper_bound(probs, tau[:2], cost)
    with pytest.raises(ValueError, match="probs: expected nonnegative rows summing to 1"):
        transport_cost_upper_bound(2 * probs, tau, cost)
    with pytest.raises(TypeError, match="cost: expected a floating-point tensor"):
        transport_cost_upper_bound(probs, tau, cost.long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("margin", [5.0, 19.0, 50.0, 1e4])
def test_emo_mle_confident_model_is_finite_and_bounded(dtype, margin):
    """A confidently correct model (target logit `margin` above the rest): the loss stays near
    CE (about e^-margin V) and the gradient stays bounded, instead of CE / (rounded C ~ 0)."""
    torch.manual_seed(0)
    v, n = 30, 8
    emb = torch.randn(v, 16)
    t = torch.randint(0, v, (n,))
    logits = torch.zeros(n, v)
    logits[torch.arange(n), t] = margin
    logits = logits.to(dtype).requires_grad_()
    loss, ce, emo = emo_mle_loss(logits, t, emb)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert 0 <= loss.item() <= 1.5 * ce.item() + 1e-6 and logits.grad.abs().max().item() <= 1.0
    assert emo.item() >= 0


def test_emo_cost_accurate_when_confident():
    """C = sum_i p_i c_it against a float64 reference with an explicit cost matrix, at a margin
    where 1 - <sum p_i e_i, e_t> would round to zero in float32."""
    torch.manual_seed(1)
    v = 30
    emb = torch.randn(v, 8)
    t = torch.arange(4)
    logits = torch.randn(4, v)
    logits[torch.arange(4), t] += 16.0
    e = emb.double() / emb.double().norm(dim=-1, keepdim=True)
    ref = (logits.double().softmax(-1) * (1 - e @ e.T)[t]).sum(-1)
    got = emo_loss(logits, t, emb, reduction="none").double()
    assert torch.allclose(got, ref, rtol=1e-3, atol=0), (got, ref)


def test_emo_mle_takes_no_elementwise_exp_over_the_vocabulary():
    """p comes from the fused softmax, not exp(log p): torch.exp is many times slower where its
    result is subnormal, as for most of a confident model's vocabulary."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g, requires_grad=True)
    target = torch.randint(0, 40, (6,), generator=g)
    emb = torch.randn(40, 5, generator=g)
    with OpsOnLargeTensors(("exp", "exp_"), logits.numel()) as ops:
        emo_mle_loss(logits, target, emb)[0].backward()
    assert not ops.seen, ops.seen
