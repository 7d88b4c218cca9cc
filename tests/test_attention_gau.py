"""Tests of the gau-alpha section of companion.attention: scale_offset, gau_attention_normalize,
GatedAttentionUnit, gau_param_count."""
import math

import pytest
import torch

from companion.attention import (GatedAttentionUnit, gau_attention_normalize, gau_param_count,
                                 scale_offset)


METHODS = ("softmax", "softmax_plus", "squared_relu")


def naive_normalize(scores, keep, method, train_length):
    """Row by row, with explicit exp and sums over the kept keys only."""
    out = torch.zeros_like(scores)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in scores.shape[:-1]]):
        idx = tuple(idx.reshape(-1).tolist())
        row, kept = scores[idx], keep[idx]
        c = int(kept.sum())
        if c == 0:
            continue
        if method == "squared_relu":
            out[idx] = torch.where(kept, torch.clamp(row, min=0) ** 2 / c, 0.0)
            continue
        lam = math.log(c) / math.log(train_length) if method == "softmax_plus" else 1.0
        vals = [math.exp(lam * row[j].item()) if kept[j] else 0.0 for j in range(row.numel())]
        total = sum(vals)
        out[idx] = torch.tensor([v / total for v in vals], dtype=scores.dtype)
    return out


def rope(t):
    """A tiny RoPE (pairs 2i, 2i+1) for the tests, positions 0..n-1."""
    n, dim = t.shape[-2], t.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    c, s = ang.cos().to(t.dtype), ang.sin().to(t.dtype)
    x1, x2 = t[..., 0::2], t[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)


# ---------------------------------------------------------------------------------- scale_offset
def test_scale_offset_matches_loop_and_grad():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    outs = scale_offset(z, gamma, beta)
    assert len(outs) == 3
    for i, o in enumerate(outs):
        ref = torch.stack([torch.stack([z[b, t] * gamma[i] + beta[i] for t in range(5)]) for b in range(2)])
        torch.testing.assert_close(o, ref, atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.stack(scale_offset(a, b, c)), (z, gamma, beta))


