"""Tests of companion.position: RoPE (1-D, n-D, RoPE-Tie positions) and the training-free
length-extrapolation tools (interpolated frequencies, log-n scale, ReRoPE, the Λ-mask)."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.position import (apply_rope, apply_rope_nd, interpolated_frequencies, lambda_mask,
                                 logn_scale, rerope_attention, rope_frequencies, rope_tie_positions)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def complex_rope(x, positions, freqs):
    """Reference: z_i = x[2i] + i x[2i+1] multiplied by e^{i m θ_i} (float64 / complex128)."""
    z = torch.view_as_complex(x.to(F64).unflatten(-1, (-1, 2)).contiguous())
    angle = torch.as_tensor(positions, dtype=F64)[..., None] * freqs.to(F64)
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def complex_score(q, k, rel, freqs):
    """Re sum_i q_i conj(k_i) e^{i rel θ_i} for one query/key pair (vectors [d])."""
    zq = torch.view_as_complex(q.to(F64).reshape(-1, 2).contiguous())
    zk = torch.view_as_complex(k.to(F64).reshape(-1, 2).contiguous())
    return (zq * zk.conj() * torch.exp(1j * rel * freqs.to(F64))).real.sum()


# ------------------------------------------------------------------------------ rope_frequencies
def test_rope_frequencies_formula():
    for dim, base in ((2, 1e4), (8, 1e4), (64, 500.0)):
        f = rope_frequencies(dim, base)
        assert f.dtype == F64 and f.shape == (dim // 2,)
        ref = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=F64)
        torch.testing.assert_close(f, ref, rtol=1e-15, atol=0)


def test_rope_frequencies_bad_inputs():
    with pytest.raises(ValueError, match="dim: expected an even number, got 7"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="dim: expected a value in"):
        rope_frequencies(0)
    with pytest.raises(TypeError, match="dim: expected an int"):
        rope_frequencies(8.0)
    with pytest.raises(ValueError, match="base: expected a value in"):
        rope_frequencies(8, base=1.0)


# ------------------------------------------------------------------------------------ apply_rope
def test_apply_rope_equals_complex_multiplication():
    g = gen(0)
    x = torch.randn(2, 3, 7, 16, generator=g, dtype=F64)
    freqs = rope_frequencies(16)
    pos = torch.randn(7, generator=g, dtype=F64) * 50          # float positions allowed
    torch.testing.assert_close(apply_rope(x, pos, freqs), complex_rope(x, pos, freqs), rtol=0, atol=1e-12)
    # default freqs, integer positions, list positions
    ipos = torch.arange(7) * 3
    torch.testing.assert_close(apply_rope(x, ipos), complex_rope(x, ipos, freqs), rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_rope(x, ipos.tolist()), apply_rope(x, ipos), rtol=0, atol=0)
    # per-batch positions broadcast against x's leading dimensions
    bpos = torch.randn(2, 1, 7, generator=g, dtype=F64) * 10
    torch.testing.assert_close(apply_rope(x, bpos, freqs), complex_rope(x, bpos, freqs), rtol=0, atol=1e-12)
    # a rotation: norms of every pair are kept
    torch.testing.assert_close(apply_rope(x, pos).unflatten(-1, (-1, 2)).norm(dim=-1),
                               x.unflatten(-1, (-1, 2)).norm(dim=-1), rtol=1e-12, atol=0)


def test_rope_score_depends_only_on_relative_position():
    g = gen(1)
    d, n = 32, 9
    freqs = rope_frequencies(d)
    q, k = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    pos = torch.arange(n, dtype=F64)
    scores = apply_rope(q, pos, freqs) @ apply_rope(k, pos, freqs).T
    for shift in (1.0, 37.0, 1000.0, -12.5):
        shifted = apply_rope(q, pos + shift, freqs) @ apply_rope(k, pos + shift, freqs).T
        torch.testing.assert_close(shifted, scores, rtol=0, atol=1e-10)
    ref = torch.stack([torch.stack([complex_score(q[m], k[j], m - j, freqs) for j in range(n)])
                       for m in range(n)])
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-10)


def test_apply_rope_gradcheck():
    g = gen(2)
    x = torch.randn(2, 5, 6, generator=g, dtype=F64, requires_grad=True)
    pos = torch.tensor([0.0, 1.5, 3.0, 7.0, 11.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, pos), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rope_low_precision(dtype):
    g = gen(3)
    x = torch.randn(4, 64, 32, generator=g)
    pos = torch.arange(64) * 100                               # angles up to 6300 rad
    ref = apply_rope(x, pos)
    out = apply_rope(x.to(dtype), pos)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    assert (out.float() - ref).abs().max() < tol * 4


def test_apply_rope_bad_inputs():
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="x: the last dimension must be even"):
        apply_rope(torch.randn(5, 7), torch.arange(5))
    with pytest.raises(ValueError, match=r"positions: expected 5 positions"):
        apply_rope(x, torch.arange(4))
    with pytest.raises(ValueError, match=r"freqs: expected a tensor of shape \[3\]"):
        apply_rope(x, torch.arange(5), rope_frequencies(8))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        apply_rope(torch.ones(5, 6, dtype=torch.long), torch.arange(5))
    with pytest.raises(TypeError, match="x: expected a real floating-point tensor"):
        apply_rope(torch.randn(5, 6, dtype=torch.complex64), torch.arange(5))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., n, d\]"):
        apply_rope(torch.randn(6), torch.arange(1))


# --------------------------------------------------------------------------------- apply_rope_nd
def naive_rope_nd(x, positions, freqs, split):
    """Loop over pairs: pair i is rotated by positions[:, axis(i)] θ_i."""
    d = x.shape[-1]
    k = positions.shape[1]
    out = x.clone().to(F64)
    for i in range(d // 2):
        a = i % k if split == "interleave" else i // (d // (2 * k))
        ang = positions[:, a].to(F64) * freqs[i]
        c, s = ang.cos(), ang.sin()
        x0, x1 = x[..., 2 * i].to(F64), x[..., 2 * i + 1].to(F64)
        out[..., 2 * i], out[..., 2 * i + 1] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


@pytest.mark.parametrize("split", ["interleave", "half"])
def test_apply_rope_nd_matches_loop_and_reduces_to_1d(split):
    g = gen(4)
    for k in (1, 2, 3):
        d = 12 * k if k != 2 else 16
        x = torch.randn(2, 6, d, generator=g, dtype=F64)
        freqs = rope_frequencies(d)
        pos = torch.randint(-20, 50, (6, k), generator=g)
        torch.testing.assert_close(apply_rope_nd(x, pos, split=split), naive_rope_nd(x, pos, freqs, split),
                                   rtol=0, atol=1e-12)
        # equal coordinates (n, ..., n) give exactly 1-D RoPE at n
        n = torch.randn(6, generator=g, dtype=F64) * 30
        torch.testing.assert_close(apply_rope_nd(x, n[:, None].expand(6, k), split=split),
                                   apply_rope(x, n), rtol=0, atol=1e-12)


def test_apply_rope_nd_2d_relative_property():
    g = gen(5)
    d, n = 16, 10
    q, k = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    pos = torch.randint(0, 30, (n, 2), generator=g).to(F64)
    base = apply_rope_nd(q, pos) @ apply_rope_nd(k, pos).T
    for shift in ([3.0, -7.0], [100.0, 0.5], [-11.0, 250.0]):
        p2 = pos + torch.tensor(shift, dtype=F64)
        torch.testing.assert_close(apply_rope_nd(q, p2) @ apply_rope_nd(k, p2).T, base, rtol=0, atol=1e-10)
    # it is not only a function of one axis: swapping x and y changes the scores
    swapped = apply_rope_nd(q, pos.flip(1)) @ apply_rope_nd(k, pos.flip(1)).T
    assert (swapped - base).abs().max() > 1e-2


def test_apply_rope_nd_gradcheck():
    g = gen(6)
    x = torch.randn(3, 8, generator=g, dtype=F64, requires_grad=True)
    pos = torch.tensor([[0.0, 1.0], [2.5, -1.0], [4.0, 9.0]], dtype=F64)
    assert torch.autograd.gradcheck(lambda t: apply_rope_nd(t, pos), (x,))
    assert torch.autograd.gradcheck(lambda t: apply_rope_nd(t, pos, split="half"), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rope_nd_low_precision(dtype):
    g = gen(7)
    x = torch.randn(2, 20, 16, generator=g)
    pos = rope_tie_positions([("text", 4), ("image", 4, 3), ("text", 4)])
    ref = apply_rope_nd(x, pos)
    out = apply_rope_nd(x.to(dtype), pos)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < (1e-2 if dtype == torch.float16 else 8e-2)


def test_apply_rope_nd_bad_inputs():
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match="x: the last dimension 12 must be divisible by 2k = 8"):
        apply_rope_nd(x, torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"positions: expected shape \[4, k\]"):
        apply_rope_nd(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"positions: expected shape \[4, k\]"):
        apply_rope_nd(x, torch.zeros(4))
    with pytest.raises(ValueError, match="positions: expected at least one position axis"):
        apply_rope_nd(x, torch.zeros(4, 0))
    with pytest.raises(ValueError, match="split: expected one of 'interleave' | 'half'"):
        apply_rope_nd(x, torch.zeros(4, 2), split="blocks")
    with pytest.raises(ValueError, match=r"freqs: expected a tensor of shape \[6\]"):
        apply_rope_nd(x, torch.zeros(4, 2), freqs=torch.ones(3))


# ---------------------------------------------------------------------------- rope_tie_positions
def test_rope_tie_positions_article_example():
    pos = rope_tie_positions([("text", 5), ("image", 3, 2), ("text", 4)])
    assert pos.dtype == torch.int64 and pos.shape == (5 + 6 + 4, 2)
    text1, img, text2 = pos[:5], pos[5:11], pos[11:]
    assert text1.tolist() == [[n, n] for n in range(5)]                       # (n, n), 0-based
    s, t = 4, 3                                                                # s = w + 1, t = h + 1
    assert (img[0] - text1[-1]).tolist() == [s, t]
    assert (text2[0] - img[-1]).tolist() == [s, t]
    assert text2[0].tolist() == [16, 16]                                       # K = 4 + (w+1)(h+1)
    # row-major: rows x = 1..h scaled by s, columns y = 1..w scaled by t
    assert img.tolist() == [[4 + s * x, 4 + t * y] for x in (1, 2) for y in (1, 2, 3)]
    assert text2.tolist() == [[16 + j, 16 + j] for j in range(4)]


def test_rope_tie_positions_symmetry_random_sizes():
    g = gen(8)
    for _ in range(20):
        w, h = torch.randint(1, 17, (2,), generator=g).tolist()
        L, after = torch.randint(1, 10, (2,), generator=g).tolist()
        for fractional in (False, True):
            pos = rope_tie_positions([("text", L), ("image", w, h), ("text", after)], fractional=fractional)
            pos = pos.to(F64)
            last_text, first_patch = pos[L - 1], pos[L]
            last_patch, next_text = pos[L + w * h - 1], pos[L + w * h]
            step_in, step_out = first_patch - last_text, next_text - last_patch
            torch.testing.assert_close(step_in, step_out, rtol=0, atol=1e-12)
            img = pos[L:L + w * h].view(h, w, 2)
            # inside the image: rows step by (s, 0), columns by (0, t)
            if h > 1:
                torch.testing.assert_close(img[1:, :, 1] - img[:-1, :, 1], torch.zeros(h - 1, w, dtype=F64))
                assert torch.allclose(img[1:, :, 0] - img[:-1, :, 0], step_in[0].expand(h - 1, w), atol=1e-12)
            if w > 1:
                assert torch.allclose(img[:, 1:, 1] - img[:, :-1, 1], step_in[1].expand(h, w - 1), atol=1e-12)
            span = next_text[0] - last_text[0]
            if fractional:   # the image counts as exactly w h tokens: K - L = w h + 1
                assert abs(span.item() - (w * h + 1)) < 1e-12
                assert abs(step_in[0].item() - (w * h + 1) / (h + 1)) < 1e-12
            else:
                assert step_in.tolist() == [w + 1, h + 1] and span.item() == (w + 1) * (h + 1)
                assert torch.equal(pos, pos.round())


def test_rope_tie_positions_text_only_and_image_first():
    assert torch.equal(rope_tie_positions([("text", 7)]), torch.arange(7)[:, None].expand(7, 2))
    assert torch.equal(rope_tie_positions([("text", 3), ("text", 4)]), rope_tie_positions([("text", 7)]))
    # an image first: as if a token sat at (-1, -1)
    pos = rope_tie_positions([("image", 2, 2), ("text", 1)])
    assert pos.tolist() == [[2, 2], [2, 5], [5, 2], [5, 5], [8, 8]]
    frac = rope_tie_positions([("image", 2, 2), ("text", 1)], fractional=True)
    assert frac.dtype == F64 and frac[-1].tolist() == [4.0, 4.0]


def test_rope_tie_positions_bad_inputs():
    with pytest.raises(ValueError, match="segments: image width: expected a value in"):
        rope_tie_positions([("image", 0, 3)])
    with pytest.raises(ValueError, match="segments: text length: expected a value in"):
        rope_tie_positions([("text", -1)])
    with pytest.raises(TypeError, match="segments: image height: expected an int"):
        rope_tie_positions([("image", 3, 2.0)])
    with pytest.raises(ValueError, match=r"segments: expected \('text', n\) or \('image', w, h\), got \('video', 3\)"):
        rope_tie_positions([("video", 3)])
    with pytest.raises(ValueError, match=r"segments: expected \('text', n\) or \('image', w, h\)"):
        rope_tie_positions([("image", 3)])
    with pytest.raises(ValueError, match="segments: expected at least one token"):
        rope_tie_positions([])
    with pytest.raises(TypeError, match="segments: expected a list"):
        rope_tie_positions("text")


# ---------------------------------------------------------------------- interpolated_frequencies
def test_interpolated_frequencies_pi_and_ntk():
    d, Ltr, Lte = 64, 512, 2048
    freqs = rope_frequencies(d)
    s = Lte / Ltr
    torch.testing.assert_close(interpolated_frequencies(freqs, Ltr, Lte, "pi"), freqs / s, rtol=1e-15, atol=0)
    ntk = interpolated_frequencies(freqs, Ltr, Lte, "ntk")
    torch.testing.assert_close(ntk[-1], freqs[-1] / s, rtol=1e-12, atol=0)       # slowest: exactly PI
    torch.testing.assert_close(ntk[0], freqs[0], rtol=1e-3, atol=0)             # fastest: unchanged
    kappa = s ** (d / (d - 2))
    torch.testing.assert_close(ntk, rope_frequencies(d, 1e4 * kappa), rtol=1e-12, atol=0)   # base b κ
    assert (ntk <= freqs).all() and (ntk >= freqs / s * (1 - 1e-12)).all()
    for method in ("pi", "ntk", "yarn"):          # no extension: nothing changes
        torch.testing.assert_close(interpolated_frequencies(freqs, Ltr, Ltr, method), freqs, rtol=1e-15, atol=0)


def test_interpolated_frequencies_yarn_limits_and_continuity():
    d, Ltr, Lte, alpha, beta = 64, 512, 4096, 1.0, 32.0
    freqs = rope_frequencies(d)
    s = Lte / Ltr
    yarn = interpolated_frequencies(freqs, Ltr, Lte, "yarn", alpha=alpha, beta=beta)
    turns = Ltr * freqs / (2 * math.pi)
    fast, slow = turns > beta, turns < alpha
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    assert torch.equal(yarn[fast], freqs[fast])
    assert torch.equal(yarn[slow], freqs[slow] / s)
    for i in torch.nonzero(~fast & ~slow).flatten().tolist():      # the ramp, pair by pair
        gamma = (turns[i].item() - alpha) / (beta - alpha)
        assert abs(yarn[i].item() - (gamma + (1 - gamma) / s) * freqs[i].item()) < 1e-15
    # γ(r) is continuous at both thresholds: frequencies placed just around r = alpha and r = beta
    eps = 1e-9
    r = torch.tensor([alpha - eps, alpha + eps, beta - eps, beta + eps], dtype=F64)
    f = r * 2 * math.pi / Ltr
    ratio = interpolated_frequencies(f, Ltr, Lte, "yarn", alpha=alpha, beta=beta) / f
    assert abs(ratio[0] - ratio[1]) < 1e-8 and abs(ratio[0] - 1 / s) < 1e-8
    assert abs(ratio[2] - ratio[3]) < 1e-8 and abs(ratio[3] - 1) < 1e-8


def test_interpolated_frequencies_bad_inputs():
    freqs = rope_frequencies(16)
    with pytest.raises(ValueError, match="test_length: expected >= train_length = 64, got 32"):
        interpolated_frequencies(freqs, 64, 32)
    with pytest.raises(ValueError, match="method: expected one of 'pi' | 'ntk' | 'yarn', got 'linear'"):
        interpolated_frequencies(freqs, 64, 128, "linear")
    with pytest.raises(ValueError, match="beta: expected a value in"):
        interpolated_frequencies(freqs, 64, 128, "yarn", alpha=4.0, beta=2.0)
    with pytest.raises(ValueError, match="freqs: expected a 1-D tensor"):
        interpolated_frequencies(freqs[None], 64, 128)
    with pytest.raises(TypeError, match="train_length: expected an int"):
        interpolated_frequencies(freqs, 64.0, 128)
    with pytest.raises(TypeError, match="freqs: expected a floating-point tensor"):
        interpolated_frequencies(torch.arange(8), 64, 128)


# ------------------------------------------------------------------------------------ logn_scale
def test_logn_scale_matches_formula():
    pos = torch.tensor([0, 1, 62, 63, 64, 100, 1000, 100000])
    out = logn_scale(pos, 64)
    ref = torch.tensor([max(1.0, math.log(p + 1) / math.log(64)) for p in pos.tolist()], dtype=F64)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=0)
    assert out.dtype == torch.float32
    out64 = logn_scale(pos.to(F64), 64)
    assert out64.dtype == F64
    torch.testing.assert_close(out64, ref, rtol=1e-12, atol=0)
    assert torch.equal(logn_scale(list(range(64)), 64), torch.ones(64))       # no change inside L_train
    # YaRN's constant at L_test = s L_train against the position-wise factor at n = L_test
    for Ltr in (2048, 4096):
        assert 0.11 < 1 / math.log(Ltr) < 0.14


def test_logn_scale_bad_inputs():
    with pytest.raises(ValueError, match="train_length: expected a value in"):
        logn_scale(torch.arange(4), 1)
    with pytest.raises(ValueError, match="positions: expected positions >= 0"):
        logn_scale(torch.tensor([-1, 0]), 8)


# ----------------------------------------------------------------------------------- lambda_mask
def test_lambda_mask_matches_loops():
    for n, window, sinks in ((1, 1, 0), (10, 3, 0), (10, 3, 2), (12, 20, 4), (9, 1, 9)):
        ref = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                ref[i, j] = j <= i and (i - j < window or j < sinks)
        out = lambda_mask(n, window, sinks)
        assert out.dtype == torch.bool and torch.equal(out, ref)
    # every row keeps at least its own token, so SDPA never sees an all-masked row
    assert lambda_mask(30, 1).diagonal().all()


def test_lambda_mask_bad_inputs():
    with pytest.raises(ValueError, match="window: expected a value in"):
        lambda_mask(8, 0)
    with pytest.raises(ValueError, match="num_sinks: expected a value in"):
        lambda_mask(8, 2, -1)
    with pytest.raises(TypeError, match="n: expected an int"):
        lambda_mask(8.0, 2)


# ------------------------------------------------------------------------------ rerope_attention
def mapped_relative(r, window, leak_k):
    """r' = r inside the window, sign(r) (w + (|r| - w)/k) outside (k = inf: sign(r) w)."""
    a = r.abs()
    far = window + (0.0 if math.isinf(leak_k) else 1.0 / leak_k) * (a - window)
    return torch.where(a < window, r, torch.sign(r) * far)


