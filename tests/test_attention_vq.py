"""Tests of VQ attention in companion.attention (notebook: transformer-vq)."""
import weakref

import pytest
import torch
from _helpers import LargestTensor
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from companion import attention as A
from companion.attention import VQAttention, vq_attention, vq_attention_naive
from companion.quantize import VectorQuantizer


def _data(shape=(2, 3), n=60, dk=6, dv=5, c=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, n, dk, generator=g, dtype=dtype)
    v = torch.randn(*shape, n, dv, generator=g, dtype=dtype)
    codebook = torch.randn(c, dk, generator=g, dtype=dtype)
    codes = torch.randint(0, c, (*shape, n), generator=g)
    return q, codes, v, codebook


def _recurrent(q, codes, v, codebook, rel_bias=None, block_size=1, scale=None):
    """Token-by-token loops (the article's RNN form): for query t, exact terms for the keys of its
    own and previous block, and per-code states U (value sums) and counts for the older keys."""
    n, dk = q.shape
    c = codebook.shape[0]
    scale = dk ** -0.5 if scale is None else scale
    out = torch.empty(n, v.shape[1], dtype=q.dtype)
    for t in range(n):
        first_local = max(0, (t // block_size - 1) * block_size)
        u = torch.zeros(c, v.shape[1], dtype=q.dtype)
        cnt = torch.zeros(c, dtype=q.dtype)
        for s in range(first_local):
            u[codes[s]] += v[s]
            cnt[codes[s]] += 1
        num = torch.zeros(v.shape[1], dtype=q.dtype)
        den = torch.zeros((), dtype=q.dtype)
        for j in range(c):                       # exp(q_t C^T) U
            w = torch.exp(scale * q[t] @ codebook[j])
            num, den = num + w * u[j], den + w * cnt[j]
        for s in range(first_local, t + 1):      # exp(q_t k_s + b(t - s)) v_s
            b = rel_bias[t - s] if rel_bias is not None and t - s < len(rel_bias) else 0.0
            w = torch.exp(scale * q[t] @ codebook[codes[s]] + b)
            num, den = num + w * v[s], den + w
        out[t] = num / den
    return out


# --- the references agree: naive == SDPA, naive == token loops --------------------------------
def test_naive_equals_sdpa_with_quantised_keys():
    q, codes, v, codebook = _data()
    keys = codebook[codes]
    for causal in (False, True):
        got = vq_attention_naive(q, codes, v, codebook, causal=causal)
        want = F.scaled_dot_product_attention(q, keys, v, is_causal=causal)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    bias = torch.randn(9, dtype=torch.float64)
    t = torch.arange(60)
    lag = t[:, None] - t[None, :]
    mask = torch.where((lag >= 0) & (lag < 9), bias[lag.clamp(0, 8)], torch.zeros(()))
    mask = mask.masked_fill(lag < 0, float("-inf"))
    got = vq_attention_naive(q, codes, v, codebook, rel_bias=bias, block_size=16, scale=0.7)
    want = F.scaled_dot_product_attention(q, keys, v, attn_mask=mask, scale=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_blockwise_equals_token_recurrence(block_size):
    q, codes, v, codebook = _data(shape=(), n=23)
    bias = torch.randn(block_size, dtype=torch.float64)
    want = _recurrent(q, codes, v, codebook, rel_bias=bias, block_size=block_size)
    got = vq_attention(q, codes, v, codebook, block_size=block_size, rel_bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# --- the fast form is exact -------------------------------------------------------------------
def test_bidirectional_equals_naive():
    q, codes, v, codebook = _data(n=300, c=16)
    got = vq_attention(q, codes, v, codebook, causal=False)
    torch.testing.assert_close(got, vq_attention_naive(q, codes, v, codebook, causal=False),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("block_size", [1, 8, 32, 300, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_blocks_equal_naive(block_size, with_bias):
    q, codes, v, codebook = _data(n=300, c=16)     # 300 is not a multiple of 8 or 32
    bias = torch.randn(min(block_size, 5), dtype=torch.float64) if with_bias else None
    got = vq_attention(q, codes, v, codebook, block_size=block_size, rel_bias=bias)
    want = vq_attention_naive(q, codes, v, codebook, block_size=block_size, rel_bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_full_window_bias_and_per_head_codebooks():
    q, codes, v, _ = _data(n=70, c=9)
    codebook = torch.randn(3, 9, 6, dtype=torch.float64)           # one codebook per head
    bias = torch.randn(16, dtype=torch.float64)                    # lags 0..15 = the whole block
    for causal, rb in ((True, bias), (False, None)):
        got = vq_attention(q, codes, v, codebook, causal=causal, block_size=16, rel_bias=rb)
        want = vq_attention_naive(q, codes, v, codebook, causal=causal, rel_bias=rb)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_float32_matches_float64():
    q, codes, v, codebook = _data(n=300, c=16)
    got = vq_attention(q.float(), codes, v.float(), codebook.float(), block_size=32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), vq_attention_naive(q, codes, v, codebook),
                               rtol=0, atol=1e-5)




@pytest.mark.parametrize("causal", [False, True])
def test_no_quadratic_intermediate(causal):
    q, codes, v, codebook = _data(shape=(1,), n=1024, dk=4, dv=4, c=8, dtype=torch.float32)
    with LargestTensor() as rec:
        vq_attention(q, codes, v, codebook, causal=causal, block_size=16)
    assert rec.largest <= 1024 * (2 * 16 + 8)      # n (2l + c) scores: linear in n
    with LargestTensor() as rec:
        vq_attention_naive(q, codes, v, codebook, causal=causal)
    assert rec.largest >= 1024 ** 2                # the reference is quadratic


# --- chunks of blocks: same result, bounded memory ---------------------------------------------
@pytest.mark.parametrize("block_size, n", [(1, 23), (7, 100), (16, 100), (16, 16), (64, 100)])
def test_chunk_sizes_equal_naive(block_size, n):
    """Any chunk size (dividing the number of blocks m or not, 1 block, m, more than m, the
    default) gives the naive result, with a bias, per-head codebooks and straight-through keys."""
    q, codes, v, _ = _data(n=n, c=9)
    codebook = torch.randn(3, 9, 6, dtype=torch.float64)
    bias = torch.randn(min(block_size, 5), dtype=torch.float64)
    k_hat = torch.gather(codebook.expand(2, 3, 9, 6), -2, codes[..., None].expand(2, 3, n, 6))
    want = vq_attention_naive(q, codes, v, codebook, rel_bias=bias)
    m = -(-n // block_size)
    for chunk in sorted({1, 2, 3, 5, m, m + 3}) + [None]:
        for kh in (None, k_hat):
            got = vq_attention(q, codes, v, codebook, block_size=block_size, rel_bias=bias,
                               k_hat=kh, chunk_size=chunk)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"chunk_size={chunk}")


def test_chunk_size_does_not_change_gradients():
    q, codes, v, codebook = _data(shape=(2,), n=45, c=6)
    bias = torch.randn(3, dtype=torch.float64)
    w = torch.randn(2, 45, 5, dtype=torch.float64)
    for through in (False, True):
        grads = []
        for chunk in (1, 3, 4, None):                             # 6 blocks of 8
            args = [t.clone().requires_grad_() for t in (q, v, codebook, bias)]
            out = vq_attention(*args[:1], codes, *args[1:3], block_size=8, rel_bias=args[3],
                               grad_through_cache=through, chunk_size=chunk)
            grads.append(torch.autograd.grad((out * w).sum(), args))
        for g in grads[1:]:
            for a, b in zip(grads[0], g):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("through", [False, True])
def test_gradcheck_causal_chunks(through):
    """Exact gradients across chunk boundaries (4 blocks of 3 in chunks of 3 and 1 block); with
    the default detached cache, the values are left out (they get a cut gradient by design)."""
    q, codes, v, codebook = _data(shape=(), n=11, dk=2, dv=2, c=3)
    bias = torch.randn(2, dtype=torch.float64)
    q, v, codebook, bias = (t.requires_grad_() for t in (q, v, codebook, bias))

    def f(q, cb, b, v=v.detach()):
        return vq_attention(q, codes, v, cb, block_size=3, rel_bias=b, chunk_size=3,
                            grad_through_cache=through)
    assert torch.autograd.gradcheck(f, (q, codebook, bias, v) if through else (q, codebook, bias))


def test_chunk_size_errors_name_the_argument():
    q, codes, v, codebook = _data(n=10, c=4)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="chunk_size: expected a value in"):
            vq_attention(q, codes, v, codebook, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size: expected an int"):
        vq_attention(q, codes, v, codebook, chunk_size=2.0)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create and that are alive at once (the inputs', and
    views of them, are not counted): each storage is counted from the first op returning it until
    the last tensor returned on it is freed (a finalizer per returned tensor)."""

    def __init__(self, *inputs):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(x, torch.Tensor):
                continue
            storage = x.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.skip:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
            weakref.finalize(x, self._free, key)
        return out


def _extra_peak(q, codes, v, codebook, **kw):
    """Peak live bytes of a no-grad forward pass beyond its [..., n, dv] output."""
    with torch.no_grad(), _LiveBytes(q, codes, v, codebook) as rec:
        out = vq_attention(q, codes, v, codebook, **kw)
    return rec.peak - out.numel() * out.element_size()


def test_forward_peak_does_not_grow_with_the_length():
    """With a fixed chunk, the memory beyond the output is one chunk's, whatever n (unchunked, the
    [..., n / l, l, 2l + c] scores and [..., n / l, c, dv] caches alone were 4 x larger at 4n)."""
    extra = {}
    for n in (4096, 16384):
        q, codes, v, codebook = _data(shape=(2,), n=n, dk=8, dv=8, c=16, dtype=torch.float32)
        extra[n] = _extra_peak(q, codes, v, codebook, block_size=16, chunk_size=8)
        assert extra[n] < 2 * 16384 * 8 * 4 // 8                  # < 1/8 of the output at 16k
    assert extra[16384] <= 1.2 * extra[4096]


def test_default_chunk_bounds_the_forward_peak():
    """The default chunk keeps the intermediates near the documented 2^22 elements (here 4
    chunks; one pass over all 256 blocks would hold 50 MB of scores alone)."""
    q, codes, v, codebook = _data(shape=(4,), n=16384, dk=16, dv=16, c=64, dtype=torch.float32)
    extra = _extra_peak(q, codes, v, codebook, block_size=64)
    assert 0 < extra <= 2 * 4 * A._VQ_CHUNK_ELEMENTS_CPU       # 32 MiB


def test_chunks_under_torch_compile_with_changing_lengths():
    """Several chunks (3, then 4) under AOT autograd's functionalisation of the in-place ops;
    static shapes per length (the one-chunk dynamic-shape case is in test_properties)."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, c, v, cb: vq_attention(q, c, v, cb, block_size=4, chunk_size=2),
                      backend="aot_eager", dynamic=False)
    for n in (19, 30):
        q, codes, v, codebook = _data(shape=(2,), n=n, c=5, dtype=torch.float32)
        torch.testing.assert_close(f(q, codes, v, codebook),
                                   vq_attention_naive(q, codes, v, codebook),
                                   rtol=1e-5, atol=1e-5)


# --- gradients --------------------------------------------------------------------------------
def test_gradcheck_bidirectional():
    q, codes, v, codebook = _data(shape=(), n=9, dk=3, dv=2, c=4)
    inputs = tuple(t.requires_grad_() for t in (q, v, codebook))
    assert torch.autograd.gradcheck(
        lambda q, v, cb: vq_attention(q, codes, v, cb, causal=False), inputs)


def test_gradcheck_causal_through_cache():
    q, codes, v, codebook = _data(shape=(), n=11, dk=2, dv=2, c=3)
    bias = torch.randn(3, dtype=torch.float64)
    k_hat = codebook[codes].clone()
    inputs = tuple(t.requires_grad_() for t in (q, v, codebook, bias, k_hat))

    def f(q, v, cb, b, kh):
        return vq_attention(q, codes, v, cb, block_size=3, rel_bias=b, k_hat=kh,
                            grad_through_cache=True)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_causal_default_for_all_but_values():
    """The detached cache only cuts the gradient to v; q, codebook, bias and k_hat are exact."""
    q, codes, v, codebook = _data(shape=(), n=11, dk=2, dv=2, c=3)
    bias = torch.randn(3, dtype=torch.float64)
    k_hat = codebook[codes].clone()
    inputs = tuple(t.requires_grad_() for t in (q, codebook, bias, k_hat))

    def f(q, cb, b, kh):
        return vq_attention(q, codes, v, cb, block_size=3, rel_bias=b, k_hat=kh)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradients_match_the_paper_rule():
    """Default gradients equal those of a quadratic reference in which the keys get the
    straight-through gradient only from queries of their own or the next block, and values
    older than one block are detached, as the paper trains."""
    q, codes, v, codebook = _data(shape=(2,), n=40, c=6)
    keys_raw = torch.randn(2, 40, 6, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    l, n = 8, 40
    w = torch.randn(2, 40, 5, dtype=torch.float64)

    def fast(q, v, cb, kr, b):
        k_hat = kr + (cb[codes] - kr).detach()
        return (vq_attention(q, codes, v, cb, block_size=l, rel_bias=b, k_hat=k_hat) * w).sum()

    def ref(q, v, cb, kr, b):
        k_hat = kr + (cb[codes] - kr).detach()
        t = torch.arange(n)
        lag = t[:, None] - t[None, :]
        near = (t[None, :] // l) >= (t[:, None] // l) - 1            # key block >= query block - 1
        scores = torch.where(near, q @ k_hat.transpose(-1, -2), q @ cb[codes].transpose(-1, -2))
        scores = scores * 6 ** -0.5 + torch.where((lag >= 0) & (lag < 4), b[lag.clamp(0, 3)], 0)
        p = torch.softmax(scores.masked_fill(lag < 0, float("-inf")), -1)
        out = (p * near) @ v + (p * ~near) @ v.detach()
        return (out * w).sum()

    args = [t.clone().requires_grad_() for t in (q, v, codebook, keys_raw, bias)]
    args2 = [t.clone().requires_grad_() for t in (q, v, codebook, keys_raw, bias)]
    torch.testing.assert_close(fast(*args), ref(*args2), rtol=0, atol=1e-10)
    g1 = torch.autograd.grad(fast(*args), args)
    g2 = torch.autograd.grad(ref(*args2), args2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert g1[3].abs().sum() > 0                                     # keys learn through STE


# --- extreme inputs and low precision ---------------------------------------------------------
def test_shifted_logits_give_the_same_output():
    """Adding 1000 to every logit of a row (an extra coordinate shared by all codes) changes
    nothing; the softmax is stabilised by the max over local and code scores."""
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):   # float32: 1000 + s
        q, codes, v, codebook = _data(n=100, c=8, dtype=dtype)             # keeps ~5 digits of s
        q2 = torch.cat([q, torch.full((*q.shape[:-1], 1), 1000.0, dtype=dtype)], -1)
        cb2 = torch.cat([codebook, torch.ones(8, 1, dtype=dtype)], -1)
        for causal in (False, True):
            base = vq_attention(q, codes, v, codebook, causal=causal, scale=1.0, block_size=16)
            got = vq_attention(q2, codes, v, cb2, causal=causal, scale=1.0, block_size=16)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, base, rtol=0, atol=atol)


def test_huge_logits_are_finite_and_exact():
    q, codes, v, codebook = _data(n=100, c=8)
    q = q * 1e4                                                       # |logits| ~ 1e4
    for causal in (False, True):
        got = vq_attention(q, codes, v, codebook, causal=causal, block_size=16)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, vq_attention_naive(q, codes, v, codebook, causal=causal),
                                   rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, codes, v, codebook = _data(shape=(2,), n=600, c=16, dtype=torch.float32)
    bias = torch.randn(8)
    want = vq_attention_naive(q.double(), codes, v.double(), codebook.double(),
                              rel_bias=bias.double())
    got = vq_attention(q.to(dtype), codes, v.to(dtype), codebook.to(dtype), block_size=32,
                       rel_bias=bias.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert (got.double() - want).abs().max() < tol


# --- the module -------------------------------------------------------------------------------
class _NearestCode(nn.Module):
    """A minimal quantizer for the tests: nearest code, straight-through, commitment loss."""

    def __init__(self, c, dim):
        super().__init__()
        self.register_buffer("codebook", torch.randn(c, dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, z):
        codes = torch.cdist(z, self.codebook.to(z.dtype)).argmin(-1)
        z_q = self.codebook.to(z.dtype)[codes]
        return z + (z_q - z).detach(), codes, ((z - z_q.detach()) ** 2).mean()


def test_module_matches_functional_and_trains_keys():
    torch.manual_seed(0)
    layer = VQAttention(d_model=12, key_size=4, quantizer=_NearestCode(5, 4), block_size=8).double()
    with torch.no_grad():
        layer.rel_bias.copy_(torch.randn(8))
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    y, codes, aux = layer(x)
    assert y.shape == (2, 30, 12) and codes.shape == (2, 30) and aux.ndim == 0
    q = F.rms_norm(layer.w_q(x), (4,))
    k = F.rms_norm(layer.w_k(x), (4,))
    torch.testing.assert_close(codes, torch.cdist(k, layer.quantizer.codebook).argmin(-1))
    want = layer.w_o(vq_attention_naive(q, codes, layer.w_v(x), layer.quantizer.codebook,
                                        rel_bias=layer.rel_bias))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-10)
    y.square().sum().backward()
    for p in (layer.w_q.weight, layer.w_k.weight, layer.w_v.weight, layer.rel_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_module_bad_quantizer():
    with pytest.raises(TypeError, match="quantizer"):
        VQAttention(8, 4, quantizer=nn.Linear(4, 4))


# --- bad inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [vq_attention, vq_attention_naive])
def test_bad_inputs(fn):
    q, codes, v, codebook = _data(n=10, c=4)
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 3\]"):
        fn(q, codes + 1 + codes.max(), v, codebook)
    with pytest.raises(TypeError, match="codes: expected an integer tensor"):
        fn(q, codes.double(), v, codebook)
    with pytest.raises(ValueError, match="codes: expected shape"):
        fn(q, codes[..., :-1], v, codebook)
    with pytest.raises(ValueError, match="block_size: expected a value in"):
        fn(q, codes, v, codebook, block_size=0)
    with pytest.raises(ValueError, match=r"codebook: expected shape \[..., c, 6\]"):
        fn(q, codes, v, codebook[:, :3])
    with pytest.raises(ValueError, match="codebook: leading dims"):
        fn(q, codes, v, codebook.expand(5, 4, 6))
    with pytest.raises(TypeError, match="v: expected dtype torch.float64"):
        fn(q, codes, v.float(), codebook)
    with pytest.raises(ValueError, match="v: expected shape"):
        fn(q, codes, v[..., :-1, :], codebook)
    with pytest.raises(ValueError, match="rel_bias: expected a 1-D tensor of 1 to block_size"):
        fn(q, codes, v, codebook, block_size=4, rel_bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rel_bias: a relative bias is only defined for causal"):
        fn(q, codes, v, codebook, causal=False, rel_bias=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="k_hat: straight-through keys"):
        fn(q, codes, v, codebook, causal=False, k_hat=q)
    with pytest.raises(ValueError, match="k_hat: expected the shape of q"):
        fn(q, codes, v, codebook, k_hat=q[..., :-1, :])
    with pytest.raises(ValueError, match="scale: expected a value in"):
        fn(q, codes, v, codebook, scale=0.0)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        fn(codes, codes, v, codebook)


@pytest.mark.parametrize("B, n", [(0, 8), (2, 0), (0, 0)])
def test_vq_attention_empty_batches(B, n):
    q, v = torch.randn(B, n, 4), torch.randn(B, n, 5)
    out = vq_attention(q, torch.zeros(B, n, dtype=torch.long), v, torch.randn(6, 4), block_size=4)
    assert out.shape == (B, n, 5)
    layer = VQAttention(8, 4, VectorQuantizer(6, 4), block_size=4)
    y, codes, aux = layer(torch.randn(B, n, 8))
    assert y.shape == (B, n, 8) and codes.shape == (B, n) and aux.shape == ()


def test_vq_attention_layer_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"quantizer: expected a .codebook of shape \[c, key_size=4\]"):
        VQAttention(8, 4, VectorQuantizer(6, 5))
    layer = VQAttention(8, 4, VectorQuantizer(6, 4), block_size=4)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, n, d_model=8\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
