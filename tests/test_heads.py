"""Tests of companion.heads, section competition-baselines: the span pointer and its band
decoder, powered BCE, half-pointer decoding, conditional LayerNorm, the linear-chain CRF (brute
force and pytorch-crf), BIO labels, the LCS soft F1 and rematch_offsets."""
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.heads import (ConditionalLayerNorm, HalfPointerHead, LinearChainCRF,
                             SpanPointerHead, bio_labels, decode_best_span,
                             decode_pointer_spans, lcs_f1, powered_bce, rematch_offsets,
                             span_pointer_log_probs)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- span pointer ----------------------------------------------------------------------------
def test_span_pointer_log_probs_matches_softmax_over_kept():
    g = gen(0)
    s, e = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    mask = torch.rand(3, 7, generator=g) < 0.6
    mask[:, 0] = True
    ls, le = span_pointer_log_probs(s, e, mask)
    for b in range(3):
        keep = mask[b]
        torch.testing.assert_close(ls[b, keep], torch.log_softmax(s[b, keep], 0))
        torch.testing.assert_close(le[b, keep], torch.log_softmax(e[b, keep], 0))
        assert torch.isinf(ls[b, ~keep]).all() and torch.isinf(le[b, ~keep]).all()


def test_span_pointer_head_fp16_extreme_and_grad():
    s = torch.tensor([[6e4, -6e4, 0.0, 1.0]], dtype=torch.float16)
    mask = torch.tensor([[False, True, True, True]])
    ls, _ = span_pointer_log_probs(s, s, mask)
    assert torch.isfinite(ls[mask]).all() and ls[0, 0] == -math.inf
    x = torch.randn(2, 5, dtype=F64, requires_grad=True)
    m = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert torch.autograd.gradcheck(
        lambda z: span_pointer_log_probs(z, 2 * z, m)[0].masked_fill(~m, 0), (x,))
    head = SpanPointerHead(8)
    out = head(torch.randn(2, 5, 8), m)
    assert out[0].shape == (2, 5)
    with torch.inference_mode():
        head(torch.randn(2, 5, 8), m)


def brute_best_span(ls, le, max_len, valid):
    best, arg = -math.inf, (0, 0)
    T = len(ls)
    for i in range(T):
        for j in range(i, min(T, i + max_len)):
            if valid is not None and not (valid[i] and valid[j]):
                continue
            v = ls[i] + le[j]
            if v > best:
                best, arg = v, (i, j)
    return arg, best


def test_decode_best_span_matches_double_loop():
    g = gen(1)
    for case in range(200):
        T = int(torch.randint(1, 30, (1,), generator=g))
        max_len = int(torch.randint(1, 20, (1,), generator=g))
        ls = torch.log_softmax(torch.randn(1, T, generator=g, dtype=F64), -1)
        le = torch.log_softmax(torch.randn(1, T, generator=g, dtype=F64), -1)
        valid = torch.rand(1, T, generator=g) < 0.8 if case % 2 else None
        if valid is not None:
            valid[0, 0] = True
        got = decode_best_span(ls, le, max_len, valid)[0].tolist()
        want, score = brute_best_span(ls[0].tolist(), le[0].tolist(), max_len,
                                      None if valid is None else valid[0].tolist())
        assert tuple(got) == want
        assert abs((ls[0, got[0]] + le[0, got[1]]).item() - score) < 1e-6


def test_decode_best_span_compile_and_bad_input():
    ls = torch.log_softmax(torch.randn(4, 9), -1)
    compiled = torch.compile(decode_best_span, backend="eager", dynamic=True)
    assert torch.equal(compiled(ls, ls.flip(-1), 3), decode_best_span(ls, ls.flip(-1), 3))
    with pytest.raises(ValueError, match="max_len"):
        decode_best_span(ls, ls, 0)
    with pytest.raises(ValueError, match="log_p_end"):
        decode_best_span(ls, ls[:, :5])
    with pytest.raises(TypeError, match="valid"):
        decode_best_span(ls, ls, valid=torch.ones(4, 9))
    with pytest.raises(ValueError, match="mask"):
        span_pointer_log_probs(ls, ls, torch.ones(4, 8, dtype=torch.bool))


# ---- powered BCE -----------------------------------------------------------------------------
def naive_powered_bce(z, t, n):
    p = torch.sigmoid(z) ** n
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p))


