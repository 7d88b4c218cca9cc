"""Heads: span pointers, half-pointers with powered probabilities, conditional LayerNorm and a
linear-chain CRF, the extraction heads of three competition baselines, with their helpers (BIO
labels, the LCS soft-match F1 and token-to-character offsets).

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_floating, check_int, check_range, check_same_shape, reduce

__all__: list[str] = []


# === competition-baselines ===
# Notebook: notebooks/competition-baselines.ipynb (kexue.fm/archives/7321). Equation labels
# in the docstrings (eq. `span-decode`, ...) are the notebook's.
__all__ += ["span_pointer_log_probs", "SpanPointerHead", "decode_best_span", "HalfPointerHead",
            "powered_bce", "decode_pointer_spans", "ConditionalLayerNorm", "LinearChainCRF",
            "bio_labels", "lcs_f1", "rematch_offsets"]


def _check_mask(name: str, mask, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name}: expected a bool tensor (True = kept), got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


# ---- span pointer (reading comprehension) ---------------------------------------------------
def span_pointer_log_probs(start_logits: torch.Tensor, end_logits: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked log-softmax over positions of the start and end logits (eq. `span-pointer`).

    start_logits, end_logits: float [B, T]; mask: bool [B, T], True where a position may hold
    the answer. Returns (log_p_start, log_p_end), float [B, T], ``-inf`` at masked positions.
    Masked logits are replaced by the dtype's most negative finite value before the softmax
    (not -1e12, which overflows fp16), so a row with at least one kept position is exact.
    """
    check_floating("start_logits", start_logits)
    check_floating("end_logits", end_logits)
    if start_logits.dim() != 2:
        raise ValueError(f"start_logits: expected shape [B, T], got {tuple(start_logits.shape)}")
    check_same_shape("start_logits", start_logits, "end_logits", end_logits)
    _check_mask("mask", mask, start_logits.shape)
    out = []
    for z in (start_logits, end_logits):
        z = z.masked_fill(~mask, torch.finfo(z.dtype).min)
        out.append(torch.log_softmax(z, -1).masked_fill(~mask, -math.inf))
    return out[0], out[1]


class SpanPointerHead(nn.Module):
    """One linear map from encoder states [B, T, d_model] to start and end logits, then
    :func:`span_pointer_log_probs`: ``forward(h, mask) -> (log_p_start, log_p_end)``."""

    def __init__(self, d_model: int):
        super().__init__()
        check_int("d_model", d_model, 1)
        self.proj = nn.Linear(d_model, 2)

    def forward(self, h: torch.Tensor, mask: torch.Tensor):
        s, e = self.proj(h).unbind(-1)
        return span_pointer_log_probs(s, e, mask)


