"""Language models: the book's reference GPT (three block orders), top-k sampling with a KV cache.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb); the GPT is also the
test-bed decoder of lossless-model-expansion, recompute, adafactor and tiger-lion-embedding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

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
    cache = None
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


# === unargmaxable-tokens ===
__all__ += ["argmax_margin", "find_unargmaxable", "frank_wolfe_min_norm", "argmax_region_grid",
            "UnargmaxableResult"]


def _check_softmax_layer(W, b):
    """Validate ``W [n, d]`` (floating) and ``b [n] | None``; return float64 CPU copies."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W: expected a floating-point tensor, got dtype {W.dtype}")
    if W.dim() != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"W: expected shape [n, d] with n, d >= 1, got {tuple(W.shape)}")
    W64 = W.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(W64).all()):
        raise ValueError("W: expected finite entries")
    if b is None:
        return W64, None
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b: expected a torch.Tensor or None, got {type(b).__name__}")
    if not b.is_floating_point():
        raise TypeError(f"b: expected a floating-point tensor, got dtype {b.dtype}")
    if tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"b: expected shape ({W.shape[0]},) (one bias per row of W), "
                         f"got {tuple(b.shape)}")
    b64 = b.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(b64).all()):
        raise ValueError("b: expected finite entries")
    return W64, b64


def _lp_margin(W, b, k, bound, *, tol=1e-9, decide=False, deadline=None, chunk=64):
    """Eq. (lp-margin) by constraint generation; ``W [n, d]``, ``b [n]`` float64 CPU.

    Solves the LP over a few competitors (those with the largest logits at ``z = w_k``), adds
    every constraint the solution violates and repeats. The relaxed value bounds t* from above;
    once the solution violates nothing it is t*. With ``decide`` it stops as soon as the class
    is settled: relaxed t <= tol (unargmaxable) or the solution's full margin > tol (a witness).
    Returns ``(t, z, status)``, status "opt" | "argmaxable" | "unargmaxable" | "timeout".
    """
    from scipy.optimize import linprog

    n, d = W.shape
    if deadline is not None and time.perf_counter() >= deadline:
        return float("nan"), None, "timeout"
    if n == 1:
        return float("inf"), torch.zeros(d, dtype=W.dtype), "opt"
    A = W - W[k]                                  # rows w_i - w_k
    c = b - b[k]                                  # b_i - b_k
    others = torch.ones(n, dtype=torch.bool)
    others[k] = False
    start = A @ W[k] + c                          # logits (minus class k's) at z = w_k
    start[k] = -float("inf")
    active = torch.topk(start, min(n - 1, chunk)).indices
    cost = torch.zeros(d + 1, dtype=torch.float64)
    cost[-1] = -1.0                               # maximise t
    bounds = [(-bound, bound)] * d + [(None, None)]
    scale = 1.0 + float(bound * A.abs().sum(1).max() + c.abs().max())
    while True:
        options = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                return float("nan"), None, "timeout"
            options["time_limit"] = left
        A_ub = torch.cat([A[active], torch.ones(len(active), 1, dtype=A.dtype)], 1)
        res = linprog(cost.numpy(), A_ub=A_ub.numpy(), b_ub=(-c[active]).numpy(),
                      bounds=bounds, method="highs", options=options)
        if res.status == 1:                       # iteration or time limit
            return float("nan"), None, "timeout"
        if res.status != 0:
            raise RuntimeError(f"HiGHS failed on class {k}: {res.message}")
        x = torch.from_numpy(res.x)
        z, t = x[:d], float(x[d])
        if decide and t <= tol:
            return t, z, "unargmaxable"
        gaps = A @ z + c                          # w_i.z + b_i - (w_k.z + b_k), i != k
        gaps[k] = -float("inf")
        if decide and float(-gaps.max()) > tol:
            return t, z, "argmaxable"
        viol = gaps + t                           # > 0: constraint i is violated
        viol[active] = -float("inf")
        viol[k] = -float("inf")
        if float(viol.max()) <= 1e-12 * scale:
            return t, z, "opt"
        new = torch.topk(viol, min(chunk, int((viol > 1e-12 * scale).sum()))).indices
        active = torch.cat([active, new])


