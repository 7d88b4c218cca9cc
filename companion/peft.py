"""Parameter-efficient tuning: learned continuous prompts (P-tuning) and a ladder side network.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import (check_choice, check_floating, check_int, check_range, check_same_shape,
                        check_tensor)

__all__: list[str] = []


# === p-tuning ===
# Learned continuous prompts (notebooks/p-tuning.ipynb). A masked LM reads a template with a
# [MASK]; a verbalizer maps each class to label tokens, eq. (pt-verbalizer); P-tuning replaces
# the template's words by m trainable vectors P in R^{m x d}, eq. (pt-template), and trains only
# P (LM frozen). Two ways to train only P, both here: a separate parameter spliced into
# ``inputs_embeds`` (PromptEncoder + insert_prompts) or a gradient mask on chosen rows of the
# embedding table, eq. (pt-stopgrad) (mask_embedding_grad).
__all__ += ["PromptEncoder", "insert_prompts", "mask_embedding_grad", "verbalizer_logits",
            "load_masked_lm"]


class PromptEncoder(nn.Module):
    """The m prompt vectors P [num_tokens, dim] of P-tuning, eq. (pt-template).

    ``reparam="none"``: P is a free parameter (``self.embedding.weight``). ``"mlp"``: P =
    MLP(E) with learnable inputs E, a 3-layer ReLU MLP dim -> hidden -> hidden -> dim.
    ``"lstm"``: P = MLP(biLSTM(E)), a 2-layer bidirectional LSTM of width ``hidden`` then
    2*hidden -> 2*hidden -> dim, which couples neighbouring prompt tokens. The layouts match
    Hugging Face ``peft.PromptEncoder`` (MLP / LSTM reparametrisation), so weights copy over.
    ``forward()`` takes no input and returns P, float [num_tokens, dim].
    """

    def __init__(self, num_tokens: int, dim: int, reparam: str = "none",
                 hidden: int | None = None):
        super().__init__()
        check_int("num_tokens", num_tokens, 1)
        check_int("dim", dim, 1)
        check_choice("reparam", reparam, ("none", "mlp", "lstm"))
        hidden = dim if hidden is None else check_int("hidden", hidden, 1)
        self.num_tokens, self.dim, self.reparam, self.hidden = num_tokens, dim, reparam, hidden
        self.embedding = nn.Embedding(num_tokens, dim)
        if reparam == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                                          nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        elif reparam == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        if self.reparam == "none":
            return e
        if self.reparam == "lstm":
            e = self.lstm_head(e.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(e)

    def extra_repr(self) -> str:
        return (f"num_tokens={self.num_tokens}, dim={self.dim}, reparam={self.reparam!r}, "
                f"hidden={self.hidden}")


def insert_prompts(input_embeds: torch.Tensor, prompts: torch.Tensor, positions="prefix",
                   key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Splice m prompt vectors into a batch of embedded sequences, eq. (pt-template).

    input_embeds: float [B, T, d]; prompts: [m, d] (or [B, m, d], one set per sequence);
    positions: ``"prefix"`` (slots 0..m-1) or the slots the prompts occupy in the OUTPUT
    sequence, LongTensor [m] (shared) or [B, m] (per sequence, e.g. before a [MASK] whose
    position varies), distinct, in [0, T+m). The input tokens fill the other slots in order.
    key_mask: bool [B, T], True = real token (default all True).
    Returns (embeds [B, T+m, d], key_mask [B, T+m]); prompt slots are True in the mask.
    """
    check_floating("input_embeds", input_embeds)
    check_floating("prompts", prompts)
    if input_embeds.dim() != 3:
        raise ValueError(f"input_embeds: expected a [B, T, d] tensor, got shape "
                         f"{tuple(input_embeds.shape)}")
    B, T, d = input_embeds.shape
    if prompts.dim() not in (2, 3) or prompts.shape[-1] != d or (
            prompts.dim() == 3 and prompts.shape[0] != B):
        raise ValueError(f"prompts: expected [m, {d}] or [{B}, m, {d}] (d of input_embeds), "
                         f"got shape {tuple(prompts.shape)}")
    m = prompts.shape[-2]
    L = T + m
    dev = input_embeds.device
    if isinstance(positions, str):
        check_choice("positions", positions, ("prefix",))
        positions = torch.arange(m, device=dev)
    check_tensor("positions", positions)
    if positions.dtype not in (torch.int64, torch.int32) or positions.dim() not in (1, 2) \
            or positions.shape[-1] != m or (positions.dim() == 2 and positions.shape[0] != B):
        raise ValueError(f"positions: expected an integer tensor [{m}] or [{B}, {m}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    pos = positions.to(device=dev, dtype=torch.int64).expand(B, m)
    if m > 0 and ((pos < 0).any() or (pos >= L).any()):
        raise ValueError(f"positions: expected slots in [0, {L}), got {positions.tolist()}")
    is_prompt = torch.zeros(B, L, dtype=torch.bool, device=dev)
    is_prompt = is_prompt.scatter(1, pos, True)
    if (is_prompt.sum(1) != m).any():
        raise ValueError(f"positions: expected {m} distinct slots per sequence, got "
                         f"{positions.tolist()}")
    # slot j of the output takes input token (#input slots before j) or prompt (#prompt slots
    # before j, counted in the order the slots appear: sorted positions)
    src = (torch.cumsum(~is_prompt, 1) - 1).clamp(0, max(T - 1, 0))
    rank = (torch.cumsum(is_prompt, 1) - 1).clamp(0, max(m - 1, 0))
    # prompts in the order of their listed positions: prompt k goes to slot pos[:, k]
    order = torch.argsort(pos, dim=1)
    which = torch.gather(order, 1, rank) if m > 0 else rank
    from_input = torch.gather(input_embeds, 1, src.unsqueeze(-1).expand(B, L, d)) if T > 0 \
        else input_embeds.new_zeros(B, L, d)
    P = prompts.to(input_embeds.dtype).expand(B, m, d)
    from_prompt = torch.gather(P, 1, which.unsqueeze(-1).expand(B, L, d)) if m > 0 \
        else input_embeds.new_zeros(B, L, d)
    embeds = torch.where(is_prompt.unsqueeze(-1), from_prompt, from_input)
    if key_mask is None:
        out_mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    else:
        check_tensor("key_mask", key_mask)
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, T):
            raise ValueError(f"key_mask: expected a bool tensor [{B}, {T}], got "
                             f"{key_mask.dtype} {tuple(key_mask.shape)}")
        kept = torch.gather(key_mask, 1, src) if T > 0 else is_prompt
        out_mask = is_prompt | kept
    return embeds, out_mask


