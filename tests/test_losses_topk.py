"""Tests of companion.losses: grad_topk, thre_topk (exp, sigmoid, smooth) and iterative_soft_topk."""
import itertools
import math

import pytest
import torch
from scipy.optimize import brentq

from companion.losses import grad_topk, iterative_soft_topk, thre_topk

THRE = ["exp", "sigmoid", "smooth"]
# every operator as fn(x, k, tau); "principled" ones are proven to be monotone and in [0, 1]
PRINCIPLED = {
    "grad": grad_topk,
    **{f"thre-{f}": (lambda f: lambda x, k, tau=1.0: thre_topk(x, k, tau, f=f))(f) for f in THRE},
}
ALL = {
    **PRINCIPLED,
    "iter-blog": lambda x, k, tau=1.0: iterative_soft_topk(x, k, tau, "blog"),
    "iter-weighted": lambda x, k, tau=1.0: iterative_soft_topk(x, k, tau, "weighted"),
}
F_SCALAR = {
    "exp": lambda u: min(1.0, math.exp(u)),
    "sigmoid": lambda u: 1 / (1 + math.exp(-u)),
    "smooth": lambda u: 1 - math.exp(-u) / 2 if u >= 0 else math.exp(u) / 2,
}


def hard_topk(x, k):
    return torch.zeros_like(x).scatter(-1, x.topk(k, dim=-1).indices, 1.0)


def brute_grad_topk(row, k):
    """Z_{k,i} / Z_k by enumerating every k-subset (plain floats)."""
    n = len(row)
    shift = max(row)
    z_all, z_i = 0.0, [0.0] * n
    for subset in itertools.combinations(range(n), k):
        w = math.exp(sum(row[j] - shift for j in subset))
        z_all += w
        for j in subset:
            z_i[j] += w
    return [v / z_all for v in z_i]


def brentq_thre(row, k, f):
    """f(z - lambda) with lambda from scipy's brentq on sum_i f(z_i - lambda) = k."""
    fs = F_SCALAR[f]
    lam = brentq(lambda lam: sum(fs(z - lam) for z in row) - k, min(row) - 60, max(row) + 60, xtol=1e-14, rtol=1e-15)
    return [fs(z - lam) for z in row]


def loop_iterative(row, k, variant):
    n = len(row)
    p = [0.0] * n
    if variant == "blog":
        lo = min(row)
        z = [v - lo for v in row]
        for _ in range(k):
            y = [(1 - p[i]) * z[i] for i in range(n)]
            top = max(y)
            e = [math.exp(v - top) for v in y]
            p = [p[i] + e[i] / sum(e) for i in range(n)]
        return p
    for _ in range(k):
        top = max(row)
        e = [(1 - p[i]) * math.exp(row[i] - top) for i in range(n)]
        p = [p[i] + e[i] / sum(e) for i in range(n)]
    return p


@pytest.fixture
def x8():
    return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_grad_topk_equals_subset_enumeration(x8, k):
    tau = 0.7
    got = grad_topk(x8, k, tau)
    ref = torch.tensor([brute_grad_topk((r / tau).tolist(), k) for r in x8.reshape(-1, 8)], dtype=torch.float64)
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-10, atol=1e-12)
    assert bool(((got > 0) & (got < 1)).all())


@pytest.mark.parametrize("f", THRE)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_thre_topk_equals_brentq_threshold(x8, f, k):
    got = thre_topk(x8, k, 0.7, f=f, iters=60)
    ref = torch.tensor([brentq_thre((r / 0.7).tolist(), k, f) for r in x8.reshape(-1, 8)], dtype=torch.float64)
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["blog", "weighted"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_iterative_equals_loops(x8, variant, k):
    got = iterative_soft_topk(x8, k, 0.5, variant)
    ref = torch.tensor([loop_iterative((r / 0.5).tolist(), k, variant) for r in x8.reshape(-1, 8)], dtype=torch.float64)
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL))
def test_sums_to_k_and_k1(x8, name):
    fn = ALL[name]
    for k in (1, 3, 7):
        torch.testing.assert_close(fn(x8, k).sum(-1), torch.full((2, 3), float(k), dtype=torch.float64),
                                   rtol=0, atol=1e-10)
    if name in ("grad", "thre-exp", "iter-blog", "iter-weighted"):  # k = 1 is softmax
        torch.testing.assert_close(fn(x8, 1), torch.softmax(x8, -1), rtol=1e-12, atol=1e-14)