def argmax_margin(W: torch.Tensor, b: torch.Tensor | None, k: int, bound: float = 1e2) -> float:
    """The largest margin t* by which class ``k`` can win the argmax of ``W z + b`` (eq. lp-margin):

        t* = max_{z, t} t   s.t.  (w_i - w_k) . z + b_i - b_k + t <= 0  (i != k),  |z_j| <= bound

    ``W [n, d]`` floating, ``b [n]`` or ``None`` (no bias). Class ``k`` is argmaxable inside the
    box iff t* > 0 (use a small threshold such as 1e-9 for round-off); without bias t* >= 0
    always (z = 0 ties everyone) and t* = 0 exactly for an unargmaxable class. Solved in float64
    by scipy's HiGHS (``linprog(method="highs")``) with constraint generation, so a large
    vocabulary costs a few small LPs. Returns a Python float (``inf`` when n = 1).
    """
    W64, b64 = _check_softmax_layer(W, b)
    check_int("k", k, 0, W64.shape[0] - 1)
    check_range("bound", bound, 0.0, low_open=True)
    if b64 is None:
        b64 = torch.zeros(W64.shape[0], dtype=torch.float64)
    return _lp_margin(W64, b64, k, float(bound))[0]


class UnargmaxableResult(NamedTuple):
    """What :func:`find_unargmaxable` returns.

    ``indices`` LongTensor [m]: the classes proved unargmaxable, ascending. ``mask`` BoolTensor
    [n]: True at those classes. ``decided_by`` tuple of n str, how each class was settled:
    ``"witness"`` (argmaxable: the cheap test z = w_k, scaled to the box, already wins),
    ``"lp"`` / ``"frank_wolfe"`` / ``"hull"`` (the exact method, either way), or
    ``"undecided"`` (the LP time budget or the Frank-Wolfe iteration cap ran out first).
    ``undecided`` LongTensor: the undecided classes (in neither ``indices`` nor argmaxable).
    """

    indices: torch.Tensor
    mask: torch.Tensor
    decided_by: tuple
    undecided: torch.Tensor


def _witness_margins(W, b, bound, chunk_size=1024):
    """Margin of class k at z = s_k w_k (s_k scales w_k to the box, eq. witness):
    min_i (w_k - w_i).z + b_k - b_i, in row chunks (memory O(chunk_size * n)). Large layers
    (n > 4096) multiply in float32 and subtract a bound on its rounding error, so a positive
    result is still a proof. Returns float64 [n]."""
    n, d = W.shape
    if n == 1:
        return torch.full((1,), float("inf"), dtype=torch.float64)
    inf_norm = W.abs().amax(1)
    s = torch.where(inf_norm > 0, bound / inf_norm.clamp_min(1e-300), torch.zeros_like(inf_norm))
    fast = n > 4096
    Wc, bc = (W.float(), b.float()) if fast else (W, b)
    # |fl(z.w) - z.w| <= 1.01 d u |z| |w| (u: unit round-off), plus the rounding of b and of the
    # final subtraction; doubled for safety
    u = torch.finfo(torch.float32).eps if fast else 0.0
    wmax, bmax = float(W.norm(dim=1).max()), float(b.abs().max())
    out = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        Z = Wc[lo:hi] * s[lo:hi, None].to(Wc.dtype)
        L = Z @ Wc.T + bc                          # [chunk, n] logits at the witness
        rows = torch.arange(hi - lo)
        own = L[rows, rows + lo].clone()
        L[rows, rows + lo] = -float("inf")
        m = (own - L.amax(1)).double()
        slack = 4 * (d + 2) * u * (Z.double().norm(dim=1) * wmax + bmax + m.abs())
        out[lo:hi] = m - slack
    return out