def mask_embedding_grad(embedding: nn.Embedding, trainable_ids):
    """Let only the rows ``trainable_ids`` of ``embedding.weight`` receive gradient, eq.
    (pt-stopgrad): E' = M*E + (1-M)*sg(E) has E's forward value and gradient M*dL/dE.

    Registers a hook on the weight that multiplies its gradient by the 0/1 row mask M (so a
    tied output layer's gradient is masked too). Returns the ``RemovableHandle``; call
    ``.remove()`` to train the whole table again. With an optimizer that has weight decay the
    frozen rows still move (decay needs no gradient): use ``weight_decay=0`` for them.
    """
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"embedding: expected an nn.Embedding, got {type(embedding).__name__}")
    if embedding.sparse:
        raise ValueError("embedding: sparse gradients are not supported (sparse=True)")
    V = embedding.num_embeddings
    if isinstance(trainable_ids, torch.Tensor):
        ids = trainable_ids.reshape(-1).tolist()
    elif isinstance(trainable_ids, Sequence) and not isinstance(trainable_ids, str):
        ids = list(trainable_ids)
    else:
        raise TypeError(f"trainable_ids: expected a sequence of ints, got "
                        f"{type(trainable_ids).__name__}")
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V
                      for i in ids):
        raise ValueError(f"trainable_ids: expected a non-empty list of ids in [0, {V}), got "
                         f"{ids}")
    weight = embedding.weight
    mask = torch.zeros(V, 1, dtype=weight.dtype, device=weight.device)
    mask[ids] = 1.0

    def hook(grad):
        return grad * mask.to(grad.dtype)

    return weight.register_hook(hook)


