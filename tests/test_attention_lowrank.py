"""Tests of the attention-low-rank-bottleneck section of companion.attention: multihead_attention,
MultiHeadAttention, fit_attention_matrix."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.attention import MultiHeadAttention, fit_attention_matrix, multihead_attention


def weights(d, h, dk, dv, dtype=torch.float64, seed=0, d_out=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / math.sqrt(s[0])
    return r(d, h * dk), r(d, h * dk), r(d, h * dv), r(h * dv, d_out or d)


def naive_mha(x, w_q, w_k, w_v, w_o, h, pre_mix=None, post_mix=None, causal=False, key_mask=None):
    """Loops over batch, heads and query rows; explicit exp and sums."""
    B, n, _ = x.shape
    dk, dv = w_q.shape[1] // h, w_v.shape[1] // h
    out = []
    for b in range(B):
        q = [(x[b] @ w_q)[:, i * dk:(i + 1) * dk] for i in range(h)]
        k = [(x[b] @ w_k)[:, i * dk:(i + 1) * dk] for i in range(h)]
        v = [(x[b] @ w_v)[:, i * dv:(i + 1) * dv] for i in range(h)]
        jhat = [q[i] @ k[i].T / math.sqrt(dk) for i in range(h)]
        hm = h if pre_mix is None else pre_mix.shape[0]
        j = jhat if pre_mix is None else [sum(pre_mix[a, c] * jhat[c] for c in range(h)) for a in range(hm)]
        p = []
        for a in range(hm):
            pa = torch.zeros(n, n, dtype=x.dtype)
            for t in range(n):
                kept = [m for m in range(n) if (not causal or m <= t)
                        and (key_mask is None or bool(key_mask[b, m]))]
                if not kept:
                    continue
                ex = torch.stack([torch.exp(j[a][t, m] - max(j[a][t, kk] for kk in kept)) for m in kept])
                pa[t, kept] = ex / ex.sum()
            p.append(pa)
        if post_mix is not None:
            p = [sum(post_mix[a, c] * p[c] for c in range(hm)) for a in range(h)]
        out.append(torch.cat([p[i] @ v[i] for i in range(h)], dim=-1) @ w_o)
    return torch.stack(out)


# --------------------------------------------------------------------------- multihead_attention
def test_matches_torch_multihead_attention():
    torch.manual_seed(0)
    d, h = 16, 4
    mha = torch.nn.MultiheadAttention(d, h, bias=False, batch_first=True).double()
    x = torch.randn(2, 7, d, dtype=torch.float64)
    w_q, w_k, w_v = (w.T for w in mha.in_proj_weight.chunk(3, dim=0))
    w_o = mha.out_proj.weight.T
    key_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    ref, _ = mha(x, x, x, key_padding_mask=~key_mask, need_weights=False)  # torch's mask is inverted
    got = multihead_attention(x, w_q, w_k, w_v, w_o, h, key_mask=key_mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(multihead_attention(x, w_q, w_k, w_v, w_o, h), ref, atol=1e-12, rtol=0)


def test_causal_matches_sdpa_per_head_and_naive():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    w_q, w_k, w_v, w_o = weights(8, 2, 4, 4)
    got = multihead_attention(x, w_q, w_k, w_v, w_o, 2, causal=True)
    heads = []
    for i in range(2):
        q, k = (x @ w_q)[..., 4 * i:4 * i + 4], (x @ w_k)[..., 4 * i:4 * i + 4]
        heads.append(F.scaled_dot_product_attention(q, k, (x @ w_v)[..., 4 * i:4 * i + 4], is_causal=True))
    torch.testing.assert_close(got, torch.cat(heads, -1) @ w_o, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, naive_mha(x, w_q, w_k, w_v, w_o, 2, causal=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mixing", ["none", "pre", "post", "both", "wide"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_with_key_size_and_mixing(mixing, causal):
    g = torch.Generator().manual_seed(2)
    h, dk, dv = 3, 5, 2   # key size differs from head size; scale is 1/sqrt(d_k)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    w_q, w_k, w_v, w_o = weights(6, h, dk, dv, seed=3)
    hm = 4 if mixing == "wide" else h
    pre = torch.randn(hm, h, generator=g, dtype=torch.float64) if mixing in ("pre", "both", "wide") else None
    post = torch.randn(h, hm, generator=g, dtype=torch.float64) if mixing in ("post", "both", "wide") else None
    key_mask = torch.tensor([[True] * 5, [False, True, True, True, False]])  # row 0 of batch 1 is empty if causal
    got = multihead_attention(x, w_q, w_k, w_v, w_o, h, pre, post, causal, key_mask)
    ref = naive_mha(x, w_q, w_k, w_v, w_o, h, pre, post, causal, key_mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert torch.isfinite(got).all()
    if causal:
        assert (got[1, 0] == 0).all()  # a query with no key to attend to gets a zero output


def test_identity_mixing_is_plain_attention_and_talking_heads_is_one_wide_head():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 12, generator=g, dtype=torch.float64)
    w_q, w_k, w_v, w_o = weights(12, 4, 3, 3)
    eye = torch.eye(4, dtype=torch.float64)
    plain = multihead_attention(x, w_q, w_k, w_v, w_o, 4, causal=True)
    torch.testing.assert_close(multihead_attention(x, w_q, w_k, w_v, w_o, 4, eye, eye, causal=True),
                               plain, atol=1e-12, rtol=0)
    # pre-mixed logits of output head i = one head whose query blocks are re-weighted by Lambda_ij
    lam = torch.randn(4, 4, generator=g, dtype=torch.float64)
    q, k = (x @ w_q).view(2, 9, 4, 3), (x @ w_k).view(2, 9, 4, 3)
    jhat = torch.einsum("bnhd,bmhd->bhnm", q, k)
    mixed = torch.einsum("ij,bjnm->binm", lam, jhat)
    for i in range(4):
        wide = (q * lam[i][None, None, :, None]).reshape(2, 9, 12) @ k.reshape(2, 9, 12).transpose(1, 2)
        torch.testing.assert_close(mixed[:, i], wide, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mixing", [False, True])
def test_gradcheck(mixing):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [w.requires_grad_() for w in weights(4, 2, 3, 2)]
    pre = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True) if mixing else None
    post = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True) if mixing else None
    key_mask = torch.tensor([[True, True, False, True]])
    args = (x, *ws) + ((pre, post) if mixing else ())
    f = lambda x, a, b, c, d, *m: multihead_attention(x, a, b, c, d, 2, *(m or (None, None)),
                                                       causal=True, key_mask=key_mask)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("mixing", [False, True])
def test_extreme_logits_finite(mixing):
    g = torch.Generator().manual_seed(6)
    x = 300 * torch.randn(2, 8, 8, generator=g)      # logits of order 1e4
    w_q, w_k, w_v, w_o = weights(8, 2, 4, 4, dtype=torch.float32)
    eye = torch.eye(2) if mixing else None
    out = multihead_attention(x, w_q, w_k, w_v, w_o, 2, eye, eye, causal=True)
    assert torch.isfinite(out).all()
    ref = naive_mha(x.double(), w_q.double(), w_k.double(), w_v.double(), w_o.double(), 2,
                    None if eye is None else eye.double(), None if eye is None else eye.double(), True)
    torch.testing.assert_close(out.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mixing", [False, True])
def test_half_precision(dtype, mixing):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 16, generator=g)
    w_q, w_k, w_v, w_o = weights(16, 4, 8, 4, dtype=torch.float32)
    mix = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g) if mixing else None
    ref = multihead_attention(x, w_q, w_k, w_v, w_o, 4, mix, mix, causal=True)
    c = lambda t: None if t is None else t.to(dtype)
    got = multihead_attention(c(x), c(w_q), c(w_k), c(w_v), c(w_o), 4, c(mix), c(mix), causal=True)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_bad_inputs():
    x = torch.randn(1, 3, 8)
    w_q, w_k, w_v, w_o = weights(8, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="w_q: expected a number of columns divisible by num_heads=3"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 3)
    with pytest.raises(ValueError, match="w_v: expected a number of columns divisible by num_heads=2"):
        multihead_attention(x, w_q, w_k, torch.randn(8, 5), w_o, 2)
    with pytest.raises(ValueError, match="w_k: expected the shape of w_q"):
        multihead_attention(x, w_q, torch.randn(8, 6), w_v, w_o, 2)
    with pytest.raises(ValueError, match=r"w_q: expected shape \[8, num_heads \* size\]"):
        multihead_attention(x, torch.randn(7, 8), w_k, w_v, w_o, 2)
    with pytest.raises(ValueError, match=r"w_o: expected shape \[8, d_out\]"):
        multihead_attention(x, w_q, w_k, w_v, torch.randn(6, 8), 2)
    with pytest.raises(ValueError, match=r"pre_mix: expected shape \[h', 2\]"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 2, pre_mix=torch.eye(3))
    with pytest.raises(ValueError, match=r"post_mix: expected shape \[2, 3\]"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 2, pre_mix=torch.randn(3, 2), post_mix=torch.eye(2))
    with pytest.raises(ValueError, match="pre_mix: with 3 mixed heads a post_mix"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 2, pre_mix=torch.randn(3, 2))
    with pytest.raises(TypeError, match="key_mask: expected a boolean tensor"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 2, key_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="key_mask: expected shape"):
        multihead_attention(x, w_q, w_k, w_v, w_o, 2, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        multihead_attention(x.long(), w_q, w_k, w_v, w_o, 2)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, n, d\]"):
        multihead_attention(x[0], w_q, w_k, w_v, w_o, 2)


# ---------------------------------------------------------------------------- MultiHeadAttention
def test_module_shapes_defaults_and_functional_equivalence():
    torch.manual_seed(8)
    m = MultiHeadAttention(16, 4, key_size=8, causal=True)
    assert m.w_q.shape == (16, 32) and m.w_v.shape == (16, 16) and m.w_o.shape == (16, 16)
    assert m.pre_mix is None and sum(p.numel() for p in m.parameters()) == 2 * 16 * 32 + 2 * 16 * 16
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(m(x), multihead_attention(x, m.w_q, m.w_k, m.w_v, m.w_o, 4, causal=True))
    t = MultiHeadAttention(16, 4, talking_heads=True, causal=True)
    assert torch.equal(t.pre_mix, torch.eye(4)) and torch.equal(t.post_mix, torch.eye(4))
    plain = multihead_attention(x, t.w_q, t.w_k, t.w_v, t.w_o, 4, causal=True)
    torch.testing.assert_close(t(x), plain, atol=1e-6, rtol=0)   # identity mixing at initialisation
    with pytest.raises(ValueError, match="num_heads: expected a divisor of d_model=10"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"key_size: expected a value in \[1, inf\]"):
        MultiHeadAttention(16, 4, key_size=0)
    assert MultiHeadAttention(10, 4, key_size=3, head_size=5).w_o.shape == (20, 10)


# -------------------------------------------------------------------------- fit_attention_matrix
def dirichlet_rows(n, alpha, count=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, n) if count is None else (count, n, n)
    x = torch._standard_gamma(torch.full(shape, alpha, dtype=torch.float64), generator=g).clamp_min(1e-300)
    return x / x.sum(-1, keepdim=True)


def test_fit_reports_the_kl_of_what_it_returns_and_improves_with_key_size():
    target = dirichlet_rows(8, 0.5)
    kls = []
    for dk in (1, 2, 8):
        kl, p = fit_attention_matrix(target, dk, steps=300, lr=0.05, seed=0)
        assert p.shape == (8, 8) and torch.allclose(p.sum(-1), torch.ones(8, dtype=torch.float64))
        naive = sum(sum(target[i, j] * math.log(target[i, j] / p[i, j]) for j in range(8)) for i in range(8)) / 8
        assert abs(kl - float(naive)) < 1e-10
        kls.append(kl)
    assert kls[0] > kls[1] > kls[2] and kls[2] < 1e-3   # key size = n: any positive target is reachable
    assert fit_attention_matrix(target, 2, steps=50, seed=3)[0] == fit_attention_matrix(target, 2, steps=50, seed=3)[0]


def test_fit_batched_and_talking_heads():
    targets = dirichlet_rows(8, 0.5, count=3, seed=1)
    kl_b, p_b = fit_attention_matrix(targets, 2, steps=200)
    assert p_b.shape == (3, 8, 8)
    # talking heads: 4 mixed heads of key size 1 reach what one head of key size 4 reaches
    kl_th, _ = fit_attention_matrix(targets, 1, steps=300, num_heads=4)
    kl_1, _ = fit_attention_matrix(targets, 1, steps=300)
    kl_4, _ = fit_attention_matrix(targets, 4, steps=300)
    assert kl_th < kl_1 and abs(kl_th - kl_4) < 0.5 * kl_4 + 1e-3
    extreme = dirichlet_rows(8, 0.05, seed=2)   # entries down to ~1e-30: still finite
    kl_e, p_e = fit_attention_matrix(extreme, 8, steps=100)
    assert math.isfinite(kl_e) and torch.isfinite(p_e).all()


def test_fit_bad_inputs():
    t = dirichlet_rows(4, 1.0)
    with pytest.raises(ValueError, match="target: expected positive entries"):
        fit_attention_matrix(torch.eye(4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"target: expected rows summing to 1 \(atol 1e-5\)"):
        fit_attention_matrix(2 * t, 2)
    with pytest.raises(ValueError, match=r"target: expected shape \[..., n, n\]"):
        fit_attention_matrix(t[:, :3] / t[:, :3].sum(-1, keepdim=True), 2)
    with pytest.raises(ValueError, match=r"key_size: expected a value in \[1, inf\]"):
        fit_attention_matrix(t, 0)
    with pytest.raises(ValueError, match=r"lr: expected a value in \(0.0, inf\]"):
        fit_attention_matrix(t, 2, lr=0.0)
    with pytest.raises(TypeError, match="target: expected a floating-point tensor"):
        fit_attention_matrix(torch.ones(4, 4, dtype=torch.long), 2)
