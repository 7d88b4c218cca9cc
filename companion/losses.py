"""Losses: multi-label and n-m cross-entropy, EMO, TaiLr, FlatNCE, multi-task weighting, smooth top-k.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validate import check_choice, check_floating, check_int, check_range, check_same_shape, reduce

__all__: list[str] = []


# === multilabel-softmax-ce ===
__all__ += [
    "multilabel_categorical_crossentropy",
    "multilabel_soft_crossentropy",
    "log_elementary_symmetric",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> float32 for the reductions (sums of n terms); other dtypes unchanged."""
    return x.float() if x.dtype in _HALF_DTYPES else x


def _logaddexp_masked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logaddexp(a, b)`` whose gradient is 0, not NaN, where both arguments are -inf.

    Written with ``logsumexp`` rather than ``torch.logaddexp``: the latter's second derivative
    overflows to NaN once the arguments differ by more than ~88 (float32), which would break
    ``grad_topk``, the gradient of ``log_elementary_symmetric``, under backpropagation."""
    both = (a == float("-inf")) & (b == float("-inf"))
    out = torch.logsumexp(torch.stack((torch.where(both, 0.0, a), torch.where(both, 0.0, b))), dim=0)
    return out.masked_fill(both, float("-inf"))


def log_elementary_symmetric(logits: torch.Tensor, k: int) -> torch.Tensor:
    r"""``log e_k(exp(s_1), ..., exp(s_n))`` over the last dim: the log of the sum, over all
    k-subsets of the n classes, of ``exp`` of the subset's total score.

    ``logits``: ``[..., n]`` floating; a -inf entry removes that element (``e_k`` of the rest).
    ``k``: int with ``1 <= k <= n``. Returns ``[...]`` in the dtype of ``logits`` (fp16/bf16 are
    computed in float32); -inf where fewer than k entries are finite.

    Log-space dynamic programme over the classes, with ``E_j^{(i)} = log e_j(s_1..s_i)``::

        E_0^{(i)} = 0,   E_j^{(i)} = logaddexp(E_j^{(i-1)}, s_i + E_{j-1}^{(i-1)}),   j <= min(i, k)

    Only reachable entries (``j <= i``) are stored, the newest being ``E_i^{(i)} = s_1 + ... + s_i``,
    so for finite logits ``logaddexp(-inf, -inf)`` (NaN backward) never occurs; -inf logits go
    through a masked logaddexp with a zero gradient there. Cost O(n k). The gradient
    ``d/ds_i log e_k`` is the probability that class i lies in a k-subset drawn with weight
    ``exp(sum of its scores)``; these sum to k. Newton's identities give the same value but cancel
    catastrophically; this recursion only adds positive terms.
    """
    check_floating("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits: expected at least 1 dimension [..., n], got a 0-dim tensor")
    n = logits.shape[-1]
    check_int("k", k, 1, n)
    s = _upcast(logits)
    E = s.new_zeros(s.shape[:-1] + (1,))  # [E_0] = [log e_0] = [0]
    for i in range(n):
        shifted = s[..., i : i + 1] + E  # s_i + E_{j-1}, for j = 1 .. len(E)
        parts = [E[..., :1], _logaddexp_masked(E[..., 1:], shifted[..., : E.shape[-1] - 1])]
        if E.shape[-1] <= k:  # the new entry E_{i+1} = s_1 + ... + s_{i+1}: nothing to add to
            parts.append(shifted[..., -1:])
        E = torch.cat(parts, dim=-1)
    return E[..., k].to(logits.dtype)


def _check_multilabel_args(logits, targets, reduction) -> None:
    check_floating("logits", logits)
    if logits.is_complex():
        raise TypeError(f"logits: expected a real floating-point tensor, got dtype {logits.dtype}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    check_same_shape("logits", logits, "targets", targets)
    if logits.dim() == 0:
        raise ValueError("logits: expected at least 1 dimension [..., n], got a 0-dim tensor")
    check_choice("reduction", reduction, ("none", "mean", "sum"))


def _logsumexp_with_zero(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(x_j))`` over the last dim; -inf entries drop out. The appended 0 keeps
    the max finite, so value and gradient are finite even when every entry is -inf."""
    zero = x.new_zeros(x.shape[:-1] + (1,))
    return torch.logsumexp(torch.cat([x, zero], dim=-1), dim=-1)


