"""Tests of companion.peft, section p-tuning: PromptEncoder (against Hugging Face peft),
insert_prompts (against a Python loop), mask_embedding_grad (against the stop-gradient
formula and the full gradient), verbalizer_logits (against indexing the log-softmax) and
load_masked_lm (offline round trip through save_pretrained)."""
import pytest
import torch
import torch.nn as nn

from companion.peft import (PromptEncoder, insert_prompts, load_masked_lm, mask_embedding_grad,
                            verbalizer_logits)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- PromptEncoder ----------------------------------------------------------------------------
@pytest.mark.parametrize("reparam", ["none", "mlp", "lstm"])
def test_prompt_encoder_shapes_and_params(reparam):
    torch.manual_seed(0)
    enc = PromptEncoder(5, 8, reparam=reparam, hidden=6)
    P = enc()
    assert P.shape == (5, 8) and P.requires_grad
    n = sum(p.numel() for p in enc.parameters())
    expected = {"none": 5 * 8,
                "mlp": 5 * 8 + (8 * 6 + 6) + (6 * 6 + 6) + (6 * 8 + 8),
                "lstm": 5 * 8 + 4 * 6 * (8 + 6 + 2) * 2 + 4 * 6 * (12 + 6 + 2) * 2
                + (12 * 12 + 12) + (12 * 8 + 8)}[reparam]
    assert n == expected


@pytest.mark.parametrize("reparam", ["MLP", "LSTM"])
def test_prompt_encoder_matches_hf_peft(reparam):
    peft = pytest.importorskip("peft")
    from peft.tuners.p_tuning import PromptEncoder as HFPromptEncoder

    cfg = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, token_dim=8,
                                   encoder_hidden_size=6, num_transformer_submodules=1,
                                   encoder_reparameterization_type=reparam)
    torch.manual_seed(0)
    hf = HFPromptEncoder(cfg).eval()
    ours = PromptEncoder(4, 8, reparam=reparam.lower(), hidden=6)
    missing = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys
    idx = torch.arange(4).unsqueeze(0)
    torch.testing.assert_close(ours(), hf(idx)[0], rtol=1e-6, atol=1e-6)


def test_prompt_encoder_bad_input():
    with pytest.raises(ValueError, match="num_tokens"):
        PromptEncoder(0, 8)
    with pytest.raises(ValueError, match="reparam"):
        PromptEncoder(3, 8, reparam="gru")
    with pytest.raises(TypeError, match="dim"):
        PromptEncoder(3, 8.0)


# ---- insert_prompts ---------------------------------------------------------------------------
def insert_loop(x, P, pos, key_mask):
    B, T, d = x.shape
    m = P.shape[-2]
    out, mask = [], []
    for b in range(B):
        slots = pos[b].tolist() if pos.dim() == 2 else pos.tolist()
        Pb = P[b] if P.dim() == 3 else P
        rows, keep, i = [], [], 0
        for j in range(T + m):
            if j in slots:
                rows.append(Pb[slots.index(j)])
                keep.append(True)
            else:
                rows.append(x[b, i])
                keep.append(bool(key_mask[b, i]))
                i += 1
        out.append(torch.stack(rows))
        mask.append(torch.tensor(keep))
    return torch.stack(out), torch.stack(mask)


@pytest.mark.parametrize("case", ["prefix", "shared", "per_seq", "per_seq_prompts"])
def test_insert_prompts_matches_loop(case):
    g = gen(1)
    B, T, d, m = 3, 5, 4, 3
    x = torch.randn(B, T, d, generator=g, dtype=F64)
    P = torch.randn(B if case == "per_seq_prompts" else 1, m, d, generator=g, dtype=F64)
    P = P if case == "per_seq_prompts" else P[0]
    km = torch.rand(B, T, generator=g) > 0.3
    pos = {"prefix": torch.arange(m), "shared": torch.tensor([6, 0, 3]),
           "per_seq": torch.tensor([[0, 1, 2], [7, 2, 4], [5, 6, 7]]),
           "per_seq_prompts": torch.tensor([[1, 3, 5], [0, 4, 7], [2, 6, 3]])}[case]
    arg = "prefix" if case == "prefix" else pos
    e, k = insert_prompts(x, P, arg, key_mask=km)
    e_ref, k_ref = insert_loop(x, P, pos, km)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=0)
    assert torch.equal(k, k_ref)
    e2, k2 = insert_prompts(x, P, arg)
    assert k2.all() and torch.equal(e2, e)