def _hull_unargmaxable(W, b):
    """Exact for unbounded z: without bias (or a constant one) class k is argmaxable iff w_k is a
    vertex of conv{w_i}; with bias iff (w_k, b_k) lies on an upper facet of the lifted hull (a
    facet whose outward normal has a positive last coordinate). Duplicated rows never win."""
    from scipy.spatial import ConvexHull

    n, d = W.shape
    P = W if b is None or float(b.max() - b.min()) == 0.0 else torch.cat([W, b[:, None]], 1)
    uniq, inverse, counts = torch.unique(P, dim=0, return_inverse=True, return_counts=True)
    hull = ConvexHull(uniq.numpy())
    if P.shape[1] == d:
        winners = torch.as_tensor(hull.vertices, dtype=torch.long)
    else:
        upper = torch.from_numpy(hull.equations[:, d] > 0)   # normals: [a, c, offset]
        winners = torch.as_tensor(hull.simplices, dtype=torch.long)[upper].unique()
    ok_uniq = torch.zeros(len(uniq), dtype=torch.bool)
    ok_uniq[winners] = True
    ok_uniq &= counts == 1
    return ~ok_uniq[inverse]


def find_unargmaxable(W: torch.Tensor, b: torch.Tensor | None = None, method: str = "lp",
                      bound: float = 1e2, certify_first: bool = True, *,
                      time_budget: float | None = None, tol: float = 1e-9,
                      fw_iters: int = 20000) -> UnargmaxableResult:
    """Classes ``k`` of ``softmax(W z + b)`` that no ``z`` in the box ``|z_j| <= bound`` makes the
    strict argmax. ``W [n, d]`` floating, ``b [n]`` or ``None``. Returns an
    :class:`UnargmaxableResult` ``(indices, mask, decided_by, undecided)``.

    ``certify_first``: first try the witness z = w_k (scaled to the box; eq. witness): every
    class whose own logit then beats all others by more than ``tol`` is argmaxable, and only
    the rest go to ``method``:

    * ``"lp"``: the margin LP of eq. (lp-margin) with scipy's HiGHS, stopped as soon as the
      class is settled (t <= ``tol``: unargmaxable; a z with margin > ``tol``: argmaxable).
      ``time_budget`` (seconds for all LPs together, None: no limit): classes not reached in
      time are reported undecided.
    * ``"frank_wolfe"``: the min-norm point of conv{w_k - w_i} (eq. min-norm), no bias only,
      by away-step Frank-Wolfe (:func:`frank_wolfe_min_norm`): argmaxable once an iterate x
      has min_i (w_k - w_i).x > 0 (x is a witness), unargmaxable once ||x|| < 1e-6 (a
      numerical verdict), undecided after ``fw_iters`` iterations. Ignores ``bound``.
    * ``"hull"``: scipy's ConvexHull (Qhull), d <= 8 only; exact for an unbounded z (ignores
      ``bound``); with bias it uses the upper facets of the lifted points (w_i, b_i).
    """
    W64, b64 = _check_softmax_layer(W, b)
    check_choice("method", method, ("lp", "frank_wolfe", "hull"))
    check_range("bound", bound, 0.0, low_open=True)
    check_range("tol", tol, 0.0)
    check_int("fw_iters", fw_iters, 1)
    if time_budget is not None:
        check_range("time_budget", time_budget, 0.0)
    n, d = W64.shape
    if method == "hull" and d > 8:
        raise ValueError(f"method: 'hull' is limited to d <= 8 (Qhull grows too fast), got "
                         f"d={d}; use method='lp'")
    if method == "frank_wolfe" and b64 is not None:
        raise ValueError("b: method='frank_wolfe' handles no bias (b=None); use method='lp'")
    bz = torch.zeros(n, dtype=torch.float64) if b64 is None else b64
    decided = ["undecided"] * n
    mask = torch.zeros(n, dtype=torch.bool)
    todo = torch.arange(n)
    if certify_first:
        ok = _witness_margins(W64, bz, float(bound)) > tol
        for i in torch.nonzero(ok).flatten().tolist():
            decided[i] = "witness"
        todo = torch.nonzero(~ok).flatten()
    if method == "hull":
        bad = _hull_unargmaxable(W64, b64)
        for i in todo.tolist():
            mask[i], decided[i] = bool(bad[i]), "hull"
    elif method == "frank_wolfe" and len(todo):
        others = torch.stack([torch.cat([torch.arange(k), torch.arange(k + 1, n)])
                              for k in todo.tolist()])                      # [m, n-1]
        D = W64[todo][:, None, :] - W64[others]                             # [m, n-1, d]
        _, x, status, _ = _frank_wolfe(D, fw_iters, 0.0, away=True, zero_tol=1e-6,
                                       stop_separated=True)
        for j, i in enumerate(todo.tolist()):
            if status[j] != 0:
                mask[i], decided[i] = bool(status[j] == 2), "frank_wolfe"
    elif method == "lp":
        deadline = None if time_budget is None else time.perf_counter() + time_budget
        for i in todo.tolist():
            t, _, status = _lp_margin(W64, bz, i, float(bound), tol=tol, decide=True,
                                      deadline=deadline)
            if status == "timeout":
                continue
            mask[i], decided[i] = (status == "unargmaxable") or (status == "opt" and t <= tol), "lp"
    undecided = torch.tensor([i for i in range(n) if decided[i] == "undecided"], dtype=torch.long)
    return UnargmaxableResult(torch.nonzero(mask).flatten(), mask, tuple(decided), undecided)