def test_smooth_threshold_k1_is_softmax_only_below_one_half():
    """m = 0 (every entry below lambda) gives softmax; it is the consistent case iff max softmax <= 1/2."""
    flat = torch.tensor([0.3, 0.0, -0.2, 0.1], dtype=torch.float64)  # max softmax 0.31
    torch.testing.assert_close(thre_topk(flat, 1, f="smooth"), torch.softmax(flat, -1), rtol=1e-12, atol=1e-14)
    peaked = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)  # max softmax 0.91: m = 1
    lam = (3.0 + math.log(2.0)) / 2  # e^{2 lambda} = e^{x_1} (e^{x_2} + e^{x_3})
    expected = torch.tensor([1 - math.exp(lam - 3.0) / 2, math.exp(-lam) / 2, math.exp(-lam) / 2], dtype=torch.float64)
    torch.testing.assert_close(thre_topk(peaked, 1, f="smooth"), expected, rtol=1e-12, atol=1e-14)
    assert (thre_topk(peaked, 1, f="smooth") - torch.softmax(peaked, -1)).abs().max().item() > 0.05


@pytest.mark.parametrize("name", list(PRINCIPLED) + ["iter-blog"])
def test_tends_to_hard_topk(name):
    """Well separated entries (gaps >= 0.5): the L1 distance to torch.topk's mask falls with tau."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randperm(12, generator=g).double() * 0.5).reshape(1, 12)
    for k in (1, 3, 6):
        dist = [(ALL[name](x, k, tau) - hard_topk(x, k)).abs().sum().item() for tau in (1.0, 0.1, 0.01)]
        assert dist[0] > dist[1] > dist[2] and dist[2] < 1e-3, (k, dist)


def test_weighted_iteration_does_not_tend_to_hard_topk():
    x = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(iterative_soft_topk(x, 2, 0.1, "weighted"),
                               torch.tensor([1.5, 0.5, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(iterative_soft_topk(x, 2, 0.1, "blog"),
                               torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", list(ALL))
def test_shift_invariance(x8, name):
    torch.testing.assert_close(ALL[name](x8 + 37.5, 3, 0.8), ALL[name](x8, 3, 0.8), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(PRINCIPLED) + ["iter-blog"])
def test_monotone(x8, name):
    p = ALL[name](x8, 3, 0.8)
    order = x8.argsort(-1)
    assert bool((p.gather(-1, order).diff(dim=-1) >= -1e-12).all())
    if name in PRINCIPLED:
        assert bool(((p >= 0) & (p <= 1)).all())


@pytest.mark.parametrize("name", list(ALL))
def test_gradcheck(name):
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    for k in (1, 2, 4):
        assert torch.autograd.gradcheck(lambda z: ALL[name](z, k, 0.7), (x,))


def test_sigmoid_threshold_gradient_is_implicit_function_gradient():
    """d lambda / d z_j = s'(z_j - lambda) / sum_i s'(z_i - lambda), checked through p = s(z - lambda)."""
    z = torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    p = thre_topk(z, 3, f="sigmoid", iters=60)
    (jac,) = torch.autograd.grad(p[0], z)
    lam = z.detach()[0] - torch.logit(p.detach()[0])
    sp = torch.sigmoid(z.detach() - lam) * torch.sigmoid(lam - z.detach())  # s'
    dlam = sp / sp.sum()
    expected = sp[0] * (torch.nn.functional.one_hot(torch.tensor(0), 7).double() - dlam)
    torch.testing.assert_close(jac, expected, rtol=1e-9, atol=1e-12)


def test_no_graph_without_grad(x8):
    with torch.no_grad():
        p = grad_topk(x8.clone().requires_grad_(), 3)
    assert not p.requires_grad
    torch.testing.assert_close(p, grad_topk(x8, 3))


@pytest.mark.parametrize("name", list(ALL))
def test_extreme_inputs_forward(name):
    x = 1e4 * torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    p = ALL[name](x, 3)
    assert bool(torch.isfinite(p).all())
    if name != "iter-weighted":  # at this spread its rounding happens to give the mask too
        torch.testing.assert_close(p, hard_topk(x, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if n != "grad"])
def test_extreme_inputs_backward(name):
    x = (1e4 * torch.randn(4, 10, generator=torch.Generator().manual_seed(5))).requires_grad_()
    p = ALL[name](x, 3)
    (p * torch.randn(4, 10, generator=torch.Generator().manual_seed(6))).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_grad_topk_backward_moderate_spread():
    x = (10 * torch.randn(4, 10, generator=torch.Generator().manual_seed(7))).requires_grad_()
    p = grad_topk(x, 3)
    (p * torch.randn(4, 10, generator=torch.Generator().manual_seed(8))).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_grad_topk_backward_extreme_spread():
    x = (1e4 * torch.randn(4, 10, generator=torch.Generator().manual_seed(5))).requires_grad_()
    p = grad_topk(x, 3)
    (p * torch.randn(4, 10, generator=torch.Generator().manual_seed(6))).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(name, dtype):
    x = 3 * torch.randn(4, 12, generator=torch.Generator().manual_seed(9))
    xh = x.to(dtype).requires_grad_()
    p = ALL[name](xh, 4, 0.5)
    p.float().pow(2).sum().backward()
    assert p.dtype == dtype and bool(torch.isfinite(p).all()) and bool(torch.isfinite(xh.grad).all())
    torch.testing.assert_close(p.float(), ALL[name](xh.detach().float(), 4, 0.5), rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", list(ALL))
def test_bad_inputs(name):
    fn = ALL[name]
    x = torch.randn(2, 5)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        fn(torch.arange(5), 2)
    with pytest.raises(TypeError, match="x: expected a real floating-point tensor"):
        fn(torch.randn(5, dtype=torch.complex64), 2)
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        fn(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= \d \(n = 5\), got 0"):
        fn(x, 0)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= \d \(n = 5\), got 6"):
        fn(x, 6)
    with pytest.raises(TypeError, match="k: expected an int"):
        fn(x, 2.0)
    with pytest.raises(ValueError, match=r"tau: expected a value in \(0.0, inf\], got 0"):
        fn(x, 2, 0)
    with pytest.raises(ValueError, match=r"tau: expected a value in \(0.0, inf\], got -1.0"):
        fn(x, 2, -1.0)


def test_bad_choices_and_k_equal_n():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="f: expected one of 'exp' | 'sigmoid' | 'smooth', got 'relu'"):
        thre_topk(x, 2, f="relu")
    with pytest.raises(ValueError, match="variant: expected one of 'blog' | 'weighted', got 'x'"):
        iterative_soft_topk(x, 2, variant="x")
    with pytest.raises(ValueError, match=r"iters: expected a value in \[1, inf\], got 0"):
        thre_topk(x, 2, f="sigmoid", iters=0)
    for f in ("sigmoid", "smooth"):  # no finite threshold makes the sum n
        with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 4 \(n = 5\), got 5"):
            thre_topk(x, 5, f=f)
    for p in (thre_topk(x, 5, f="exp"), grad_topk(x, 5)):
        torch.testing.assert_close(p, torch.ones_like(x))


def test_thre_topk_sigmoid_second_derivatives():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda v: thre_topk(v, 2, 0.7, f="sigmoid", iters=80), (x,), atol=1e-6)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_grad_topk_under_no_grad_and_inference_mode(ctx):
    x = torch.randn(4, 7)
    ref = grad_topk(x, 3, 0.5)
    with ctx():
        out = grad_topk(x, 3, 0.5)
    torch.testing.assert_close(out, ref)
    assert not out.requires_grad
