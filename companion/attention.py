"""Attention variants: GAU, talking-heads, low-rank analysis, scale, VQ attention. Plain attention is SDPA.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_floating, check_int, check_range, check_same_shape

__all__: list[str] = []


# === gau-alpha ===
# The gated attention unit (GAU) of FLASH (Hua et al. 2022, arXiv:2202.10447) with the
# normalisations compared in GAU-alpha (kexue.fm/archives/9052): plain softmax, the
# length-scaled "softmax_plus" and FLASH's relu^2 / n.
__all__ += ["scale_offset", "gau_attention_normalize", "GatedAttentionUnit", "gau_param_count"]

GAU_NORMALIZATIONS = ("softmax", "softmax_plus", "squared_relu")


def scale_offset(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cheap "heads" from one shared projection: ``z * gamma[i] + beta[i]`` for i = 0..h-1.

    ``z`` ``[..., s]``; ``gamma``, ``beta`` ``[h, s]``. Returns a tuple of ``h`` tensors ``[..., s]``
    (GAU takes h = 2: queries and keys from the same ``Z``).
    """
    check_floating("z", z)
    check_floating("gamma", gamma)
    check_floating("beta", beta)
    if gamma.dim() != 2:
        raise ValueError(f"gamma: expected shape [h, s], got {tuple(gamma.shape)}")
    check_same_shape("gamma", gamma, "beta", beta)
    if z.dim() < 1 or z.shape[-1] != gamma.shape[-1]:
        raise ValueError(f"z: expected last dimension {gamma.shape[-1]} (that of gamma), "
                         f"got shape {tuple(z.shape)}")
    return (z.unsqueeze(-2) * gamma + beta).unbind(-2)  # z ⊙ γ_i + β_i, one per row of gamma


def gau_attention_normalize(scores: torch.Tensor, mask: torch.Tensor | None = None,
                            method: str = "softmax_plus", train_length: int = 512) -> torch.Tensor:
    """Turn attention scores ``[..., n, m]`` into weights ``[..., n, m]``, row by row.

    ``mask``: boolean, broadcastable to ``scores``, True = the key may be attended. With
    ``c`` = number of kept keys of a row (clamped >= 1):

    - ``"softmax"``:       A = softmax(S)
    - ``"softmax_plus"``:  A = softmax(log(c) / log(train_length) * S)   (entropy-invariant softmax;
      the factor multiplies the scores *before* masking, and is 1 when c = train_length)
    - ``"squared_relu"``:  A = relu(S)^2 / c   (FLASH; the caller scales S, e.g. by 1/sqrt(s))

    Masked keys get weight exactly 0; a row with no kept key is all zeros (never NaN).
    Half-precision scores are normalised in float32 and the result cast back.
    """
    check_floating("scores", scores)
    check_choice("method", method, GAU_NORMALIZATIONS)
    check_int("train_length", train_length, 2)
    if scores.dim() < 2:
        raise ValueError(f"scores: expected shape [..., n, m], got {tuple(scores.shape)}")
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a boolean tensor (True = keep), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            keep = torch.broadcast_to(mask.to(scores.device), scores.shape)
        except RuntimeError:
            raise ValueError(f"mask: expected a shape broadcastable to scores {tuple(scores.shape)}, "
                             f"got {tuple(mask.shape)}") from None
    work = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(work)
    if keep is None:
        count = torch.full((1,) * (s.dim() - 1) + (1,), float(s.shape[-1]), dtype=work, device=s.device)
    else:
        count = keep.sum(-1, keepdim=True).to(work).clamp(min=1.0)  # c: kept keys per row
    if method == "squared_relu":
        a = torch.relu(s).square() / count  # relu(S)^2 / c
        return (a if keep is None else a.masked_fill(~keep, 0.0)).to(scores.dtype)
    if method == "softmax_plus":
        s = s * (torch.log(count) / math.log(train_length))  # log c / log L_train, before the mask
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
        s = s.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # empty rows: finite, zeroed below
    a = torch.softmax(s, dim=-1)
    return (a if keep is None else a.masked_fill(~keep, 0.0)).to(scores.dtype)


def _gau_expanded_size(d_model: int, expansion) -> int:
    check_int("d_model", d_model, 1)
    check_range("expansion", expansion, 0, low_open=True)
    e = expansion * d_model
    if e != int(e):
        raise ValueError(f"expansion: expected expansion * d_model to be an integer, got {e!r}")
    return int(e)


def gau_param_count(d_model: int, expansion, key_size: int, bias: bool = False) -> int:
    """Parameters of one ``GatedAttentionUnit``, in closed form (e = expansion * d_model, s = key_size):

    d(2e + s) [W_u, W_v, W_z] + e d [W_o] + 2s [gamma_q, gamma_k]  =  3ed + ds + 2s,
    plus 2s [beta_q, beta_k] + (2e + s) + d [linear biases] with ``bias=True``.
    """
    e = _gau_expanded_size(d_model, expansion)
    s = check_int("key_size", key_size, 1)
    d = d_model
    count = d * (2 * e + s) + e * d + 2 * s
    if bias:
        count += 2 * s + (2 * e + s) + d
    return count


# From this many positions on, GAU's attention pads Q and K to the value width on the CPU when a
# backward pass will follow (see _attend_sdpa): measured on 2 cores, the padded fused kernel is as
# fast as the math kernel at n = 2048 (and 2x slower at 512) and keeps no [n, n] matrix.
_GAU_PAD_FROM = 2048