def _signed_groups(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[..., 2, n + 1]``: row 0 holds the negatives' scores s_i (-inf at positives), row 1 the
    positives' -s_j (-inf at negatives), and each row ends in the 0 of ``log(1 + ...)``."""
    n = s.shape[-1]
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    if torch.is_grad_enabled() and s.requires_grad:  # the same, differentiable (double backward)
        zz = torch.stack([torch.where(pos, -inf, s), torch.where(pos, -s, -inf)], dim=-2)
        return F.pad(zz, (0, 1))
    zz = s.new_empty(s.shape[:-1] + (2, n + 1))
    torch.where(pos, -inf, s, out=zz[..., 0, :n])
    torch.where(pos, s, inf, out=zz[..., 1, :n])
    zz[..., 1, :n].neg_()
    zz[..., n] = 0
    return zz


class _MultilabelCE(torch.autograd.Function):
    """Both halves of the loss from one fused softmax over ``[..., 2, n + 1]``.

    With p = softmax over a row (the appended 0 last), p_last = 1 / (1 + sum_i e^{z_i}), so the
    half is ``log1p(sum_{i<n} p_i / p_last)`` (accurate when it is tiny) and its gradient is
    ``p_i`` itself: no exp of a masked -inf or of a deeply negative score is ever taken outside
    the fused kernel (torch.exp is up to 30x slower on arguments whose result is subnormal).
    Rows whose p_last underflows (a half above ~69 nats) or is NaN are recomputed by logsumexp.
    The backward uses the saved p; under ``create_graph`` it differentiates the same formula
    through autograd instead, so second derivatives are exact."""

    @staticmethod
    def forward(ctx, s, pos):
        n = s.shape[-1]
        zz = _signed_groups(s, pos)
        p = torch.softmax(zz, -1)
        last = p[..., n]
        half = torch.log1p(p[..., :n].sum(-1) / last)                # [..., 2]
        ok = last > 1e-30
        if not bool(ok.all()):
            bad = ~ok
            half[bad] = torch.logsumexp(zz[bad], -1)
        ctx.save_for_backward(s, pos, p)
        return half[..., 0], half[..., 1]

    @staticmethod
    def backward(ctx, grad_neg, grad_pos):
        s, pos, p = ctx.saved_tensors
        n = s.shape[-1]
        if torch.is_grad_enabled():  # create_graph=True: p again, differentiably
            p = torch.softmax(_signed_groups(s, pos), -1)
        grad = p[..., 0, :n] * grad_neg.unsqueeze(-1)                 # +p_i on Omega_-
        grad = grad.addcmul_(p[..., 1, :n], grad_pos.unsqueeze(-1), value=-1)  # -p_j on Omega_+
        return grad, None


def multilabel_categorical_crossentropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""Softmax cross-entropy generalised to multi-label classification (threshold score 0).

    ``logits``: ``[..., n]`` raw scores s (no sigmoid), floating. ``targets``: same shape, entries in
    {0, 1} (bool, integer or floating); 1 marks the positive classes Omega_+. A logit of -inf
    with target 0 drops out (a masked class, as in span-pointer heads). Per sample::

        L = log(1 + sum_{i in Omega_-} exp(s_i)) + log(1 + sum_{j in Omega_+} exp(-s_j))

    computed by one fused softmax over the two masked groups (-inf masking) with a 0 appended to
    each, so it stays finite at any |s| and costs about one ``binary_cross_entropy_with_logits``
    (fp16/bf16 are computed in float32 and returned in the input dtype: a loss
    above fp16's largest value, 65504, as from logits of about ±6e4, is inf in fp16; bf16 holds
    it). Complex logits raise TypeError. Predict
    class i iff ``s_i > 0``. ``reduction``: "none" (shape ``[...]``) | "mean" | "sum" over samples;
    the classes are summed inside the logs, never averaged.
    """
    _check_multilabel_args(logits, targets, reduction)
    if targets.dtype == torch.bool:
        pos = targets
    else:
        pos = targets == 1
        if not bool((pos | (targets == 0)).all()):
            bad = targets[~(pos | (targets == 0))][0].item()
            raise ValueError(f"targets: expected entries in {{0, 1}}, got a value {bad!r}")
    # log(1 + sum_- e^{s_i}) and log(1 + sum_+ e^{-s_j})
    loss_neg, loss_pos = _MultilabelCE.apply(_upcast(logits), pos)
    return reduce(loss_neg + loss_pos, reduction).to(logits.dtype)


def multilabel_soft_crossentropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""Soft-label version of :func:`multilabel_categorical_crossentropy`; targets t in [0, 1].

    ``logits``, ``targets``: ``[..., n]``; per sample::

        L = log(1 + sum_i t_i exp(-s_i)) + log(1 + sum_i (1 - t_i) exp(s_i))

    in log space (``log t`` with ``log 0 = -inf``: no clipping), equal to the hard loss when t is
    0/1; a logit of -inf with t = 0 drops out. Its minimiser over s_i satisfies
    ``t_i = sigmoid(2 s_i)``. ``reduction`` as in the hard version.
    """
    _check_multilabel_args(logits, targets, reduction)
    s = _upcast(logits)
    t = targets.to(s.dtype)
    if not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
        bad = t[~((t >= 0) & (t <= 1))][0].item()
        raise ValueError(f"targets: expected entries in [0, 1], got a value {bad!r}")
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    # log(t_i e^{-s_i}) and log((1 - t_i) e^{s_i}), -inf where t_i = 0 (resp. 1); the inner where
    # keeps log away from 0, so that gradients w.r.t. t (and masked -inf logits) stay finite
    pos_terms = torch.where(t > 0, torch.log(torch.where(t > 0, t, 1.0)) - s, neg_inf)
    neg_terms = torch.where(t < 1, torch.log1p(-torch.where(t < 1, t, 0.0)) + s, neg_inf)
    loss_pos = _logsumexp_with_zero(pos_terms)  # log(1 + sum_i t_i e^{-s_i})
    loss_neg = _logsumexp_with_zero(neg_terms)  # log(1 + sum_i (1 - t_i) e^{s_i})
    return reduce(loss_neg + loss_pos, reduction).to(logits.dtype)

# === end multilabel-softmax-ce ===


# === multilabel-n-m-classification ===
__all__ += ["nm_crossentropy", "nm_centered_crossentropy"]


def _nm_log_targets(logits: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
    """Validate (logits, target, mask) and return log t of shape [..., n, m], -inf where t = 0
    and on masked positions (a masked position leaves every class group)."""
    check_floating("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits: expected shape [..., n, m] with m >= 2, got {tuple(logits.shape)}")
    m = logits.shape[-1]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask: expected a bool tensor [..., n] (True = position kept)")
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask: expected shape {tuple(logits.shape[:-1])}, got {tuple(mask.shape)}")
    work = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    if target.is_floating_point():  # probabilities [..., n, m]
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"target: probabilities must have the shape of logits {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        t = target.detach().to(work)
        if mask is not None:
            t = t.masked_fill(~mask.unsqueeze(-1), 0.0)  # masked rows are not checked, then dropped
        if bool(((t < 0) | (t > 1)).any()):  # NaN passes neither test: caught by the sum below
            raise ValueError("target: probabilities must lie in [0, 1]")
        atol = 1e-2 if target.dtype in (torch.float16, torch.bfloat16) else 1e-4
        off = (t.sum(-1) - 1).abs() > atol
        if mask is not None:
            off &= mask
        if bool(off.any()) or bool(t.isnan().any()):
            raise ValueError(f"target: probabilities must sum to 1 over the last dim (atol {atol})")
        return torch.log(t)  # log 0 = -inf: that entry (and every masked row) drops out
    if target.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"target: expected int class indices or float probabilities, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):  # class indices [..., n]
        raise ValueError(f"target: class indices must have shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    bad = (target < 0) | (target >= m)
    if bool((bad if mask is None else bad & mask).any()):
        raise ValueError(f"target: class indices must lie in [0, {m - 1}] (m = {m})")
    hit = torch.arange(m, device=target.device) == target.unsqueeze(-1)  # one-hot; masked may hold -100
    if mask is not None:
        hit &= mask.unsqueeze(-1)
    zero = torch.zeros((), dtype=work, device=logits.device)
    return torch.where(hit, zero, -math.inf)


def _logsumexp_others(s: torch.Tensor) -> torch.Tensor:
    """out[..., j] = log sum_{k != j} exp(s[..., k]), stable in O(m) per row.

    For j != argmax the sum contains exp(s_max), so with e = exp(s - s_max) it is
    s_max + log(sum(e) - e_j), and sum(e) - e_j >= 1 (no cancellation). For j = argmax the row is
    re-summed with that entry masked to -inf."""
    s_max, top = s.detach().max(-1, keepdim=True)  # any constant shift is exact; detached as logsumexp does
    is_top = torch.arange(s.shape[-1], device=s.device) == top  # exactly one True per row, even with ties
    e = torch.exp(s - s_max)
    rest = (e.sum(-1, keepdim=True) - e).masked_fill(is_top, 1.0)  # 1 where unused: no log(0)
    others_of_top = torch.logsumexp(s.masked_fill(is_top, -math.inf), -1, keepdim=True)
    return torch.where(is_top, others_of_top, s_max + torch.log(rest))


def _log1p_sum_over_positions(a: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_i exp(a[..., i, j])) -> [..., m]: a logsumexp over positions with a zero appended,
    finite (and with finite gradients) even when every a[..., :, j] is -inf."""
    zero = torch.zeros_like(a[..., :1, :])
    # -log_softmax at the appended 0: the fused kernel (logsumexp's exp of the -inf entries of
    # hard targets is several times slower)
    return -torch.log_softmax(torch.cat([a, zero], dim=-2), dim=-2)[..., -1, :]


def nm_crossentropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for n m-way classifications with the sum over positions inside the log.

        l = sum_j log(1 + sum_i t_ij sum_{k != j} exp(s_ik - s_ij))          (loss-1)

    logits s: float [..., n, m]; target t: int class indices [..., n] or probabilities [..., n, m]
    (rows sum to 1); mask: bool [..., n], True = position counted (masked positions are removed from
    every class group j). One loss per group of n positions, shape [...], then ``reduction``
    ("none" | "mean" | "sum") over the leading dims. n = 1 with hard labels is softmax CE; m = 2 with
    s_i0 = 0 is the multi-label CE (soft version for soft t). Computed in log-space as
    log t_ij + logsumexp_{k != j} s_ik - s_ij; fp16/bf16 logits are computed in float32 and the loss
    is returned in the logits' dtype.
    """
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    log_t = _nm_log_targets(logits, target, mask)
    s = logits.to(log_t.dtype)
    a = log_t + _logsumexp_others(s) - s  # log(t_ij * sum_{k != j} exp(s_ik - s_ij))
    loss = _log1p_sum_over_positions(a).sum(-1)  # sum over class groups j
    return reduce(loss, reduction).to(logits.dtype)


def nm_centered_crossentropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                             reduction: str = "mean") -> torch.Tensor:
    """The centred variant, kept as a documented failure:

        l = sum_j log(1 + sum_i t_ij exp(mean_k s_ik - s_ij))                 (loss-3)

    Same arguments and shapes as :func:`nm_crossentropy`. Its minimiser for soft labels is exactly
    softmax(s_i) = t_i, but with hard labels it is near 0 as soon as s_i,target >> mean_k s_ik, which
    does not make the target the argmax: it trains poorly. Use :func:`nm_crossentropy` for training.
    """
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    log_t = _nm_log_targets(logits, target, mask)
    s = logits.to(log_t.dtype)
    a = log_t + s.mean(-1, keepdim=True) - s  # log(t_ij * exp(s_bar_i - s_ij))
    loss = _log1p_sum_over_positions(a).sum(-1)
    return reduce(loss, reduction).to(logits.dtype)


# === end multilabel-n-m-classification ===


# === emo-loss ===
__all__ += ["emo_loss", "emo_mle_loss", "transport_cost_upper_bound"]


def _check_class_logits(logits, target, ignore_index):
    """Validate ``logits [..., V]`` (real floating) and ``target [...]`` (class indices or
    ``ignore_index``, None for none); return ``(valid, safe_target)`` where ``valid`` marks the
    counted positions and ``safe_target`` has the ignored positions replaced by class 0."""
    check_floating("logits", logits)
    if logits.is_complex():
        raise TypeError(f"logits: expected a real floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor of class indices, "
                        f"got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of class indices, "
                        f"got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(logits.shape[:-1])} (logits without "
                         f"its last dim), got {tuple(target.shape)}")
    if ignore_index is not None:
        check_int("ignore_index", ignore_index)
    num_classes = logits.shape[-1]
    if ignore_index is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = target != ignore_index
    if valid.any():
        counted = target[valid]
        lo, hi = int(counted.min()), int(counted.max())
        if lo < 0 or hi >= num_classes:
            extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
            raise ValueError(f"target: expected class indices in [0, {num_classes}){extra}, "
                             f"got values in [{lo}, {hi}]")
    return valid, torch.where(valid, target, torch.zeros_like(target)).long()


def _masked_reduce(loss, valid, reduction):
    """``reduction`` as ``F.cross_entropy`` does with ``ignore_index``: ignored positions are 0
    under "none"/"sum", and "mean" divides by the number of counted positions (NaN if none)."""
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return reduce(loss, reduction)


def _compute_dtype(x):
    """Half precision is computed in float32 (softmax and matmul), then cast back."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _unit_cost_embedding(cost_embedding, num_classes, dtype):
    """Detached, row-normalised cost embedding ``ê_i = e_i / ||e_i||`` in ``dtype``."""
    check_floating("cost_embedding", cost_embedding)
    if cost_embedding.dim() != 2 or cost_embedding.shape[0] != num_classes:
        raise ValueError(f"cost_embedding: expected shape [V, d] with V = {num_classes} (the "
                         f"last dim of logits), got {tuple(cost_embedding.shape)}")
    e = cost_embedding.detach().to(dtype)
    norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        rows = torch.nonzero(norm[:, 0] == 0)[:5, 0].tolist()
        raise ValueError(f"cost_embedding: every row must have a nonzero norm (the cost is "
                         f"1 - cos), got zero rows {rows}")
    return e / norm


def emo_loss(logits: torch.Tensor, target: torch.Tensor, cost_embedding: torch.Tensor,
             ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Earth mover's distance between ``p = softmax(logits)`` and the one-hot target (EMO).

    With the cost ``c_ij = 1 - cos(e_i, e_j)`` from the fixed rows of ``cost_embedding`` and a
    one-hot target ``t``, the only coupling moves all mass to ``t``, so

        C[p, δ_t] = Σ_i p_i c_it = 1 - < Σ_i p_i ê_i , ê_t >,    ê = e / ||e||,

    one ``[N, V] x [V, d]`` matmul: memory O(N d) beyond the ``[N, V]`` softmax, never O(V^2).

    logits: ``[..., V]`` float (fp16/bf16 are computed in float32); target: ``[...]`` int class
    indices or ``ignore_index``; cost_embedding: ``[V, d]``, detached here (the cost must stay
    fixed, or it collapses to zero). Returns ``[...]`` (reduction="none") or a scalar, in the
    dtype of ``logits``; "mean" averages over the positions that are not ignored.
    """
    valid, t = _check_class_logits(logits, target, ignore_index)
    dtype = _compute_dtype(logits)
    e_hat = _unit_cost_embedding(cost_embedding, logits.shape[-1], dtype)   # ê   [V, d]
    p = torch.softmax(logits.to(dtype), dim=-1)                              # p   [..., V]
    cost, _ = _emo_cost(p, e_hat, t)
    return _masked_reduce(cost, valid, reduction).to(logits.dtype)


def _emo_cost(p, e_hat, t):
    """``C = Σ_{i≠t} p_i c_it = (1 - p_t) - <Σ_{i≠t} p_i ê_i, ê_t>`` (c_tt = 0), and ``1 - p_t``.

    The target's own mass is left out before the sum: written as ``1 - <Σ_i p_i ê_i, ê_t>``
    the cost cancels catastrophically for a confident model (p_t -> 1 rounds it to 0 or below);
    this way its rounding error is relative to ``1 - p_t``, and it is clamped at 0 from below."""
    q = p.scatter(-1, t[..., None], 0.0)                            # p with p_t zeroed [..., V]
    rest = q.sum(-1)                                                # 1 - p_t, accurately
    cost = rest - ((q @ e_hat) * e_hat[t]).sum(-1)                  # Σ_{i≠t} p_i (1 - ê_i·ê_t)
    return cost.clamp_min(0.0), rest


def emo_mle_loss(logits: torch.Tensor, target: torch.Tensor, cost_embedding: torch.Tensor,
                 ignore_index: int = -100, reduction: str = "mean"):
    """EMO mixed with MLE as in the paper's code, rescaled per token so both terms have CE's size:

        L = ½ (CE + sg[CE / C] · C),

    whose value equals CE and whose gradient is ½ (∇CE + (CE / C) ∇C) (sg = stop-gradient).
    Same arguments as ``emo_loss``. Returns ``(loss, ce, emo)``, each reduced the same way;
    ``ce`` and ``emo`` keep their own gradients (for logging, or to mix them differently).
    """
    valid, t = _check_class_logits(logits, target, ignore_index)
    dtype = _compute_dtype(logits)
    e_hat = _unit_cost_embedding(cost_embedding, logits.shape[-1], dtype)
    x = logits.to(dtype)
    log_p = torch.log_softmax(x, dim=-1)                                     # log p [..., V]
    ce = -log_p.gather(-1, t[..., None])[..., 0]                             # CE = -log p_t
    # p from its own fused softmax, not log_p.exp(): torch.exp is many times slower where its
    # result is subnormal (log p below about -87, common for a confident model's vocabulary)
    emo, rest = _emo_cost(torch.softmax(x, dim=-1), e_hat, t)                # C (see emo_loss)
    # sg[CE / C]; C below what rounding resolves (a few eps of 1 - p_t) is floored there, so a
    # confident model gets a finite, bounded weight instead of CE / 0.
    floor = (8 * torch.finfo(dtype).eps * rest).clamp_min(torch.finfo(dtype).tiny)
    scale = ce.detach() / torch.maximum(emo.detach(), floor.detach())
    loss = 0.5 * (ce + scale * emo)
    out = (_masked_reduce(x, valid, reduction).to(logits.dtype) for x in (loss, ce, emo))
    return tuple(out)


def transport_cost_upper_bound(probs: torch.Tensor, tau: torch.Tensor,
                               cost: torch.Tensor) -> torch.Tensor:
    """The independent-coupling bound on the transport cost between ``probs`` and a soft ``tau``:

        C[p, τ] = min_{γ ∈ Π(p, τ)} Σ_ij γ_ij c_ij  <=  Σ_ij p_i τ_j c_ij,

    with equality when ``tau`` is one-hot. probs, tau: ``[..., V]`` distributions (nonnegative,
    rows summing to 1); cost: ``[V, V]`` (explicit, so for small V only). Returns ``[...]``.
    """
    for name, x in (("probs", probs), ("tau", tau), ("cost", cost)):
        check_floating(name, x)
    check_same_shape("probs", probs, "tau", tau)
    v = probs.shape[-1]
    if cost.dim() != 2 or tuple(cost.shape) != (v, v):
        raise ValueError(f"cost: expected shape [V, V] = [{v}, {v}], got {tuple(cost.shape)}")
    tol = max(1e-4, 10 * torch.finfo(probs.dtype).eps ** 0.5)   # loose: rounding, not misuse
    for name, x in (("probs", probs), ("tau", tau)):
        x_ = x.detach()
        if bool((x_ < 0).any()) or bool(((x_.sum(-1) - 1).abs() > tol).any()):
            raise ValueError(f"{name}: expected nonnegative rows summing to 1 along the last dim")
    return ((probs @ cost) * tau).sum(-1)                                    # Σ_ij p_i c_ij τ_j

# === end emo-loss ===


# === tv-distance-overconfidence ===
__all__ += ["gamma_crossentropy", "tailr_loss"]


def gamma_crossentropy(logits: torch.Tensor, target: torch.Tensor, gamma: float,
                       reduction: str = "mean") -> torch.Tensor:
    """The closed-form TaiLr loss, cross-entropy with its gradient weight capped at 1/γ:

        L_γ = -log(γ + (1 - γ) p_y) / (1 - γ),    p_y = softmax(logits)_y,

    whose gradient is -∇p_y / (γ + (1 - γ) p_y): cross-entropy at γ = 0 (-log p_y) and, as the
    limit γ -> 1, the smooth-accuracy / total-variation loss 1 - p_y (used at γ = 1 exactly).

    logits: ``[..., C]`` float (fp16/bf16 computed in float32); target: ``[...]`` int class indices;
    gamma: float in [0, 1]. Returns ``[...]`` ("none") or a scalar, in the dtype of ``logits``.
    Stable for p_y -> 0: the loss is bounded by -log(γ) / (1 - γ).
    """
    check_range("gamma", gamma, 0.0, 1.0)
    valid, y = _check_class_logits(logits, target, None)
    dtype = _compute_dtype(logits)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, y[..., None])[..., 0]  # log p_y
    one_minus_p = -torch.expm1(log_p)                                        # 1 - p_y, exact near 1
    if gamma == 1.0:
        loss = one_minus_p                                                   # the γ -> 1 limit
    elif gamma < 0.5:   # log(γ + (1-γ) p) = logaddexp(log γ, log(1-γ) + log p): exact as p -> 0
        log_gamma = torch.full_like(log_p, math.log(gamma) if gamma > 0 else -math.inf)
        log_mix = torch.logaddexp(log_gamma, math.log1p(-gamma) + log_p)
        loss = -log_mix / (1.0 - gamma)
    else:               # log(γ + (1-γ) p) = log1p(-(1-γ)(1-p)): exact as γ -> 1
        loss = -torch.log1p(-(1.0 - gamma) * one_minus_p) / (1.0 - gamma)
    return _masked_reduce(loss, valid, reduction).to(logits.dtype)


def tailr_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, min_weight: float = 0.0,
               ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """TaiLr as the paper trains it: negative log-likelihood with a detached per-token weight,

        L = -sg[max(b, w)] · log p_y,    w = p_y / (γ + (1 - γ) p_y) ∈ [p_y, 1],

    (sg = stop-gradient, b = ``min_weight``). With b = 0 its gradient equals that of
    ``gamma_crossentropy`` (its value does not); γ = 0 or b = 1 is plain cross-entropy.

    logits: ``[..., C]`` float (fp16/bf16 computed in float32); target: ``[...]`` int class indices
    or ``ignore_index``; gamma, min_weight: floats in [0, 1]. Returns ``[...]`` ("none") or a
    scalar in the dtype of ``logits``; "mean" averages over the positions that are not ignored.
    """
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("min_weight", min_weight, 0.0, 1.0)
    valid, y = _check_class_logits(logits, target, ignore_index)
    dtype = _compute_dtype(logits)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, y[..., None])[..., 0]  # log p_y
    with torch.no_grad():   # log w = log p - log(γ + (1-γ) p), in log space so p -> 0 is safe
        log_gamma = torch.full_like(log_p, math.log(gamma) if gamma > 0 else -math.inf)
        log_one_minus = math.log1p(-gamma) if gamma < 1 else -math.inf
        log_w = log_p - torch.logaddexp(log_gamma, log_one_minus + log_p)
        weight = log_w.exp().clamp(min_weight, 1.0)                          # max(b, w), w <= 1
    return _masked_reduce(-weight * log_p, valid, reduction).to(logits.dtype)

