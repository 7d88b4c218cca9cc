"""Tests of companion.losses: nm_crossentropy (loss-1) and nm_centered_crossentropy (loss-3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.losses import (
    multilabel_categorical_crossentropy,
    multilabel_soft_crossentropy,
    nm_centered_crossentropy,
    nm_crossentropy,
)

LOSSES = [nm_crossentropy, nm_centered_crossentropy]


def naive(s, t, centered=False, mask=None):
    """Loops over groups, classes j, positions i, classes k, with plain exp/log (float64)."""
    *lead, n, m = s.shape
    s2, t2 = s.reshape(-1, n, m).tolist(), t.reshape(-1, n, m).tolist()
    keep = [[True] * n] * len(s2) if mask is None else mask.reshape(-1, n).tolist()
    out = []
    for sb, tb, kb in zip(s2, t2, keep):
        total = 0.0
        for j in range(m):
            acc = 1.0
            for i in range(n):
                if not kb[i]:
                    continue
                if centered:
                    acc += tb[i][j] * math.exp(sum(sb[i]) / m - sb[i][j])
                else:
                    acc += sum(tb[i][j] * math.exp(sb[i][k] - sb[i][j]) for k in range(m) if k != j)
            total += math.log(acc)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64).reshape(lead)


def pairwise_reference(s, t):
    """Loss-1 from the full [.., n, m, m] tensor of s_ik - s_ij with k = j masked (no leave-one-out
    trick), one logsumexp per class group; stable at any |s|."""
    d = s.unsqueeze(-2) - s.unsqueeze(-1)  # d[..., i, j, k] = s_ik - s_ij
    eye = torch.eye(s.shape[-1], dtype=torch.bool)
    a = (torch.log(t).unsqueeze(-1) + d.masked_fill(eye, -math.inf)).transpose(-3, -2)  # [.., j, i, k]
    a = a.flatten(-2)
    return torch.logsumexp(torch.cat([a, torch.zeros_like(a[..., :1])], -1), -1).sum(-1)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 4, (2, 3, 5), generator=g)
    soft = torch.softmax(2 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64), -1)
    soft[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # exact zeros in t
    mask = torch.rand(2, 3, 5, generator=g) > 0.3
    return s, idx, soft, mask


@pytest.mark.parametrize("centered", [False, True])
def test_equals_naive_loops(data, centered):
    s, idx, soft, mask = data
    fn = nm_centered_crossentropy if centered else nm_crossentropy
    hard = F.one_hot(idx, 4).double()
    for target, t in [(idx, hard), (soft, soft)]:
        got = fn(s, target, reduction="none")
        assert got.shape == (2, 3)
        torch.testing.assert_close(got, naive(s, t, centered), rtol=1e-12, atol=1e-12)
        got = fn(s, target, mask=mask, reduction="none")
        torch.testing.assert_close(got, naive(s, t, centered, mask), rtol=1e-12, atol=1e-12)
    ref = naive(s, soft, centered)
    torch.testing.assert_close(fn(s, soft), ref.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(fn(s, soft, reduction="sum"), ref.sum(), rtol=1e-12, atol=0)


def test_matches_pairwise_reference_and_unbatched(data):
    s, idx, soft, _ = data
    torch.testing.assert_close(nm_crossentropy(s, soft, reduction="none"), pairwise_reference(s, soft),
                               rtol=1e-12, atol=1e-12)
    # no leading dims: a single group [n, m] gives a 0-dim loss
    torch.testing.assert_close(nm_crossentropy(s[0, 0], soft[0, 0]), pairwise_reference(s[0, 0], soft[0, 0]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", LOSSES)
def test_masked_positions_leave_every_group(data, fn):
    """Masking a position equals deleting it, whatever its target (e.g. a padding -100)."""
    s, idx, soft, _ = data
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[..., 3:] = False
    idx = idx.clone()
    idx[..., 3:] = -100
    got = fn(s, idx, mask=mask, reduction="none")
    torch.testing.assert_close(got, fn(s[..., :3, :], idx[..., :3], reduction="none"), rtol=1e-12, atol=1e-12)
    soft = soft.clone()
    soft[..., 3:, :] = 0.0  # padding rows need not sum to 1
    got = fn(s, soft, mask=mask, reduction="none")
    torch.testing.assert_close(got, fn(s[..., :3, :], soft[..., :3, :], reduction="none"), rtol=1e-12, atol=1e-12)
    # a fully masked group contributes 0
    assert fn(s, idx, mask=torch.zeros_like(mask), reduction="sum").item() == 0.0


def test_n1_is_softmax_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s = 4 * torch.randn(7, 1, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (7, 1), generator=g)
    torch.testing.assert_close(nm_crossentropy(s, y, reduction="none"),
                               F.cross_entropy(s[:, 0], y[:, 0], reduction="none"), rtol=1e-12, atol=1e-12)


def test_m2_is_multilabel_crossentropy():
    g = torch.Generator().manual_seed(2)
    u = 3 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 9), generator=g)
    t = torch.rand(4, 9, generator=g, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(u), u], -1)  # s_i0 = 0, s_i1 = u_i
    soft = torch.stack([1 - t, t], -1)
    ref_hard = multilabel_categorical_crossentropy(u, y, reduction="none")
    torch.testing.assert_close(nm_crossentropy(logits, y, reduction="none"), ref_hard, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nm_crossentropy(logits, soft, reduction="none"),
                               multilabel_soft_crossentropy(u, t, reduction="none"), rtol=1e-12, atol=1e-12)
    # loss-3 with (0, 2u): mean is u, so the exponents are -u (positives) and +u (negatives)
    logits3 = torch.stack([torch.zeros_like(u), 2 * u], -1)
    torch.testing.assert_close(nm_centered_crossentropy(logits3, y, reduction="none"), ref_hard,
                               rtol=1e-12, atol=1e-12)


def test_hard_label_bounds_by_per_position_ce():
    """Truncating the product: max over each class group of the CE <= loss-1 <= the sum of CEs."""
    g = torch.Generator().manual_seed(3)
    s = 2 * torch.randn(6, 10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6, 10), generator=g)
    ce = F.cross_entropy(s.transpose(1, 2), y, reduction="none")  # [6, 10]
    l1 = nm_crossentropy(s, y, reduction="none")
    group_max = torch.stack([torch.where(y == j, ce, torch.zeros_like(ce)).amax(-1) for j in range(5)]).sum(0)
    assert bool((group_max <= l1 + 1e-12).all()) and bool((l1 <= ce.sum(-1) + 1e-12).all())
    assert bool((l1 < ce.sum(-1) - 1e-3).all())  # strictly smaller here: the truncation matters


def test_soft_label_stationary_points():
    """loss-3 is stationary at s = log t; loss-1 at 2 s_ij = log t_ij - log G_j, where
    g_j = sqrt(G_j) solves g_j^2 = 1 + g_j sum_{k != j} C_jk / g_k, C_jk = sum_i sqrt(t_ij t_ik)."""
    g = torch.Generator().manual_seed(4)
    t = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), -1)
    s = torch.log(t).requires_grad_()
    nm_centered_crossentropy(s, t).backward()
    assert s.grad.abs().max().item() < 1e-12
    C = t.sqrt().T @ t.sqrt()
    C.fill_diagonal_(0.0)
    gj = torch.ones(4, dtype=torch.float64)
    for _ in range(500):
        b = C @ (1 / gj)
        gj = (b + torch.sqrt(b * b + 4)) / 2
    s = (0.5 * torch.log(t) - torch.log(gj)).requires_grad_()
    nm_crossentropy(s, t).backward()
    assert s.grad.abs().max().item() < 1e-12
    s = torch.log(t).requires_grad_()  # the naive guess softmax(s) = t is not stationary for loss-1
    nm_crossentropy(s, t).backward()
    assert s.grad.abs().max().item() > 1e-2


def test_gradient_matches_two_term_formula(data):
    s, idx, soft, _ = data
    s, t = s[0, 0].clone().requires_grad_(), soft[0, 1]
    nm_crossentropy(s, t).backward()
    e = s.detach().exp()
    G = 1 + (t * (e.sum(-1, keepdim=True) - e) / e).sum(0)  # [m]
    w = t / e / G  # t_ih e^{-s_ih} / G_h
    # dl/ds_ij = -w_ij sum_{k != j} e^{s_ik} + e^{s_ij} sum_{h != j} w_ih
    ref = -w * (e.sum(-1, keepdim=True) - e) + e * (w.sum(-1, keepdim=True) - w)
    torch.testing.assert_close(s.grad, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fn", LOSSES)
def test_gradcheck(data, fn):
    s, idx, soft, mask = data
    x = s[:, :2].clone().requires_grad_()
    for target, msk in [(idx[:, :2], None), (soft[:, :2], mask[:, :2])]:
        assert torch.autograd.gradcheck(lambda z: fn(z, target, mask=msk, reduction="sum"), (x,))
        assert torch.autograd.gradgradcheck(lambda z: fn(z, target, mask=msk), (x,))


@pytest.mark.parametrize("fn", LOSSES)
def test_extreme_logits_finite_and_exact(fn):
    g = torch.Generator().manual_seed(5)
    s = 1e4 * torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    s[0, 0] = torch.tensor([1e4, 1e4, -1e4, 0.0, 1e4])  # ties at the maximum
    y = torch.randint(0, 5, (3, 6), generator=g)
    soft = torch.softmax(torch.randn(3, 6, 5, generator=g, dtype=torch.float64), -1)
    for target in (y, soft):
        x = s.clone().requires_grad_()
        loss = fn(x, target, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
        if fn is nm_crossentropy:
            t = F.one_hot(y, 5).double() if target is y else soft
            torch.testing.assert_close(loss, pairwise_reference(s, t).sum(), rtol=1e-12, atol=0)
        x32 = s.float().requires_grad_()
        l32 = fn(x32, target.float() if target.is_floating_point() else target, reduction="sum")
        l32.backward()
        assert bool(torch.isfinite(x32.grad).all())
        torch.testing.assert_close(l32.double(), loss.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(fn, dtype):
    g = torch.Generator().manual_seed(6)
    s = 5 * torch.randn(4, 16, 6, generator=g)
    y = torch.randint(0, 6, (4, 16), generator=g)
    x = s.to(dtype).requires_grad_()
    loss = fn(x, y)
    loss.backward()
    assert loss.dtype == dtype and torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    ref = fn(s.to(dtype).float(), y)  # same rounded inputs, float32 arithmetic
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=0)
    big = (1e4 * torch.randn(4, 16, 6, generator=g)).to(dtype).requires_grad_()
    # fp16 cannot hold a loss of 1e4 per wrong position (max 65504): there the targets are the argmax
    y_big = big.detach().argmax(-1) if dtype == torch.float16 else y
    loss = fn(big, y_big)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(big.grad).all())
    torch.testing.assert_close(loss.float(), fn(big.detach().float(), y_big), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("fn", LOSSES)
def test_bad_inputs(fn):
    s = torch.randn(2, 5, 4)
    y = torch.randint(0, 4, (2, 5))
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        fn(torch.ones(2, 5, 4, dtype=torch.long), y)
    with pytest.raises(ValueError, match=r"logits: expected shape \[\.\.\., n, m\] with m >= 2"):
        fn(torch.randn(5), y)
    with pytest.raises(ValueError, match="m >= 2"):
        fn(torch.randn(2, 5, 1), y)
    with pytest.raises(ValueError, match=r"target: class indices must lie in \[0, 3\]"):
        fn(s, torch.full((2, 5), 4))
    with pytest.raises(ValueError, match=r"target: class indices must lie in \[0, 3\]"):
        fn(s, torch.full((2, 5), -1))
    with pytest.raises(ValueError, match=r"target: class indices must have shape \(2, 5\)"):
        fn(s, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target: probabilities must have the shape of logits"):
        fn(s, torch.full((2, 5, 3), 1 / 3))
    with pytest.raises(ValueError, match="target: probabilities must sum to 1"):
        fn(s, torch.full((2, 5, 4), 0.3))
    with pytest.raises(ValueError, match=r"target: probabilities must lie in \[0, 1\]"):
        fn(s, torch.tensor([1.5, -0.5, 0.0, 0.0]).expand(2, 5, 4))
    with pytest.raises(TypeError, match="target: expected int class indices or float probabilities"):
        fn(s, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="target: expected a torch.Tensor"):
        fn(s, [0, 1])
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        fn(s, y, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\)"):
        fn(s, y, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction: expected one of 'none' | 'mean' | 'sum', got 'avg'"):
        fn(s, y, reduction="avg")