def verbalizer_logits(mlm_logits: torch.Tensor, mask_pos: torch.Tensor,
                      label_token_ids) -> torch.Tensor:
    """Class scores from a masked LM's logits, eq. (pt-verbalizer).

    mlm_logits: float [B, T, V]; mask_pos: LongTensor [B] (one [MASK] per sequence) or [B, K]
    (label token k read at mask_pos[:, k]); label_token_ids: LongTensor [C] (one token per
    class), [C, k] or a list of C lists of ids (ragged allowed with mask_pos [B]).
    Returns float [B, C]: log p(v(y) | x) under the FULL vocabulary softmax, multi-token labels
    averaged in log-space; ``softmax`` over C (or ``cross_entropy``) renormalises over labels.
    """
    check_floating("mlm_logits", mlm_logits)
    if mlm_logits.dim() != 3:
        raise ValueError(f"mlm_logits: expected [B, T, V], got shape {tuple(mlm_logits.shape)}")
    B, T, V = mlm_logits.shape
    check_tensor("mask_pos", mask_pos)
    if mask_pos.dtype not in (torch.int64, torch.int32) or mask_pos.dim() not in (1, 2) \
            or mask_pos.shape[0] != B:
        raise ValueError(f"mask_pos: expected an integer tensor [{B}] or [{B}, K], got "
                         f"{mask_pos.dtype} {tuple(mask_pos.shape)}")
    dev = mlm_logits.device
    if isinstance(label_token_ids, torch.Tensor):
        ids = label_token_ids.to(dev, torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(1)
        if ids.dim() != 2:
            raise ValueError(f"label_token_ids: expected [C] or [C, k], got shape "
                             f"{tuple(label_token_ids.shape)}")
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in label_token_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("label_token_ids: expected C >= 1 non-empty lists of token ids")
        k = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (k - len(r)) for r in rows], dtype=torch.int64,
                           device=dev)
        valid = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows],
                             device=dev)
    C, k = ids.shape
    if C == 0 or (ids < 0).any() or (ids >= V).any():
        raise ValueError(f"label_token_ids: expected ids in [0, {V}), got {ids.tolist()}")
    pos = mask_pos.to(dev, torch.int64)
    if pos.dim() == 1:
        pos = pos.unsqueeze(1).expand(B, k)
    elif pos.shape[1] < k:
        raise ValueError(f"mask_pos: expected at least {k} [MASK] slots per sequence for "
                         f"{k}-token labels, got {pos.shape[1]}")
    else:
        pos = pos[:, :k]
    if (pos < 0).any() or (pos >= T).any():
        raise ValueError(f"mask_pos: expected positions in [0, {T}), got {mask_pos.tolist()}")
    at_mask = torch.gather(mlm_logits, 1, pos.unsqueeze(-1).expand(B, k, V))  # [B, k, V]
    wide = torch.promote_types(at_mask.dtype, torch.float32)
    logp = torch.log_softmax(at_mask.to(wide), dim=-1)                       # [B, k, V]
    # logp_tok[b, j, c] = logp[b, j, ids[c, j]]
    logp_tok = torch.gather(logp, 2, ids.t().unsqueeze(0).expand(B, k, C))   # [B, k, C]
    w = valid.t().to(logp_tok.dtype)                                         # [k, C]
    out = (logp_tok * w).sum(1) / w.sum(0)
    return out.to(mlm_logits.dtype)