def _frank_wolfe(D, iters, tol, *, away=True, zero_tol=None, stop_separated=False):
    """Batched (away-step) Frank-Wolfe for min_{alpha in simplex} 1/2 ||alpha @ D||^2.

    ``D [B, m, d]`` float64. Each problem stops on its own when ``||x|| < zero_tol`` (status 2),
    with ``stop_separated`` when min_i <D_i, x> > 0 (status 3), or when the duality gap
    ||x||^2 - min_i <D_i, x> is <= ``tol`` (status 1); status 0: ran out of ``iters``.
    Only the problems still running are iterated. Returns ``(alpha [B, m], x [B, d],
    status [B], iterations [B])``.
    """
    B, m, _ = D.shape
    G_all = D @ D.transpose(1, 2)                          # Gram matrix [B, m, m]
    start = torch.diagonal(G_all, dim1=1, dim2=2).argmin(1)  # the shortest row
    alpha_all = F.one_hot(start, m).to(D.dtype)
    status = torch.zeros(B, dtype=torch.long)
    its = torch.zeros(B, dtype=torch.long)
    idx = torch.arange(B)
    G, alpha = G_all, alpha_all.clone()
    for _ in range(iters + 1):
        g = (G @ alpha[:, :, None])[:, :, 0]              # <D_i, x>
        xx = (alpha * g).sum(1)                            # ||x||^2
        gmin, s = g.min(1)
        st = torch.zeros(len(idx), dtype=torch.long)
        if zero_tol is not None:
            st = torch.where(xx < zero_tol ** 2, 2, st)
        if stop_separated:
            st = torch.where((st == 0) & (gmin > 0), 3, st)
        st = torch.where((st == 0) & (xx - gmin <= tol), 1, st)
        stop = st > 0
        if bool(stop.any()) or _ == iters:
            alpha_all[idx] = alpha
            status[idx] = st
            keep = ~stop
            if _ == iters or not bool(keep.any()):
                break
            idx, G, alpha = idx[keep], G[keep], alpha[keep]
            g, xx, gmin, s = g[keep], xx[keep], gmin[keep], s[keep]
        its[idx] += 1
        rows = torch.arange(len(idx))
        # Frank-Wolfe direction e_s - alpha; away direction alpha - e_a (a: worst active vertex)
        g_act = torch.where(alpha > 0, g, torch.full_like(g, -float("inf")))
        gmax, a = g_act.max(1)
        a_w = alpha[rows, a]
        use_away = away & ((gmax - xx) > (xx - gmin)) & (a_w < 1)
        e_s, e_a = F.one_hot(s, m).to(D.dtype), F.one_hot(a, m).to(D.dtype)
        direc = torch.where(use_away[:, None], alpha - e_a, e_s - alpha)
        step_max = torch.where(use_away, a_w / (1 - a_w).clamp_min(1e-300), torch.ones_like(xx))
        # exact line search on the quadratic: gamma = -<x, dx> / ||dx||^2
        num = -(g * direc).sum(1)
        den = (direc * (G @ direc[:, :, None])[:, :, 0]).sum(1)
        gamma = torch.where(den > 0, num / den.clamp_min(1e-300), step_max)
        gamma = torch.minimum(gamma.clamp_min(0), step_max)
        alpha = (alpha + gamma[:, None] * direc).clamp_min(0)
        alpha = alpha / alpha.sum(1, keepdim=True)
    x = (alpha_all[:, :, None] * D).sum(1)
    return alpha_all, x, status, its


