"""Tests of attention masks, mixed-direction attention and attention spectra in companion.attention
(notebook: decoder-only-low-rank)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from companion.attention import attention_mask, attention_spectrum, mixed_direction_attention


# --- attention_mask ---------------------------------------------------------------------------
def _mask_loops(kind, n, prefix_len=None):
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = {"bidirectional": True, "causal": j <= i, "anticausal": j >= i,
                       "prefix": (j < (prefix_len or 0)) or j <= i}[kind]
    return m


@pytest.mark.parametrize("n", [1, 5, 8])
def test_masks_equal_loops(n):
    for kind in ("bidirectional", "causal", "anticausal"):
        got = attention_mask(kind, n)
        assert got.dtype == torch.bool and got.shape == (n, n)
        assert torch.equal(got, _mask_loops(kind, n))
    for m in range(n + 1):
        assert torch.equal(attention_mask("prefix", n, prefix_len=m), _mask_loops("prefix", n, m))


def test_prefix_mask_extremes_and_no_leak():
    assert torch.equal(attention_mask("prefix", 6, prefix_len=0), attention_mask("causal", 6))
    assert torch.equal(attention_mask("prefix", 6, prefix_len=6), attention_mask("bidirectional", 6))
    m = attention_mask("prefix", 10, prefix_len=4)
    assert not m[:4, 4:].any()                  # prefix tokens never see output tokens
    assert m[4:, :4].all()                      # outputs see the whole prefix
    assert torch.equal(m[4:, 4:], attention_mask("causal", 6))


def test_mask_bad_inputs():
    with pytest.raises(ValueError, match="kind: expected one of 'bidirectional'"):
        attention_mask("sliding", 4)
    with pytest.raises(ValueError, match="prefix_len: expected an int in"):
        attention_mask("prefix", 4)
    with pytest.raises(ValueError, match=r"prefix_len: expected a value in \[0, 4\]"):
        attention_mask("prefix", 4, prefix_len=5)
    with pytest.raises(ValueError, match="prefix_len: only used with kind='prefix'"):
        attention_mask("causal", 4, prefix_len=2)
    with pytest.raises(ValueError, match="n: expected a value in"):
        attention_mask("causal", 0)


# --- mixed_direction_attention ----------------------------------------------------------------
def _qkv(b=2, h=4, n=9, dk=5, dv=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, e, generator=g, dtype=dtype) for e in (dk, dk, dv))


def _naive(q, k, v, forward_heads):
    """Explicit masked softmax, head by head."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    n = q.shape[2]
    for head in range(q.shape[1]):
        allowed = _mask_loops("causal" if head < forward_heads else "anticausal", n)
        s = q[:, head] @ k[:, head].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, head] = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v[:, head]
    return out


@pytest.mark.parametrize("forward_heads", [0, 1, 2, 4])
def test_mixed_equals_naive(forward_heads):
    q, k, v = _qkv()
    torch.testing.assert_close(mixed_direction_attention(q, k, v, forward_heads),
                               _naive(q, k, v, forward_heads), rtol=0, atol=1e-12)


def test_all_forward_is_causal_sdpa_and_all_backward_is_flipped():
    q, k, v = (t.float() for t in _qkv(n=33))
    torch.testing.assert_close(mixed_direction_attention(q, k, v, 4),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-6)
    flip = lambda t: t.flip(2)
    torch.testing.assert_close(mixed_direction_attention(q, k, v, 0),
                               flip(F.scaled_dot_product_attention(flip(q), flip(k), flip(v), is_causal=True)),
                               rtol=0, atol=1e-6)