def naive_rerope(q, k, v, window, leak_k, causal=True, logn_train_length=None):
    """Per entry: logit(m, n) = Re sum_i q_m,i conj(k_n,i) e^{i r'(m - n) θ_i} / sqrt(d)."""
    n, d = q.shape[-2], q.shape[-1]
    freqs = rope_frequencies(d)
    pos = torch.arange(n, dtype=F64)
    r = mapped_relative(pos[:, None] - pos[None, :], window, leak_k)          # [n, n]
    zq = torch.view_as_complex(q.to(F64).unflatten(-1, (-1, 2)).contiguous())
    zk = torch.view_as_complex(k.to(F64).unflatten(-1, (-1, 2)).contiguous())
    phase = torch.exp(1j * r[..., None] * freqs)                               # [n, n, d/2]
    logits = (zq[..., :, None, :] * zk[..., None, :, :].conj() * phase).real.sum(-1) / math.sqrt(d)
    if logn_train_length is not None:
        lam = torch.tensor([max(1.0, math.log(m + 1) / math.log(logn_train_length)) for m in range(n)], dtype=F64)
        logits = logits * lam[:, None]
    if causal:
        logits = logits.masked_fill(pos[:, None] < pos[None, :], -math.inf)
    return torch.softmax(logits, -1) @ v.to(F64)