# === end tv-distance-overconfidence ===


# === flatnce ===
__all__ += ["infonce_loss", "flatnce_loss", "nt_xent_scores"]


def _contrastive_args(scores, positive):
    """Validate ``scores [B, K]`` and ``positive [B]``; return ``positive`` as a long tensor."""
    check_floating("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores: expected a 2-D tensor [B, K], got shape {tuple(scores.shape)}")
    B, K = scores.shape
    if K < 2:
        raise ValueError(f"scores: expected K >= 2 candidates (the positive and at least one "
                         f"negative), got K={K}")
    if positive is None:  # column 0 holds the positive of every row
        return torch.zeros(B, dtype=torch.long, device=scores.device)
    if not isinstance(positive, torch.Tensor):
        raise TypeError(f"positive: expected a LongTensor [B] or None, got {type(positive).__name__}")
    if positive.is_floating_point() or positive.is_complex() or positive.dtype == torch.bool:
        raise TypeError(f"positive: expected an integer tensor, got dtype {positive.dtype}")
    if tuple(positive.shape) != (B,):
        raise ValueError(f"positive: expected shape ({B},) (one index per row of scores), "
                         f"got {tuple(positive.shape)}")
    if B > 0 and (int(positive.min()) < 0 or int(positive.max()) >= K):
        raise ValueError(f"positive: expected indices in [0, {K - 1}], got values in "
                         f"[{int(positive.min())}, {int(positive.max())}]")
    return positive.to(device=scores.device, dtype=torch.long)


