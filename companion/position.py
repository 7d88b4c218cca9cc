"""Position encodings: RoPE in 1-D, 2-D and the mixed text-image scheme (RoPE-Tie), and the
training-free length-extrapolation tools (PI, NTK, YaRN frequencies, ReRoPE, the Λ-mask, log-n scale).

RoPE here rotates the interleaved pairs (x[2i], x[2i+1]) of the last dimension by the angle
``position * freqs[i]``; as a complex number z_i = x[2i] + i x[2i+1] it is z_i -> z_i e^{i m θ_i}, so

    <R_m q, R_n k> = Re sum_i q_i conj(k_i) e^{i (m - n) θ_i}

depends only on m - n. Angles are computed in float32 at least (float64 for float64 inputs) and the
result has the input's dtype, so RoPE works with SDPA: apply it to q and k, then call
``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._validate import check_choice, check_floating, check_int, check_range

__all__ = [
    "rope_frequencies", "apply_rope", "apply_rope_nd", "rope_tie_positions",
    "interpolated_frequencies", "logn_scale", "rerope_attention", "lambda_mask",
]


def rope_frequencies(dim: int, base: float = 1e4, *, device=None) -> torch.Tensor:
    """θ_i = base^(-2i/dim) for i = 0 .. dim/2 - 1, float64 ``[dim/2]``."""
    check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim: expected an even number, got {dim}")
    check_range("base", base, 1.0, low_open=True)
    i = torch.arange(dim // 2, dtype=torch.float64, device=device)
    return base ** (-2.0 * i / dim)


def _angle_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., 2i], x[..., 2i+1]) by ``angles[..., i]`` (broadcast over x's batch)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    # y = x ⊙ (c, c) + swap(x) ⊙ (-s, s) pair by pair, on contiguous rows of width d: the same
    # products and sums as (x0 c - x1 s, x0 s + x1 c), bit for bit, in four full-width passes
    cos2 = torch.stack((cos, cos), dim=-1).flatten(-2)             # [..., d/2] -> [..., d]
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)         # (x1, x0) in each pair
    out = x * cos2
    return out.add_(swapped * sin2)


def _check_rope_input(x: torch.Tensor) -> int:
    check_floating("x", x)
    if x.is_complex():
        raise TypeError("x: expected a real floating-point tensor, got a complex one")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [..., n, d], got {tuple(x.shape)}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x: the last dimension must be even (pairs are rotated), got {d}")
    return d


def _check_freqs(freqs, d: int, x: torch.Tensor) -> torch.Tensor:
    if freqs is None:
        return rope_frequencies(d, device=x.device)
    if not isinstance(freqs, torch.Tensor) or freqs.shape != (d // 2,):
        shape = tuple(freqs.shape) if isinstance(freqs, torch.Tensor) else type(freqs).__name__
        raise ValueError(f"freqs: expected a tensor of shape [{d // 2}] (d/2), got {shape}")
    return freqs.to(x.device)


def _as_positions(positions, x: torch.Tensor) -> torch.Tensor:
    """``positions`` as a real tensor on x's device, or a TypeError naming the argument."""
    if positions is None:
        raise TypeError("positions: expected a tensor or sequence of token positions, got None")
    try:
        positions = torch.as_tensor(positions, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"positions: expected numbers (a tensor or a sequence), got "
                        f"{type(positions).__name__}") from None
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected real numbers, got dtype {positions.dtype}")
    return positions


