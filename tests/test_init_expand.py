"""Tests of companion.init, section lossless-model-expansion: the widening map, the per-layer
rules (each against an independent computation in float64) and the whole-GPT expansion."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from companion.init import (expand_attention, expand_gpt_state, expand_layernorm,
                            expand_linear, repeat_expand)
from companion.lm import GPT, GPTConfig

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def E_matrix(n, k, pairwise=False):
    """The widening map as an explicit [k n, n] matrix, built entry by entry."""
    E = torch.zeros(k * n, n, dtype=F64)
    for i in range(k * n):
        if pairwise:
            pair, j = divmod(i, 2 * k)  # block of k copies of one pair
            E[i, 2 * pair + (j % 2)] = 1.0
        else:
            E[i, i // k] = 1.0
    return E / math.sqrt(k)


# ---- repeat_expand -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pairwise", [False, True])
def test_repeat_expand_equals_matrix_and_is_isometry(k, pairwise):
    x = torch.randn(5, 3, 6, generator=gen(k), dtype=F64)
    E = E_matrix(6, k, pairwise)
    y = repeat_expand(x, k, pairwise=pairwise)
    torch.testing.assert_close(y, x @ E.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=0)
    torch.testing.assert_close(y @ E, x, rtol=0, atol=1e-14)  # E^T E = I
    # another axis, and no scaling
    z = repeat_expand(x, k, dim=1, scale=False)
    E3 = E_matrix(3, k) * math.sqrt(k)
    torch.testing.assert_close(z, (x.transpose(1, 2) @ E3.T).transpose(1, 2))


def test_repeat_expand_grad_inference_compile():
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: repeat_expand(t, 3, pairwise=True), (x,))
    with torch.inference_mode():
        y = repeat_expand(x.detach(), 2)
    assert y.shape == (4, 12)
    f = torch.compile(repeat_expand, backend="eager", dynamic=True)
    for n in (4, 6):
        x = torch.randn(3, n)
        torch.testing.assert_close(f(x, 2), repeat_expand(x, 2))


def test_repeat_expand_extremes_and_ints():
    x = torch.tensor([[1e300, -1e-300, 0.0, 3.0]], dtype=F64)
    y = repeat_expand(x, 2)
    assert torch.isfinite(y).all() and y[0, 0] == 1e300 / math.sqrt(2)
    i = torch.arange(4)
    assert repeat_expand(i, 2, scale=False).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_repeat_expand_bad_input():
    with pytest.raises(ValueError, match="k: expected a value"):
        repeat_expand(torch.ones(3), 0)
    with pytest.raises(ValueError, match="pairwise=True needs an even size"):
        repeat_expand(torch.ones(3), 2, pairwise=True)
    with pytest.raises(ValueError, match="dim: expected an int"):
        repeat_expand(torch.ones(3), 2, dim=1)
    with pytest.raises(TypeError, match="scale=True needs a floating-point"):
        repeat_expand(torch.arange(3), 2)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        repeat_expand([1.0, 2.0], 2)


# ---- expand_linear ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_expand_linear_maps_E_to_E_and_plain_repeat(k):
    g = gen(k)
    W, b = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    x = torch.randn(7, 4, generator=g, dtype=F64)
    Ein, Eout = E_matrix(4, k), E_matrix(5, k)
    s = 1 / math.sqrt(k)
    W2, b2 = expand_linear(W, b, k, s, s)
    torch.testing.assert_close(W2, Eout @ W @ Ein.T, rtol=0, atol=1e-14)  # E W E^T
    torch.testing.assert_close(F.linear(x @ Ein.T, W2, b2), F.linear(x, W, b) @ Eout.T,
                               rtol=0, atol=1e-12)
    # an E-mapped input to a plainly repeated output (out_factor 1) and back (in_factor 1/k)
    W3, b3 = expand_linear(W, b, k, s, 1.0)
    h = F.gelu(F.linear(x @ Ein.T, W3, b3))
    torch.testing.assert_close(h, F.gelu(F.linear(x, W, b)).repeat_interleave(k, -1),
                               rtol=0, atol=1e-12)
    V, c = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    V2, c2 = expand_linear(V, c, k, 1 / k, s)
    torch.testing.assert_close(F.linear(h, V2, c2),
                               F.linear(F.gelu(F.linear(x, W, b)), V, c) @ E_matrix(3, k).T,
                               rtol=0, atol=1e-12)


def test_expand_linear_pairwise_none_bias_grad_compile():
    W = torch.randn(6, 4, dtype=F64, requires_grad=True)
    w2, b2 = expand_linear(W, None, 2, 0.5, 0.5, pairwise_out=True)
    assert b2 is None and w2.shape == (12, 8)
    torch.testing.assert_close(w2, 0.25 * E_matrix(6, 2, True) @ W @ E_matrix(4, 2).T * 2)
    assert torch.autograd.gradcheck(lambda w: expand_linear(w, None, 2, 0.7, 1.3)[0], (W,))
    f = torch.compile(expand_linear, backend="eager")
    torch.testing.assert_close(f(W.detach(), None, 2, 0.5, 0.5)[0],
                               expand_linear(W.detach(), None, 2, 0.5, 0.5)[0])
    with torch.inference_mode():
        assert expand_linear(W.detach(), None, 3, 1.0, 1.0)[0].shape == (18, 12)


def test_expand_linear_bad_input():
    W = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"weight: expected shape \[out, in\]"):
        expand_linear(torch.ones(3), None, 2, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"bias: expected shape \[3\]"):
        expand_linear(W, torch.ones(2), 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="pairwise_out=True needs an even number"):
        expand_linear(W, None, 2, 1.0, 1.0, pairwise_out=True)
    with pytest.raises(ValueError, match="in_factor: expected a finite number"):
        expand_linear(W, None, 2, float("inf"), 1.0)
    with pytest.raises(TypeError, match="weight: expected a floating-point tensor"):
        expand_linear(W.long(), None, 2, 1.0, 1.0)


# ---- expand_layernorm -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_expand_layernorm_exact_with_eps_over_k(k):
    g = gen(k)
    x = 3 * torch.randn(4, 8, generator=g, dtype=F64) + 1
    gamma, beta = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    g2, b2 = expand_layernorm(gamma, beta, k)
    E, eps = E_matrix(8, k), 1e-2  # a large eps makes the eps/k rule visible
    ref = F.layer_norm(x, (8,), gamma, beta, eps) @ E.T
    wide = F.layer_norm(x @ E.T, (8 * k,), g2, b2, eps / k)
    torch.testing.assert_close(wide, ref, rtol=0, atol=1e-13)
    wrong = F.layer_norm(x @ E.T, (8 * k,), g2, b2, eps)
    assert (wrong - ref).abs().max() > 1e-4
    assert expand_layernorm(gamma, None, k)[1] is None


def test_expand_layernorm_bad_input():
    with pytest.raises(ValueError, match=r"beta: expected the shape of gamma"):
        expand_layernorm(torch.ones(4), torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"gamma: expected shape \[d\]"):
        expand_layernorm(torch.ones(2, 2), None, 2)


# ---- expand_attention ---------------------------------------------------------------------
def _mha(x, params, H, rope_freqs=None):
    """Reference attention through torch.nn.functional.multi_head_attention_forward."""
    wq, bq, wk, bk, wv, bv, wo, bo = params
    d = wq.shape[1]
    out, w = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), d, H,
        torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv]), None, None, False, 0.0, wo, bo,
        training=False, need_weights=True, average_attn_weights=False)
    return out.transpose(0, 1), w


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("scaled", [True, False])
def test_expand_attention_against_torch_mha(k, scaled):
    g, d, H = gen(k), 8, 2
    params = [torch.randn(*s, generator=g, dtype=F64)
              for s in [(d, d), (d,)] * 4]
    x = torch.randn(3, 5, d, generator=g, dtype=F64)
    E = E_matrix(d, k)
    wide = expand_attention(*params, k, scaled=scaled)
    if scaled:
        out, w = _mha(x, params, H)
        out2, w2 = _mha(x @ E.T, wide, H)
        torch.testing.assert_close(w2, w, rtol=0, atol=1e-12)
        torch.testing.assert_close(out2, out @ E.T, rtol=0, atol=1e-12)
    else:  # unscaled scores: q.k is preserved exactly
        q, kk = F.linear(x, params[0], params[1]), F.linear(x, params[2], params[3])
        q2 = F.linear(x @ E.T, wide[0], wide[1])
        k2 = F.linear(x @ E.T, wide[2], wide[3])
        s1 = q.unflatten(-1, (H, -1)).transpose(1, 2) @ kk.unflatten(-1, (H, -1)).permute(0, 2,
                                                                                     3, 1)
        s2 = q2.unflatten(-1, (H, -1)).transpose(1, 2) @ k2.unflatten(-1, (H, -1)).permute(0, 2,
                                                                                       3, 1)
        torch.testing.assert_close(s2, s1, rtol=0, atol=1e-12)


def test_expand_attention_rope_pairs_and_none_biases():
    d, k = 8, 2
    W = [torch.randn(d, d, dtype=F64) for _ in range(4)]
    out = expand_attention(W[0], None, W[1], None, W[2], None, W[3], None, k, rope=True)
    assert out[1] is None and out[7] is None
    q = torch.randn(d, dtype=F64)
    q2 = (q @ E_matrix(d, k).T) @ out[0].T
    assert torch.allclose(q2, (W[0] @ q) @ E_matrix(d, k, True).T * k ** 0.25, atol=1e-12)


def test_expand_attention_bad_input():
    W = torch.ones(4, 4)
    with pytest.raises(ValueError, match="wk: expected the shape of wq"):
        expand_attention(W, None, torch.ones(4, 2), None, W, None, W, None, 2)
    with pytest.raises(ValueError, match="wo: expected 4 inputs"):
        expand_attention(W, None, W, None, W, None, torch.ones(4, 3), None, 2)
    with pytest.raises(ValueError, match=r"bq: expected shape \[4\]"):
        expand_attention(W, torch.ones(3), W, None, W, None, W, None, 2)


# ---- expand_gpt_state -----------------------------------------------------------------------
def _random_gpt(**kw):
    cfg = GPTConfig(vocab_size=23, num_layers=2, num_heads=2, d_model=8, block_size=6, **kw)
    model = GPT(cfg).double()
    g = gen(1)
    with torch.no_grad():  # move LayerNorms and biases off (1, 0) so that they matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


@pytest.mark.parametrize("style", ["bert", "gpt2", "gpt2_ml"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("tie", [True, False])
def test_expand_gpt_state_logits_unchanged(style, activation, tie):
    model = _random_gpt(block_style=style, activation=activation, tie_embeddings=tie)
    idx = torch.randint(0, 23, (2, 6), generator=gen(2))
    for k in (2, 3):
        sd, cfg = expand_gpt_state(model.state_dict(), model.cfg, k)
        assert cfg.d_model == 8 * k and cfg.layer_norm_eps == model.cfg.layer_norm_eps / k
        wide = GPT(cfg).double()
        wide.load_state_dict(sd)
        torch.testing.assert_close(wide(idx)[0], model(idx)[0], rtol=0, atol=1e-12)


def test_expand_gpt_state_eps_and_noise():
    model = _random_gpt(block_style="bert", activation="relu")
    idx = torch.randint(0, 23, (2, 6), generator=gen(3))
    sd, cfg = expand_gpt_state(model.state_dict(), model.cfg, 2)
    wide = GPT(dataclasses.replace(cfg, layer_norm_eps=model.cfg.layer_norm_eps)).double()
    wide.load_state_dict(sd)
    assert (wide(idx)[0] - model(idx)[0]).abs().max() > 1e-6  # eps not divided: not exact
    sd1, _ = expand_gpt_state(model.state_dict(), model.cfg, 2, 1e-3, gen(5))
    sd2, _ = expand_gpt_state(model.state_dict(), model.cfg, 2, 1e-3, gen(5))
    delta = sd1["blocks.0.mlp.fc.weight"] - sd["blocks.0.mlp.fc.weight"]
    assert 0.5e-3 < delta.std() < 2e-3
    torch.testing.assert_close(sd1["blocks.0.mlp.fc.weight"], sd2["blocks.0.mlp.fc.weight"])
    torch.testing.assert_close(sd1["blocks.0.ln1.weight"], sd["blocks.0.ln1.weight"])


def test_expand_gpt_state_bad_input():
    model = _random_gpt()
    sd = model.state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['x'\]: expected a floating-point"):
        expand_gpt_state({**sd, "x": torch.ones(2, dtype=torch.long)}, model.cfg)
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.foo.weight'"):
        expand_gpt_state({**sd, "blocks.0.foo.weight": torch.ones(2)}, model.cfg)
    with pytest.raises(TypeError, match="cfg: expected a GPTConfig-like dataclass"):
        expand_gpt_state(sd, {"d_model": 8})
    with pytest.raises(ValueError, match="noise_std: expected a value"):
        expand_gpt_state(sd, model.cfg, 2, -1.0)
    with pytest.raises(ValueError, match="k: expected a value"):
        expand_gpt_state(sd, model.cfg, 0)