def test_mixed_heads_reach_every_token():
    """With one forward and one backward head fed from the same x, every output depends on every input."""
    g = torch.Generator().manual_seed(1)
    n, d = 7, 4
    w = 0.3 * torch.randn(3, 2, d, d, generator=g, dtype=torch.float64)     # soft attention

    def layer(x):                                                    # x [n, d] -> [n, 2 d]
        q, k, v = (torch.einsum("nd,hde->hne", x, w[i])[None] for i in range(3))
        return mixed_direction_attention(q, k, v, 1)[0].transpose(0, 1).reshape(n, 2 * d)

    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x)              # [n, 2d, n, d]
    dep = jac.abs().sum((1, 3))                                     # [n out, n in]
    assert (dep > 1e-8).all()
    one_way = torch.autograd.functional.jacobian(
        lambda x: mixed_direction_attention(*(torch.einsum("nd,hde->hne", x, w[i])[None] for i in range(3)), 2)[0],
        x).abs().sum((0, 2, 4))                                     # both heads forward: [n, n]
    assert torch.equal(one_way > 1e-12, attention_mask("causal", n))


def test_mixed_gradcheck():
    q, k, v = _qkv(b=1, h=2, n=5, dk=3, dv=2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mixed_direction_attention(q, k, v, 1), inputs)


def test_mixed_extreme_and_half_precision():
    q, k, v = _qkv(n=16)
    big = mixed_direction_attention(1e4 * q, k, v, 2)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, _naive(1e4 * q, k, v, 2), rtol=0, atol=1e-10)
    ref = mixed_direction_attention(*(t.float() for t in (q, k, v)), 2)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        out = mixed_direction_attention(*(t.to(dtype) for t in (q, k, v)), 2)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < tol


def test_mixed_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"forward_heads: expected a value in \[0, 4\]"):
        mixed_direction_attention(q, k, v, 5)
    with pytest.raises(TypeError, match="forward_heads: expected an int"):
        mixed_direction_attention(q, k, v, 1.5)
    with pytest.raises(ValueError, match="q: expected shape"):
        mixed_direction_attention(q[0], k[0], v[0], 1)
    with pytest.raises(ValueError, match="k: expected the shape of q"):
        mixed_direction_attention(q, k[:, :, :-1], v, 1)
    with pytest.raises(ValueError, match="v: expected shape"):
        mixed_direction_attention(q, k, v[:, :, :-1], 1)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        mixed_direction_attention(q.long(), k, v, 1)


# --- attention_spectrum -----------------------------------------------------------------------
def test_spectrum_equals_numpy_and_entropy_formula():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(3, 12, 12, generator=g, dtype=torch.float64), -1)
    sigma, erank = attention_spectrum(p)
    assert sigma.shape == (3, 12) and erank.shape == (3,)
    for b in range(3):
        s_np = np.linalg.svd(p[b].numpy(), compute_uv=False)
        np.testing.assert_allclose(sigma[b].numpy(), s_np, rtol=1e-12, atol=1e-15)
        q = s_np / s_np.sum()
        assert math.isclose(erank[b].item(), math.exp(-sum(x * math.log(x) for x in q if x > 0)),
                            rel_tol=1e-12)


def test_effective_rank_of_known_matrices():
    n = 10
    assert math.isclose(attention_spectrum(torch.eye(n, dtype=torch.float64))[1].item(), n, rel_tol=1e-12)
    uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)          # rank 1: 0 log 0 = 0
    assert math.isclose(attention_spectrum(uniform)[1].item(), 1.0, rel_tol=1e-12)
    d = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert math.isclose(attention_spectrum(d)[1].item(), 3.0, rel_tol=1e-12)
    assert torch.isfinite(attention_spectrum(torch.zeros(4, 4))[0]).all()


def test_spectrum_gradcheck_and_extreme():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(6, 6, generator=g, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: attention_spectrum(p)[1], (p,))
    onehot = torch.softmax(1e4 * torch.randn(8, 8, generator=g, dtype=torch.float64), -1)
    sigma, erank = attention_spectrum(onehot)
    assert torch.isfinite(sigma).all() and 1.0 <= erank.item() <= 8.0


def test_spectrum_bad_inputs():
    with pytest.raises(ValueError, match=r"p: expected square matrices \[..., n, n\]"):
        attention_spectrum(torch.rand(3, 4))
    with pytest.raises(TypeError, match="p: expected a floating-point tensor"):
        attention_spectrum(torch.eye(3, dtype=torch.long))