@pytest.mark.parametrize("n", [1, 2, 4, 1.5])
def test_powered_bce_matches_naive_float64(n):
    z = torch.linspace(-15, 15, 301, dtype=F64)
    t = (torch.arange(301) % 3 == 0).to(F64)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = powered_bce(z1, t, n, reduction="none")
    ref = naive_powered_bce(z2, t, n)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-12)
    # the closed-form gradients of eq. powered-grad
    p = torch.sigmoid(z)
    grad = torch.where(t > 0, -n * (1 - p), n * p**n * (1 - p) / (1 - p**n))
    torch.testing.assert_close(z1.grad, grad, rtol=1e-6, atol=1e-12)


def test_powered_bce_gradcheck_and_extremes():
    z = torch.randn(6, 3, dtype=F64, requires_grad=True)
    t = torch.rand(6, 3, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: powered_bce(x, t, 2.0), (z,))
    for n in (1, 2, 4):
        zz = torch.tensor([-80.0, -30.0, 30.0, 41.0, 80.0, 200.0], requires_grad=True)
        for tt in (torch.zeros(6), torch.ones(6)):
            loss = powered_bce(zz, tt, n, reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), zz)
            assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        # t = 0 at z = 80: loss = z - log n (the asymptote), gradient 1
        zz64 = torch.tensor([80.0], dtype=F64)
        assert abs(powered_bce(zz64, torch.zeros(1, dtype=F64), n).item()
                   - (80 - math.log(n))) < 1e-9


def test_powered_bce_mask_reduction_inference_compile():
    z, t = torch.randn(2, 5, 3, 2), (torch.rand(2, 5, 3, 2) < 0.2).float()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    full = powered_bce(z, t, 2, reduction="none")
    want = full[mask].sum() / (mask.sum() * 6)
    torch.testing.assert_close(powered_bce(z, t, 2, mask=mask), want)
    assert (powered_bce(z, t, 2, mask=mask, reduction="none")[~mask] == 0).all()
    with torch.inference_mode():
        powered_bce(z, t, 4)
    compiled = torch.compile(powered_bce, backend="aot_eager", dynamic=True)
    zc = z.clone().requires_grad_()
    compiled(zc, t, 2).backward()
    zr = z.clone().requires_grad_()
    powered_bce(zr, t, 2).backward()
    torch.testing.assert_close(zc.grad, zr.grad)
    with pytest.raises(ValueError, match="power"):
        powered_bce(z, t, 0)
    with pytest.raises(ValueError, match="targets"):
        powered_bce(z, t[:1], 1)
    with pytest.raises(ValueError, match="reduction"):
        powered_bce(z, t, 1, reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        powered_bce(z, t, 1, mask=torch.ones(3, 5, dtype=torch.bool))


def test_half_pointer_head_shape():
    head = HalfPointerHead(16, num_types=3)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 3, 2)
    with pytest.raises(ValueError, match="num_types"):
        HalfPointerHead(16, 0)


# ---- half-pointer decoding -------------------------------------------------------------------
def P(*on, T=8):
    p = torch.zeros(T)
    p[list(on)] = 0.9
    return p


@pytest.mark.parametrize("starts, ends, want", [
    ((1, 5), (2, 6), [(1, 2), (5, 6)]),            # two separate spans
    ((1, 3), (3,), [(1, 3), (3, 3)]),              # adjacent/nested sharing an end
    ((1, 2), (5,), [(1, 5), (2, 5)]),              # nested starts, one end: both pair with it
    ((6,), (2,), []),                              # no end after the start
    ((2,), (2,), [(2, 2)]),                        # single token
    ((), (3,), []),
])
def test_decode_pointer_spans_hand_made(starts, ends, want):
    assert decode_pointer_spans(P(*starts), P(*ends)) == want


def test_decode_pointer_spans_threshold_and_bad_input():
    ps = torch.tensor([0.39, 0.41, 0.0])
    pe = torch.tensor([0.0, 0.0, 0.45])
    assert decode_pointer_spans(ps, pe) == [(1, 2)]
    assert decode_pointer_spans(ps, pe, threshold=0.3) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="p_start"):
        decode_pointer_spans(ps[None], pe[None])
    with pytest.raises(ValueError, match="threshold"):
        decode_pointer_spans(ps, pe, threshold=1.5)


