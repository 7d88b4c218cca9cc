"""Tests of companion.losses, section multilabel-softmax-ce: the multi-label categorical cross-entropy
(hard and soft targets) and log e_k, the log elementary symmetric polynomial of exp(logits)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import OpsOnLargeTensors
from companion.losses import (
    log_elementary_symmetric,
    multilabel_categorical_crossentropy,
    multilabel_soft_crossentropy,
)

MCCE = multilabel_categorical_crossentropy
SOFT = multilabel_soft_crossentropy


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_problem(shape, seed=0, scale=3.0, rate=0.3):
    g = _gen(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y = torch.rand(shape, generator=g) < rate
    return s, y


def pairwise_loss(s, y, s0=0.0):
    """Naive reference: log(1 + sum over every ordered pair that should be ordered a < b of
    exp(a - b)), the pairs being (negative, positive), (negative, threshold s0), (s0, positive)."""
    s2, y2 = s.reshape(-1, s.shape[-1]).tolist(), y.reshape(-1, y.shape[-1]).tolist()
    out = []
    for row, lab in zip(s2, y2):
        pos = [v for v, t in zip(row, lab) if t]
        neg = [v for v, t in zip(row, lab) if not t]
        exponents = [0.0]  # the 1 inside the log
        for a in neg:
            for b in pos:
                exponents.append(a - b)
        exponents += [a - s0 for a in neg] + [s0 - b for b in pos]
        m = max(exponents)  # log-sum-exp, so that the reference survives +-1e4 too
        out.append(m + math.log(sum(math.exp(e - m) for e in exponents)))
    return torch.tensor(out, dtype=torch.float64).reshape(s.shape[:-1])


def mask_1e12_loss(s, y):
    """The widely copied port of the loss that masks with a large constant instead of -inf."""
    y = y.to(s.dtype)
    s = (1 - 2 * y) * s
    s_neg = s - y * 1e12
    s_pos = s - (1 - y) * 1e12
    zeros = torch.zeros_like(s[..., :1])
    return torch.logsumexp(torch.cat([s_neg, zeros], -1), -1) + torch.logsumexp(
        torch.cat([s_pos, zeros], -1), -1
    )


def brute_log_ek(s, k):
    """log e_k(exp s) by enumerating the k-subsets with itertools.combinations (last dim)."""
    n = s.shape[-1]
    terms = [s[..., list(c)].sum(-1) for c in itertools.combinations(range(n), k)]
    return torch.logsumexp(torch.stack(terms, -1), -1)


# --- multilabel_categorical_crossentropy ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 7), (12,)])
def test_mcce_equals_pairwise_double_loop(shape):
    s, y = _random_problem(shape)
    y.reshape(-1, shape[-1])[0] = False  # a row with no positive
    if len(shape) > 1:
        y.reshape(-1, shape[-1])[1] = True  # a row with no negative
    got = MCCE(s, y, reduction="none")
    assert got.shape == shape[:-1]
    torch.testing.assert_close(got, pairwise_loss(s, y), rtol=1e-12, atol=0)


def test_mcce_equals_the_1e12_masking_port_in_float64():
    s, y = _random_problem((64, 30), seed=1)
    torch.testing.assert_close(MCCE(s, y, "none"), mask_1e12_loss(s, y), rtol=1e-12, atol=1e-12)


def test_mcce_target_dtypes_agree():
    s, y = _random_problem((4, 9), seed=2)
    ref = MCCE(s, y, "none")
    for t in (y.long(), y.int(), y.float(), y.double(), y.to(torch.uint8)):
        torch.testing.assert_close(MCCE(s, t, "none"), ref, rtol=0, atol=0)


def test_mcce_reductions():
    s, y = _random_problem((6, 10), seed=3)
    per_sample = pairwise_loss(s, y)
    torch.testing.assert_close(MCCE(s, y, "none"), per_sample, rtol=1e-12, atol=0)
    torch.testing.assert_close(MCCE(s, y, "sum"), per_sample.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(MCCE(s, y), per_sample.mean(), rtol=1e-12, atol=0)
    assert MCCE(s, y).dim() == 0


def test_mcce_unified_form_is_softmax_ce_for_one_label():
    """Without the threshold the pairwise loss with one positive t is softmax CE; with it, the loss
    is log(exp(CE_0) + sum_{i != t} exp(s_i)) >= CE_0, CE_0 being softmax CE over (0, s)."""
    g = _gen(4)
    s = torch.randn(8, 10, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, 10, (8,), generator=g)
    y = F.one_hot(t, 10).bool()
    s_t = s.gather(-1, t[:, None])
    unified = torch.log1p(torch.where(y, 0.0, torch.exp(s - s_t)).sum(-1))  # log(1 + sum e^{s_i-s_t})
    torch.testing.assert_close(unified, F.cross_entropy(s, t, reduction="none"), rtol=1e-12, atol=0)
    ce0 = F.cross_entropy(torch.cat([torch.zeros(8, 1, dtype=s.dtype), s], -1), t + 1, reduction="none")
    rhs = torch.log(torch.exp(ce0) + torch.where(y, 0.0, torch.exp(s)).sum(-1))
    got = MCCE(s, y, "none")
    torch.testing.assert_close(got, rhs, rtol=1e-12, atol=0)
    assert bool((got >= ce0).all())


def test_mcce_gradcheck():
    s, y = _random_problem((3, 6), seed=5, scale=1.0)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: MCCE(x, y, "none"), (s,))


def test_mcce_analytic_gradient_and_group_sums():
    """dL/ds_i = e^{s_i}/(1 + sum_- e^s) on negatives, -e^{-s_j}/(1 + sum_+ e^{-s}) on positives;
    each group's gradient sums to less than 1 in absolute value."""
    s, y = _random_problem((16, 40), seed=6, scale=2.0)
    y[:, 0], y[:, 1] = True, False  # both groups non-empty
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(MCCE(s, y, "sum"), s)
    e_neg = torch.where(y, 0.0, torch.exp(s.detach()))
    e_pos = torch.where(y, torch.exp(-s.detach()), 0.0)
    analytic = e_neg / (1 + e_neg.sum(-1, keepdim=True)) - e_pos / (1 + e_pos.sum(-1, keepdim=True))
    torch.testing.assert_close(grad, analytic, rtol=0, atol=1e-10)
    neg_sum = torch.where(y, 0.0, grad).sum(-1)
    pos_sum = torch.where(y, grad, 0.0).sum(-1)
    assert bool(((neg_sum > 0) & (neg_sum < 1)).all()) and bool(((pos_sum < 0) & (pos_sum > -1)).all())


