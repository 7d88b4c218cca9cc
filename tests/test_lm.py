"""Tests of companion.lm: the three block orders against hand-written functional versions, causality,
SDPA against the explicit softmax, the KV cache against a full forward, the closed-form parameter
count, and top-k sampling (frequencies, cache against no cache, end tokens)."""
import math

import pytest
import torch
import torch.nn.functional as F

from companion.lm import GPT, GPTConfig, KVCache, generate_topk, gpt_param_count

F64 = torch.float64
STYLES = ("gpt2", "bert", "gpt2_ml")


def small(style="gpt2", **kw):
    args = dict(vocab_size=37, num_layers=2, num_heads=4, d_model=32, block_size=24,
                block_style=style)
    args.update(kw)
    return GPTConfig(**args)


def model(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = GPT(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters, so that each one matters
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def functional_forward(m, idx):
    """The model written out from the equations, with plain tensor ops and the state dict."""
    cfg, sd = m.cfg, m.state_dict()
    B, T = idx.shape
    d, H = cfg.d_model, cfg.num_heads

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * sd[name + ".weight"] \
            + sd[name + ".bias"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def attn(x, p):
        q, k, v = lin(x, p + "attn.qkv").split(d, dim=-1)
        q, k, v = (t.view(B, T, H, d // H).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // H)
        s = s + torch.triu(torch.full((T, T), float("-inf"), dtype=s.dtype), 1)
        y = torch.softmax(s, -1) @ v
        return lin(y.transpose(1, 2).reshape(B, T, d), p + "attn.proj")

    def mlp(x, p):
        h = lin(x, p + "mlp.fc")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) if cfg.activation == "gelu" else \
            torch.clamp(h, min=0) if cfg.activation == "relu" else \
            0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        return lin(h, p + "mlp.proj")

    h = sd["tok_emb.weight"][idx] + sd["pos_emb.weight"][:T]
    if cfg.block_style != "gpt2":
        h = ln(h, "emb_ln")
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        if cfg.block_style == "gpt2":                 # y = x + A(LN(x)), x' = y + F(LN(y))
            y = h + attn(ln(h, p + "ln1"), p)
            h = y + mlp(ln(y, p + "ln2"), p)
        elif cfg.block_style == "bert":               # y = LN(x + A(x)), x' = LN(y + F(y))
            y = ln(h + attn(h, p), p + "ln1")
            h = ln(y + mlp(y, p), p + "ln2")
        else:                                         # y = x + A(x), x' = LN1(y + F(LN0(y)))
            y = h + attn(h, p)
            h = ln(y + mlp(ln(y, p + "ln1"), p), p + "ln2")
    if cfg.block_style == "gpt2":
        h = ln(h, "ln_f")
    return h @ sd["tok_emb.weight"].T


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_blocks_match_the_equations(style, activation):
    m = model(small(style, activation=activation), dtype=F64)
    idx = torch.randint(0, 37, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = m(idx)
        ref = functional_forward(m, idx)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
def test_styles_differ(style):
    """A check that could fail: the three orders give different functions of the same weights."""
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    outs = {}
    for s in STYLES:
        m = model(small(s), dtype=F64)
        outs[s] = m(idx)[0]
    others = [s for s in STYLES if s != style]
    for o in others:
        assert (outs[style] - outs[o]).abs().max() > 1e-3


@pytest.mark.parametrize("style", STYLES)
def test_sdpa_equals_the_explicit_path_values_and_gradients(style):
    m = model(small(style), dtype=F64)
    idx = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(3))
    out = {}
    for flag in (True, False):
        m.use_sdpa = flag
        m.zero_grad()
        logits, loss = m(idx, idx)
        loss.backward()
        out[flag] = (logits.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-12)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
def test_causal(style):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    m = model(small(style))
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 37, (2, 20), generator=g)
    other = idx.clone()
    other[:, 11:] = torch.randint(0, 37, (2, 9), generator=g)
    with torch.no_grad():
        a, b = m(idx)[0], m(other)[0]
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-3


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_equals_the_full_forward(style, use_sdpa):
    m = model(small(style), dtype=F64)
    m.use_sdpa = use_sdpa
    idx = torch.randint(0, 37, (3, 22), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(idx)[0]
        cache = KVCache()
        parts = [m(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 16), (16, 22))]
    assert len(cache) == 22
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_closed_form(style, tie):
    for cfg in (small(style, tie_embeddings=tie), small(style, num_layers=3, d_model=48,
                                                         num_heads=6, tie_embeddings=tie)):
        assert gpt_param_count(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


def test_initial_loss_is_log_vocab():
    """Near-zero logits at init: the loss on random tokens is about ln V."""
    cfg = GPTConfig(vocab_size=100, num_layers=2, num_heads=4, d_model=64, block_size=64)
    m = model(cfg, seed=1)
    g = torch.Generator().manual_seed(6)
    idx, tgt = torch.randint(0, 100, (2, 16, 64), generator=g)
    with torch.no_grad():
        loss = m(idx, tgt)[1].item()
    assert abs(loss - math.log(100)) < 0.05


def test_ignore_index_and_loss_equals_cross_entropy():
    m = model(small())
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 37, (2, 10), generator=g)
    tgt = torch.randint(0, 37, (2, 10), generator=g)
    tgt[0, :4] = -100
    logits, loss = m(idx, tgt)
    keep = tgt != -100
    ref = -torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep]
    torch.testing.assert_close(loss, ref.mean(), rtol=1e-6, atol=1e-6)


def test_topk_sampling_frequencies():
    """20k samples from a fixed distribution: frequencies within 0.015 of the renormalised top-k
    probabilities, and no token outside the top k."""
    cfg = GPTConfig(vocab_size=10, num_layers=1, num_heads=1, d_model=8, block_size=4)
    m = GPT(cfg).eval()
    p = torch.tensor([0.3, 0.05, 0.2, 0.02, 0.15, 0.1, 0.08, 0.04, 0.03, 0.03])
    with torch.no_grad():
        # all weights zero and E[0] = 0: the prompt token 0 leaves h = 0 through every block,
        # the final LN returns its bias e_1, and the logits are E e_1 = log(p / p_0)
        for q in m.parameters():
            q.zero_()
        m.tok_emb.weight[:, 0] = torch.log(p / p[0])
        m.ln_f.bias[0] = 1.0
        out = m(torch.zeros(1, 1, dtype=torch.long))[0][0, -1]
    torch.testing.assert_close(torch.softmax(out, -1), p)
    probs = torch.softmax(out, -1)
    top = probs.topk(5).indices
    p_tilde = torch.zeros(10)
    p_tilde[top] = probs[top] / probs[top].sum()
    prompt = torch.zeros(20_000, 1, dtype=torch.long)
    samples = generate_topk(m, prompt, 1, k=5, generator=torch.Generator().manual_seed(8))[:, 1]
    freq = torch.bincount(samples, minlength=10).double() / len(samples)
    assert set(samples.unique().tolist()) <= set(top.tolist())
    assert (freq - p_tilde.double()).abs().max() < 0.015


@pytest.mark.parametrize("style", STYLES)
def test_generate_with_and_without_cache_agree(style):
    """Same generator, same tokens, also past block_size (where each step re-encodes)."""
    m = model(small(style), dtype=F64)
    prompt = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(9))
    a = generate_topk(m, prompt, 40, k=5, generator=torch.Generator().manual_seed(10))
    b = generate_topk(m, prompt, 40, k=5, generator=torch.Generator().manual_seed(10),
                      use_cache=False)
    assert a.shape == (3, 45) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)