# ---- conditional LayerNorm -------------------------------------------------------------------
def test_conditional_layer_norm_starts_as_layer_norm_and_gradcheck():
    torch.manual_seed(0)
    cln, ln = ConditionalLayerNorm(16, 6, eps=1e-5), nn.LayerNorm(16, eps=1e-5)
    h, c = torch.randn(3, 5, 16), torch.randn(3, 6)
    torch.testing.assert_close(cln(h, c), ln(h), atol=1e-6, rtol=0)
    cln = ConditionalLayerNorm(4, 3).double()
    nn.init.normal_(cln.cond_weight.weight)
    nn.init.normal_(cln.cond_bias.weight)
    h = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    c = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cln, (h, c))
    # reference: per-example gain and bias
    out = cln(h, c)
    for b in range(2):
        gain = cln.weight + cln.cond_weight.weight @ c[b]
        bias = cln.bias + cln.cond_bias.weight @ c[b]
        ref = F.layer_norm(h[b], (4,), eps=1e-12) * gain + bias
        torch.testing.assert_close(out[b], ref)


def test_conditional_layer_norm_extreme_inference_compile_bad_input():
    cln = ConditionalLayerNorm(8, 4)
    h = torch.full((2, 3, 8), 1e6)
    h[..., 0] += 1.0
    assert torch.isfinite(cln(h, torch.randn(2, 4))).all()
    with torch.inference_mode():
        cln(torch.randn(2, 3, 8), torch.randn(2, 4))
    compiled = torch.compile(cln, backend="eager", dynamic=True)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 4)
    torch.testing.assert_close(compiled(x, c), cln(x, c))
    with pytest.raises(ValueError, match="c: expected shape"):
        cln(torch.randn(2, 3, 8), torch.randn(2, 5))
    with pytest.raises(ValueError, match="h: expected last dim"):
        cln(torch.randn(2, 3, 7), torch.randn(2, 4))