def test_scale_offset_bad_inputs():
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="z: expected last dimension 3"):
        scale_offset(z, torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"gamma: expected shape \[h, s\]"):
        scale_offset(z, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="beta: expected the shape of gamma"):
        scale_offset(z, torch.ones(2, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        scale_offset(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, 4))


# ----------------------------------------------------------------------- gau_attention_normalize
@pytest.mark.parametrize("method", METHODS)
def test_normalize_matches_naive_with_mask(method):
    g = torch.Generator().manual_seed(1)
    scores = 3 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    keep = torch.rand(2, 5, 7, generator=g) < 0.6
    keep[0, 2] = False  # an empty row
    keep[1, 3] = True   # a full row
    got = gau_attention_normalize(scores, keep, method, train_length=4)
    torch.testing.assert_close(got, naive_normalize(scores, keep, method, 4), atol=1e-12, rtol=0)
    assert (got[~keep] == 0).all() and (got[0, 2] == 0).all()
    full = torch.ones_like(keep)
    torch.testing.assert_close(gau_attention_normalize(scores, None, method, 4),
                               naive_normalize(scores, full, method, 4), atol=1e-12, rtol=0)


def test_softmax_plus_is_softmax_at_train_length_and_counts_kept_keys():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 512, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gau_attention_normalize(scores, method="softmax_plus", train_length=512),
                               torch.softmax(scores, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(gau_attention_normalize(scores, method="softmax"),
                               torch.softmax(scores, -1), atol=1e-12, rtol=0)
    # 100 kept keys among 300: the same as the 100-key row alone (n counts kept keys only)
    s300 = torch.randn(1, 1, 300, generator=g, dtype=torch.float64)
    keep = torch.zeros(1, 1, 300, dtype=torch.bool)
    keep[..., 50:150] = True
    got = gau_attention_normalize(s300, keep, "softmax_plus", 512)
    alone = gau_attention_normalize(s300[..., 50:150], None, "softmax_plus", 512)
    torch.testing.assert_close(got[..., 50:150], alone, atol=1e-12, rtol=0)
    assert got[..., :50].abs().max() == 0 and got[..., 150:].abs().max() == 0
    # rows sum to 1 for the softmaxes, to mean(relu(s)^2) for relu^2/n
    for method in ("softmax", "softmax_plus"):
        torch.testing.assert_close(gau_attention_normalize(scores, None, method).sum(-1),
                                   torch.ones(2, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(gau_attention_normalize(scores, None, "squared_relu").sum(-1),
                               torch.relu(scores).square().mean(-1), atol=1e-12, rtol=0)


def test_normalize_causal_mask_broadcast_counts_position_plus_one():
    scores = torch.zeros(1, 6, 6, dtype=torch.float64)
    scores[..., 0] = 1.0  # key 0 has logit 1, the others 0
    tri = torch.ones(6, 6, dtype=torch.bool).tril()
    a = gau_attention_normalize(scores, tri, "softmax_plus", train_length=4)
    for t in range(6):
        lam = math.log(t + 1) / math.log(4)
        expect = math.exp(lam) / (math.exp(lam) + t)
        assert abs(a[0, t, 0].item() - expect) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_normalize_gradcheck(method):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 4, 5, generator=g) < 0.7
    keep[1, 0] = False
    assert torch.autograd.gradcheck(lambda s: gau_attention_normalize(s, keep, method, 8), (scores,))
    gau_attention_normalize(scores, keep, method, 8).sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[1, 0] == 0).all()


@pytest.mark.parametrize("method", ("softmax", "softmax_plus"))
def test_normalize_extreme_logits(method):
    g = torch.Generator().manual_seed(4)
    scores = 1e4 * torch.randn(2, 8, 16, generator=g)
    keep = torch.rand(2, 8, 16, generator=g) < 0.5
    a = gau_attention_normalize(scores, keep, method, 16)
    assert torch.isfinite(a).all()
    rows = keep.any(-1)
    torch.testing.assert_close(a.sum(-1)[rows], torch.ones(int(rows.sum())), atol=1e-6, rtol=0)
    # the row maximum among kept keys takes (essentially) all the weight
    best = scores.masked_fill(~keep, float("-inf")).argmax(-1)
    assert (a.gather(-1, best[..., None])[rows] > 0.999).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("method", METHODS)
def test_normalize_half_precision(method, dtype):
    g = torch.Generator().manual_seed(5)
    scores = 4 * torch.randn(2, 8, 32, generator=g)
    keep = torch.ones(8, 32, dtype=torch.bool).tril()
    ref = gau_attention_normalize(scores, keep, method, 16)
    got = gau_attention_normalize(scores.to(dtype), keep, method, 16)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=0)
    big = gau_attention_normalize((1e4 * torch.randn(2, 8, 32, generator=g)).to(dtype), keep,
                                  "softmax_plus", 16)
    assert torch.isfinite(big).all()


def test_normalize_bad_inputs():
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="method: expected one of"):
        gau_attention_normalize(s, method="relu")
    with pytest.raises(ValueError, match=r"train_length: expected a value in \[2, inf\]"):
        gau_attention_normalize(s, train_length=1)
    with pytest.raises(TypeError, match="mask: expected a boolean tensor"):
        gau_attention_normalize(s, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable to scores"):
        gau_attention_normalize(s, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="scores: expected a floating-point tensor"):
        gau_attention_normalize(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scores: expected shape \[..., n, m\]"):
        gau_attention_normalize(torch.randn(4))


# ---------------------------------------------------------------------------- GatedAttentionUnit
def naive_gau(layer, x, key_mask=None):
    """Explicit per-batch, per-row computation of the GAU equations from the layer's weights."""
    e, s = layer.expanded, layer.key_size
    w = layer.uvz.weight
    b = layer.uvz.bias if layer.uvz.bias is not None else torch.zeros(w.shape[0], dtype=x.dtype)
    outs = []
    for bi in range(x.shape[0]):
        h = torch.nn.functional.silu(x[bi] @ w.T + b)
        u, v, z = h[:, :e], h[:, e:2 * e], h[:, 2 * e:]
        q = z * layer.gamma[0] + layer.beta[0]
        k = z * layer.gamma[1] + layer.beta[1]
        if layer.rotary is not None:
            q, k = layer.rotary(q), layer.rotary(k)
        n = x.shape[1]
        av = torch.zeros(n, e, dtype=x.dtype)
        for t in range(n):
            kept = [j for j in range(n) if (not layer.causal or j <= t)
                    and (key_mask is None or bool(key_mask[bi, j]))]
            sc = torch.stack([q[t] @ k[j] for j in kept]) / math.sqrt(s)
            if layer.normalization == "squared_relu":
                a = torch.relu(sc) ** 2 / len(kept)
            else:
                lam = math.log(len(kept)) / math.log(layer.train_length) \
                    if layer.normalization == "softmax_plus" else 1.0
                a = torch.softmax(lam * sc, 0)
            av[t] = a @ v[kept]
        outs.append(layer.out(u * av))
    return torch.stack(outs)


@pytest.mark.parametrize("normalization", METHODS)
@pytest.mark.parametrize("causal,bias,rotary", [(False, False, None), (True, True, rope), (True, False, rope)])
def test_gau_matches_naive(normalization, causal, bias, rotary):
    torch.manual_seed(6)
    layer = GatedAttentionUnit(8, expansion=1.5, key_size=4, normalization=normalization,
                               causal=causal, bias=bias, rotary=rotary, train_length=4).double()
    if bias:
        torch.nn.init.normal_(layer.beta)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = layer(x, key_mask)
    torch.testing.assert_close(got, naive_gau(layer, x, key_mask), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), naive_gau(layer, x), atol=1e-12, rtol=0)


def test_gau_causal_and_padding_do_not_leak():
    torch.manual_seed(7)
    layer = GatedAttentionUnit(16, key_size=8, causal=True, rotary=rope)
    x = torch.randn(2, 10, 16)
    y = x.clone()
    y[:, 6:] += 5 * torch.randn(2, 4, 16)
    torch.testing.assert_close(layer(x)[:, :6], layer(y)[:, :6], atol=1e-6, rtol=0)
    bidir = GatedAttentionUnit(16, key_size=8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    y7 = x.clone()
    y7[:, 7:] += 5 * torch.randn(2, 3, 16)
    torch.testing.assert_close(bidir(x, mask)[:, :7], bidir(y7, mask)[:, :7], atol=1e-6, rtol=0)
    # the padded keys really are ignored: same as running the 7 real tokens alone
    torch.testing.assert_close(bidir(x, mask)[:, :7], bidir(x[:, :7]), atol=1e-6, rtol=0)


def test_gau_gradcheck():
    torch.manual_seed(8)
    layer = GatedAttentionUnit(4, expansion=1, key_size=3, causal=True, rotary=rope).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gau_half_precision_and_large_inputs(dtype):
    torch.manual_seed(9)
    layer = GatedAttentionUnit(32, key_size=16, causal=True, train_length=16)
    x = torch.randn(2, 24, 32)
    ref = layer(x)
    got = layer.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    layer.float()
    with torch.no_grad():
        layer.gamma.fill_(30.0)  # logits of order 1e4: the softmax saturates but stays finite
    assert torch.isfinite(layer(10 * x)).all()


def test_gau_bad_inputs():
    layer = GatedAttentionUnit(8, key_size=4)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        layer(torch.ones(1, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, n, 8\]"):
        layer(torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="key_mask: expected shape"):
        layer(torch.randn(1, 3, 8), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask: expected a boolean tensor"):
        layer(torch.randn(1, 3, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match="normalization: expected one of"):
        GatedAttentionUnit(8, normalization="relu2")
    with pytest.raises(ValueError, match="expansion: expected expansion \\* d_model to be an integer"):
        GatedAttentionUnit(8, expansion=1.3)
    with pytest.raises(TypeError, match="rotary: expected a callable"):
        GatedAttentionUnit(8, rotary=3)
    with pytest.raises(ValueError, match="gamma_init_std"):
        GatedAttentionUnit(8, gamma_init_std=-1.0)


# ------------------------------------------------------------------------------- gau_param_count
@pytest.mark.parametrize("d,expansion,s,bias", [(8, 2, 4, False), (8, 2, 4, True), (64, 2, 32, False),
                                                (12, 1.5, 5, True), (768, 2, 128, False)])
def test_param_count_closed_form(d, expansion, s, bias):
    layer = GatedAttentionUnit(d, expansion=expansion, key_size=s, bias=bias)
    assert gau_param_count(d, expansion, s, bias) == sum(p.numel() for p in layer.parameters())


def test_two_gau_layers_match_one_transformer_block():
    d = 768
    block = 4 * d * d + 2 * d * (4 * d)  # bias-free MHA (Wq, Wk, Wv, Wo) + FFN of width 4d
    assert abs(2 * gau_param_count(d, 2, 128) / block - 1) < 0.05
    with pytest.raises(ValueError, match=r"key_size: expected a value in \[1, inf\]"):
        gau_param_count(8, 2, 0)
    with pytest.raises(TypeError, match="d_model: expected an int"):
        gau_param_count(8.0, 2, 4)


@pytest.mark.parametrize("normalization", ["softmax", "softmax_plus"])
@pytest.mark.parametrize("causal", [False, True])
def test_gau_sdpa_path_equals_the_explicit_reference(normalization, causal):
    """forward through SDPA (the default) equals the explicit score-matrix path, values and
    gradients, with padding and an all-padding sequence."""
    torch.manual_seed(0)
    gau = GatedAttentionUnit(32, 2, 16, normalization=normalization, causal=causal,
                             train_length=8).double()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, 6:] = False
    key_mask[2] = False
    out = gau(x, key_mask)
    (g_sdpa,) = torch.autograd.grad(out.square().sum(), x)
    gau.use_sdpa = False
    ref = gau(x, key_mask)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_sdpa, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal,padded", [(True, False), (False, False), (True, True)])
def test_gau_long_sequences_keep_no_score_matrix_on_the_cpu(monkeypatch, causal, padded):
    """From _GAU_PAD_FROM positions on, Q and K are zero-padded to the value width so that the
    CPU's fused kernel runs: no [n, n] tensor is saved for backward, and values and gradients
    equal the explicit reference (float32 here: the CPU's fused kernel has no float64)."""
    import companion.attention as A

    monkeypatch.setattr(A, "_GAU_PAD_FROM", 16)
    torch.manual_seed(1)
    n = 48
    gau = GatedAttentionUnit(16, 2, 8, normalization="softmax_plus", causal=causal,
                             train_length=16)
    x = torch.randn(2, n, 16, requires_grad=True)
    key_mask = torch.ones(2, n, dtype=torch.bool)
    if padded:
        key_mask[1, 30:] = False
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gau(x, key_mask if padded else None)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    if not padded:  # the mask tensor of a padded batch is [B, n, n] bool by itself
        assert not [s for s in shapes if len(s) >= 2 and s[-1] == n and s[-2] == n], shapes
    gau.use_sdpa = False
    ref = gau(x, key_mask if padded else None)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