def test_generate_end_id_and_min_new_tokens():
    m = model(small())
    prompt = torch.randint(0, 37, (8, 3), generator=torch.Generator().manual_seed(11))
    out = generate_topk(m, prompt, 15, k=37, end_id=5, min_new_tokens=4,
                        generator=torch.Generator().manual_seed(12))
    new = out[:, 3:]
    assert not (new[:, :4] == 5).any()               # no end token before min_new_tokens
    for row in new:                                  # after the first end token, only end tokens
        hits = (row == 5).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == 5).all()
    # with k = 1 and the end token made certain, generation stops right after min_new_tokens
    with torch.no_grad():
        m.tok_emb.weight[5] += 50 * m.tok_emb.weight[5] / m.tok_emb.weight[5].norm()
    out = generate_topk(m, prompt[:1], 10, k=1, end_id=5, min_new_tokens=2)
    assert out.shape[1] <= 3 + 10


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30), "d_model: expected a multiple of num_heads"),
    (dict(block_style="post"), "block_style"),
    (dict(activation="swish"), "activation"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad)


def test_forward_and_generate_bad_inputs():
    m = model(small())
    with pytest.raises(TypeError, match="idx: expected an integer tensor"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="exceed block_size=24"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\)"):
        m(torch.full((1, 3), 37))
    with pytest.raises(ValueError, match="targets: expected shape"):
        m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="cfg: expected a GPTConfig"):
        GPT({"vocab_size": 3})
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="k"):
        generate_topk(m, idx, 3, k=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_topk(m, idx, 3, temperature=0.0)
    with pytest.raises(ValueError, match="idx: expected a prompt"):
        generate_topk(m, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="end_id"):
        generate_topk(m, idx, 3, end_id=37)


def test_inference_mode_and_extreme_logits():
    m = model(small())
    idx = torch.randint(0, 37, (2, 8))
    with torch.inference_mode():
        a = m(idx, idx)
        out = generate_topk(m, idx, 4)
    assert torch.isfinite(a[1]) and out.shape == (2, 12)
    with torch.no_grad():  # a huge logit scale: the loss stays finite (log-softmax in float32)
        m.tok_emb.weight.mul_(1e3)
    assert torch.isfinite(m(idx, idx)[1])


def test_bf16_training_step():
    m = model(small()).to(torch.bfloat16).train()
    idx = torch.randint(0, 37, (2, 8))
    loss = m(idx, idx)[1]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_torch_compile_changing_lengths():
    m = model(small(num_layers=1))
    compiled = torch.compile(m, backend="aot_eager", dynamic=True)
    for T in (9, 14):
        idx = torch.randint(0, 37, (2, T))
        torch.testing.assert_close(compiled(idx, idx)[1], m(idx, idx)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_gradcheck_float64(style):
    m = model(small(style, num_layers=1, d_model=8, num_heads=2), dtype=F64)
    h = torch.randn(1, 4, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m.blocks[0](x), (h,))


# --- Hugging Face GPT-2 weights: the loading code, exercised offline on a tiny checkpoint ---

def _tiny_hf_gpt2(tmp_path, activation="gelu_new", seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    conf = transformers.GPT2Config(vocab_size=41, n_positions=20, n_embd=24, n_layer=2, n_head=3,
                                   activation_function=activation, bos_token_id=0,
                                   eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that a transposed one shows
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_load_pretrained_gpt2_matches_transformers_offline(tmp_path, activation):
    from companion.lm import load_pretrained_gpt2

    _tiny_hf_gpt2(tmp_path, activation)
    ours, hf = load_pretrained_gpt2(str(tmp_path))  # the same from_pretrained call as online
    ours, hf = ours.double(), hf.double()
    x = torch.randint(0, 41, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours(x)[0] - hf(x).logits).abs().max().item()
    assert err < 1e-10, err
    # the cache-backed sampler runs on the converted model and agrees with the uncached one
    prompt = x[:, :4]
    a = generate_topk(ours, prompt, 12, k=3, generator=torch.Generator().manual_seed(2))
    b = generate_topk(ours, prompt, 12, k=3, generator=torch.Generator().manual_seed(2),
                      use_cache=False)
    assert torch.equal(a, b)


def test_gpt_from_hf_rejects_what_it_cannot_hold(tmp_path):
    from companion.lm import gpt_from_hf, load_pretrained_gpt2

    hf = _tiny_hf_gpt2(tmp_path)
    hf.config.activation_function = "silu"
    with pytest.raises(ValueError, match="activation_function 'silu'"):
        gpt_from_hf(hf)
    hf.config.activation_function = "gelu_new"
    hf.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt_from_hf(hf)
    with pytest.raises(TypeError, match="name_or_path"):
        load_pretrained_gpt2("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError):  # a local directory without a checkpoint: no network involved
        load_pretrained_gpt2(str(empty))