class GatedAttentionUnit(nn.Module):
    """One GAU layer (no norm, no residual: the caller wraps it, e.g. Post-Norm ``norm(x + gau(x))``).

    U = silu(X W_u) [B, n, e],  V = silu(X W_v) [B, n, e],  Z = silu(X W_z) [B, n, s],
    Q, K = scale_offset(Z, gamma, beta),  S = R(Q) R(K)^T / sqrt(s),
    A = gau_attention_normalize(S, mask, normalization, train_length),  O = (U ⊙ (A V)) W_o.
    "softmax" and "softmax_plus" run through SDPA (``F.scaled_dot_product_attention``, with
    softmax_plus's row factor folded into Q); "squared_relu", and ``use_sdpa = False``, form A
    explicitly (the reference the tests compare to). On the CPU, from n = 2048 on and when
    gradients are recorded, Q and K are zero-padded to the value width e: the CPU's fused kernel
    needs equal widths, and without it SDPA keeps the [n, n] matrices for the backward pass.

    ``rotary``: optional callable applied to Q and K ``[B, n, s]`` (e.g. RoPE); ``bias=False`` is
    GAU-alpha (no linear biases, no offsets beta). ``gamma`` starts at 1 as in GAU-alpha, or at
    N(0, gamma_init_std^2) as in FLASH (0.02: a nearly uniform first attention). ``forward(x [B, n, d_model], key_mask [B, n] | None)`` with
    ``key_mask`` True = a real token; ``causal=True`` adds the lower-triangular mask.
    """

    def __init__(self, d_model: int, expansion=2, key_size: int = 128,
                 normalization: str = "softmax_plus", causal: bool = False, bias: bool = False,
                 rotary=None, train_length: int = 512, gamma_init_std: float | None = None):
        super().__init__()
        self.expanded = _gau_expanded_size(d_model, expansion)
        self.key_size = check_int("key_size", key_size, 1)
        check_choice("normalization", normalization, GAU_NORMALIZATIONS)
        check_int("train_length", train_length, 2)
        if rotary is not None and not callable(rotary):
            raise TypeError(f"rotary: expected a callable or None, got {type(rotary).__name__}")
        self.d_model, self.normalization, self.train_length = d_model, normalization, train_length
        self.causal, self.rotary = bool(causal), rotary
        e, s = self.expanded, self.key_size
        self.uvz = nn.Linear(d_model, 2 * e + s, bias=bias)  # [W_u | W_v | W_z]
        self.out = nn.Linear(e, d_model, bias=bias)           # W_o
        if gamma_init_std is None:  # GAU-alpha (bert4keras): gamma = 1
            self.gamma = nn.Parameter(torch.ones(2, s))
        else:                       # FLASH: gamma ~ N(0, 0.02^2), a nearly uniform first attention
            check_range("gamma_init_std", gamma_init_std, 0.0, low_open=True)
            self.gamma = nn.Parameter(gamma_init_std * torch.randn(2, s))
        if bias:
            self.beta = nn.Parameter(torch.zeros(2, s))
        else:
            self.register_buffer("beta", torch.zeros(2, s), persistent=False)
        # softmax and softmax_plus run through SDPA; False forces the explicit reference path
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_floating("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape [B, n, {self.d_model}], got {tuple(x.shape)}")
        n, e, s = x.shape[1], self.expanded, self.key_size
        u, v, z = F.silu(self.uvz(x)).split([e, e, s], dim=-1)       # U, V, Z
        q, k = scale_offset(z, self.gamma, self.beta)                  # Q = Z⊙γ_q+β_q, K = Z⊙γ_k+β_k
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        mask = None
        if key_mask is not None:
            if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
                raise TypeError("key_mask: expected a boolean tensor [B, n] (True = real token)")
            if tuple(key_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"key_mask: expected shape {tuple(x.shape[:2])}, got {tuple(key_mask.shape)}")
            mask = key_mask[:, None, :]
        if self.causal:
            tri = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = tri if mask is None else mask & tri
        if self.normalization == "squared_relu" or not self.use_sdpa:
            av = self._attend_explicit(q, k, v, mask)
        else:
            av = self._attend_sdpa(q, k, v, mask, causal_only=self.causal and key_mask is None)
        return self.out(u * av)                                        # O = (U ⊙ AV) W_o

    def _attend_explicit(self, q, k, v, mask):
        """A V with A from the score matrix, normalised by ``gau_attention_normalize`` (the
        reference path, and the only one for squared_relu)."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.key_size)   # S = QK^T / sqrt(s)
        a = gau_attention_normalize(scores, mask, self.normalization, self.train_length)
        return a @ v

    def _attend_sdpa(self, q, k, v, mask, causal_only=False):
        """A V through SDPA (fused, no score matrix kept for backward on CPU/GPU kernels that
        support it). softmax_plus's per-row factor log(c)/log(L_train) multiplies the query row,
        which scales that row's scores alike; rows with no kept key give 0, as in the reference."""
        s, work = self.key_size, torch.promote_types(q.dtype, torch.float32)
        if self.normalization == "softmax_plus":
            if mask is None:
                count = torch.full((1, 1), float(q.shape[-2]), dtype=work, device=q.device)
            else:
                keep = torch.broadcast_to(mask, (q.shape[0], q.shape[-2], k.shape[-2]))
                count = keep.sum(-1).to(work).clamp(min=1.0)          # c: kept keys per row
            q = q * (torch.log(count) / math.log(self.train_length)).unsqueeze(-1).to(q.dtype)
        if (q.device.type == "cpu" and v.shape[-1] > s and q.shape[-2] >= _GAU_PAD_FROM
                and torch.is_grad_enabled()):
            # the CPU's fused (flash) kernel needs equal key and value widths; otherwise SDPA
            # falls back to its math kernel, which keeps the [n, n] matrices for backward.
            # Zero columns leave Q K^T unchanged: the fused kernel at e/s times the Q K^T work.
            q, k = F.pad(q, (0, v.shape[-1] - s)), F.pad(k, (0, v.shape[-1] - s))
        if causal_only:  # SDPA's own causal kernel: no mask tensor, masked blocks skipped
            return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                  is_causal=True, scale=1.0 / math.sqrt(s))[:, 0]
        empty = None
        if mask is not None:
            mask = torch.broadcast_to(mask, (q.shape[0], q.shape[-2], k.shape[-2]))
            empty = ~mask.any(-1, keepdim=True)                       # rows with no kept key
            mask = mask | empty                                       # (finite), zeroed below
            mask = mask[:, None]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask,
                                             scale=1.0 / math.sqrt(s))[:, 0]
        return out if empty is None else out.masked_fill(empty, 0.0)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, expanded={self.expanded}, key_size={self.key_size}, "
                f"normalization={self.normalization!r}, causal={self.causal}")


# === end gau-alpha ===


# === attention-low-rank-bottleneck ===
# Multi-head attention with a key size decoupled from the value head size (Bhojanapalli et al.
# 2020, arXiv:2002.07028) and talking-heads mixing (Shazeer et al. 2020, arXiv:2003.02436), as
# discussed in kexue.fm/archives/7325. Plain attention goes through SDPA; only the mixing is ours.
__all__ += ["multihead_attention", "MultiHeadAttention", "fit_attention_matrix"]


def _check_mix(name: str, mix, rows: int, cols: int) -> None:
    check_floating(name, mix)
    if tuple(mix.shape) != (rows, cols):
        raise ValueError(f"{name}: expected shape [{rows}, {cols}], got {tuple(mix.shape)}")