def apply_rope(x: torch.Tensor, positions, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding of ``x [..., n, d]`` at ``positions [n]`` (float allowed, or any
    shape broadcastable to ``[..., n]``) with frequencies ``freqs [d/2]`` (default
    ``rope_frequencies(d)``): pair i of token m is rotated by the angle m θ_i."""
    d = _check_rope_input(x)
    freqs = _check_freqs(freqs, d, x)
    dt = _angle_dtype(x)
    positions = _as_positions(positions, x)
    if positions.dim() == 0 or positions.shape[-1] != x.shape[-2]:
        raise ValueError(f"positions: expected {x.shape[-2]} positions (one per token of x), "
                         f"got shape {tuple(positions.shape)}")
    try:
        ok = torch.broadcast_shapes(positions.shape, x.shape[:-1]) == x.shape[:-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"positions: expected a shape that broadcasts to x.shape[:-1] = "
                         f"{tuple(x.shape[:-1])}, got {tuple(positions.shape)}")
    angles = positions.to(dt)[..., None] * freqs.to(dt)
    return _rotate_pairs(x, angles)


def apply_rope_nd(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor | None = None,
                  split: str = "interleave") -> torch.Tensor:
    """RoPE over k position axes: ``x [..., N, d]``, ``positions [N, k]``.

    The k axes share one 1-D frequency list ``freqs [d/2]`` (default ``rope_frequencies(d)``):
    pair i keeps its frequency θ_i and is rotated by ``positions[:, a(i)] * θ_i``, where the axis
    a(i) is ``i mod k`` for ``split="interleave"`` (each axis spans the whole frequency range) or
    ``i // (d / 2k)`` for ``split="half"`` (contiguous blocks). Either way, equal coordinates
    (n, ..., n) give exactly 1-D RoPE at position n. Needs d divisible by 2k.
    """
    d = _check_rope_input(x)
    check_choice("split", split, ("interleave", "half"))
    positions = _as_positions(positions, x)
    if positions.dim() != 2 or positions.shape[0] != x.shape[-2]:
        raise ValueError(f"positions: expected shape [{x.shape[-2]}, k] (one row per token), "
                         f"got {tuple(positions.shape)}")
    k = positions.shape[1]
    if k < 1:
        raise ValueError("positions: expected at least one position axis, got shape "
                         f"{tuple(positions.shape)}")
    if d % (2 * k):
        raise ValueError(f"x: the last dimension {d} must be divisible by 2k = {2 * k} "
                         f"for {k} position axes")
    freqs = _check_freqs(freqs, d, x)
    pair = torch.arange(d // 2, device=x.device)
    axis = pair % k if split == "interleave" else pair // (d // (2 * k))
    dt = _angle_dtype(x)
    angles = positions.to(dt)[:, axis] * freqs.to(dt)  # [N, d/2]
    return _rotate_pairs(x, angles)


def rope_tie_positions(segments: Sequence[tuple], fractional: bool = False) -> torch.Tensor:
    """2-D positions ``[N, 2]`` of an interleaved text/image sequence (RoPE-Tie), 0-based.

    ``segments`` is a list like ``[("text", 5), ("image", w, h), ("text", 4)]``. Text token n sits
    at (n, n), so pure text is 1-D RoPE. An image of w columns and h rows placed after a token at
    (L, L) puts its patch in row x = 1..h, column y = 1..w at (L + s x, L + t y), row-major, with
    s = w + 1 and t = h + 1: the step from the last text token into the image and from the last
    patch to the next text token (at L + (w+1)(h+1)) is the same (s, t). With ``fractional=True``,
    s = (wh + 1)/(h + 1) and t = (wh + 1)/(w + 1), so an image takes exactly wh positions.
    A sequence that starts with an image places it after a virtual token at (-1, -1); an image
    right after another is placed after (K - 1, K - 1), where K is the first free text position,
    so the symmetry needs a text token on each side (wrap images in [IMG] ... [/IMG] tokens).
    Integer positions are int64, fractional ones float64.
    """
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise TypeError("segments: expected a list of ('text', n) or ('image', w, h) tuples")
    rows: list[tuple[float, float]] = []
    last = -1.0  # the position (last, last) of the token before the sequence
    for seg in segments:
        kind = seg[0] if isinstance(seg, (tuple, list)) and seg else None
        if kind == "text" and len(seg) == 2:
            n = seg[1]
            check_int("segments: text length", n, 1)
            rows += [(last + j, last + j) for j in range(1, n + 1)]
            last += n
        elif kind == "image" and len(seg) == 3:
            w, h = seg[1], seg[2]
            check_int("segments: image width", w, 1)
            check_int("segments: image height", h, 1)
            if fractional:
                s, t = (w * h + 1) / (h + 1), (w * h + 1) / (w + 1)
            else:
                s, t = w + 1, h + 1
            rows += [(last + s * x, last + t * y) for x in range(1, h + 1) for y in range(1, w + 1)]
            last += (h + 1) * s - 1  # the next text token sits at last + (h + 1) s = K
        else:
            raise ValueError(f"segments: expected ('text', n) or ('image', w, h), got {seg!r}")
    if not rows:
        raise ValueError("segments: expected at least one token")
    out = torch.tensor(rows, dtype=torch.float64)
    return out if fractional else out.round().long()


def interpolated_frequencies(freqs: torch.Tensor, train_length: int, test_length: int,
                             method: str = "yarn", alpha: float = 1.0, beta: float = 32.0) -> torch.Tensor:
    """Frequencies for running a RoPE model trained on ``train_length`` at ``test_length``.

    With s = test_length / train_length and pair i of d/2 (``freqs`` from ``rope_frequencies``):
      "pi":   θ_i / s                              (position interpolation)
      "ntk":  θ_i κ^(-2i/d), κ = s^(d/(d-2))       (base b -> b κ; the slowest pair is θ/s exactly)
      "yarn": [γ_i + (1 - γ_i)/s] θ_i,  r_i = train_length θ_i / 2π turns,
              γ_i = clamp((r_i - alpha)/(beta - alpha), 0, 1)
    """
    check_floating("freqs", freqs)
    if freqs.dim() != 1 or freqs.numel() < 2:
        raise ValueError(f"freqs: expected a 1-D tensor of at least 2 frequencies, got {tuple(freqs.shape)}")
    check_int("train_length", train_length, 1)
    check_int("test_length", test_length, 1)
    if test_length < train_length:
        raise ValueError(f"test_length: expected >= train_length = {train_length}, got {test_length}")
    check_choice("method", method, ("pi", "ntk", "yarn"))
    s = test_length / train_length
    if method == "pi":
        return freqs / s
    if method == "ntk":
        d = 2 * freqs.numel()
        kappa = s ** (d / (d - 2))
        i = torch.arange(freqs.numel(), dtype=freqs.dtype, device=freqs.device)
        return freqs * kappa ** (-2.0 * i / d)
    check_range("alpha", alpha, 0.0)
    check_range("beta", beta, alpha, low_open=True)
    turns = train_length * freqs / (2 * math.pi)
    gamma = ((turns - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    return (gamma + (1 - gamma) / s) * freqs


def logn_scale(positions, train_length: int) -> torch.Tensor:
    """λ_n = max(1, log n / log train_length) with n = position + 1 (positions start at 0)."""
    check_int("train_length", train_length, 2)
    positions = torch.as_tensor(positions)
    n = positions.to(torch.float64 if positions.dtype == torch.float64 else torch.float32) + 1
    if (n < 1).any():
        raise ValueError("positions: expected positions >= 0")
    return (n.log() / math.log(train_length)).clamp_min(1.0)


def lambda_mask(n: int, window: int, num_sinks: int = 0, device=None) -> torch.Tensor:
    """Causal Λ-shaped mask ``[n, n]``, True where query i may attend key j: j <= i and
    (i - j < window or j < num_sinks). ``num_sinks=0`` is the plain sliding window."""
    check_int("n", n, 1)
    check_int("window", window, 1)
    check_int("num_sinks", num_sinks, 0)
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < num_sinks))


def rerope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     leak_k: float = math.inf, freqs: torch.Tensor | None = None, causal: bool = True,
                     logn_train_length: int | None = None) -> torch.Tensor:
    """Attention whose relative positions are kept inside the window and compressed outside it.

    ``q, k, v [B, h, n, d]`` (un-rotated). The relative position r = m - n enters RoPE as r'
    with r' = r for |r| < window and r' = sign(r)(window + (|r| - window)/leak_k) beyond it
    (Leaky ReRoPE; ``leak_k=inf`` is ReRoPE, every far position becomes ``window``). Computed with
    RoPE in passes: ordinary RoPE logits inside the window; outside, q_m rotated by
    θ(m/k ± (w - w/k)) and k_n by θ n/k. ``logn_train_length`` multiplies the logits of query m by
    ``logn_scale(m, logn_train_length)``. O(n^2) memory: a reference implementation.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, h, n, d], got {tuple(t.shape)}")
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v: expected q and k of one shape and v of shape [B, h, n, *], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_int("window", window, 1)
    if not (isinstance(leak_k, (int, float)) and leak_k >= 1):
        raise ValueError(f"leak_k: expected a number >= 1 (math.inf for ReRoPE), got {leak_k!r}")
    n, d = q.shape[-2], q.shape[-1]
    freqs = _check_freqs(freqs, d, q)
    pos = torch.arange(n, device=q.device, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d)
    inside = apply_rope(q, pos, freqs) @ apply_rope(k, pos, freqs).transpose(-1, -2)
    inv_k = 0.0 if math.isinf(leak_k) else 1.0 / leak_k
    shift = window - window * inv_k
    k_far = apply_rope(k, pos * inv_k, freqs).transpose(-1, -2)
    ahead = apply_rope(q, pos * inv_k + shift, freqs) @ k_far    # r >= window
    behind = apply_rope(q, pos * inv_k - shift, freqs) @ k_far   # r <= -window
    r = pos[:, None] - pos[None, :]
    logits = torch.where(r.abs() < window, inside, torch.where(r > 0, ahead, behind)) * scale
    if logn_train_length is not None:
        logits = logits * logn_scale(pos, logn_train_length).to(logits.dtype)[:, None]
    if causal:
        logits = logits.masked_fill(r < 0, float("-inf"))
    return torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                         dim=-1).to(v.dtype) @ v