@pytest.mark.parametrize("leak_k", [4.0, math.inf])
@pytest.mark.parametrize("causal", [True, False])
def test_rerope_attention_matches_naive(leak_k, causal):
    g = gen(9)
    q, k, v = (torch.randn(2, 3, 24, 8, generator=g, dtype=F64) for _ in range(3))
    for window in (1, 5, 11):
        out = rerope_attention(q, k, v, window, leak_k, causal=causal)
        ref = naive_rerope(q, k, v, window, leak_k, causal=causal)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    out = rerope_attention(q, k, v, 6, leak_k, causal=causal, logn_train_length=8)
    torch.testing.assert_close(out, naive_rerope(q, k, v, 6, leak_k, causal, 8), rtol=0, atol=1e-9)


def test_rerope_attention_large_window_is_plain_rope_sdpa():
    g = gen(10)
    n, d = 20, 16
    q, k, v = (torch.randn(1, 2, n, d, generator=g, dtype=F64) for _ in range(3))
    pos = torch.arange(n)
    for causal in (True, False):
        ref = F.scaled_dot_product_attention(apply_rope(q, pos), apply_rope(k, pos), v, is_causal=causal)
        for window, leak_k in ((n, math.inf), (n + 7, 2.0)):
            out = rerope_attention(q, k, v, window, leak_k, causal=causal)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # log-n scale = SDPA on λ_m q_m
    lam = logn_scale(pos.to(F64), 4)
    ref = F.scaled_dot_product_attention(apply_rope(q, pos) * lam[:, None], apply_rope(k, pos), v, is_causal=True)
    torch.testing.assert_close(rerope_attention(q, k, v, n, logn_train_length=4), ref, rtol=0, atol=1e-12)