def infonce_loss(scores: torch.Tensor, positive: torch.Tensor | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """InfoNCE: softmax cross-entropy of each row's scores against its positive column,

        L = -log( e^{s_t} / sum_i e^{s_i} ) = log(1 + xi),   xi = sum_{i != t} e^{s_i - s_t}.

    ``scores`` ``[B, K]`` (float; K >= 2 candidates per anchor), ``positive`` LongTensor ``[B]``
    with the positive's column in each row; ``None`` means column 0 is the positive of every row.
    This is ``F.cross_entropy`` with validation, so it runs in the dtype of ``scores``: cast to
    bf16/fp16 explicitly to see the rounding of the low-precision path. Returns ``[B]`` for
    ``reduction="none"``, else a scalar.
    """
    positive = _contrastive_args(scores, positive)
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    return F.cross_entropy(scores, positive, reduction=reduction)


def flatnce_loss(scores: torch.Tensor, positive: torch.Tensor | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """FlatNCE in its plain form: the log-sum-exp over the negatives minus the positive score,

        L = log xi = logsumexp_{i != t}(s_i) - s_t,

    whose gradient equals that of ``xi / sg(xi)`` (the paper's stop-gradient form) and is the
    InfoNCE gradient times (1 + xi) / xi for each row: -1 on the positive, the softmax over the
    negatives on the negatives, computed in closed form (no cancellation in any dtype; first
    derivatives only). The value can be negative. Arguments and shapes as ``infonce_loss``
    (``positive=None``: column 0 is the positive).
    """
    positive = _contrastive_args(scores, positive)
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    return reduce(_FlatNCE.apply(scores, positive), reduction)


class _FlatNCE(torch.autograd.Function):
    """Per-row log xi with its closed-form backward, itself differentiable (so gradient
    penalties and other double backwards get the right second derivatives). The scores are saved
    (no new [B, K] tensor is kept between forward and backward; the backward makes two)."""

    @staticmethod
    def forward(ctx, scores, positive):
        idx = positive[:, None]
        masked = scores.scatter(1, idx, float("-inf"))                 # the negatives only
        lse_neg = torch.logsumexp(masked, dim=1)                        # log sum_{i != t} e^{s_i}
        ctx.save_for_backward(scores, idx)
        return lse_neg - scores.gather(1, idx).squeeze(1)               # log xi, [B]

    @staticmethod
    def backward(ctx, grad_out):
        scores, idx = ctx.saved_tensors
        g = grad_out[:, None]
        weights = torch.softmax(scores.scatter(1, idx, float("-inf")), dim=1)  # over negatives
        grad = (weights * g).scatter(1, idx, -g)                        # exactly -1 on the positive
        return grad, None


def nt_xent_scores(z1: torch.Tensor, z2: torch.Tensor, tau: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's in-batch scores: cosine similarities of the 2B views divided by ``tau``, with each
    view's similarity to itself removed.

    ``z1``, ``z2`` ``[B, d]`` (float, B >= 2) are the two views of the same B examples; the rows
    of the result are the views ``cat([z1, z2])``. Returns ``scores`` ``[2B, 2B - 1]`` (row r is
    view r against the 2B - 1 other views, in their order) and ``positive`` LongTensor ``[2B]``,
    the column of the other view of the same example, ready for ``infonce_loss`` and
    ``flatnce_loss`` (SimCLR's NT-Xent is ``infonce_loss(*nt_xent_scores(z1, z2, tau))``).
    """
    check_floating("z1", z1)
    check_floating("z2", z2)
    if z1.dim() != 2:
        raise ValueError(f"z1: expected a 2-D tensor [B, d], got shape {tuple(z1.shape)}")
    check_same_shape("z1", z1, "z2", z2)
    if z1.shape[0] < 2:
        raise ValueError(f"z1: expected B >= 2 rows (one negative per view needs two examples), "
                         f"got B={z1.shape[0]}")
    check_range("tau", tau, 0.0, low_open=True)
    B = z1.shape[0]
    n = 2 * B
    z = F.normalize(torch.cat([z1, z2]), dim=1)                        # [2B, d], unit rows
    sim = (z @ z.T) / tau                                               # [2B, 2B]
    # drop the diagonal: the n*n entries without the first, viewed as (n-1) rows of n+1, lose
    # their last column (the next diagonal entry); what is left is the off-diagonal, row-major
    scores = sim.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)
    # view r < B has its positive at column B + r, shifted left by one by the removed diagonal;
    # view B + r has its positive at column r (left of the diagonal, unshifted)
    r = torch.arange(B, device=z1.device)
    positive = torch.cat([r + B - 1, r])
    return scores, positive

# === end flatnce ===


# === multitask-loss-weighting ===
__all__ += ["multitask_loss", "prior_loss_classification", "prior_loss_regression",
            "normalized_gradient_combine"]

MULTITASK_MODES = ("sum", "initial", "prior", "realtime", "generalized_mean")


def _task_losses(losses) -> torch.Tensor:
    """``losses`` as a 1-D tensor ``[n]`` (a 1-D tensor, or a non-empty sequence of scalar tensors)."""
    if isinstance(losses, torch.Tensor):
        check_floating("losses", losses)
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"losses: expected a 1-D tensor [n] with n >= 1 (or a sequence of scalar "
                             f"tensors), got shape {tuple(losses.shape)}")
        return losses
    if not isinstance(losses, (list, tuple)) or len(losses) == 0:
        raise TypeError(f"losses: expected a 1-D tensor or a non-empty sequence of scalar tensors, "
                        f"got {type(losses).__name__}" + (" of length 0" if isinstance(losses, (list, tuple)) else ""))
    for i, loss in enumerate(losses):
        check_floating(f"losses[{i}]", loss)
        if loss.numel() != 1:
            raise ValueError(f"losses[{i}]: expected a scalar loss, got shape {tuple(loss.shape)}")
    return torch.stack([loss.reshape(()) for loss in losses])


def multitask_loss(losses, mode: str = "realtime", ref=None, gamma: float = 0.0,
                   eps: float = 1e-12) -> torch.Tensor:
    """Combine n task losses L_i (``losses``: a 1-D tensor ``[n]`` or a sequence of scalar tensors)
    into one scalar whose gradient weighs the tasks as ``mode`` says:

    - ``"sum"``: sum_i L_i (not invariant to the units of any loss).
    - ``"initial"`` / ``"prior"``: sum_i L_i / ref_i with reference losses ``ref [n] > 0``: the losses
      at initialisation (e.g. log K for K-way cross-entropy with zero logits), or those of the best
      input-independent predictor (``prior_loss_classification``, ``prior_loss_regression``).
    - ``"realtime"``: sum_i L_i / sg(L_i) (denominator clamped to >= ``eps``). Its value is n; its
      gradient is sum_i grad L_i / L_i = grad sum_i log L_i, the gradient of n log(geometric mean).
    - ``"generalized_mean"``: the power mean ((1/n) sum_i L_i^gamma)^(1/gamma), computed in log space
      (stable for any gamma; float16/bfloat16 losses are combined in float32); gamma = 0 is the geometric mean exp(mean log L_i),
      gamma = 1 the arithmetic mean, gamma -> +inf / -inf the max / min. Effective weight of task i:
      (1/n) (L_i / mean)^(gamma - 1). Losses are clamped to >= ``eps`` before the log.

    ``"realtime"`` and ``"generalized_mean"`` take logs, so they need losses >= 0 (ValueError
    otherwise); ``ref`` is only for ``"initial"``/``"prior"`` and ``gamma`` only for
    ``"generalized_mean"``. Device and dtype follow ``losses``.
    """
    L = _task_losses(losses)
    check_choice("mode", mode, MULTITASK_MODES)
    check_range("gamma", gamma)
    check_range("eps", eps, 0.0, low_open=True)
    n = L.numel()
    if mode in ("initial", "prior"):
        if ref is None:
            raise ValueError(f"ref: mode {mode!r} needs the reference losses ref [n] > 0, got None")
        ref = torch.as_tensor(ref, dtype=L.dtype, device=L.device)
        if tuple(ref.shape) != (n,):
            raise ValueError(f"ref: expected shape ({n},) (one reference per loss), got {tuple(ref.shape)}")
        if not bool((ref > 0).all()):
            raise ValueError(f"ref: expected every reference loss > 0, got {ref.tolist()}")
    elif ref is not None:
        raise ValueError(f"ref: only used by modes 'initial' and 'prior', got mode {mode!r}")
    if gamma != 0.0 and mode != "generalized_mean":
        raise ValueError(f"gamma: only used by mode 'generalized_mean', got mode {mode!r}")
    if mode == "sum":
        return L.sum()
    if mode in ("initial", "prior"):
        return (L / ref).sum()                                           # sum_i L_i / ref_i
    if bool((L.detach() < 0).any()):
        raise ValueError(f"losses: mode {mode!r} takes logs of the losses, so each must be >= 0, "
                         f"got {L.detach().tolist()} (shift them, which breaks shift invariance)")
    if mode == "realtime":
        return (L / L.detach().clamp_min(eps)).sum()                     # sum_i L_i / sg(L_i)
    out_dtype = L.dtype
    if L.dtype in (torch.float16, torch.bfloat16):  # n numbers: compute in float32 at no cost
        L = L.float()
    log_L = L.clamp_min(eps).log()
    m = log_L.mean()                                                     # log of the geometric mean
    if gamma == 0.0:
        return m.exp().to(out_dtype)
    # log M = m + (1/gamma) log mean_i e^{gamma d_i}, d_i = log L_i - m (so sum_i d_i = 0)
    gd = gamma * (log_L - m)
    if bool(gd.abs().max() < 1):   # small |gamma|: log1p/expm1 avoid the cancellation of lse - log n
        log_mean = torch.log1p(torch.expm1(gd).mean())
    else:
        log_mean = torch.logsumexp(gd, dim=0) - math.log(n)
    return (m + log_mean / gamma).exp().to(out_dtype)                    # power mean


def prior_loss_classification(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy of the best input-independent classifier: the entropy of the label frequencies,
    H = -sum_k p_k log p_k (0 log 0 = 0), where p_k counts ``labels`` (integer tensor, any shape,
    values in [0, num_classes)). Returns a float64 scalar on the labels' device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected an integer torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor of class indices, got dtype {labels.dtype}")
    check_int("num_classes", num_classes, 1)
    if labels.numel() == 0:
        raise ValueError("labels: expected at least one label, got an empty tensor")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels: expected values in [0, {num_classes - 1}], got values in [{lo}, {hi}]")
    p = torch.bincount(labels.flatten(), minlength=num_classes).double() / labels.numel()
    return -torch.special.xlogy(p, p).sum()


def prior_loss_regression(y: torch.Tensor) -> torch.Tensor:
    """Squared-error loss of the best input-independent predictor (the mean): the total variance
    E ||y - mean(y)||^2 over the N rows of ``y`` ``[N]`` or ``[N, d]`` (population variance summed
    over the d outputs; divide by d for a loss averaged over outputs). Dtype and device of ``y``."""
    check_floating("y", y)
    if y.dim() not in (1, 2) or y.shape[0] == 0:
        raise ValueError(f"y: expected a non-empty tensor [N] or [N, d], got shape {tuple(y.shape)}")
    y = y.reshape(y.shape[0], -1)
    return (y - y.mean(0)).pow(2).sum(1).mean()


def normalized_gradient_combine(losses, params, *, eps: float = 1e-12) -> list[torch.Tensor]:
    """Sum of the unit-normalised task gradients, sum_i grad L_i / ||grad L_i||, over ``params``.

    This is the gradient of sum_i L_i / sg(||grad L_i||): invariant to rescaling (c_i > 0) and
    shifting of every loss. ``losses``: a 1-D tensor ``[n]`` or a sequence of scalar tensors, each
    differentiable w.r.t. ``params`` (an iterable of tensors with requires_grad). The norm of task i
    is taken over all of ``params``; a task whose gradient norm is below ``eps`` contributes nothing.
    For the article's theta pass the shared parameters (the trunk); each task head can take its
    own task's plain gradient separately.
    Costs one backward pass per task (the graph is retained between them and freed after the last).
    Returns one tensor per parameter, to assign to ``.grad`` before ``optimizer.step()``.
    """
    L = _task_losses(losses)
    params = list(params)
    if len(params) == 0:
        raise ValueError("params: expected at least one parameter tensor")
    for j, p in enumerate(params):
        check_floating(f"params[{j}]", p)
        if not p.requires_grad:
            raise ValueError(f"params[{j}]: expected a tensor with requires_grad=True")
    check_range("eps", eps, 0.0, low_open=True)
    if not L.requires_grad:
        raise ValueError("losses: expected losses computed from params (requires_grad=True)")
    total = [torch.zeros_like(p) for p in params]
    n = L.numel()
    for i in range(n):
        grads = torch.autograd.grad(L[i], params, retain_graph=i < n - 1, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))          # ||grad L_i|| over all params
        if float(norm) < eps:
            continue
        for t, g in zip(total, grads):
            t.add_(g / norm)                                             # grad L_i / ||grad L_i||
    return total

# === end multitask-loss-weighting ===


# === smooth-top-k ===
__all__ += ["grad_topk", "thre_topk", "iterative_soft_topk"]


def _topk_args(x: torch.Tensor, k, tau, k_max_offset: int = 0) -> torch.Tensor:
    """Validate (x, k, tau); return z = x / tau (fp16/bf16 upcast to float32)."""
    check_floating("x", x)
    if x.is_complex():
        raise TypeError(f"x: expected a real floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension [..., n], got a 0-dim tensor")
    n = x.shape[-1]
    check_int("k", k)
    if not 1 <= k <= n - k_max_offset:
        raise ValueError(f"k: expected 1 <= k <= {n - k_max_offset} (n = {n}), got {k}")
    check_range("tau", tau, 0.0, low_open=True)
    return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x) / tau


def grad_topk(x: torch.Tensor, k: int, tau: float = 1.0) -> torch.Tensor:
    """GradTopK: the gradient of a smooth maximum over all k-subsets, a softmax generalised to top-k.

        ST_k(x)_i = d/dz_i log Z_k(z),   Z_k = sum_{|S| = k} exp(sum_{j in S} z_j) = e_k(exp z),  z = x / tau

    i.e. the probability that item i is in a k-subset drawn with weight exp(sum of its scores).
    Entries lie in (0, 1) and sum to k; k = 1 is softmax(z); as tau -> 0 it tends to the hard top-k
    mask. log Z_k is the stable log-space DP ``log_elementary_symmetric``; its gradient comes from
    autograd (double backward when x requires grad), not from the cancellation-prone recursion
    Z_{k,i} = e^{z_i}(Z_{k-1} - Z_{k-1,i}). x: float [..., n]; 1 <= k <= n; tau > 0. Returns [..., n]
    in x's dtype (fp16/bf16 computed in float32). Cost O(n k) with n sequential steps. The backward
    of this function is a second derivative of the DP: it stays finite as long as torch.logaddexp's
    double backward does (differences of its arguments below ~88 in float32, ~709 in float64).
    """
    z = _topk_args(x, k, tau)
    if torch.is_inference_mode_enabled():  # autograd computes the result: leave inference mode
        with torch.inference_mode(False), torch.no_grad():
            return grad_topk(x.clone(), k, tau)
    keep_graph = torch.is_grad_enabled() and z.requires_grad
    with torch.enable_grad():
        if not keep_graph:
            z = z.detach().requires_grad_()
        log_z = log_elementary_symmetric(z, k)
        (p,) = torch.autograd.grad(log_z.sum(), z, create_graph=keep_graph)
    return p.to(x.dtype)


class _SigmoidThreshold(torch.autograd.Function):
    """lambda(z) with sum_i sigmoid(z_i - lambda) = k, by bisection; implicit-function backward
    d lambda / d z_j = sigma'(z_j - lambda) / sum_i sigma'(z_i - lambda) (a softmax of log sigma')."""

    @staticmethod
    def forward(ctx, z, k, iters):
        n = z.shape[-1]
        logit = math.log(k / (n - k))  # sigma^{-1}(k / n): the root lies in [min z - logit, max z - logit]
        lo = z.amin(-1, keepdim=True) - logit
        hi = z.amax(-1, keepdim=True) - logit
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = torch.sigmoid(z - mid).sum(-1, keepdim=True) > k  # F(mid) > k: the root is right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        lam = (lo + hi) / 2
        ctx.save_for_backward(z, lam)
        return lam

    @staticmethod
    def backward(ctx, grad_lam):
        # differentiable: lam is this Function's own output, so a double backward flows through
        # it again and the second derivatives are exact
        z, lam = ctx.saved_tensors
        u = z - lam
        weight = torch.softmax(F.logsigmoid(u) + F.logsigmoid(-u), dim=-1)  # log sigma'(u) = log s(u) + log s(-u)
        return grad_lam * weight, None, None


def _threshold_closed_form(z: torch.Tensor, k: int, f: str) -> torch.Tensor:
    """lambda [..., 1] for f = "exp" (min(1, e^u)) or "smooth" (1 - e^{-u}/2 for u >= 0, e^u/2 below).

    With z sorted decreasingly and m entries above lambda (z_(m) >= lambda >= z_(m+1)):
      exp:    lambda_m = log B_m - log(k - m)                                         (m < k)
      smooth: lambda_m = log B_m - log(sqrt(a^2 + A_m B_m) + a),  a = k - m,  m = 0..n
    with A_m = sum_{i <= m} e^{-z_(i)}, B_m = sum_{i > m} e^{z_(i)} taken in log space. Every candidate m
    is built at once; the consistent one is kept (the least violation, deterministic on ties), then
    lambda is recomputed from that m's A, B so that autograd sees one smooth branch."""
    zs = torch.sort(z, dim=-1, descending=True).values
    n = zs.shape[-1]
    ninf, inf = torch.full_like(zs[..., :1], -math.inf), torch.full_like(zs[..., :1], math.inf)
    # index m = 0..n: m entries above lambda; log A_m = log sum_{i < m} e^{-z_(i)}, log B_m = log sum_{i >= m} e^{z_(i)}
    log_a = torch.cat([ninf, torch.logcumsumexp(-zs, -1)], -1)
    log_b = torch.cat([torch.logcumsumexp(zs.flip(-1), -1).flip(-1), ninf], -1)
    num = n + 1 if f == "smooth" else k  # smooth: every m, including all n above; exp: m < k
    m = torch.arange(num, device=z.device, dtype=z.dtype)
    log_a, log_b = log_a[..., :num], log_b[..., :num]
    a = k - m

    def lam_of(log_a, log_b, a):
        if f == "exp":
            return log_b - torch.log(a)
        log_abs_a = torch.log(a.abs())  # -inf at a = 0
        h = 0.5 * torch.logaddexp(2 * log_abs_a, log_a + log_b)  # log sqrt(a^2 + A B)
        pos = log_b - torch.logaddexp(log_abs_a, h)  # a >= 0: log B - log(sqrt(.) + a)
        neg = torch.logaddexp(log_abs_a, h) - torch.where(a < 0, log_a, torch.zeros_like(log_a))  # a < 0
        return torch.where(a >= 0, pos, neg)  # (for a < 0 the + a form cancels: B / (sqrt(.) + a) = (sqrt(.) + |a|) / A)

    with torch.no_grad():
        cand = lam_of(log_a, log_b, a)
        upper = torch.cat([inf, zs], -1)[..., :num]  # z_(m), +inf for m = 0
        lower = torch.cat([zs, ninf], -1)[..., :num]  # z_(m+1), -inf for m = n
        violation = torch.relu(cand - upper) + torch.relu(lower - cand)
        best = violation.argmin(-1, keepdim=True)
    return lam_of(log_a.gather(-1, best), log_b.gather(-1, best), a[best])


def thre_topk(x: torch.Tensor, k: int, tau: float = 1.0, f: str = "smooth", iters: int = 50) -> torch.Tensor:
    """ThreTopK: ST_k(x) = f(z - lambda(z)), z = x / tau, with the threshold lambda solving sum_i f(z_i - lambda) = k.

    f = "exp":     min(1, e^u); closed-form lambda (k = 1 gives softmax; not differentiable where z_i = lambda)
    f = "smooth":  1 - e^{-u}/2 (u >= 0), e^u/2 (u < 0), C^1 at 0; closed-form lambda (k = 1 gives
                   softmax only while max softmax(z) <= 1/2)
    f = "sigmoid": sigma(u); lambda by ``iters`` bisection steps, implicit-function gradient
    Entries in [0, 1], sum k, monotone in x, shift invariant, hard top-k mask as tau -> 0. x: float [..., n];
    tau > 0; 1 <= k <= n for "exp", 1 <= k <= n - 1 otherwise (no finite lambda gives sum n). Returns
    [..., n] in x's dtype (fp16/bf16 computed in float32).
    """
    check_choice("f", f, ("exp", "sigmoid", "smooth"))
    z = _topk_args(x, k, tau, k_max_offset=0 if f == "exp" else 1)
    check_int("iters", iters, 1)
    if f == "sigmoid":
        lam = _SigmoidThreshold.apply(z, k, iters)
        return torch.sigmoid(z - lam).to(x.dtype)
    u = z - _threshold_closed_form(z, k, f)
    if f == "exp":
        return torch.exp(u.clamp_max(0.0)).to(x.dtype)  # min(1, e^u)
    # clamps keep the branch not taken finite, so its zero gradient never meets an inf
    return torch.where(u >= 0, 1 - 0.5 * torch.exp(-u.clamp_min(0.0)), 0.5 * torch.exp(u.clamp_max(0.0))).to(x.dtype)


def iterative_soft_topk(x: torch.Tensor, k: int, tau: float = 1.0, variant: str = "blog") -> torch.Tensor:
    """Heuristic "softmax, remove, repeat" top-k, kept for the comparison. z = x / tau, p = 0, then k times:

    variant="blog":     z <- z - min z once;  p <- p + softmax((1 - p) * z)
    variant="weighted": p <- p + w e^z / sum(w e^z) with w = 1 - p (a weighted softmax)

    Both sum to k. "blog" tends to the hard mask, but at moderate tau it can leave [0, 1] and break the
    order of x (x = (1.9, 1.7, 1.6, 1.5, 0), k = 3, tau = 0.1 gives 1.05 to the fourth entry). "weighted"
    does not tend to the hard mask (k = 2 gives 1.5 on the maximum and 0.5 on the runner-up) and for
    k >= 3 its weights 1 - p turn negative. x: float [..., n]; 1 <= k <= n; tau > 0.
    """
    check_choice("variant", variant, ("blog", "weighted"))
    z = _topk_args(x, k, tau)
    p = torch.zeros_like(z)
    if variant == "blog":
        z = z - z.amin(-1, keepdim=True)
        for _ in range(k):
            p = p + torch.softmax((1 - p) * z, dim=-1)
        return p.to(x.dtype)
    big = -math.log(torch.finfo(z.dtype).tiny)
    for _ in range(k):
        w = 1 - p
        with torch.no_grad():  # any per-row shift is exact; take the largest |w| e^z, ignoring w = 0
            shift = (z + torch.log(w.abs())).amax(-1, keepdim=True)
        expo = torch.where(w == 0, torch.zeros_like(z), z - shift).clamp_max(big)  # finite even where w = 0
        e = w * torch.exp(expo)  # w e^{z - shift}
        p = p + e / e.sum(-1, keepdim=True)
    return p.to(x.dtype)


# === end smooth-top-k ===
