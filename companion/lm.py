"""Language models: the book's reference GPT (three block orders), top-k sampling with a KV cache.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb); the GPT is also the
test-bed decoder of lossless-model-expansion, recompute, adafactor and tiger-lion-embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_int, check_range

__all__: list[str] = []


# === gpt2-chinese ===
__all__ += ["GPTConfig", "GPT", "KVCache", "generate_topk", "gpt_param_count"]

BLOCK_STYLES = ("gpt2", "bert", "gpt2_ml")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass
class GPTConfig:
    """Sizes and block order of :class:`GPT`.

    ``block_style``: ``"gpt2"`` (pre-LN, a final LN before the output), ``"bert"`` (post-LN, a LN
    on the embeddings) or ``"gpt2_ml"`` (no LN around attention, a LN inside the MLP branch and one
    after its residual sum, a LN on the embeddings). ``activation``: ``"gelu"`` (exact erf form),
    ``"gelu_tanh"`` (the tanh approximation OpenAI's GPT-2 uses) or ``"relu"``. ``layer_norm_eps``
    travels with the config so that a widened model can divide it by the widening factor.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    block_size: int
    block_style: str = "gpt2"
    activation: str = "gelu"
    dropout: float = 0.0
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "num_heads", "d_model", "block_size"):
            check_int(name, getattr(self, name), 1)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model: expected a multiple of num_heads={self.num_heads}, "
                             f"got {self.d_model}")
        check_choice("block_style", self.block_style, BLOCK_STYLES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_range("layer_norm_eps", self.layer_norm_eps, 0.0, low_open=True)


def gpt_param_count(cfg: GPTConfig) -> int:
    """Parameters of ``GPT(cfg)`` in closed form::

        N = V d + T_max d + L (12 d^2 + 13 d) + 2 d   (+ V d without tied embeddings)

    per block: qkv 3d^2 + 3d, output d^2 + d, MLP 8d^2 + 5d, two LayerNorms 4d; the last 2d is the
    one extra LayerNorm (the final LN of "gpt2", the embedding LN of "bert" and "gpt2_ml")."""
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg: expected a GPTConfig, got {type(cfg).__name__}")
    V, T, L, d = cfg.vocab_size, cfg.block_size, cfg.num_layers, cfg.d_model
    n = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    return n if cfg.tie_embeddings else n + V * d


class KVCache:
    """Keys and values of the positions seen so far, one ``(k, v)`` pair ``[B, H, t, d_head]`` per
    block, filled by ``GPT.forward(..., cache=...)``; ``len(cache)`` is the number of positions."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Add new keys/values to block ``layer``; returns that block's full keys and values."""
        while len(self.layers) <= layer:
            self.layers.append(None)
        old = self.layers[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=-2), torch.cat([old[1], v], dim=-2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv = x W + b``, ``softmax(q k^T / sqrt(d_h) + M) v``,
    output projection. ``use_sdpa=False`` runs the explicit softmax (the tests' reference)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, d = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # [B, H, T, d_h]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
        S = k.shape[-2]
        # query r (absolute position past + r) sees keys s <= past + r
        mask = None
        if past and T > 1:
            mask = (torch.arange(S, device=x.device)[None, :]
                    <= past + torch.arange(T, device=x.device)[:, None])
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=(past == 0 and T > 1))
        else:
            if mask is None:
                mask = (torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
            w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            y = F.dropout(w, p) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """``F(x) = act(x W_1 + b_1) W_2 + b_2`` with width 4d."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.activation = cfg.activation

    def forward(self, x):
        h = self.fc(x)
        if self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.proj(h)


class Block(nn.Module):
    """One decoder block in one of the three orders (A = attention, F = MLP)::

        gpt2:    y = x + A(LN1(x)),   x' = y + F(LN2(y))
        bert:    y = LN1(x + A(x)),   x' = LN2(y + F(y))
        gpt2_ml: y = x + A(x),        x' = LN2(y + F(LN1(y)))
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.style = cfg.block_style
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        A = lambda h: self.drop(self.attn(h, cache, layer))  # noqa: E731
        Fm = lambda h: self.drop(self.mlp(h))  # noqa: E731
        if self.style == "gpt2":
            y = x + A(self.ln1(x))
            return y + Fm(self.ln2(y))
        if self.style == "bert":
            y = self.ln1(x + A(x))
            return self.ln2(y + Fm(y))
        y = x + A(x)
        return self.ln2(y + Fm(self.ln1(y)))


class GPT(nn.Module):
    """The book's reference decoder-only language model.

    ``forward(idx [B, T] integer, targets [B, T] | None = None, *, cache=None) -> (logits [B, T, V],
    loss | None)``: token + learned position embeddings (a LayerNorm on them for "bert" and
    "gpt2_ml"), ``num_layers`` blocks of ``cfg.block_style``, a final LayerNorm for "gpt2", and the
    output ``h E^T`` (tied) or a separate head. ``loss`` is the mean cross-entropy over targets that
    are not -100. With a :class:`KVCache`, ``idx`` continues the cached positions and the cache is
    extended in place (what :func:`generate_topk` uses). Attention runs through SDPA; set
    ``model.use_sdpa = False`` for the explicit softmax. Initialisation: normal(0, 0.02) weights,
    zero biases, LayerNorms (1, 0). State-dict keys: ``tok_emb``, ``pos_emb``, ``emb_ln`` (bert,
    gpt2_ml), ``blocks.{i}.{ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.proj}``, ``ln_f`` (gpt2),
    ``head`` (untied only).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg: expected a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d)
        if cfg.block_style in ("bert", "gpt2_ml"):
            self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        if cfg.block_style == "gpt2":
            self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        if not cfg.tie_embeddings:
            self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def use_sdpa(self) -> bool:
        return all(b.attn.use_sdpa for b in self.blocks)

    @use_sdpa.setter
    def use_sdpa(self, value: bool):
        for b in self.blocks:
            b.attn.use_sdpa = bool(value)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None):
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() \
                or idx.dtype == torch.bool:
            raise TypeError(f"idx: expected an integer tensor of token ids, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2:
            raise ValueError(f"idx: expected shape [B, T], got {tuple(idx.shape)}")
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.block_size:
            raise ValueError(f"idx: {past + T} positions (cached {past} + new {T}) exceed "
                             f"block_size={self.cfg.block_size}")
        if T and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"idx: token ids must lie in [0, {self.cfg.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        pos = torch.arange(past, past + T, device=idx.device)
        h = self.tok_emb(idx) + self.pos_emb(pos)
        if hasattr(self, "emb_ln"):
            h = self.emb_ln(h)
        h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if cache is not None:
            cache.length = past + T
        if hasattr(self, "ln_f"):
            h = self.ln_f(h)
        logits = self.head(h) if hasattr(self, "head") else h @ self.tok_emb.weight.T
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets: expected shape {tuple(idx.shape)} like idx, got "
                                 f"{tuple(targets.shape)}")
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss


@torch.no_grad()
def generate_topk(model: GPT, idx: torch.Tensor, max_new_tokens: int, k: int = 5,
                  temperature: float = 1.0, end_id: int | None = None, min_new_tokens: int = 0,
                  generator: torch.Generator | None = None, *, use_cache: bool = True
                  ) -> torch.Tensor:
    """Top-k sampling: at each step keep the ``k`` most probable next tokens, renormalise
    ``p_i / sum_{top-k} p_j`` (of ``softmax(logits / temperature)``), sample one.

    ``idx [B, T0]`` is the prompt; returns ``[B, T0 + n]`` with ``n <= max_new_tokens`` new tokens.
    ``end_id``: a sequence that samples it is finished (later positions are filled with
    ``end_id``), and generation stops when every sequence is; it cannot be sampled before
    ``min_new_tokens`` new tokens. With ``use_cache`` (default) the prompt is run once and each new
    token reuses the keys and values of the past (a :class:`KVCache`); once the sequence outgrows
    ``block_size``, each step re-encodes the last ``block_size`` tokens (learned absolute positions
    shift, so no cache can be reused). ``use_cache=False`` recomputes the window every step (the
    reference); both give the same tokens for the same generator. Dropout applies if the model is
    in training mode: call ``model.eval()`` first.
    ``k`` larger than the vocabulary keeps every token; ties at the k-th value are broken by index.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model: expected a companion.lm.GPT, got {type(model).__name__}")
    check_int("max_new_tokens", max_new_tokens, 0)
    check_int("k", k, 1)
    check_range("temperature", temperature, 0.0, low_open=True)
    check_int("min_new_tokens", min_new_tokens, 0)
    V, Tmax = model.cfg.vocab_size, model.cfg.block_size
    if end_id is not None:
        check_int("end_id", end_id, 0, V - 1)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx: expected a prompt of shape [B, T0] with T0 >= 1, got "
                         f"{tuple(idx.shape)}")
    k = min(k, V)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache, window = None, None
    for step in range(max_new_tokens):
        if use_cache and cache is not None and cache.length < Tmax:
            logits, _ = model(idx[:, -1:], cache=cache)
        else:  # the prompt, every step without the cache, and every step past block_size
            cache = KVCache() if use_cache else None
            logits, _ = model(idx[:, -Tmax:], cache=cache)
        logits = logits[:, -1, :].float() / temperature
        if end_id is not None and step < min_new_tokens:
            logits[:, end_id] = float("-inf")
        top, top_i = logits.topk(k, dim=-1)
        choice = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=generator)
        nxt = top_i.gather(-1, choice)
        if end_id is not None:
            nxt = torch.where(done[:, None], torch.full_like(nxt, end_id), nxt)
            done = done | (nxt[:, 0] == end_id)
        idx = torch.cat([idx, nxt], dim=1)
        if end_id is not None and bool(done.all()):
            break
    return idx


__all__ += ["gpt_from_hf", "load_pretrained_gpt2"]

# Hugging Face GPT-2 layout -> ours (their Conv1D stores weights [in, out]: transposed here).
_HF_GPT2_BLOCK = {"ln_1": "ln1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                  "ln_2": "ln2", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
_HF_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                        "gelu": "gelu", "relu": "relu"}


def gpt_from_hf(hf_model) -> GPT:
    """A :class:`GPT` ("gpt2" block order) with the weights of a Hugging Face ``GPT2LMHeadModel``.

    ``hf_model`` is duck-typed (``.config`` with ``vocab_size, n_layer, n_head, n_embd,
    n_positions, layer_norm_epsilon, activation_function``; ``.state_dict()``), so this module
    never imports ``transformers``. The result computes the same logits (tests: float64, 1e-10)
    and has no dropout, in eval mode. Raises ValueError for an activation or layout GPT cannot
    hold (e.g. ``scale_attn_by_inverse_layer_idx``, untied output weights).
    """
    c = hf_model.config
    act = getattr(c, "activation_function", "gelu_new")
    if act not in _HF_GPT2_ACTIVATIONS:
        raise ValueError(f"hf_model: activation_function {act!r} has no GPT equivalent "
                         f"(expected one of {sorted(_HF_GPT2_ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(c, flag, False):
            raise ValueError(f"hf_model: config.{flag}=True is not supported")
    if not getattr(c, "scale_attn_weights", True):
        raise ValueError("hf_model: config.scale_attn_weights=False is not supported")
    cfg = GPTConfig(vocab_size=c.vocab_size, num_layers=c.n_layer, num_heads=c.n_head,
                    d_model=c.n_embd, block_size=c.n_positions, block_style="gpt2",
                    activation=_HF_GPT2_ACTIVATIONS[act], layer_norm_eps=c.layer_norm_epsilon)
    sd = hf_model.state_dict()
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"],
                                                  sd["transformer.wte.weight"]):
        raise ValueError("hf_model: lm_head is not tied to the token embedding")
    ours = {"tok_emb.weight": sd["transformer.wte.weight"],
            "pos_emb.weight": sd["transformer.wpe.weight"],
            "ln_f.weight": sd["transformer.ln_f.weight"],
            "ln_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(c.n_layer):
        for theirs, mine in _HF_GPT2_BLOCK.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            ours[f"blocks.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.T
            ours[f"blocks.{i}.{mine}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    ref = ours["tok_emb.weight"]
    model = GPT(cfg).to(device=ref.device, dtype=ref.dtype).eval()
    model.load_state_dict(ours)
    return model


def load_pretrained_gpt2(name_or_path: str = "gpt2"):
    """``(GPT, GPT2LMHeadModel)``: a GPT-2 checkpoint loaded with ``transformers``'
    ``GPT2LMHeadModel.from_pretrained(name_or_path)`` (a hub name when online, or a local
    directory written by ``save_pretrained``) and converted by :func:`gpt_from_hf`.
    Needs ``transformers``; raises its errors (e.g. ``OSError`` offline) unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"name_or_path: expected a non-empty string, got {name_or_path!r}")
    from transformers import GPT2LMHeadModel  # optional dependency, imported only here

    hf = GPT2LMHeadModel.from_pretrained(name_or_path).eval()
    return gpt_from_hf(hf), hf