def test_insert_prompts_gradcheck():
    g = gen(2)
    x = torch.randn(2, 3, 2, generator=g, dtype=F64, requires_grad=True)
    P = torch.randn(2, 2, generator=g, dtype=F64, requires_grad=True)
    pos = torch.tensor([[4, 1], [0, 2]])
    assert torch.autograd.gradcheck(lambda a, b: insert_prompts(a, b, pos)[0], (x, P))


def test_insert_prompts_extreme_values_pass_through():
    x = torch.full((1, 2, 3), 3e38)
    P = torch.full((1, 3), -3e38)
    e, _ = insert_prompts(x, P, torch.tensor([1]))
    assert torch.isfinite(e).all() and e[0, 1, 0] == -3e38 and e[0, 0, 0] == 3e38


def test_insert_prompts_bad_input():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="prompts: expected"):
        insert_prompts(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="input_embeds: expected"):
        insert_prompts(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="distinct"):
        insert_prompts(x, torch.randn(2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"slots in \[0, 5\)"):
        insert_prompts(x, torch.randn(2, 4), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="positions"):
        insert_prompts(x, torch.randn(2, 4), "suffix")
    with pytest.raises(ValueError, match="key_mask"):
        insert_prompts(x, torch.randn(2, 4), key_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="input_embeds"):
        insert_prompts(torch.ones(2, 3, 4, dtype=torch.long), torch.randn(2, 4))


def test_insert_prompts_inference_mode_and_compile():
    g = gen(3)
    x, P = torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, generator=g)
    ref = insert_prompts(x, P, torch.tensor([[0, 5], [2, 3]]))[0]
    with torch.inference_mode():
        out = insert_prompts(x, P, torch.tensor([[0, 5], [2, 3]]))[0]
    torch.testing.assert_close(out, ref)
    f = torch.compile(insert_prompts, backend="eager", dynamic=True)
    torch.testing.assert_close(f(x, P, torch.tensor([[0, 5], [2, 3]]))[0], ref)
    x2 = torch.randn(3, 6, 3, generator=g)
    torch.testing.assert_close(f(x2, P)[0], insert_prompts(x2, P)[0])


# ---- mask_embedding_grad ----------------------------------------------------------------------
def test_mask_embedding_grad_equals_stop_gradient_formula():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4).double()
    ids = torch.tensor([[1, 2, 3, 7], [7, 7, 0, 9]])
    w = torch.randn(2, 4, 4, dtype=F64)
    train = [2, 7]
    # reference: E' = M E + (1 - M) sg(E), eq. (pt-stopgrad)
    M = torch.zeros(10, 1, dtype=F64)
    M[train] = 1
    E = emb.weight
    (nn.functional.embedding(ids, M * E + (1 - M) * E.detach()) * w).sum().backward()
    ref = E.grad.clone()
    E.grad = None
    (emb(ids) * w).sum().backward()
    full = E.grad.clone()
    E.grad = None
    handle = mask_embedding_grad(emb, train)
    out = emb(ids)
    (out * w).sum().backward()
    torch.testing.assert_close(E.grad, ref, rtol=0, atol=0)
    torch.testing.assert_close(E.grad[train], full[train], rtol=0, atol=0)
    assert (E.grad[[i for i in range(10) if i not in train]] == 0).all()
    handle.remove()
    E.grad = None
    (emb(ids) * w).sum().backward()
    torch.testing.assert_close(E.grad, full)


def test_mask_embedding_grad_optimizer_step_changes_only_listed_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3)
    mask_embedding_grad(emb, torch.tensor([4]))
    before = emb.weight.detach().clone()
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    emb(torch.arange(6)).pow(2).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(1)
    assert changed.tolist() == [False, False, False, False, True, False]


def test_mask_embedding_grad_bad_input():
    with pytest.raises(TypeError, match="embedding: expected an nn.Embedding"):
        mask_embedding_grad(nn.Linear(3, 3), [0])
    with pytest.raises(ValueError, match=r"trainable_ids: expected .* ids in \[0, 5\)"):
        mask_embedding_grad(nn.Embedding(5, 2), [5])
    with pytest.raises(ValueError, match="trainable_ids"):
        mask_embedding_grad(nn.Embedding(5, 2), [])
    with pytest.raises(ValueError, match="sparse"):
        mask_embedding_grad(nn.Embedding(5, 2, sparse=True), [1])