def test_mcce_second_derivatives():
    """Double backward (gradient penalties, meta-learning) is exact: gradgradcheck in float64."""
    s, y = _random_problem((3, 6), seed=11, scale=1.5)
    s.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: MCCE(x, y, "none"), (s,))


def test_mcce_tiny_losses_keep_their_relative_precision():
    """A confident model's loss, e^{-25} per class, in float32: relative error at rounding level
    (log(1 + x) computed as log1p, not as -log of a probability that rounds to 1)."""
    y = torch.zeros(4, 30, dtype=torch.bool)
    y[:, :3] = True
    s = torch.where(y, 25.0, -25.0) + 0.5 * torch.randn(4, 30, generator=_gen(12))
    x = s.clone().requires_grad_(True)
    loss = MCCE(x, y, "none")
    loss.sum().backward()
    ref = pairwise_loss(s.double(), y)
    assert bool((ref < 1e-9).all())  # the regime the test is about
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    e = torch.where(y, -torch.exp(-s.double()), torch.exp(s.double()))  # gradient ~ e^{-25}
    torch.testing.assert_close(x.grad.double(), e, rtol=1e-5, atol=0)


def test_mcce_rows_beyond_the_fused_range_and_non_finite_rows():
    """Rows whose half-loss exceeds ~69 nats (p_last underflows in the fused softmax) take the
    logsumexp path, mixed in one batch with ordinary rows; a NaN logit gives a NaN loss in its
    row only, and +inf on a negative class an infinite loss."""
    s, y = _random_problem((5, 8), seed=13, scale=1.0)
    y[:, 0], y[:, 1] = True, False
    s[1, 1] = 300.0   # a negative scored far above: its half is ~300 nats
    s[2, 0] = -90.0   # a positive scored far below
    x = s.clone().float().requires_grad_(True)
    loss = MCCE(x, y, "none")
    loss.sum().backward()
    torch.testing.assert_close(loss.double(), pairwise_loss(s, y), rtol=1e-6, atol=0)
    s64 = s.clone().requires_grad_(True)
    MCCE(s64, y, "sum").backward()
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    bad = s.clone()
    bad[3, 4] = float("nan")
    bad[4, 1] = float("inf")
    out = MCCE(bad, y, "none")
    assert math.isnan(out[3].item()) and out[4].item() == float("inf")
    torch.testing.assert_close(out[:3], pairwise_loss(s[:3], y[:3]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mcce_extreme_logits(dtype):
    g = _gen(7)
    s = (torch.randint(0, 2, (8, 50), generator=g) * 2 - 1).to(dtype) * 1e4  # entries +-1e4
    s[:, :5] += torch.randn(8, 5, generator=g).to(dtype)
    y = torch.rand(8, 50, generator=g) < 0.2
    x = s.clone().requires_grad_(True)
    loss = MCCE(x, y, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), pairwise_loss(s.double(), y), rtol=1e-6, atol=1e-3)
    assert bool((loss > 1e4).any())  # the test really reaches the large-loss regime


@pytest.mark.parametrize("dtype,rtol,gtol", [(torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1e-2, 1e-2)])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_mcce_half_precision(dtype, rtol, gtol, scale):
    g = _gen(8)
    sign = torch.randint(0, 2, (32, 300), generator=g) * 2 - 1
    noise = torch.randn(32, 300, generator=g) * 3
    s = (sign * scale + noise if scale > 100 else noise).to(dtype)  # +-1e4, or O(1); 300 classes
    y = torch.rand(32, 300, generator=g) < 0.05
    x = s.clone().requires_grad_(True)
    loss = MCCE(x, y, "none")
    loss.sum().backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    s64 = s.double().requires_grad_(True)  # float64 answer on the same (rounded) inputs
    ref = MCCE(s64, y, "none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-3)
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=0, atol=gtol)


def test_mcce_bad_inputs():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"targets.*\(2, 3\).*\(2, 4\)"):
        MCCE(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"targets: expected entries in \{0, 1\}, got a value 0\.5"):
        MCCE(s, torch.tensor([[0, 1, 0.5], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"targets: expected entries in \{0, 1\}, got a value 2"):
        MCCE(s, torch.tensor([[0, 1, 2], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"targets: expected entries in \{0, 1\}, got a value nan"):
        MCCE(s, torch.tensor([[0, 1, float("nan")], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"reduction: expected one of 'none' \| 'mean' \| 'sum', got 'avg'"):
        MCCE(s, torch.zeros(2, 3), reduction="avg")
    with pytest.raises(TypeError, match=r"logits: expected a floating-point tensor, got dtype torch\.int64"):
        MCCE(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"targets: expected a torch\.Tensor, got list"):
        MCCE(s, [[0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"logits: expected at least 1 dimension"):
        MCCE(torch.tensor(1.0), torch.tensor(1.0))


# --- multilabel_soft_crossentropy ----------------------------------------------------------------


def soft_loop(s, t):
    """Naive reference: log(1 + sum_i t_i e^{-s_i}) + log(1 + sum_i (1 - t_i) e^{s_i}), row by row."""
    out = []
    for row, tr in zip(s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()):
        a = 1.0 + sum(ti * math.exp(-si) for si, ti in zip(row, tr))
        b = 1.0 + sum((1 - ti) * math.exp(si) for si, ti in zip(row, tr))
        out.append(math.log(a) + math.log(b))
    return torch.tensor(out, dtype=torch.float64).reshape(s.shape[:-1])


def test_soft_equals_loop_reference():
    g = _gen(10)
    s = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 3
    t = torch.rand(3, 4, 11, generator=g, dtype=torch.float64)
    t[0, 0, :3] = 0.0
    t[0, 1, :3] = 1.0
    torch.testing.assert_close(SOFT(s, t, "none"), soft_loop(s, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(SOFT(s, t, "sum"), soft_loop(s, t).sum(), rtol=1e-12, atol=0)


def test_soft_equals_hard_on_binary_targets():
    s, y = _random_problem((20, 15), seed=11)
    y[0] = False
    y[1] = True
    for t in (y, y.double(), y.long()):
        torch.testing.assert_close(SOFT(s, t, "none"), MCCE(s, y, "none"), rtol=1e-12, atol=0)
    s16 = (s * 3e3).half()  # also at large logits in fp16
    torch.testing.assert_close(SOFT(s16, y, "none"), MCCE(s16, y, "none"), rtol=1e-3, atol=0)


def test_soft_gradcheck_in_logits_and_targets():
    g = _gen(12)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(3, 6, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: SOFT(a, b, "none"), (s, t))
    t01 = torch.tensor([[0.0, 1.0, 0.3, 0.0, 1.0, 0.5]] * 3, dtype=torch.float64, requires_grad=True)
    s.grad = None
    SOFT(s, t01).backward()  # log 0 = -inf in the forward; the backward must stay finite
    assert torch.isfinite(s.grad).all() and torch.isfinite(t01.grad).all()


def test_soft_stationary_at_sigmoid_2s():
    """The gradient vanishes where t_i = sigmoid(2 s_i), i.e. s_i = logit(t_i) / 2."""
    t = torch.rand(5, 13, generator=_gen(13), dtype=torch.float64) * 0.9 + 0.05
    s = (torch.logit(t) / 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(SOFT(s, t, "sum"), s)
    assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_half_precision_extreme(dtype):
    g = _gen(14)
    s = ((torch.randint(0, 2, (16, 200), generator=g) * 2 - 1) * 1e4 + torch.randn(16, 200, generator=g) * 3).to(dtype)
    t = torch.rand(16, 200, generator=g)  # +-1e4 logits, soft targets
    x = s.clone().requires_grad_(True)
    loss = SOFT(x, t, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), SOFT(s.double(), t.double(), "none"), rtol=1e-2, atol=0)


def test_soft_bad_inputs():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"targets: expected entries in \[0, 1\], got a value 1\.5"):
        SOFT(s, torch.tensor([[0.0, 1.5, 0.2], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"targets: expected entries in \[0, 1\], got a value -0\.1"):
        SOFT(s, torch.tensor([[0.0, -0.1, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"targets: expected entries in \[0, 1\], got a value nan"):
        SOFT(s, torch.tensor([[0.0, float("nan"), 0.2], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"targets.*\(2, 3\).*\(3, 2\)"):
        SOFT(s, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"reduction"):
        SOFT(s, torch.zeros(2, 3), reduction=None)
    with pytest.raises(TypeError, match=r"logits: expected a floating-point tensor"):
        SOFT(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3))


# --- log_elementary_symmetric --------------------------------------------------------------------


@pytest.mark.parametrize("k", range(1, 9))
def test_log_ek_equals_brute_force(k):
    s = torch.randn(2, 3, 8, generator=_gen(15), dtype=torch.float64) * 2
    torch.testing.assert_close(log_elementary_symmetric(s, k), brute_log_ek(s, k), rtol=1e-12, atol=0)


def test_log_ek_special_cases():
    s = torch.randn(4, 30, generator=_gen(16), dtype=torch.float64)
    torch.testing.assert_close(log_elementary_symmetric(s, 1), torch.logsumexp(s, -1), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_elementary_symmetric(s, 30), s.sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_log_ek_gradcheck(k):
    s = torch.randn(2, 6, generator=_gen(17), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_elementary_symmetric(x, k), (s,))


def test_log_ek_gradient_is_inclusion_probability():
    """d log e_k / d s_i = P(i in the subset) under p(subset) ~ exp(sum of its scores): each in
    (0, 1), summing to k; checked against the brute-force marginals."""
    n, k = 7, 3
    s = torch.randn(n, generator=_gen(18), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_elementary_symmetric(s, k), s)
    subsets = list(itertools.combinations(range(n), k))
    w = torch.softmax(torch.stack([s.detach()[list(c)].sum() for c in subsets]), 0)
    marg = torch.zeros(n, dtype=torch.float64)
    for wi, c in zip(w, subsets):
        marg[list(c)] += wi
    torch.testing.assert_close(grad, marg, rtol=0, atol=1e-12)
    assert abs(grad.sum().item() - k) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_log_ek_extreme_and_half(dtype):
    g = _gen(19)
    sign = torch.randint(0, 2, (4, 40), generator=g) * 2 - 1
    s = (sign * 1e4 + torch.randn(4, 40, generator=g) * 100).to(dtype)  # +-1e4; e_5 up to ~5e4
    x = s.clone().requires_grad_(True)
    out = log_elementary_symmetric(x, 5)
    out.sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    ref = log_elementary_symmetric(s.double(), 5)  # float64 on the same rounded inputs
    torch.testing.assert_close(out.double(), ref, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)
    top5 = s.double().topk(5, -1).values.sum(-1)  # max term <= e_5 <= C(40, 5) * max term
    assert bool((ref >= top5).all()) and bool((ref <= top5 + math.log(math.comb(40, 5))).all())


def test_minus_inf_logits_are_masked_out():
    """A logit of -inf (with target 0) removes its class: the value is that of the remaining classes
    and the gradient is finite, zero at the masked entries (two or more -inf entries in log e_k would
    otherwise meet in logaddexp(-inf, -inf), whose backward is NaN)."""
    s, y = _random_problem((6, 10), seed=20)
    y[:, :3], y[:, 3] = False, True
    masked = s.clone()
    masked[:, :3] = float("-inf")
    cases = [
        (lambda v: MCCE(v, y, "none"), MCCE(s[:, 3:], y[:, 3:], "none")),
        (lambda v: SOFT(v, y.double(), "none"), SOFT(s[:, 3:], y[:, 3:].double(), "none")),
        (lambda v: log_elementary_symmetric(v, 3), log_elementary_symmetric(s[:, 3:], 3)),
    ]
    for fn, ref in cases:
        x = masked.clone().requires_grad_(True)
        out = fn(x)
        out.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        assert torch.isfinite(x.grad).all() and bool((x.grad[:, :3] == 0).all())
    x = masked[:, :5].clone().requires_grad_(True)  # only 2 finite entries: e_3 = 0
    out = log_elementary_symmetric(x, 3)
    out.sum().backward()
    assert bool((out == float("-inf")).all()) and torch.isfinite(x.grad).all()


def test_log_ek_bad_inputs():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"k: expected a value in \[1, 5\], got 0"):
        log_elementary_symmetric(s, 0)
    with pytest.raises(ValueError, match=r"k: expected a value in \[1, 5\], got 6"):
        log_elementary_symmetric(s, 6)
    with pytest.raises(TypeError, match=r"k: expected an int, got float"):
        log_elementary_symmetric(s, 2.0)
    with pytest.raises(TypeError, match=r"logits: expected a floating-point tensor"):
        log_elementary_symmetric(torch.ones(2, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"logits: expected at least 1 dimension"):
        log_elementary_symmetric(torch.tensor(1.0), 1)


def test_complex_logits_raise():
    with pytest.raises(TypeError, match="logits: expected a real floating-point tensor"):
        multilabel_categorical_crossentropy(torch.randn(2, 3, dtype=torch.complex64),
                                            torch.zeros(2, 3))


def test_mcce_takes_no_elementwise_exp_over_the_logits():
    """The loss and its gradient come from one fused softmax: no torch.exp / logsumexp over a
    tensor of the logits' size, forward or backward (torch.exp is many times slower where its
    result is subnormal, e.g. at masked -inf entries or far below the maximum)."""
    s, y = _random_problem((16, 50), seed=21)
    x = s.float().requires_grad_(True)
    with OpsOnLargeTensors(("exp", "exp_", "logsumexp", "expm1"), x.numel()) as ops:
        MCCE(x, y).backward()
    assert not ops.seen, ops.seen