def load_masked_lm(name_or_path: str | None = None, config=None):
    """A ``transformers`` masked LM: ``AutoModelForMaskedLM.from_pretrained(name_or_path)``
    (a hub name when online, or a local directory written by ``save_pretrained``), or a fresh
    randomly initialised model from ``config`` (offline, e.g. a small ``BertConfig``). Exactly
    one of the two. transformers is imported here, so the rest of the module needs only torch.
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("load_masked_lm: expected exactly one of name_or_path and config")
    from transformers import AutoModelForMaskedLM

    if name_or_path is not None:
        return AutoModelForMaskedLM.from_pretrained(name_or_path)
    return AutoModelForMaskedLM.from_config(config)


# === ladder-side-tuning ===
__all__ += ["ladder_gate", "LadderSideNetwork", "backbone_hidden_states", "backprop_depth",
            "trainable_fraction"]


def ladder_gate(tilde_h: torch.Tensor, z_prev: torch.Tensor, alpha: torch.Tensor,
                tau: float) -> torch.Tensor:
    """The ladder's mixing step (notebook {eq}`lst-gate`)::

        mu = sigmoid(alpha / tau),     out = mu * tilde_h + (1 - mu) * z_prev

    ``tilde_h`` (the down-projected backbone state) and ``z_prev`` (the side state) share one
    shape ``[..., d_s]``; ``alpha`` is a scalar tensor (or broadcasts against them); ``tau > 0``.
    ``alpha = 0`` gives ``mu = 1/2``. The sigmoid is evaluated stably for any ``alpha / tau``.
    """
    check_floating("tilde_h", tilde_h)
    check_floating("z_prev", z_prev)
    check_same_shape("tilde_h", tilde_h, "z_prev", z_prev)
    check_floating("alpha", alpha)
    check_range("tau", tau, 0.0, low_open=True)
    mu = torch.sigmoid(alpha / tau)
    return mu * tilde_h + (1 - mu) * z_prev


class _SideBlock(nn.Module):
    """One side block g_i of width d_s, pre-LN: ``z + Attn(LN(z))`` (SDPA, bidirectional, keys
    masked by ``key_mask``) then ``z + FFN(LN(z))`` (GELU, width 4 d_s); ``"mlp"`` keeps only the
    FFN half."""

    def __init__(self, d_s: int, num_heads: int, kind: str):
        super().__init__()
        self.num_heads = num_heads
        if kind == "transformer":
            self.ln1 = nn.LayerNorm(d_s)
            self.qkv = nn.Linear(d_s, 3 * d_s)
            self.proj = nn.Linear(d_s, d_s)
        self.ln2 = nn.LayerNorm(d_s)
        self.fc = nn.Linear(d_s, 4 * d_s)
        self.out = nn.Linear(4 * d_s, d_s)

    def forward(self, z: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "qkv"):
            B, T, d_s = z.shape
            H = self.num_heads
            q, k, v = self.qkv(self.ln1(z)).view(B, T, 3, H, d_s // H).permute(2, 0, 3, 1, 4)
            mask = None if key_mask is None else key_mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            z = z + self.proj(y.transpose(1, 2).reshape(B, T, d_s))
        return z + self.out(F.gelu(self.fc(self.ln2(z))))


class LadderSideNetwork(nn.Module):
    """Ladder side network (Sung et al. 2022) reading a frozen backbone's hidden states.

    ``forward(hidden_states, key_mask=None) -> z_L [B, T, d_s]`` with ``d_s = backbone_dim //
    reduction_factor`` (notebook {eq}`lst-side`)::

        z_0 = h_0 W_0,    z_i = g_i(ladder_gate(h_i W_i, z_{i-1}, alpha_i, tau)),  i = 1..L

    followed by a final LayerNorm. ``hidden_states``: ``L + 1`` tensors ``[B, T, d]`` (the
    embedding output and each layer's output), computed by the caller under ``torch.no_grad()``
    (see :func:`backbone_hidden_states`), so that backpropagation never enters the backbone.
    ``key_mask [B, T]`` bool, True for a real token, masks the side attention. The gates start at
    ``alpha_i = 0`` (``mu_i = 1/2``); ``side_block`` is ``"transformer"`` (attention + FFN, as in
    Su's CLUE code) or ``"mlp"`` (FFN only). Weights are initialised at random (no pruning).
    """

    def __init__(self, backbone_dim: int, num_layers: int, reduction_factor: int = 8,
                 side_block: str = "transformer", tau: float = 0.1, num_heads: int = 2):
        super().__init__()
        check_int("backbone_dim", backbone_dim, 1)
        check_int("num_layers", num_layers, 1)
        check_int("reduction_factor", reduction_factor, 1)
        check_choice("side_block", side_block, ("mlp", "transformer"))
        check_range("tau", tau, 0.0, low_open=True)
        check_int("num_heads", num_heads, 1)
        if backbone_dim % reduction_factor:
            raise ValueError(f"reduction_factor: expected a divisor of backbone_dim="
                             f"{backbone_dim}, got {reduction_factor}")
        d_s = backbone_dim // reduction_factor
        if side_block == "transformer" and d_s % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the side width d_s={d_s}, "
                             f"got {num_heads}")
        self.backbone_dim, self.num_layers, self.side_dim, self.tau = (
            backbone_dim, num_layers, d_s, float(tau))
        self.down = nn.ModuleList(nn.Linear(backbone_dim, d_s) for _ in range(num_layers + 1))
        self.alpha = nn.Parameter(torch.zeros(num_layers))
        self.blocks = nn.ModuleList(_SideBlock(d_s, num_heads, side_block)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_s)

    def forward(self, hidden_states: Sequence[torch.Tensor],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        hs = list(hidden_states)
        if len(hs) != self.num_layers + 1:
            raise ValueError(f"hidden_states: expected num_layers + 1 = {self.num_layers + 1} "
                             f"tensors, got {len(hs)}")
        for i, h in enumerate(hs):
            check_floating(f"hidden_states[{i}]", h)
            if h.dim() != 3 or h.shape[-1] != self.backbone_dim or h.shape != hs[0].shape:
                raise ValueError(f"hidden_states[{i}]: expected shape [B, T, "
                                 f"{self.backbone_dim}] like hidden_states[0], got "
                                 f"{tuple(h.shape)}")
        if key_mask is not None:
            if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
                raise TypeError("key_mask: expected a bool tensor (True = real token)")
            if tuple(key_mask.shape) != tuple(hs[0].shape[:2]):
                raise ValueError(f"key_mask: expected shape {tuple(hs[0].shape[:2])}, got "
                                 f"{tuple(key_mask.shape)}")
        z = self.down[0](hs[0])
        for i, block in enumerate(self.blocks):
            z = block(ladder_gate(self.down[i + 1](hs[i + 1]), z, self.alpha[i], self.tau),
                      key_mask)
        return self.ln_f(z)


def backbone_hidden_states(model: nn.Module, x, **kwargs) -> tuple[torch.Tensor, ...]:
    """The ``L + 1`` hidden states ``(h_0, ..., h_L)`` of a backbone, computed under
    ``torch.no_grad()`` (each ``[B, T, d]``, no autograd history).

    A Hugging Face model (one with a ``config``) is called with ``output_hidden_states=True``;
    any other module must keep its layers in an ``nn.ModuleList`` named ``blocks`` or
    ``layers`` (``companion.lm.GPT``, ``nn.TransformerEncoder``): forward hooks record the first
    layer's input (``h_0``) and every layer's output. ``kwargs`` go to ``model(x, ...)``. The
    model's train/eval mode is left as it is: put a frozen backbone in ``eval()`` (no dropout).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        if hasattr(model, "config") and not isinstance(getattr(model, "config"), dict):
            out = model(x, output_hidden_states=True, **kwargs)
            return tuple(out.hidden_states)
        layers = None
        for name in ("blocks", "layers"):
            if isinstance(getattr(model, name, None), nn.ModuleList):
                layers = getattr(model, name)
                break
        if layers is None or len(layers) == 0:
            raise ValueError("model: expected a Hugging Face model or a module whose layers are "
                             "an nn.ModuleList named 'blocks' or 'layers'")
        states: list[torch.Tensor] = []

        def first(module, args):
            states.append(args[0])

        def each(module, args, output):
            states.append(output[0] if isinstance(output, tuple) else output)

        handles = [layers[0].register_forward_pre_hook(first)]
        handles += [layer.register_forward_hook(each) for layer in layers]
        try:
            model(x, **kwargs)
        finally:
            for h in handles:
                h.remove()
    return tuple(states)


def _saved_tensors(node) -> list[torch.Tensor]:
    out = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed by an earlier backward
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        out += [v for v in values if isinstance(v, torch.Tensor)]
    return out


def backprop_depth(loss: torch.Tensor, layers: Sequence[nn.Module]) -> int:
    """How many of ``layers`` the backward pass of ``loss`` must go through (notebook
    {eq}`lst-depth`).

    A layer counts when one of its parameters lies on ``loss``'s backward graph: either it is
    trained (an ``AccumulateGrad`` leaf of the graph) or a node of the graph saved it to pass the
    gradient on to an earlier input (a frozen ``Linear`` whose input needs a gradient). The graph
    is only read (no backward runs). A layer reached by no trainable path (a frozen backbone run
    under ``torch.no_grad()``) counts 0.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss: expected a torch.Tensor, got {type(loss).__name__}")
    layers = list(layers)
    if not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError("layers: expected a sequence of nn.Module")
    if loss.grad_fn is None:
        return 0
    seen_nodes, stack, ptrs = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            ptrs.add(variable.untyped_storage().data_ptr())
        for t in _saved_tensors(node):
            if t.numel():
                ptrs.add(t.untyped_storage().data_ptr())
        stack += [n for n, _ in node.next_functions]
    return sum(any(p.numel() and p.untyped_storage().data_ptr() in ptrs
                   for p in layer.parameters()) for layer in layers)


def trainable_fraction(model: nn.Module) -> float:
    """Parameters with ``requires_grad`` over all parameters of ``model`` (each counted once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if total == 0:
        raise ValueError("model: has no parameters")
    return trainable / total