# ---- linear-chain CRF ------------------------------------------------------------------------
def random_crf(K, seed=0, dtype=F64):
    crf = LinearChainCRF(K).to(dtype)
    g = gen(seed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return crf


def brute_crf(crf, em):
    """All K^T paths of one sequence: (log Z, best path)."""
    T, K = em.shape
    scores = {}
    for path in itertools.product(range(K), repeat=T):
        s = crf.start_transitions[path[0]] + crf.end_transitions[path[-1]]
        s = s + sum(em[t, y] for t, y in enumerate(path))
        s = s + sum(crf.transitions[a, b] for a, b in zip(path, path[1:]))
        scores[path] = s
    vals = torch.stack(list(scores.values()))
    return torch.logsumexp(vals, 0), max(scores, key=lambda k: scores[k].item())


def test_crf_matches_brute_force():
    crf = random_crf(3)
    g = gen(2)
    em = torch.randn(4, 5, 3, generator=g, dtype=F64)
    lengths = [5, 4, 2, 1]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    logz = crf.log_partition(em, mask)
    best = crf.viterbi(em, mask)
    for b, L in enumerate(lengths):
        z, path = brute_crf(crf, em[b, :L])
        assert abs(logz[b].item() - z.item()) < 1e-9
        assert best[b, :L].tolist() == list(path) and (best[b, L:] == -1).all()
        # nll of the best path = log Z - its score
        tags = best[b:b + 1].clamp_min(0)
        nll = crf.nll(em[b:b + 1], tags, mask[b:b + 1]).item()
        assert nll >= 0
    with torch.no_grad():
        assert crf.nll(em, best.clamp_min(0), mask, reduction="none").min() >= 0


def test_crf_gradcheck_and_extremes():
    crf = random_crf(3, seed=1)
    em = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    tags = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    assert torch.autograd.gradcheck(lambda e: crf.nll(e, tags, mask, "none"), (em,))
    # forbidden transitions at -1e4 and emissions of 1e4 stay finite in float32
    crf32 = LinearChainCRF(5)
    with torch.no_grad():
        crf32.transitions.fill_(-1e4)
        crf32.transitions.diagonal().zero_()
    e = torch.randn(3, 50, 5) * 1e4
    e.requires_grad_()
    t = torch.randint(0, 5, (3, 50))
    loss = crf32.nll(e, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()


@pytest.mark.filterwarnings("ignore:where received a uint8")
def test_crf_against_pytorch_crf():
    torchcrf = pytest.importorskip("torchcrf")
    B, T, K = 8, 12, 7
    ref = torchcrf.CRF(K, batch_first=True).double()
    ours = LinearChainCRF(K).double()
    ours.load_state_dict(ref.state_dict())          # same parameter names
    g = gen(3)
    em = torch.randn(B, T, K, generator=g, dtype=F64)
    tags = torch.randint(0, K, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    for mask in (None, torch.arange(T)[None] < lengths[:, None]):
        e1, e2 = em.clone().requires_grad_(), em.clone().requires_grad_()
        a = ours.nll(e1, tags, mask, reduction="none")
        b = -ref(e2, tags, mask, reduction="none")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(e1.grad, e2.grad, atol=1e-5, rtol=0)
        ours_paths = ours.viterbi(em, mask)
        for i, path in enumerate(ref.decode(em, mask)):
            assert ours_paths[i, :len(path)].tolist() == path


def test_crf_inference_compile_bad_input():
    crf = random_crf(4, dtype=torch.float32)
    em, tags = torch.randn(2, 6, 4), torch.randint(0, 4, (2, 6))
    with torch.inference_mode():
        crf.nll(em, tags)
        crf.viterbi(em)
    nll = torch.compile(crf.nll, backend="eager")
    torch.testing.assert_close(nll(em, tags), crf.nll(em, tags))
    with pytest.raises(ValueError, match="emissions"):
        crf.nll(torch.randn(2, 6, 5), tags)
    with pytest.raises(ValueError, match="right padding"):
        crf.viterbi(em, torch.tensor([[True, False, True, True, True, True]] * 2))
    with pytest.raises(ValueError, match="first time step"):
        crf.viterbi(em, torch.tensor([[False] * 6] * 2))
    with pytest.raises(TypeError, match="tags"):
        crf.nll(em, tags.float())
    with pytest.raises(ValueError, match="reduction"):
        crf.nll(em, tags, reduction="token")


# ---- BIO, LCS F1, rematch --------------------------------------------------------------------
def test_bio_labels():
    got = bio_labels([(1, 3, 0), (5, 5, 2)], num_types=3, length=7)
    assert got.tolist() == [0, 1, 2, 2, 0, 5, 0]
    with pytest.raises(ValueError, match="overlaps"):
        bio_labels([(1, 3, 0), (3, 4, 1)], 2, 7)
    with pytest.raises(ValueError, match="type"):
        bio_labels([(1, 3, 5)], 2, 7)
    with pytest.raises(ValueError, match="start <= end"):
        bio_labels([(3, 1, 0)], 2, 7)


def test_lcs_f1_exact_rationals():
    # LCS("abcde", "ace") = 3 (a subsequence; the longest common substring is 1)
    f1, p, r = lcs_f1({("t", "r1"): "abcde", ("t", "r2"): "xy"},
                      {("t", "r1"): "ace", ("t", "r3"): "q", ("t", "r4"): "z"})
    X = Fraction(2 * 3, 5 + 3)
    assert math.isclose(f1, float(2 * X / (2 + 3)), rel_tol=1e-15)
    assert math.isclose(p, float(X / 2), rel_tol=1e-15)
    assert math.isclose(r, float(X / 3), rel_tol=1e-15)
    assert lcs_f1([{1: "ab"}, {}], [{1: "ab"}, {}]) == (1.0, 1.0, 1.0)
    assert lcs_f1({}, {}) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="gold"):
        lcs_f1([{}], [{}, {}])
    with pytest.raises(TypeError, match="pred, gold"):
        lcs_f1("a", "b")


def test_rematch_offsets_round_trip():
    text = "Héllo   WORLD,  naïve Café!"
    tokens = ["[CLS]", "hello", "world", ",", "na", "##ive", "cafe", "!", "[SEP]"]
    offsets = rematch_offsets(text, tokens)
    assert offsets[0] == [] and offsets[-1] == []
    for tok, m in zip(tokens[1:-1], offsets[1:-1]):
        raw = text[m[0]:m[-1] + 1]
        norm = "".join(rematch_offsets.__defaults__[0](c) for c in raw)
        assert norm == tok.removeprefix("##")
    assert text[offsets[2][0]:offsets[2][-1] + 1] == "WORLD"
    assert text[offsets[6][0]:offsets[6][-1] + 1] == "Café"
    with pytest.raises(ValueError, match="not found"):
        rematch_offsets(text, ["zzz"])
    with pytest.raises(TypeError, match="normalize"):
        rematch_offsets(text, ["a"], normalize=3)
