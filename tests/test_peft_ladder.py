"""Tests of companion.peft, section ladder-side-tuning: ladder_gate, LadderSideNetwork,
backbone_hidden_states, backprop_depth and trainable_fraction, each against a naive reference."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from companion.lm import GPT, GPTConfig
from companion.peft import (LadderSideNetwork, backbone_hidden_states, backprop_depth,
                            ladder_gate, trainable_fraction)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_gpt(num_layers=3, d=16, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, num_layers=num_layers, num_heads=2, d_model=d,
                         block_size=12)).eval()


def gpt_states_loop(model, x):
    """h_0 = token + position embedding, h_i = block_i(h_{i-1}), by hand."""
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
    out = [h]
    for block in model.blocks:
        h = block(h)
        out.append(h)
    return out


# ---- ladder_gate -----------------------------------------------------------------------------
def gate_naive(tilde_h, z_prev, alpha, tau):
    mu = 1.0 / (1.0 + math.exp(-float(alpha) / tau))
    return mu * tilde_h + (1.0 - mu) * z_prev


@pytest.mark.parametrize("alpha", [0.0, 0.05, -0.3, 1.0])
def test_ladder_gate_matches_formula(alpha):
    g = gen()
    a, b = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g,
                                                                    dtype=F64)
    out = ladder_gate(a, b, torch.tensor(alpha, dtype=F64), 0.1)
    torch.testing.assert_close(out, gate_naive(a, b, alpha, 0.1), rtol=1e-12, atol=1e-12)


def test_ladder_gate_half_at_zero():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(ladder_gate(a, b, torch.tensor(0.0), 0.1), (a + b) / 2)


def test_ladder_gate_gradcheck():
    g = gen(1)
    args = [torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(2)]
    alpha = torch.tensor(0.07, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, al: ladder_gate(a, b, al, 0.1),
                                    (*args, alpha))


def test_ladder_gate_extreme_alpha():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for alpha, expect in ((1e6, a), (-1e6, b)):
        alpha_t = torch.tensor(alpha, requires_grad=True)
        out = ladder_gate(a, b, alpha_t, 1e-3)
        torch.testing.assert_close(out, expect)
        out.sum().backward()
        assert torch.isfinite(alpha_t.grad)
    half = ladder_gate(a.half(), b.half(), torch.tensor(3.0, dtype=torch.half), 0.1)
    assert torch.isfinite(half).all() and half.dtype == torch.half


def test_ladder_gate_bad_input():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="tau: expected a value in"):
        ladder_gate(a, a, torch.tensor(0.0), 0.0)
    with pytest.raises(ValueError, match="z_prev: expected the shape of tilde_h"):
        ladder_gate(a, torch.randn(2, 4), torch.tensor(0.0), 0.1)
    with pytest.raises(TypeError, match="tilde_h: expected a floating-point tensor"):
        ladder_gate(torch.ones(2, 3, dtype=torch.long), a, torch.tensor(0.0), 0.1)
    with pytest.raises(TypeError, match="alpha: expected a torch.Tensor"):
        ladder_gate(a, a, 0.0, 0.1)


def test_ladder_gate_inference_mode_and_compile():
    a, b, al = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.tensor(0.2)
    ref = ladder_gate(a, b, al, 0.1)
    with torch.inference_mode():
        torch.testing.assert_close(ladder_gate(a, b, al, 0.1), ref)
    compiled = torch.compile(ladder_gate, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(a, b, al, 0.1), ref)
    a2, b2 = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    torch.testing.assert_close(compiled(a2, b2, al, 0.1), ladder_gate(a2, b2, al, 0.1))


# ---- LadderSideNetwork -----------------------------------------------------------------------
def side_naive(net, hs, key_mask=None):
    """eq. lst-side by hand, with the attention written as masked softmax(q k^T / sqrt(d_h)) v."""
    def block(b, z):
        if hasattr(b, "qkv"):
            B, T, ds = z.shape
            H = b.num_heads
            q, k, v = b.qkv(b.ln1(z)).view(B, T, 3, H, ds // H).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) / math.sqrt(ds // H)
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, ds)
            z = z + b.proj(y)
        return z + b.out(torch.nn.functional.gelu(b.fc(b.ln2(z))))

    z = net.down[0](hs[0])
    for i, b in enumerate(net.blocks):
        mu = torch.sigmoid(net.alpha[i] / net.tau)
        z = block(b, mu * net.down[i + 1](hs[i + 1]) + (1 - mu) * z)
    return net.ln_f(z)


def random_states(L, B=2, T=5, d=16, dtype=torch.float32, seed=0):
    g = gen(seed)
    return [torch.randn(B, T, d, generator=g, dtype=dtype) for _ in range(L + 1)]


@pytest.mark.parametrize("side_block", ["transformer", "mlp"])
def test_side_network_matches_naive(side_block):
    torch.manual_seed(0)
    net = LadderSideNetwork(16, 3, reduction_factor=4, side_block=side_block).double()
    with torch.no_grad():
        net.alpha.copy_(torch.tensor([0.1, -0.2, 0.05]))
    hs = random_states(3, dtype=F64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for km in (None, mask):
        out = net(hs, km)
        assert out.shape == (2, 5, 4)
        torch.testing.assert_close(out, side_naive(net, hs, km), rtol=1e-10, atol=1e-10)


def test_side_network_key_mask_ignores_padding():
    torch.manual_seed(0)
    net = LadderSideNetwork(16, 2, reduction_factor=4)
    hs = random_states(2)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    hs2 = [h.clone() for h in hs]
    for h in hs2:
        h[1, 3:] = 100 * torch.randn(2, 16)
    a, b = net(hs, mask), net(hs2, mask)
    torch.testing.assert_close(a[1, :3], b[1, :3])
    torch.testing.assert_close(a[0], b[0])


def test_side_network_gradcheck():
    torch.manual_seed(0)
    net = LadderSideNetwork(8, 1, reduction_factor=4, num_heads=1).double()
    hs = [h.requires_grad_() for h in random_states(1, B=1, T=3, d=8, dtype=F64)]
    assert torch.autograd.gradcheck(lambda *h: net(list(h)), tuple(hs))


def test_side_network_extreme_states():
    torch.manual_seed(0)
    net = LadderSideNetwork(16, 2, reduction_factor=4)
    hs = [1e4 * h for h in random_states(2)]
    out = net(hs)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_side_network_bad_input():
    with pytest.raises(ValueError, match="reduction_factor: expected a divisor"):
        LadderSideNetwork(10, 2, reduction_factor=4)
    with pytest.raises(ValueError, match="tau: expected a value in"):
        LadderSideNetwork(16, 2, tau=0.0)
    with pytest.raises(ValueError, match="side_block: expected one of"):
        LadderSideNetwork(16, 2, side_block="lstm")
    with pytest.raises(ValueError, match="num_heads: expected a divisor"):
        LadderSideNetwork(16, 2, reduction_factor=4, num_heads=3)
    net = LadderSideNetwork(16, 2, reduction_factor=4)
    with pytest.raises(ValueError, match=r"hidden_states: expected num_layers \+ 1 = 3"):
        net(random_states(1))
    with pytest.raises(ValueError, match=r"hidden_states\[1\]: expected shape"):
        net([torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 16)])
    with pytest.raises(TypeError, match="key_mask: expected a bool tensor"):
        net(random_states(2), torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_mask: expected shape"):
        net(random_states(2), torch.ones(2, 4, dtype=torch.bool))


def test_side_network_inference_mode_and_compile():
    torch.manual_seed(0)
    net = LadderSideNetwork(16, 1, reduction_factor=4)
    hs = random_states(1)
    ref = net(hs)
    with torch.inference_mode():
        torch.testing.assert_close(net(hs), ref)
    compiled = torch.compile(net, backend="eager", dynamic=True)
    torch.testing.assert_close(compiled(hs), ref, rtol=1e-5, atol=1e-5)
    hs2 = random_states(1, B=3, T=7, seed=1)
    torch.testing.assert_close(compiled(hs2), net(hs2), rtol=1e-5, atol=1e-5)


# ---- backbone_hidden_states ------------------------------------------------------------------
def test_backbone_hidden_states_gpt_hooks():
    model = tiny_gpt()
    x = torch.randint(0, 20, (2, 7), generator=gen())
    hs = backbone_hidden_states(model, x)
    ref = gpt_states_loop(model, x)
    assert len(hs) == 4 and not any(h.requires_grad for h in hs)
    for h, r in zip(hs, ref):
        torch.testing.assert_close(h, r)
    assert torch.is_grad_enabled()
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[0]._forward_hooks


def test_backbone_hidden_states_torch_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    hs = backbone_hidden_states(enc, x)
    torch.testing.assert_close(hs[0], x)
    torch.testing.assert_close(hs[2], enc.layers[1](enc.layers[0](x)))


def test_backbone_hidden_states_transformers_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    model = transformers.BertModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 30, (2, 6), generator=gen())
    hs = backbone_hidden_states(model, x)
    assert len(hs) == 3 and not any(h.requires_grad for h in hs)
    with torch.no_grad():
        h = model.embeddings(input_ids=x)
        torch.testing.assert_close(hs[0], h)
        for i, layer in enumerate(model.encoder.layer):
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(hs[i + 1], h, rtol=1e-5, atol=1e-5)


def test_backbone_hidden_states_bad_input():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        backbone_hidden_states(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="model: expected a Hugging Face model"):
        backbone_hidden_states(nn.Linear(3, 3), torch.zeros(1, 3))


# ---- backprop_depth --------------------------------------------------------------------------
def layers_reached_by_backward(make_loss, layers):
    """Reference: hook every layer, run forward and backward, count the layers whose backward
    hook fired (a gradient reached their output)."""
    fired = set()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    handles = [m.register_full_backward_hook(lambda m, gi, go, i=i: fired.add(i))
               for i, m in enumerate(layers)]
    make_loss().backward()
    for h in handles:
        h.remove()
    return len(fired)


@pytest.mark.parametrize("frozen_bottom", [0, 1, 2, 3])
def test_backprop_depth_partial_freezing(frozen_bottom):
    model = tiny_gpt(num_layers=4)
    model.tok_emb.requires_grad_(False)
    model.pos_emb.requires_grad_(False)
    for block in model.blocks[:frozen_bottom]:
        block.requires_grad_(False)
    x = torch.randint(0, 20, (2, 6), generator=gen())
    depth = backprop_depth(model(x)[0].square().mean(), model.blocks)
    assert depth == 4 - frozen_bottom                      # eq. lst-depth, l_min = frozen + 1
    reached = layers_reached_by_backward(lambda: model(x)[0].square().mean(), model.blocks)
    assert depth == reached


def test_backprop_depth_lora_prompt_and_ladder():
    peft = pytest.importorskip("peft")
    model = tiny_gpt(num_layers=3)
    x = torch.randint(0, 20, (2, 6), generator=gen())
    lora = copy.deepcopy(model).requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["qkv"]), lora)
    assert backprop_depth(lora(x)[0].sum(), lora.blocks) == 3
    frozen = copy.deepcopy(model).requires_grad_(False)
    prompt = torch.zeros(1, 6, 16, requires_grad=True)
    h = frozen.tok_emb(x) + prompt
    for block in frozen.blocks:
        h = block(h)
    assert backprop_depth(h.sum(), frozen.blocks) == 3
    net = LadderSideNetwork(16, 3, reduction_factor=4)
    loss = net(backbone_hidden_states(frozen, x)).sum()
    assert backprop_depth(loss, frozen.blocks) == 0
    assert backprop_depth(torch.tensor(1.0), frozen.blocks) == 0
    # the pitfall: a backbone left out of the optimiser but not frozen, its states taken with
    # autograd on, is back on the graph
    assert backprop_depth(net(gpt_states_loop(model, x)).sum(), model.blocks) == 3


def test_backprop_depth_bad_input():
    with pytest.raises(TypeError, match="loss: expected a torch.Tensor"):
        backprop_depth(1.0, [])
    with pytest.raises(TypeError, match="layers: expected a sequence of nn.Module"):
        backprop_depth(torch.tensor(1.0), [1])


# ---- trainable_fraction ----------------------------------------------------------------------
def test_trainable_fraction_hand_count():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))   # 15 + 8 parameters
    assert trainable_fraction(model) == 1.0
    model[0].requires_grad_(False)
    assert trainable_fraction(model) == 8 / 23
    shared = nn.Sequential(model[1], model[1])                   # a shared module counts once
    assert trainable_fraction(shared) == 1.0


def test_trainable_fraction_bad_input():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        trainable_fraction([torch.zeros(2)])
    with pytest.raises(ValueError, match="model: has no parameters"):
        trainable_fraction(nn.ReLU())