# ---- verbalizer_logits ------------------------------------------------------------------------
def test_verbalizer_logits_matches_indexing():
    g = gen(4)
    B, T, V = 4, 6, 11
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    mask_pos = torch.tensor([0, 5, 2, 2])
    labels = torch.tensor([3, 7, 1])
    out = verbalizer_logits(logits, mask_pos, labels)
    ref = torch.stack([logits[b, mask_pos[b]].log_softmax(-1)[labels] for b in range(B)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # multi-token, ragged: mean of log-probs at the single [MASK]
    out2 = verbalizer_logits(logits, mask_pos, [[3, 4], [7], [1, 2, 9]])
    lp = torch.stack([logits[b, mask_pos[b]].log_softmax(-1) for b in range(B)])
    ref2 = torch.stack([lp[:, [3, 4]].mean(1), lp[:, 7], lp[:, [1, 2, 9]].mean(1)], 1)
    torch.testing.assert_close(out2, ref2, rtol=1e-12, atol=1e-12)
    # multi-token with one [MASK] per label token
    pos2 = torch.tensor([[0, 1], [4, 5], [2, 3], [1, 0]])
    out3 = verbalizer_logits(logits, pos2, torch.tensor([[3, 4], [7, 8]]))
    ref3 = torch.stack([torch.stack([
        0.5 * (logits[b, pos2[b, 0]].log_softmax(-1)[t0] + logits[b, pos2[b, 1]].log_softmax(-1)[t1])
        for t0, t1 in ((3, 4), (7, 8))]) for b in range(B)])
    torch.testing.assert_close(out3, ref3, rtol=1e-12, atol=1e-12)


def test_verbalizer_logits_gradcheck():
    g = gen(5)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    f = lambda z: verbalizer_logits(z, torch.tensor([1, 2]), [[0, 3], [4]])  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits,))


def test_verbalizer_logits_extreme_inputs():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 0] = 1e4
    logits[0, 1, 3] = -1e4
    out = verbalizer_logits(logits, torch.tensor([1]), torch.tensor([0, 3, 2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], torch.tensor(0.0))
    torch.testing.assert_close(out[0, 1], torch.tensor(-2e4))
    h = verbalizer_logits(logits.half().clamp(-6e4, 6e4), torch.tensor([1]), torch.tensor([0, 2]))
    assert h.dtype == torch.float16 and torch.isfinite(h).all()


def test_verbalizer_logits_bad_input():
    z = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="label_token_ids: expected ids in"):
        verbalizer_logits(z, torch.tensor([0, 1]), torch.tensor([5]))
    with pytest.raises(ValueError, match="mask_pos: expected positions"):
        verbalizer_logits(z, torch.tensor([0, 3]), torch.tensor([1]))
    with pytest.raises(ValueError, match="mask_pos: expected an integer"):
        verbalizer_logits(z, torch.tensor([0.0, 1.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="mlm_logits: expected"):
        verbalizer_logits(z[0], torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-empty"):
        verbalizer_logits(z, torch.tensor([0, 1]), [[1], []])


def test_verbalizer_logits_inference_mode_and_compile():
    g = gen(6)
    z = torch.randn(3, 4, 7, generator=g)
    pos, lab = torch.tensor([0, 3, 1]), torch.tensor([2, 5])
    ref = verbalizer_logits(z, pos, lab)
    with torch.inference_mode():
        torch.testing.assert_close(verbalizer_logits(z, pos, lab), ref)
    f = torch.compile(verbalizer_logits, backend="eager", dynamic=True)
    torch.testing.assert_close(f(z, pos, lab), ref)
    z2 = torch.randn(5, 6, 7, generator=g)
    pos2 = torch.tensor([0, 5, 1, 2, 3])
    torch.testing.assert_close(f(z2, pos2, lab), verbalizer_logits(z2, pos2, lab))


# ---- load_masked_lm ---------------------------------------------------------------------------
def test_load_masked_lm_round_trip_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, type_vocab_size=1)
    torch.manual_seed(0)
    lm = load_masked_lm(config=cfg).eval()
    assert isinstance(lm, transformers.BertForMaskedLM)
    lm.save_pretrained(tmp_path)
    again = load_masked_lm(str(tmp_path)).eval()
    ids = torch.randint(0, 40, (2, 7), generator=gen(7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, lm(input_ids=ids).logits,
                                   rtol=0, atol=0)
    # the prompt path the notebook uses: inputs_embeds with spliced prompts
    emb = lm.get_input_embeddings()(ids)
    e, km = insert_prompts(emb, torch.randn(3, 16), "prefix")
    with torch.no_grad():
        out = lm(inputs_embeds=e, attention_mask=km.long()).logits
    assert out.shape == (2, 10, 40)


def test_load_masked_lm_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        load_masked_lm()
    with pytest.raises(ValueError, match="exactly one"):
        load_masked_lm("x", config=object())