def test_rerope_attention_gradcheck():
    g = gen(11)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: rerope_attention(a, b, c, 3, 2.0), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: rerope_attention(a, b, c, 2, causal=False), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rerope_attention_low_precision(dtype):
    g = gen(12)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(3))
    q = q * 4                                             # sharp attention, logits up to ~ 50
    ref = rerope_attention(q, k, v, 16, 4.0)
    out = rerope_attention(q.to(dtype), k.to(dtype), v.to(dtype), 16, 4.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < (0.1 if dtype == torch.float16 else 0.4)
    assert (out.float() - ref).abs().mean() < (5e-3 if dtype == torch.float16 else 3e-2)


def test_rerope_attention_bad_inputs():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="window: expected a value in"):
        rerope_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="leak_k: expected a number >= 1"):
        rerope_attention(q, q, q, 2, leak_k=0.5)
    with pytest.raises(ValueError, match=r"q: expected shape \[B, h, n, d\]"):
        rerope_attention(q[0], q[0], q[0], 2)
    with pytest.raises(ValueError, match="q, k, v: expected q and k of one shape"):
        rerope_attention(q, q[..., :2], q, 2)
    with pytest.raises(TypeError, match="v: expected a floating-point tensor"):
        rerope_attention(q, q, torch.ones(1, 2, 5, 4, dtype=torch.long), 2)


def test_apply_rope_positions_errors_name_the_argument():
    x = torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match="positions: expected a tensor or sequence"):
        apply_rope(x, None)
    with pytest.raises(TypeError, match="positions: expected numbers"):
        apply_rope(x, "abcd")
    with pytest.raises(ValueError, match="positions: expected 4 positions"):
        apply_rope(x, torch.arange(3))
    with pytest.raises(ValueError, match="positions: expected a shape that broadcasts"):
        apply_rope(x, torch.arange(4.0).expand(3, 4))
    with pytest.raises(ValueError, match="positions: expected a shape that broadcasts"):
        apply_rope(x, torch.arange(4.0)[None, None, None])