def frank_wolfe_min_norm(D: torch.Tensor, iters: int = 1000, tol: float = 1e-9, *,
                         away_steps: bool = True):
    """The point of minimum norm in conv{D_1, ..., D_m} (eq. min-norm), by Frank-Wolfe with exact
    line search (and away steps, which converge linearly where plain Frank-Wolfe crawls at
    O(1/t)): min over the simplex of 1/2 ||sum_i alpha_i D_i||^2.

    ``D [m, d]`` or a batch ``[B, m, d]`` of floating rows. Stops when the duality gap
    ||x||^2 - min_i <D_i, x> (an upper bound on ||x||^2 - ||x*||^2, twice the suboptimality)
    is <= ``tol``, or after ``iters`` iterations. Returns ``(alpha [.., m], norm [..])`` in
    float64: the weights (on the simplex) and ||sum_i alpha_i D_i||.
    """
    if not isinstance(D, torch.Tensor):
        raise TypeError(f"D: expected a torch.Tensor, got {type(D).__name__}")
    if not D.is_floating_point():
        raise TypeError(f"D: expected a floating-point tensor, got dtype {D.dtype}")
    if D.dim() not in (2, 3) or D.shape[-2] < 1 or D.shape[-1] < 1:
        raise ValueError(f"D: expected shape [m, d] or [B, m, d] with m, d >= 1, got "
                         f"{tuple(D.shape)}")
    check_int("iters", iters, 1)
    check_range("tol", tol, 0.0)
    D64 = D.detach().to("cpu", torch.float64)
    batched = D64.dim() == 3
    alpha, x, _, _ = _frank_wolfe(D64 if batched else D64[None], iters, tol, away=away_steps)
    norm = x.norm(dim=-1)
    return (alpha, norm) if batched else (alpha[0], norm[0])


def argmax_region_grid(W: torch.Tensor, b: torch.Tensor | None, lim: float, res: int
                       ) -> torch.Tensor:
    """The winning class of ``W z + b`` on a ``res x res`` grid of z = (z_1, z_2) in
    ``[-lim, lim]^2`` (``W [n, 2]``). Returns LongTensor ``[res, res]`` whose row ``r`` is
    z_2 = y_r and column ``c`` is z_1 = x_c (both ascending), ready for
    ``plt.imshow(grid, origin="lower", extent=(-lim, lim, -lim, lim))``. Ties go to the
    lower index (``argmax``)."""
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"W: expected a floating-point torch.Tensor, got "
                        f"{getattr(W, 'dtype', type(W).__name__)}")
    if W.dim() != 2 or W.shape[1] != 2:
        raise ValueError(f"W: expected shape [n, 2] (a 2-D output layer), got {tuple(W.shape)}")
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (W.shape[0],)):
        raise ValueError(f"b: expected None or shape ({W.shape[0]},), got "
                         f"{tuple(getattr(b, 'shape', ())) or type(b).__name__}")
    check_range("lim", lim, 0.0, low_open=True)
    check_int("res", res, 2)
    axis = torch.linspace(-lim, lim, res, dtype=W.dtype, device=W.device)
    zy, zx = torch.meshgrid(axis, axis, indexing="ij")
    Z = torch.stack([zx, zy], -1)                          # [res, res, 2]
    logits = Z @ W.T
    if b is not None:
        logits = logits + b.to(W.dtype)
    return logits.argmax(-1)