def multihead_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                        w_o: torch.Tensor, num_heads: int, pre_mix: torch.Tensor | None = None,
                        post_mix: torch.Tensor | None = None, causal: bool = False,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention ``[B, n, d] -> [B, n, d_out]`` with separate key and value head sizes.

    ``w_q, w_k`` ``[d, h*d_k]``, ``w_v`` ``[d, h*d_v]``, ``w_o`` ``[h*d_v, d_out]`` (``x @ w``);
    d_k and d_v are read from the shapes. Head i: ``J^(i) = Q^(i) K^(i)T / sqrt(d_k)``,
    ``P^(i) = softmax(J^(i) + M)``, ``O = [P^(1) V^(1), ..., P^(h) V^(h)] w_o``.

    Talking heads: ``pre_mix`` ``[h', h]`` mixes the logits across heads before the softmax,
    ``J^(i) = sum_j pre_mix[i, j] Jhat^(j)`` (the mask is applied *after* the mixing);
    ``post_mix`` ``[h, h']`` mixes the probabilities after it, ``P~^(i) = sum_j post_mix[i, j] P^(j)``.
    Without mixing the heads are independent and the work is done by
    ``F.scaled_dot_product_attention``. ``key_mask`` ``[B, n]``: True = a real key; a query with no
    key left to attend to gets a zero output.
    """
    check_floating("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [B, n, d], got {tuple(x.shape)}")
    h = check_int("num_heads", num_heads, 1)
    B, n, d = x.shape
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        check_floating(name, w)
        if w.dim() != 2 or w.shape[0] != d:
            raise ValueError(f"{name}: expected shape [{d}, num_heads * size], got {tuple(w.shape)}")
        if w.shape[1] % h:
            raise ValueError(f"{name}: expected a number of columns divisible by num_heads={h}, "
                             f"got {w.shape[1]}")
    check_same_shape("w_q", w_q, "w_k", w_k)
    dk, dv = w_q.shape[1] // h, w_v.shape[1] // h
    check_floating("w_o", w_o)
    if w_o.dim() != 2 or w_o.shape[0] != h * dv:
        raise ValueError(f"w_o: expected shape [{h * dv}, d_out], got {tuple(w_o.shape)}")
    h_mix = h                                          # h': the number of mixed logit heads
    if pre_mix is not None:
        check_floating("pre_mix", pre_mix)
        if pre_mix.dim() != 2 or pre_mix.shape[1] != h:
            raise ValueError(f"pre_mix: expected shape [h', {h}], got {tuple(pre_mix.shape)}")
        h_mix = pre_mix.shape[0]
    if post_mix is not None:
        _check_mix("post_mix", post_mix, h, h_mix)
    elif h_mix != h:
        raise ValueError(f"pre_mix: with {h_mix} mixed heads a post_mix [{h}, {h_mix}] is needed "
                         f"to return to {h} value heads")

    q = (x @ w_q).view(B, n, h, dk).transpose(1, 2)  # [B, h, n, d_k]
    k = (x @ w_k).view(B, n, h, dk).transpose(1, 2)
    v = (x @ w_v).view(B, n, h, dv).transpose(1, 2)  # [B, h, n, d_v]

    keep = None                                        # [B or 1, 1, n, n], True = may attend
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError("key_mask: expected a boolean tensor [B, n] (True = real key)")
        if tuple(key_mask.shape) != (B, n):
            raise ValueError(f"key_mask: expected shape {(B, n)}, got {tuple(key_mask.shape)}")
        keep = key_mask[:, None, None, :].to(x.device)
        if causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    empty = None if keep is None else ~keep.any(-1, keepdim=True)   # queries with no key at all

    if pre_mix is None and post_mix is None:           # independent heads: the fused kernel
        if keep is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty)
            o = o.masked_fill(empty, 0.0)
    else:                                              # talking heads: materialised [B, h, n, n]
        logits = q @ k.transpose(-1, -2) / math.sqrt(dk)               # Jhat^(j)
        if pre_mix is not None:
            logits = torch.einsum("ij,bjnm->binm", pre_mix, logits)     # J^(i) = sum_j L_ij Jhat^(j)
        if causal and keep is None:
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if keep is not None:                           # mask after mixing: no -inf enters the mix
            logits = logits.masked_fill(~keep, float("-inf"))
            if empty is not None:
                logits = logits.masked_fill(empty, 0.0)
        p = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        p = p.to(v.dtype)
        if post_mix is not None:
            p = torch.einsum("ij,bjnm->binm", post_mix, p)              # P~^(i) = sum_j L'_ij P^(j)
        if empty is not None:
            p = p.masked_fill(empty, 0.0)
        o = p @ v
    return o.transpose(1, 2).reshape(B, n, h * dv) @ w_o


class MultiHeadAttention(nn.Module):
    """Multi-head attention with its own key size and value head size, optionally talking heads.

    ``key_size`` (d_k, default d_model / num_heads) sets the width of queries and keys,
    ``head_size`` (d_v, same default) that of the values; the output is ``[B, n, d_model]``.
    ``talking_heads=True`` adds learned ``pre_mix`` and ``post_mix`` ``[h, h]``, initialised to the
    identity (so the module starts as plain multi-head attention). No biases.
    ``forward(x [B, n, d_model], key_mask [B, n] | None)`` calls ``multihead_attention``.
    """

    def __init__(self, d_model: int, num_heads: int, key_size: int | None = None,
                 head_size: int | None = None, talking_heads: bool = False, causal: bool = False):
        super().__init__()
        check_int("d_model", d_model, 1)
        h = check_int("num_heads", num_heads, 1)
        if (key_size is None or head_size is None) and d_model % h:
            raise ValueError(f"num_heads: expected a divisor of d_model={d_model} when key_size or "
                             f"head_size is left to its default, got {h}")
        dk = d_model // h if key_size is None else check_int("key_size", key_size, 1)
        dv = d_model // h if head_size is None else check_int("head_size", head_size, 1)
        self.d_model, self.num_heads, self.key_size, self.head_size = d_model, h, dk, dv
        self.causal = bool(causal)
        self.w_q = nn.Parameter(torch.randn(d_model, h * dk) / math.sqrt(d_model))
        self.w_k = nn.Parameter(torch.randn(d_model, h * dk) / math.sqrt(d_model))
        self.w_v = nn.Parameter(torch.randn(d_model, h * dv) / math.sqrt(d_model))
        self.w_o = nn.Parameter(torch.randn(h * dv, d_model) / math.sqrt(h * dv))
        if talking_heads:
            self.pre_mix = nn.Parameter(torch.eye(h))
            self.post_mix = nn.Parameter(torch.eye(h))
        else:
            self.pre_mix = self.post_mix = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return multihead_attention(x, self.w_q, self.w_k, self.w_v, self.w_o, self.num_heads,
                                   self.pre_mix, self.post_mix, self.causal, key_mask)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, key_size={self.key_size}, "
                f"head_size={self.head_size}, talking_heads={self.pre_mix is not None}, "
                f"causal={self.causal}")


def fit_attention_matrix(target: torch.Tensor, key_size: int, steps: int = 500, lr: float = 0.05,
                         seed: int = 0, num_heads: int = 1) -> tuple[float, torch.Tensor]:
    """How well can ``softmax(Q K^T)`` with ``Q, K`` in ``R^{n x key_size}`` reproduce ``target``?

    ``target`` ``[..., n, n]``: row-stochastic with positive entries (each leading index is fitted
    separately). Free ``Q, K`` (and, with ``num_heads > 1``, h heads of ``key_size`` mixed by learned
    weights before the softmax, ``S = sum_j lambda_j Q_j K_j^T``, i.e. one talking-heads output head)
    are fitted by Adam to the mean row ``KL(target || softmax(S))``, in the dtype of ``target``.
    Returns ``(mean KL over rows and targets, fitted P [..., n, n])``.

    Note: with free per-head Q_j, K_j, ``sum_j lambda_j Q_j K_j^T = [l_1 Q_1 .. l_h Q_h][K_1 ..
    K_h]^T`` is exactly one head of key size ``h * key_size``: this fits what one mixed output
    head can express, not what h heads sharing their Q, K across several mixed outputs can
    (the talking-heads setting, fitted jointly in the attention-low-rank-bottleneck notebook).
    """
    check_floating("target", target)
    if target.dim() < 2 or target.shape[-1] != target.shape[-2]:
        raise ValueError(f"target: expected shape [..., n, n], got {tuple(target.shape)}")
    if not (target > 0).all():
        raise ValueError(f"target: expected positive entries (full support), got min "
                         f"{target.min().item():.3g}")
    dev = (target.sum(-1) - 1).abs().max().item()
    if dev > 1e-5:
        raise ValueError(f"target: expected rows summing to 1 (atol 1e-5), got max deviation {dev:.3g}")
    dk = check_int("key_size", key_size, 1)
    check_int("steps", steps, 1)
    check_range("lr", lr, 0.0, low_open=True)
    h = check_int("num_heads", num_heads, 1)
    n, batch = target.shape[-1], tuple(target.shape[:-2])
    g = torch.Generator().manual_seed(seed)
    init = lambda: (torch.randn(*batch, h, n, dk, generator=g, dtype=target.dtype) * dk ** -0.25
                    ).to(target.device).requires_grad_()
    q, k = init(), init()                              # logits start ~ N(0, 1)
    lam = torch.ones(*batch, h, 1, 1, dtype=target.dtype, device=target.device, requires_grad=True)
    params = [q, k] + ([lam] if h > 1 else [])
    log_target = target.log()

    def mean_kl():
        s = (lam * (q @ k.transpose(-1, -2))).sum(-3)  # S = sum_j lambda_j Q_j K_j^T
        return (target * (log_target - torch.log_softmax(s, -1))).sum(-1).mean(), s

    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss, _ = mean_kl()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        loss, s = mean_kl()
    return loss.item(), torch.softmax(s, -1)


# === end attention-low-rank-bottleneck ===


# === attention-scale-gradient ===
# Which scale alpha in p = softmax(alpha * s) maximises the size of the softmax Jacobian
# (kexue.fm/archives/9812). scipy is imported inside the scalar functions that need it.
__all__ += ["softmax_jacobian_l1", "optimal_scale_gaussian", "cosine_mgf", "log_cosine_mgf",
            "optimal_scale_cosine"]


def softmax_jacobian_l1(s: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    r"""Half the entrywise L1 norm of the Jacobian of ``p = softmax(alpha * s)`` w.r.t. ``s``.

    ``dp_i/ds_j = alpha (p_i delta_ij - p_i p_j)``, so ``1/2 sum_ij |dp_i/ds_j| = alpha (1 - sum_i
    p_i^2) = alpha sum_i p_i (1 - p_i)``. ``s``: floating ``[..., n]``; ``alpha >= 0``: a float or
    a tensor broadcasting to ``s.shape[:-1]``. Returns ``[...]``. Computed as ``sum_i p_i (1 - p_i)``
    with ``1 - p_max`` taken as the sum of the other probabilities (never ``1 - sum p_i^2``, which
    cancels to 0 when one entry dominates): accurate in the tails, finite for any finite scores.
    """
    check_floating("s", s)
    if s.dim() == 0:
        raise ValueError("s: expected scores of shape [..., n], got a 0-dim tensor")
    if isinstance(alpha, torch.Tensor):
        check_floating("alpha", alpha)
        if (alpha < 0).any():
            raise ValueError("alpha: expected alpha >= 0, got a negative entry")
        a = alpha.to(s.dtype)
        logits = a.unsqueeze(-1) * s
    else:
        check_range("alpha", alpha, 0.0)
        a = alpha
        logits = alpha * s
    p = torch.softmax(logits, dim=-1)
    top = logits.argmax(-1, keepdim=True)
    rest = p.scatter(-1, top, 0.0).sum(-1, keepdim=True)           # 1 - p_max, without cancelling
    one_minus = (1 - p).scatter(-1, top, rest)                      # 1 - p_i (p_i <= 1/2 elsewhere)
    return a * (p * one_minus).sum(-1)


def optimal_scale_gaussian(n: int) -> float:
    r"""Maximiser of the mean-field objective ``f(a) = a (1 - e^{a^2} / n)`` for ``s ~ N(0, 1)``.

    Under the approximation ``sum_i p_i^2 ~= E[e^{2 a s}] / (n E[e^{a s}]^2) = e^{a^2} / n``,
    ``f'(a) = 0`` gives ``e^{a^2} (1 + 2 a^2) = n``, solved as ``a^2 + log(1 + 2 a^2) = log n`` by
    scipy's ``brentq`` on ``[0, sqrt(log n)]``. ``n >= 2`` (an int). The approximation itself holds
    only while ``e^{a^2} << n``; see the notebook attention-scale-gradient.
    """
    from scipy.optimize import brentq

    check_int("n", n, 2)
    log_n = math.log(n)
    return float(brentq(lambda a: a * a + math.log1p(2 * a * a) - log_n, 0.0, math.sqrt(log_n),
                        xtol=1e-14, rtol=4 * 2.0 ** -52))


def log_cosine_mgf(alpha: float, d: int) -> float:
    r"""``log E[exp(alpha s)]`` for ``s`` the cosine of two independent uniform directions in R^d.

    ``s`` has density ``(1 - s^2)^{(d-3)/2} / B(1/2, (d-1)/2)`` on ``[-1, 1]`` and
    ``E[e^{alpha s}] = Gamma(d/2) (alpha/2)^{1-d/2} I_{d/2-1}(alpha) = 0F1(; d/2; alpha^2/4)``.
    Computed as ``gammaln(d/2) + (1-d/2) log(alpha/2) + log ive(d/2-1, alpha) + alpha`` (``ive``
    is the exponentially scaled Bessel function, so nothing overflows); for ``alpha < 1``, or where
    ``ive`` would underflow (``alpha`` tiny against ``d``), as ``log1p`` of the series
    ``sum_{k>=1} (alpha^2/4)^k / (k! (d/2)_k)``. ``d >= 3``; the MGF is even in ``alpha``.
    """
    from scipy.special import gammaln, ive

    check_int("d", d, 3)
    check_range("alpha", alpha, None)
    a = abs(float(alpha))
    nu = d / 2 - 1
    bessel = ive(nu, a) if a >= 1.0 else 0.0
    if bessel > 1e-280:
        return float(gammaln(d / 2) + (1 - d / 2) * math.log(a / 2) + math.log(bessel) + a)
    t, term, total = a * a / 4, 1.0, 0.0                            # 0F1(; d/2; t) - 1
    for k in range(1, 100_000):
        term *= t / (k * (d / 2 + k - 1))
        total += term
        if term <= 1e-17 * total:
            break
    return math.log1p(total)


def cosine_mgf(alpha: float, d: int) -> float:
    r"""``E[exp(alpha s)]`` for the cosine ``s`` of two random directions in R^d (``d >= 3``);
    ``exp(log_cosine_mgf(alpha, d))`` (inf once it exceeds the float range)."""
    value = log_cosine_mgf(alpha, d)
    return math.exp(value) if value < 709.0 else math.inf


def optimal_scale_cosine(n: int, d: int) -> float:
    r"""Maximiser of the mean-field objective ``a (1 - M(2a) / (n M(a)^2))`` for cosine scores,
    with ``M = cosine_mgf(., d)``: the scale for a softmax over ``n`` cosine similarities in R^d.

    The ratio ``M(2a) / M(a)^2`` is evaluated in log space; the objective is positive on
    ``(0, a_0)``, where ``a_0`` is its root (``brentq``), and is maximised there by scipy's bounded
    ``minimize_scalar``. ``n >= 2``, ``d >= 3``.
    """
    from scipy.optimize import brentq, minimize_scalar

    check_int("n", n, 2)
    check_int("d", d, 3)
    log_n = math.log(n)

    def log_ratio(a):                                              # log(M(2a) / (n M(a)^2))
        return log_cosine_mgf(2 * a, d) - 2 * log_cosine_mgf(a, d) - log_n

    hi = 1.0
    while log_ratio(hi) < 0:
        hi *= 2
    a0 = brentq(log_ratio, 1e-12, hi, xtol=1e-12)
    res = minimize_scalar(lambda a: -a * (1 - math.exp(log_ratio(a))), bounds=(0.0, a0),
                          method="bounded", options={"xatol": 1e-10})
    return float(res.x)

# === end attention-scale-gradient ===


# === transformer-vq ===
__all__ += ["vq_attention", "vq_attention_naive", "VQAttention"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _vq_check(q, codes, v, codebook, causal, block_size, rel_bias, scale, k_hat) -> None:
    """Argument checks shared by ``vq_attention`` and ``vq_attention_naive``."""
    check_floating("q", q)
    check_floating("v", v)
    check_floating("codebook", codebook)
    if q.dim() < 2:
        raise ValueError(f"q: expected shape [..., n, dk], got {tuple(q.shape)}")
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _INT_DTYPES:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes: expected an integer tensor of code indices, got {got}")
    if tuple(codes.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"codes: expected shape {tuple(q.shape[:-1])} (q without its last dim), "
                         f"got {tuple(codes.shape)}")
    if v.dim() != q.dim() or tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"v: expected shape {tuple(q.shape[:-1])} + (dv,), got {tuple(v.shape)}")
    if codebook.dim() < 2 or codebook.shape[-1] != q.shape[-1]:
        raise ValueError(f"codebook: expected shape [..., c, {q.shape[-1]}] (dk of q), "
                         f"got {tuple(codebook.shape)}")
    try:
        ok = torch.broadcast_shapes(codebook.shape[:-2], q.shape[:-2]) == q.shape[:-2]
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"codebook: leading dims {tuple(codebook.shape[:-2])} do not broadcast to "
                         f"the batch dims {tuple(q.shape[:-2])} of q")
    for name, t in (("v", v), ("codebook", codebook)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
    c = codebook.shape[-2]
    if codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"codes: expected values in [0, {c - 1}] (c = {c} codes), "
                             f"got min {lo}, max {hi}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    check_int("block_size", block_size, 1)
    if scale is not None:
        check_range("scale", scale, 0.0, low_open=True)
    if rel_bias is not None:
        if not causal:
            raise ValueError("rel_bias: a relative bias is only defined for causal=True")
        check_floating("rel_bias", rel_bias)
        if rel_bias.dim() != 1 or not 1 <= rel_bias.numel() <= block_size:
            raise ValueError(f"rel_bias: expected a 1-D tensor of 1 to block_size = {block_size} "
                             f"entries (one per lag), got shape {tuple(rel_bias.shape)}")
    if k_hat is not None:
        if not causal:
            raise ValueError("k_hat: straight-through keys are only used with causal=True")
        check_floating("k_hat", k_hat)
        check_same_shape("q", q, "k_hat", k_hat)


def _gather_codes(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``K_hat = Delta C``: the code vector of every position, ``[..., n, dk]``."""
    if codebook.dim() == 2:
        return F.embedding(codes.long(), codebook)
    batch, (c, dk) = codes.shape[:-1], codebook.shape[-2:]
    cb = codebook.expand(*batch, c, dk)
    return torch.gather(cb, -2, codes.long().unsqueeze(-1).expand(*codes.shape, dk))


def _lag_bias(rel_bias: torch.Tensor, lag: torch.Tensor) -> torch.Tensor:
    """``B[t, s] = rel_bias[t - s]`` for ``0 <= t - s < len(rel_bias)``, else 0 (any lag shape)."""
    w = rel_bias.numel()
    inside = (lag >= 0) & (lag < w)
    return torch.where(inside, rel_bias[lag.clamp(0, w - 1)], rel_bias.new_zeros(()))


def vq_attention_naive(q: torch.Tensor, codes: torch.Tensor, v: torch.Tensor,
                       codebook: torch.Tensor, causal: bool = True, block_size: int = 64,
                       rel_bias: torch.Tensor | None = None, scale: float | None = None, *,
                       k_hat: torch.Tensor | None = None,
                       grad_through_cache: bool = False) -> torch.Tensor:
    r"""The quadratic reference of ``vq_attention``: materialise the ``[n, n]`` scores.

    ``softmax(scale * Q K_hat^T + B + M) V`` with ``K_hat = C[codes]`` (or ``k_hat`` where given),
    ``B[t, s] = rel_bias[t - s]`` for lags ``0 <= t - s < len(rel_bias)`` and ``M`` the causal mask.
    Same arguments and shapes as ``vq_attention``; ``block_size`` and ``grad_through_cache`` do not
    change the result here (the reference differentiates through everything). O(n^2) memory.
    """
    _vq_check(q, codes, v, codebook, causal, block_size, rel_bias, scale, k_hat)
    keys = k_hat if k_hat is not None else _gather_codes(codebook, codes)
    n, dk = q.shape[-2:]
    scale = dk ** -0.5 if scale is None else scale
    logits = scale * q @ keys.transpose(-1, -2)                       # [..., n, n]
    if causal:
        t = torch.arange(n, device=q.device)
        lag = t[:, None] - t[None, :]                                  # t - s
        if rel_bias is not None:
            logits = logits + _lag_bias(rel_bias.to(logits.dtype), lag)
        logits = logits.masked_fill(lag < 0, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def _code_sums(codes: torch.Tensor, v: torch.Tensor, c: int, offset: int = 0,
               slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts ``Delta^T 1`` ``[..., slots, c]`` and value sums ``Delta^T V``
    ``[..., slots, c, dv]`` of groups of positions (``codes [..., g, l]``, ``v [..., g, l, dv]``),
    by scatter-add (no one-hot matrix). Group ``b`` lands in slot ``b + offset``; ``slots``
    (default ``g``, at most ``g + offset``) slots are kept, groups pushed past them are dropped."""
    *batch, g, l = codes.shape
    dv = v.shape[-1]
    slots = g if slots is None else slots
    # every group is scattered, into g + offset slots, and the slots past `slots` are dropped: no
    # zero-size slice when g <= offset (which torch.compile's Inductor cannot lower)
    slot = codes.long() + c * (torch.arange(g, device=codes.device) + offset)[:, None]
    slot = slot.reshape(*batch, g * l)
    size = (g + offset) * c
    counts = v.new_zeros(*batch, size).scatter_add_(-1, slot, v.new_ones(()).expand(slot.shape))
    sums = v.new_zeros(*batch, size, dv).scatter_add_(
        -2, slot.unsqueeze(-1).expand(*slot.shape, dv), v.reshape(*batch, g * l, dv))
    counts, sums = counts[..., : slots * c], sums[..., : slots * c, :]
    return counts.reshape(*batch, slots, c), sums.reshape(*batch, slots, c, dv)


def _cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Cumulative sum along ``dim < -1``. Up to 64 entries: ``tril(1) @ x``, one matrix product
    (torch's strided CPU scan over a leading dim is several times slower, and a loop of in-place
    slice additions is as fast on one core but many small ops)."""
    k = x.shape[dim]
    if k > 64:
        return x.cumsum(dim)
    tri = torch.ones(k, k, dtype=x.dtype, device=x.device).tril_()
    return (tri @ x.flatten(dim + 1)).view(x.shape)


def _log_counts(counts: torch.Tensor) -> torch.Tensor:
    """``log(count)`` with ``-inf`` for unused codes (no ``log(0)`` is evaluated)."""
    return counts.clamp(min=1).log().masked_fill(counts == 0, float("-inf"))


# Default chunk of causal vq_attention: as many blocks as keep the chunk's scores and per-block
# caches, prod(batch) * (l (2l + c) + c (dv + 1)) elements per block, under this bound (at least
# one block). CPU: 2^22 elements = 16 MiB in float32, 12 blocks of 128 at 4 heads, c = 256,
# dv = 64 (the time is flat from 2 to 16 such blocks). Accelerators: 2^24, fewer kernel launches.
_VQ_CHUNK_ELEMENTS_CPU, _VQ_CHUNK_ELEMENTS_ACCELERATOR = 1 << 22, 1 << 24


def vq_attention(q: torch.Tensor, codes: torch.Tensor, v: torch.Tensor, codebook: torch.Tensor,
                 causal: bool = True, block_size: int = 64, rel_bias: torch.Tensor | None = None,
                 scale: float | None = None, *, k_hat: torch.Tensor | None = None,
                 grad_through_cache: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    r"""Softmax attention with vector-quantised keys in O(n c d) time and memory (Transformer-VQ).

    Shapes: ``q [..., n, dk]``, ``codes [..., n]`` (integers in ``[0, c)``, the code of each key),
    ``v [..., n, dv]``, ``codebook [c, dk]`` (or ``[..., c, dk]`` broadcasting to the batch dims);
    returns ``[..., n, dv]`` in the dtype of ``q`` (fp16/bf16 inputs are computed in float32).
    ``scale`` defaults to ``1/sqrt(dk)``. The result equals ``vq_attention_naive`` up to rounding.

    Since ``K_hat = Delta C`` with one-hot rows, ``exp(Q K_hat^T) = exp(Q C^T) Delta^T``: all keys
    sharing code ``j`` act as one key ``C_j`` with weight ``count_j`` and the mean value ``Vbar_j``:

    * ``causal=False``: ``O = softmax(scale Q C^T + log count) Vbar`` (a softmax over c slots).
    * ``causal=True``, blocks of ``l = block_size`` positions: the queries of block i attend
      exactly (``scale q.k_hat + B + M``) to the keys of blocks i and i-1, and to c code slots
      ``scale q.C_j + log U^cnt_{i-2, j}`` carrying the mean value of blocks ``<= i-2``, with
      ``U_i = U_{i-1} + Delta_[i]^T V_[i]`` (a cumulative sum over blocks; one softmax over
      ``2l + c`` slots per query). ``rel_bias`` (``[w]``, ``w <= l``) adds ``rel_bias[t - s]``
      for lags below ``w``, which always fall in blocks i and i-1, so the result does not depend
      on ``block_size``. ``k_hat`` (``[..., n, dk]``, e.g. straight-through keys from a quantizer,
      equal in value to ``C[codes]``) replaces ``C[codes]`` in these exact local scores only, so
      that gradients reach the keys there. Unless ``grad_through_cache``, the cache ``U_{i-2}`` is
      detached, as in the paper (values older than one block get no gradient from later queries).

    The blocks are processed in chunks of ``chunk_size`` blocks (``causal=True`` only), carrying
    the cache (counts ``[..., c]``, value sums ``[..., c, dv]`` of the blocks before the chunk's
    previous one) from chunk to chunk, so that only one chunk's scores ``[..., chunk, l, 2l + c]``
    and caches exist at a time: the peak memory is the ``[..., n, dv]`` output plus one chunk.
    ``chunk_size=None`` takes as many blocks as keep ``prod(batch) (l (2l + c) + c (dv + 1))``
    elements per block under ``2^22`` in all on the CPU, ``2^24`` on accelerators (at least one
    block). The result does not depend on ``chunk_size``, an int >= 1.
    """
    _vq_check(q, codes, v, codebook, causal, block_size, rel_bias, scale, k_hat)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if q.numel() == 0 or v.numel() == 0:  # an empty batch or sequence: an empty result
        return v * 0
    out_dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    codebook = codebook.to(work)
    *batch, n, dk = q.shape
    c, dv = codebook.shape[-2], v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale

    if not causal:
        q, v = q.to(work), v.to(work)
        counts, sums = _code_sums(codes.unsqueeze(-2), v.unsqueeze(-3), c)   # Delta^T 1, Delta^T V
        counts, sums = counts.squeeze(-2), sums.squeeze(-3)
        v_bar = sums / counts.clamp(min=1).unsqueeze(-1)               # mean value per code
        logits = (scale * q) @ codebook.transpose(-1, -2) + _log_counts(counts).unsqueeze(-2)
        return (torch.softmax(logits, dim=-1) @ v_bar).to(out_dtype)

    l = block_size
    m = -(-n // l)                                                     # number of blocks
    if chunk_size is None:
        per_block = math.prod(batch) * (l * (2 * l + c) + c * (dv + 1))
        budget = (_VQ_CHUNK_ELEMENTS_CPU if q.device.type == "cpu"
                  else _VQ_CHUNK_ELEMENTS_ACCELERATOR)
        chunk_size = max(1, budget // per_block)
    # additive bias and causal mask of the scores on the current ([l, l], lag r - j) and previous
    # block ([l, l], lag l + r - j, always >= 1)
    r = torch.arange(l, device=q.device)
    lag = r[:, None] - r[None, :]
    bias_cur = bias_prev = None
    if rel_bias is not None:
        rb = rel_bias.to(work)
        bias_cur = _lag_bias(rb, lag).masked_fill(lag < 0, float("-inf"))
        bias_prev = _lag_bias(rb, lag + l)
    future = lag < 0

    def blocks(x, lo, hi, front, count):          # rows lo..hi of x as `count` blocks, padded
        x = x[..., lo:hi, :]
        pad = count * l - front - (hi - lo)
        if front or pad:
            x = F.pad(x, (0, 0, front, pad))
        return x.reshape(*x.shape[:-2], count, l, x.shape[-1])

    out = None
    state = None                                   # U_{s-2}: counts [..., c], sums [..., c, dv]
    for s in range(0, m, chunk_size):
        last = s + chunk_size >= m                 # (no min(): simpler symbolic shapes)
        e = m if last else s + chunk_size          # blocks s..e-1, g of them
        g, hi = e - s, n if last else e * l
        lo, front = (s - 1) * l if s else 0, 0 if s else l   # with the previous block s-1
        qb = blocks(q, s * l, hi, 0, g).to(work) * scale              # [..., g, l, dk]
        cb = blocks(codes.unsqueeze(-1), lo, hi, front, g + 1).squeeze(-1)  # [..., g+1, l]
        vb = blocks(v, lo, hi, front, g + 1).to(work)                      # [..., g+1, l, dv]
        kb = (blocks(k_hat, lo, hi, front, g + 1).to(work) if k_hat is not None
              else _gather_codes(codebook, cb.flatten(-2)).unflatten(-2, (g + 1, l)))

        # exact scores of the current and previous block: scale q.k_hat + B, causal mask
        cur = qb @ kb[..., 1:, :, :].transpose(-1, -2)                # [..., g, l, l]
        prev = qb @ kb[..., :-1, :, :].transpose(-1, -2)              # [..., g, l, l]
        del kb
        if bias_cur is not None:
            cur, prev = cur.add_(bias_cur), prev.add_(bias_prev)
        else:
            cur = cur.masked_fill_(future, float("-inf"))
        if s == 0:
            prev[..., 0, :, :] = float("-inf")                        # block 0: no previous block

        # cache of blocks <= i-2 for the chunk's blocks, U_{s-2} .. U_{e-2} in slots 0 .. g:
        # block b of the chunk's g + 1 (block s - 1 + b) lands in slot b + 1 (+ the carried
        # U_{s-2} in slot 0), then a cumulative sum; block e-1 is dropped (it enters at e+1)
        src = vb if grad_through_cache else vb.detach()
        counts, sums = (_code_sums(cb, src, c, offset=1, slots=g + 1) if s else
                        _code_sums(cb[..., 1:, :], src[..., 1:, :, :], c, offset=2, slots=g + 1))
        if state is not None:
            counts[..., 0, :] += state[0]
            sums[..., 0, :, :] += state[1]
        counts, sums = _cumsum(counts, -2), _cumsum(sums, -3)        # [..., g+1, c(, dv)]
        state = counts[..., g, :].clone(), sums[..., g, :, :].clone()  # U_{e-2} for the next chunk
        counts, sums = counts[..., :g, :], sums[..., :g, :, :]
        v_bar = sums.div_(counts.clamp(min=1).unsqueeze(-1))          # mean value per code
        cache = (qb.flatten(-3, -2) @ codebook.transpose(-1, -2))     # scale Q_[i] C^T
        cache = cache.unflatten(-2, (g, l)).add_(_log_counts(counts).unsqueeze(-2))  # + log count
        del qb, counts, sums

        # one softmax over the 2l + c slots, without concatenating them
        with torch.no_grad():
            top = torch.maximum(torch.maximum(cur.amax(-1), prev.amax(-1)), cache.amax(-1))
        top = top.unsqueeze(-1)
        cur, prev, cache = cur.sub_(top).exp_(), prev.sub_(top).exp_(), cache.sub_(top).exp_()
        den = cur.sum(-1, keepdim=True).add_(prev.sum(-1, keepdim=True)).add_(
            cache.sum(-1, keepdim=True))
        o = cur @ vb[..., 1:, :, :]
        o = o.add_(prev @ vb[..., :-1, :, :]).add_(cache @ v_bar).div_(den)   # [..., g, l, dv]
        del cur, prev, cache, v_bar, vb, den
        o = o.flatten(-3, -2)
        if s == 0 and e == m:                      # a single chunk
            return o[..., :n, :].to(out_dtype)
        if out is None:
            out = o.new_empty(*batch, n, dv, dtype=out_dtype)
        out[..., s * l: hi, :] = o[..., : hi - s * l, :]
    return out


class VQAttention(nn.Module):
    """Single-head causal attention with vector-quantised keys (the layer of Transformer-VQ).

    ``q = rmsnorm(x W_q)``, ``k = rmsnorm(x W_k)`` (``[B, n, key_size]``), ``(k_hat, codes, aux) =
    quantizer(k)``, ``y = vq_attention(q, codes, x W_v, quantizer.codebook, block_size, rel_bias,
    k_hat=k_hat) W_o`` with a learned lag bias ``rel_bias [block_size]`` (zeros at init).
    ``quantizer`` is any module returning ``(z_q, indices, aux_loss)`` and holding ``.codebook``
    ``[c, key_size]`` (e.g. ``companion.quantize.VectorQuantizer``). ``forward(x [B, n, d_model])``
    returns ``(y [B, n, d_model], codes [B, n], aux_loss)``.
    """

    def __init__(self, d_model: int, key_size: int, quantizer: nn.Module, block_size: int = 512):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("key_size", key_size, 1)
        check_int("block_size", block_size, 1)
        if not isinstance(quantizer, nn.Module) or not hasattr(quantizer, "codebook"):
            raise TypeError("quantizer: expected an nn.Module with a .codebook [c, key_size], "
                            f"got {type(quantizer).__name__}")
        cb = quantizer.codebook
        if not isinstance(cb, torch.Tensor) or cb.dim() != 2 or cb.shape[-1] != key_size:
            got = tuple(cb.shape) if isinstance(cb, torch.Tensor) else type(cb).__name__
            raise ValueError(f"quantizer: expected a .codebook of shape [c, key_size={key_size}] "
                             f"(codes live in the key space), got {got}")
        self.d_model, self.key_size, self.block_size = d_model, key_size, block_size
        self.w_q = nn.Linear(d_model, key_size, bias=False)
        self.w_k = nn.Linear(d_model, key_size, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        self.quantizer = quantizer
        self.rel_bias = nn.Parameter(torch.zeros(block_size))

    def forward(self, x: torch.Tensor):
        check_floating("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape [B, n, d_model={self.d_model}], "
                             f"got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:  # an empty batch or sequence: empty results
            return (self.w_o(self.w_v(x)), torch.zeros(x.shape[:2], dtype=torch.long,
                    device=x.device), x.new_zeros(()))
        q = F.rms_norm(self.w_q(x), (self.key_size,))
        k = F.rms_norm(self.w_k(x), (self.key_size,))
        k_hat, codes, aux_loss = self.quantizer(k)
        v = self.w_v(x)
        codebook = self.quantizer.codebook.to(q.dtype)
        o = vq_attention(q, codes, v, codebook, causal=True, block_size=self.block_size,
                         rel_bias=self.rel_bias.to(q.dtype), k_hat=k_hat.to(q.dtype))
        return self.w_o(o), codes, aux_loss

# === end transformer-vq ===


# === decoder-only-low-rank ===
# Attention patterns of decoder-only, prefix-LM and mixed-direction models, and the spectrum of an
# attention matrix (kexue.fm/archives/9529). The attention itself is SDPA with boolean masks.
__all__ += ["attention_mask", "mixed_direction_attention", "attention_spectrum"]

ATTENTION_MASK_KINDS = ("bidirectional", "causal", "anticausal", "prefix")


def attention_mask(kind: str, n: int, prefix_len: int | None = None, device=None) -> torch.Tensor:
    """Boolean ``[n, n]`` mask, True where query i may attend key j (the SDPA convention).

    ``"bidirectional"``: all pairs; ``"causal"``: ``j <= i``; ``"anticausal"``: ``j >= i``;
    ``"prefix"`` (prefix-LM, UniLM): ``j < prefix_len or j <= i``, i.e. the first ``prefix_len``
    positions attend each other in both directions, later ones see the whole prefix and themselves
    causally, and no prefix position sees a later one. ``prefix_len`` in ``[0, n]`` is required for
    ``"prefix"`` (0 is causal, n bidirectional) and must be None otherwise.
    """
    check_choice("kind", kind, ATTENTION_MASK_KINDS)
    check_int("n", n, 1)
    if kind == "prefix":
        if prefix_len is None:
            raise ValueError("prefix_len: expected an int in [0, n] for kind='prefix', got None")
        check_int("prefix_len", prefix_len, 0, n)
    elif prefix_len is not None:
        raise ValueError(f"prefix_len: only used with kind='prefix', got {prefix_len!r} for {kind!r}")
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    if kind == "bidirectional":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if kind == "causal":
        return j <= i
    if kind == "anticausal":
        return j >= i
    return (j < prefix_len) | (j <= i)


def mixed_direction_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              forward_heads: int) -> torch.Tensor:
    """Multi-head attention whose first ``forward_heads`` heads are causal and the rest anticausal.

    ``q, k [B, h, n, dk]``, ``v [B, h, n, dv]`` -> ``[B, h, n, dv]``. Every attention matrix is
    triangular with a positive diagonal (full rank), yet one layer with both kinds of heads lets
    every token reach every other. Computed by ``F.scaled_dot_product_attention`` with a boolean
    mask per head (True = may attend), scale ``1/sqrt(dk)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, h, n, d], got {tuple(t.shape)}")
    check_same_shape("q", q, "k", k)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape {tuple(q.shape[:3])} + (dv,), got {tuple(v.shape)}")
    h, n = q.shape[1], q.shape[2]
    check_int("forward_heads", forward_heads, 0, h)
    forward = torch.arange(h, device=q.device)[:, None, None] < forward_heads        # [h, 1, 1]
    mask = torch.where(forward, attention_mask("causal", n, device=q.device),
                       attention_mask("anticausal", n, device=q.device))            # [h, n, n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_spectrum(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and effective rank of attention matrices ``p [..., n, n]``.

    Returns ``(sigma [..., n], erank [...])``: ``sigma = torch.linalg.svdvals(p)`` (descending) and
    ``erank = exp(-sum_i q_i log q_i)`` with ``q = sigma / sum(sigma)`` (Roy and Vetterli's effective
    rank: between 1 and n, equal to r for r equal nonzero singular values; ``0 log 0 = 0``). Unlike
    ``matrix_rank`` it has no threshold and measures how evenly the spectrum is spread.
    """
    check_floating("p", p)
    if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"p: expected square matrices [..., n, n], got {tuple(p.shape)}")
    sigma = torch.linalg.svdvals(p)
    q = sigma / sigma.sum(-1, keepdim=True)
    erank = torch.exp(-torch.special.xlogy(q, q).sum(-1))
    return sigma, erank

# === end decoder-only-low-rank ===