def decode_best_span(log_p_start: torch.Tensor, log_p_end: torch.Tensor, max_len: int = 16,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over i <= j < i + max_len of log p^s_i + log p^e_j (eq. `span-decode`).

    log_p_start, log_p_end: float [B, T]; valid: optional bool [B, T], True where a start or an
    end may lie (exclude question and special tokens). Returns LongTensor [B, 2] of (i, j),
    end inclusive, in O(T max_len): the end scores are unfolded into a [B, T, max_len] band.
    Ties go to the smallest i, then the smallest j; a row with no valid pair returns (0, 0).
    """
    check_floating("log_p_start", log_p_start)
    check_floating("log_p_end", log_p_end)
    if log_p_start.dim() != 2:
        raise ValueError(f"log_p_start: expected shape [B, T], got {tuple(log_p_start.shape)}")
    check_same_shape("log_p_start", log_p_start, "log_p_end", log_p_end)
    check_int("max_len", max_len, 1)
    ls, le = log_p_start, log_p_end
    if valid is not None:
        _check_mask("valid", valid, ls.shape)
        ls, le = ls.masked_fill(~valid, -math.inf), le.masked_fill(~valid, -math.inf)
    B, T = ls.shape
    L = min(max_len, T)
    band = F.pad(le, (0, L - 1), value=-math.inf).unfold(1, L, 1)        # [B, T, L]: e_{i+k}
    flat = (ls.unsqueeze(-1) + band).reshape(B, T * L).argmax(-1)
    i = flat // L
    return torch.stack([i, i + flat % L], -1)


# ---- half-pointer half-tagging and powered probabilities -------------------------------------
class HalfPointerHead(nn.Module):
    """Per token and type, two independent logits (start, end): ``forward(h [B, T, d_model]) ->
    logits [B, T, num_types, 2]``; the probabilities are sigmoid(logits) ** power
    (eq. `powered-p`), trained with :func:`powered_bce`."""

    def __init__(self, d_model: int, num_types: int = 1):
        super().__init__()
        check_int("d_model", d_model, 1)
        self.num_types = check_int("num_types", num_types, 1)
        self.proj = nn.Linear(d_model, 2 * num_types)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).unflatten(-1, (self.num_types, 2))


_Z_ASYMPTOTIC = 40.0  # beyond, log(1 - sigmoid(z)^n) = log n - z to within e^-40


def powered_bce(logits: torch.Tensor, targets: torch.Tensor, power: float = 1,
                mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of p^n, p = sigmoid(logits) (eq. `powered-bce`):

        loss = -t log p^n - (1 - t) log(1 - p^n),  log p^n = -n softplus(-z),
        log(1 - p^n) = log1mexp(log p^n)   (log(-expm1(a)) for a > -ln 2, log1p(-exp(a)) else),

    with each branch fed a safe dummy where it is not selected (finite gradients at |z| = 80 in
    float32) and the asymptote log n - z for z > 40, where log p^n underflows to 0.
    logits, targets: float, same shape (targets in [0, 1]); power n > 0; mask: optional bool
    tensor equal to the leading dims of logits (True = kept). reduction "none" returns the
    elementwise loss (0 where masked), "sum" its sum, "mean" the sum over kept entries divided
    by their number.
    """
    check_floating("logits", logits)
    check_floating("targets", targets)
    check_same_shape("logits", logits, "targets", targets)
    check_range("power", power, 0, low_open=True)
    z, t = logits, targets.to(logits.dtype)
    log_pn = power * F.logsigmoid(z)                                   # a = log p^n <= 0
    big = z > _Z_ASYMPTOTIC
    near = (log_pn > -math.log(2)) & ~big
    dummy = torch.full_like(log_pn, -1.0)
    a_near = torch.where(near, log_pn, dummy)
    a_far = torch.where(near | big, dummy, log_pn)
    z_big = torch.where(big, z, torch.full_like(z, _Z_ASYMPTOTIC))
    log_1m = torch.where(big, math.log(power) - z_big,
                         torch.where(near, torch.log(-torch.expm1(a_near)),
                                     torch.log1p(-torch.exp(a_far))))
    loss = -(t * log_pn + (1 - t) * log_1m)
    if mask is None:
        return reduce(loss, reduction)
    _check_mask("mask", mask, logits.shape[:mask.dim()] if isinstance(mask, torch.Tensor)
                else ())
    keep = mask.reshape(mask.shape + (1,) * (logits.dim() - mask.dim())).expand_as(loss)
    loss = loss.masked_fill(~keep, 0.0)
    if reduction == "mean":
        return loss.sum() / keep.sum().clamp_min(1)
    return reduce(loss, reduction)


def decode_pointer_spans(p_start: torch.Tensor, p_end: torch.Tensor,
                         threshold: float = 0.4) -> list[tuple[int, int]]:
    """Spans of one sequence from start/end probabilities [T] (eq. `pointer-decode`): every i
    with p_start[i] > threshold pairs with the nearest j >= i with p_end[j] > threshold; a
    start with no end after it is dropped. Returns [(i, j), ...] by increasing i, end
    inclusive. Nested spans sharing an end cannot both be found (each start takes the
    nearest end)."""
    check_floating("p_start", p_start)
    check_floating("p_end", p_end)
    if p_start.dim() != 1:
        raise ValueError(f"p_start: expected shape [T], got {tuple(p_start.shape)}")
    check_same_shape("p_start", p_start, "p_end", p_end)
    check_range("threshold", threshold, 0, 1)
    starts = torch.nonzero(p_start > threshold).flatten()
    ends = torch.nonzero(p_end > threshold).flatten()
    k = torch.searchsorted(ends, starts)
    ok = k < len(ends)
    return list(zip(starts[ok].tolist(), ends[k[ok]].tolist()))


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose gain and bias depend on a condition c (eq. `cln`):

        CLN(h | c) = (gamma + W_gamma c) * (h - mu) / sigma + (beta + W_beta c),

    ``forward(h [B, ..., d_model], c [B, cond_dim])``. W_gamma and W_beta start at zero, so an
    untrained CLN is exactly ``nn.LayerNorm(d_model, eps)``.
    """

    def __init__(self, d_model: int, cond_dim: int, eps: float = 1e-12):
        super().__init__()
        self.d_model = check_int("d_model", d_model, 1)
        self.cond_dim = check_int("cond_dim", cond_dim, 1)
        check_range("eps", eps, 0, low_open=True)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.cond_weight = nn.Linear(cond_dim, d_model, bias=False)
        self.cond_bias = nn.Linear(cond_dim, d_model, bias=False)
        nn.init.zeros_(self.cond_weight.weight)
        nn.init.zeros_(self.cond_bias.weight)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        check_floating("h", h)
        check_floating("c", c)
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h: expected last dim d_model={self.d_model}, got {h.shape[-1]}")
        if c.dim() != 2 or c.shape[-1] != self.cond_dim or c.shape[0] != h.shape[0]:
            raise ValueError(f"c: expected shape [{h.shape[0]}, {self.cond_dim}], "
                             f"got {tuple(c.shape)}")
        lead = (c.shape[0],) + (1,) * (h.dim() - 2) + (self.d_model,)
        gain = (self.weight + self.cond_weight(c)).reshape(lead)
        shift = (self.bias + self.cond_bias(c)).reshape(lead)
        return gain * F.layer_norm(h, (self.d_model,), eps=self.eps) + shift


# ---- linear-chain CRF ------------------------------------------------------------------------
class LinearChainCRF(nn.Module):
    """Linear-chain CRF over ``num_tags`` tags (eq. `crf`), batch first:

        log p(y | x) = b_{y_1} + sum_t U_{t, y_t} + sum_{t>1} A_{y_{t-1}, y_t} + e_{y_T} - log Z,

    with emissions U [B, T, K] from the encoder, transitions A [K, K] (from, to) and start/end
    scores b, e (as in pytorch-crf, so the two can be compared; all start at zero). log Z comes
    from the forward algorithm (a logsumexp over a [B, K, K] broadcast per step, eq.
    `crf-forward`), the best path from Viterbi (max with backpointers, then a backtrack that
    gathers over the batch at once). ``mask`` [B, T] bool, True on real tokens, must be a prefix
    per row with mask[:, 0] all True (right padding), as in pytorch-crf.
    """

    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = check_int("num_tags", num_tags, 1)
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start_transitions = nn.Parameter(torch.zeros(num_tags))
        self.end_transitions = nn.Parameter(torch.zeros(num_tags))

    def _check(self, emissions, mask):
        check_floating("emissions", emissions)
        if emissions.dim() != 3 or emissions.shape[-1] != self.num_tags:
            raise ValueError(f"emissions: expected shape [B, T, {self.num_tags}], "
                             f"got {tuple(emissions.shape)}")
        if emissions.shape[1] < 1:
            raise ValueError("emissions: expected at least one time step, got T = 0")
        if mask is None:
            return None
        _check_mask("mask", mask, emissions.shape[:2])
        if not torch.compiler.is_compiling():
            if not bool(mask[:, 0].all()):
                raise ValueError("mask: the first time step must be kept in every row")
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("mask: expected right padding (True then False in each row)")
        return mask

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor | None = None):
        """log Z [B] by the forward algorithm (eq. `crf-forward`)."""
        mask = self._check(emissions, mask)
        A = self.transitions.to(emissions.dtype)
        alpha = self.start_transitions.to(emissions.dtype) + emissions[:, 0]      # [B, K]
        for t in range(1, emissions.shape[1]):
            nxt = torch.logsumexp(alpha.unsqueeze(-1) + A, dim=1) + emissions[:, t]
            alpha = nxt if mask is None else torch.where(mask[:, t, None], nxt, alpha)
        return torch.logsumexp(alpha + self.end_transitions.to(emissions.dtype), -1)

    def path_score(self, emissions: torch.Tensor, tags: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised score [B] of the tag paths ``tags`` [B, T], vectorised over t."""
        mask = self._check(emissions, mask)
        if not isinstance(tags, torch.Tensor) or tags.dtype not in (torch.int64, torch.int32):
            raise TypeError("tags: expected an integer (int64) tensor")
        if tuple(tags.shape) != tuple(emissions.shape[:2]):
            raise ValueError(f"tags: expected shape {tuple(emissions.shape[:2])}, "
                             f"got {tuple(tags.shape)}")
        tags = tags.long()
        if mask is None:
            mask = torch.ones_like(tags, dtype=torch.bool)
        safe = tags.masked_fill(~mask, 0)        # padded tags may be anything (e.g. -100)
        m = mask.to(emissions.dtype)
        unary = (emissions.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * m).sum(-1)
        pair = (self.transitions.to(emissions.dtype)[safe[:, :-1], safe[:, 1:]]
                * m[:, 1:]).sum(-1)
        last = safe.gather(1, (mask.sum(-1, keepdim=True) - 1)).squeeze(1)
        return (unary + pair + self.start_transitions.to(emissions.dtype)[safe[:, 0]]
                + self.end_transitions.to(emissions.dtype)[last])

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor,
            mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """-log p(tags | emissions) per sequence [B] (eq. `crf`), reduced over the batch
        ("mean" | "sum" | "none")."""
        loss = self.log_partition(emissions, mask) - self.path_score(emissions, tags, mask)
        return reduce(loss, reduction)

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Best tag path [B, T] (int64) by Viterbi (eq. `crf-viterbi`); -1 at padded steps.
        Ties go to the smallest previous tag (torch's max)."""
        mask = self._check(emissions, mask)
        B, T, K = emissions.shape
        with torch.no_grad():
            A = self.transitions.to(emissions.dtype)
            score = self.start_transitions.to(emissions.dtype) + emissions[:, 0]
            stay = torch.arange(K, device=emissions.device).expand(B, K)
            pointers = []
            for t in range(1, T):
                best, arg = (score.unsqueeze(-1) + A).max(dim=1)               # [B, K]
                nxt = best + emissions[:, t]
                if mask is not None:   # padded steps keep the score and point to themselves
                    keep = mask[:, t, None]
                    nxt, arg = torch.where(keep, nxt, score), torch.where(keep, arg, stay)
                score = nxt
                pointers.append(arg)
            tag = (score + self.end_transitions.to(emissions.dtype)).argmax(-1)   # [B]
            path = [tag]
            for arg in reversed(pointers):
                tag = arg.gather(1, tag.unsqueeze(1)).squeeze(1)
                path.append(tag)
            path = torch.stack(path[::-1], 1)
            return path if mask is None else path.masked_fill(~mask, -1)


def bio_labels(spans: Iterable[Sequence[int]], num_types: int, length: int) -> torch.Tensor:
    """BIO tags [length] (int64) of typed spans (i, j, k), end inclusive, type k in
    [0, num_types): O = 0, B of type k = 2k + 1, I of type k = 2k + 2 (2 num_types + 1 tags).
    Overlapping spans cannot be tagged and raise ValueError."""
    check_int("num_types", num_types, 1)
    check_int("length", length, 1)
    tags = torch.zeros(length, dtype=torch.long)
    for span in spans:
        if len(span) != 3:
            raise ValueError(f"spans: expected (start, end, type) triples, got {tuple(span)}")
        i, j, k = (int(v) for v in span)
        if not 0 <= i <= j < length:
            raise ValueError(f"spans: expected 0 <= start <= end < {length}, got {(i, j, k)}")
        if not 0 <= k < num_types:
            raise ValueError(f"spans: expected a type in [0, {num_types}), got {(i, j, k)}")
        if bool((tags[i:j + 1] != 0).any()):
            raise ValueError(f"spans: {(i, j, k)} overlaps another span")
        tags[i] = 2 * k + 1
        tags[i + 1:j + 1] = 2 * k + 2
    return tags


# ---- evaluation and offsets ------------------------------------------------------------------
def _lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence (dynamic programming, O(|a| |b|))."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for jb, cb in enumerate(b):
            cur.append(prev[jb] + 1 if ca == cb else max(prev[jb + 1], cur[jb]))
        prev = cur
    return prev[-1]


def lcs_f1(pred, gold) -> tuple[float, float, float]:
    """Soft-match F1 of extracted arguments (eq. `lcs-f1`): ``pred`` and ``gold`` map a key
    (e.g. (event_type, role)) to an argument string, one dict per example or a list of them.
    A predicted key found in gold earns 2 LCS(a, g) / (|a| + |g|), LCS the longest common
    *subsequence* (what pylcs.lcs, used by the original code, computes). With X the summed
    credit, Y and Z the predicted and gold counts: F1 = 2X / (Y + Z), P = X / Y, R = X / Z
    (each 0 when its denominator is 0, except F1 = 1 when both are empty).
    Returns (f1, precision, recall)."""
    if isinstance(pred, Mapping) and isinstance(gold, Mapping):
        pred, gold = [pred], [gold]
    if not isinstance(pred, (list, tuple)) or not isinstance(gold, (list, tuple)):
        raise TypeError("pred, gold: expected two dicts or two lists of dicts")
    if len(pred) != len(gold):
        raise ValueError(f"gold: expected {len(pred)} examples (as in pred), got {len(gold)}")
    X, Y, Z = 0.0, 0, 0
    for p, g in zip(pred, gold):
        if not isinstance(p, Mapping) or not isinstance(g, Mapping):
            raise TypeError("pred, gold: every example must be a dict key -> argument string")
        Y, Z = Y + len(p), Z + len(g)
        for key, a in p.items():
            if key in g and len(a) + len(g[key]) > 0:
                X += 2.0 * _lcs_length(a, g[key]) / (len(a) + len(g[key]))
    f1 = 2 * X / (Y + Z) if Y + Z else 1.0
    return f1, (X / Y if Y else 0.0), (X / Z if Z else 0.0)


def _bert_uncased_normalize(ch: str) -> str:
    """What an uncased BERT tokenizer does to one raw character: lower-case, decompose (NFD),
    drop combining marks, control characters, NUL and U+FFFD."""
    out = unicodedata.normalize("NFD", ch.lower())
    return "".join(c for c in out if unicodedata.category(c) != "Mn" and ord(c) not in (0, 0xFFFD)
                   and not (unicodedata.category(c).startswith("C") and c not in "\t\n\r"))


def rematch_offsets(text: str, tokens: Sequence[str],
                    normalize: Callable[[str], str] = _bert_uncased_normalize) -> list[list[int]]:
    """Map each token back to the indices of the raw characters of ``text`` it came from.

    ``normalize`` turns one raw character into the (possibly empty or longer) string the
    tokenizer sees; the default imitates an uncased BERT tokenizer. A token's "##" prefix is
    dropped; bracketed special tokens ([CLS], [SEP], [PAD], [UNK], ...) map to []. Tokens are
    searched left to right in the normalised text, so the spans of an extraction are cut from
    the raw string as ``text[m[0] : m[-1] + 1]``. ValueError if a token is not found.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    if not callable(normalize):
        raise TypeError("normalize: expected a callable str -> str")
    chars, owner = [], []
    for i, ch in enumerate(text):
        piece = normalize(ch)
        chars.append(piece)
        owner.extend([i] * len(piece))
    norm = "".join(chars)
    offsets, pos = [], 0
    for token in tokens:
        if not isinstance(token, str):
            raise TypeError(f"tokens: expected strings, got {type(token).__name__}")
        if len(token) > 2 and token[0] == "[" and token[-1] == "]":
            offsets.append([])
            continue
        piece = token[2:] if token.startswith("##") and len(token) > 2 else token
        start = norm.find(piece, pos)
        if start < 0 or not piece:
            raise ValueError(f"tokens: {token!r} not found in the normalised text after "
                             f"position {pos}")
        offsets.append(owner[start:start + len(piece)])
        pos = start + len(piece)
    return offsets
