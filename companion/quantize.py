"""Quantizers: FSQ (finite scalar quantization) and VQ (nearest-codebook), with the shared quantizer protocol.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_floating, check_int, check_range

__all__: list[str] = []


# === fsq ===
__all__ += [
    "ste_round", "fsq_quantize", "fsq_codes_to_indices", "fsq_indices_to_codes", "FSQ",
    "FSQ_RECOMMENDED_LEVELS", "vq_quantize", "VectorQuantizer", "codebook_usage", "PatchAE",
]

# The quantizer protocol shared by `FSQ` and `VectorQuantizer` (and any quantizer a notebook passes
# to `PatchAE` or `attention.VQAttention`): `forward(z [..., dim]) -> (z_q [..., dim], indices [...],
# aux_loss [])`, with the attributes `.dim`, `.codebook_size` and `.codebook` ([codebook_size, d]).

#: Levels recommended by Mentzer et al. (2023, Table 1), keyed by the target codebook size 2^n.
#: The product of the levels (the exact codebook size) is close to, not equal to, the key.
FSQ_RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),            # K = 240
    2**10: (8, 5, 5, 5),        # K = 1000
    2**12: (7, 5, 5, 5, 5),     # K = 4375
    2**14: (8, 8, 8, 6, 5),     # K = 15360
    2**16: (8, 8, 8, 5, 5, 5),  # K = 64000
}

_FSQ_VARIANTS = ("tanh", "sigmoid")
_FSQ_EPS = 1e-3  # the paper's shrink factor (1 - eps) of the tanh bound
_FSQ_TANH_MAX_LEVEL = 1000  # (L - 1) eps / 2 < 1/2: above this the shrink loses the end levels


# ---- straight-through rounding ------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """round(x) in the forward pass, the identity in the backward pass."""

    generate_vmap_rule = True  # torch.func transforms (vmap, jacrev) work through it

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer with a straight-through gradient.

    ``ste_round(x) = x + sg[round(x) - x]``: the value is ``torch.round(x)`` (ties to even), the
    Jacobian is the identity. It is computed as one rounding kernel with a custom backward, which
    gives the same value and gradient as the stop-gradient formula without its two extra passes.
    ``x``: any floating tensor; the output has its shape and dtype.
    """
    check_floating("x", x)
    return _RoundSTE.apply(x)


# ---- FSQ: bound, round, normalise ----------------------------------------------------------------
def _check_levels(levels) -> tuple[int, ...]:
    """``levels`` as a tuple of Python ints, each >= 2 (a 1-D integer tensor is accepted too)."""
    if isinstance(levels, torch.Tensor):
        if levels.dim() != 1 or levels.is_floating_point() or levels.is_complex():
            raise TypeError(f"levels: expected a sequence of ints, got a tensor of shape "
                            f"{tuple(levels.shape)} and dtype {levels.dtype}")
        levels = levels.tolist()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels: expected a sequence of ints, got {type(levels).__name__}")
    out = []
    for level in levels:
        try:
            if isinstance(level, bool):
                raise TypeError
            out.append(operator.index(level))
        except TypeError:
            raise TypeError(f"levels: expected a sequence of ints, got {list(levels)!r}") from None
    if not out:
        raise ValueError("levels: expected at least one level, got []")
    if min(out) < 2:
        raise ValueError(f"levels: every level must be >= 2, got {out}")
    return tuple(out)


class _FSQConstants(NamedTuple):
    """Per-channel constants of FSQ, tensors [d] in the compute dtype (``basis`` is int64).

    tanh:    q = round(tanh(z + shift) * half_range - offset),  code = q / half_width,
             level index c = q + half_width
    sigmoid: c = round(scale * sigmoid(z)),  code = c * step - 1,  scale = L - 1, step = 2 / (L - 1)
    flat index = sum_i c_i * basis_i with basis_i = L_1 * ... * L_{i-1} (mixed radix).
    """
    shift: torch.Tensor
    half_range: torch.Tensor
    neg_offset: torch.Tensor
    half_width: torch.Tensor
    scale: torch.Tensor
    step: torch.Tensor
    basis: torch.Tensor
    levels: tuple[int, ...]


def _check_variant(variant: str, levels: tuple[int, ...]) -> None:
    check_choice("variant", variant, _FSQ_VARIANTS)
    if variant == "tanh" and max(levels) > _FSQ_TANH_MAX_LEVEL:
        raise ValueError(f"levels: the tanh bound reaches every level only for L <= {_FSQ_TANH_MAX_LEVEL} "
                         f"(its (1 - eps) shrink, eps = {_FSQ_EPS}); use variant='sigmoid', got {list(levels)}")


def _fsq_constant_tensors(levels: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The constants of `_FSQConstants` as float64 (basis: int64) tensors on the CPU."""
    L = torch.tensor(levels, dtype=torch.float64)
    half_range = (L - 1) * (1 - _FSQ_EPS) / 2                     # h = (L - 1)(1 - eps) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0)                    # o = 1/2 for even L, else 0
    return dict(
        shift=torch.tan(offset / half_range),                     # s = tan(o / h), as the paper's code
        half_range=half_range, neg_offset=-offset,
        half_width=torch.floor(L / 2),                            # w = floor(L / 2)
        scale=L - 1, step=2.0 / (L - 1),
        basis=torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.int64), 0),
    )


def _as_constants(tensors: dict[str, torch.Tensor], levels, device, dtype) -> _FSQConstants:
    out = {k: (v.to(device) if k == "basis" else v.to(device=device, dtype=dtype))
           for k, v in tensors.items()}
    return _FSQConstants(levels=levels, **out)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_real(name: str, x) -> None:
    check_floating(name, x)
    if x.is_complex():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")


def _check_last_dim(name: str, x: torch.Tensor, d: int, what: str) -> None:
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{name}: expected the last dim to be {what} = {d}, got shape {tuple(x.shape)}")


def _autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (a no-op context where it is not on)."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 has no device argument
        on = torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()
    return torch.autocast(device_type=device.type, enabled=False) if on else contextlib.nullcontext()


def _row_repeat(rows: int, d: int) -> int:
    """How many vectors of d channels to lay side by side for elementwise work: a broadcast of
    per-channel constants over a last dim of 4 runs several times slower than over rows of ~64
    values. The largest power of two r <= 64 / d that divides ``rows`` (1 if none)."""
    r = 1
    while 2 * r * d <= 64 and rows % (2 * r) == 0:
        r *= 2
    return r


def _fsq_core(z: torch.Tensor, c: _FSQConstants, variant: str, with_indices: bool):
    """FSQ of z [..., d] in the compute dtype: (codes [..., d], flat indices [...] int64 or None).

    The rounding acts on the bounded value b with a straight-through gradient, so the Jacobian of
    the codes is that of b / half_width (tanh) or b * step (sigmoid): diagonal and never zero.
    """
    if variant == "tanh" and not (z.requires_grad and torch.is_grad_enabled()):
        # no gradient wanted: the same arithmetic in place, in one buffer (fewer passes and no
        # fresh pages; bit-identical to the branch below)
        d = z.shape[-1]
        rep = _row_repeat(z.numel() // d, d) if z.is_contiguous() else 1
        shift, neg_offset, half_range, half_width = (
            t.repeat(rep) for t in (c.shift, c.neg_offset, c.half_range, c.half_width))
        q = torch.add(z.reshape(-1, d * rep), shift).tanh_()
        q = torch.addcmul(neg_offset, q, half_range, out=q).round_()
        codes = q / half_width if with_indices else q.div_(half_width)
        q, codes = q.view(z.shape), codes.view(z.shape)
    elif variant == "tanh":
        b = torch.addcmul(c.neg_offset, torch.tanh(z + c.shift), c.half_range)  # b = tanh(z + s) h - o
        q = ste_round(b)                                           # q in {-w, ..., L - 1 - w}
        codes = q / c.half_width                                   # code = q / w, in [-1, 1]
    if variant == "tanh":
        level_offset = sum(L // 2 * math.prod(c.levels[:i]) for i, L in enumerate(c.levels))  # c = q + w
    else:
        b = torch.sigmoid(z) * c.scale                             # b = (L - 1) sigmoid(z)
        q = ste_round(b)                                           # c = q in {0, ..., L - 1}
        codes = q * c.step - 1                                     # code = 2c / (L - 1) - 1
        level_offset = 0
    if not with_indices:
        return codes, None
    with torch.no_grad(), _autocast_off(q.device):
        # index = sum_i c_i basis_i. Every partial sum is an integer of size < K, so the sum is exact
        # in float32 while K <= 2^24 (the mantissa), in any order; larger codebooks use float64.
        # (Autocast is off here: a bf16 matmul would round the index.)
        acc = q.dtype if math.prod(c.levels) <= 2**24 else torch.float64
        qf, basis = q.detach().to(acc), c.basis.to(acc)
        if qf.device.type == "cpu":  # a matrix-vector product: much faster there than a sum over d
            idx = (qf.reshape(-1, qf.shape[-1]) @ basis).reshape(qf.shape[:-1])
        else:                        # elementwise, so that no TF32 matmul can round the index
            idx = (qf * basis).sum(-1)
        idx = idx.to(torch.int64)
        if level_offset:
            idx += level_offset
        # a vector with a non-finite entry has no code: its index is -1 (never a valid index);
        # one global test first, the per-vector one only when it fails (always under
        # torch.compile, which cannot branch on a tensor's value)
        if torch.compiler.is_compiling() or not bool(torch.isfinite(z).all()):
            idx = torch.where(torch.isfinite(z).all(-1), idx, torch.full_like(idx, -1))
    return codes, idx


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], *, variant: str = "tanh") -> torch.Tensor:
    """Finite scalar quantization of each channel of z: normalised codes in [-1, 1].

    ``z``: real floating tensor [..., d] with d = len(levels); every level L_i >= 2 (and <= 1000
    for tanh). Channel i gets exactly L_i values; the implicit codebook has K = prod(L_i) entries.

    - ``variant="tanh"`` (the paper's): b = tanh(z + s) h - o with h = (L - 1)(1 - eps)/2,
      o = 1/2 for even L (else 0), s = tan(o / h); code = round(b) / floor(L/2). Odd L gives the
      symmetric grid {-1, ..., 1}; even L gives {-L/2, ..., L/2 - 1} / (L/2).
    - ``variant="sigmoid"`` (Su's): c = round((L - 1) sigmoid(z)) in {0, ..., L - 1}, mapped onto
      [-1, 1] as code = 2c / (L - 1) - 1: a symmetric grid for every L, endpoints included.

    Rounding is straight-through on the bounded value: the forward value is on the grid, the
    gradient is that of b (scaled by the normalisation). Computed in float32 (float64 stays
    float64) even for fp16/bf16 input or under autocast; the result has the dtype of z.
    """
    levels = _check_levels(levels)
    _check_variant(variant, levels)
    _check_real("z", z)
    _check_last_dim("z", z, len(levels), "len(levels)")
    cdt = _compute_dtype(z)
    consts = _as_constants(_fsq_constant_tensors(levels), levels, z.device, cdt)
    codes, _ = _fsq_core(z.to(cdt), consts, variant, with_indices=False)
    return codes.to(z.dtype)


def _grid_tolerance(dtype: torch.dtype, max_half_width: float) -> float:
    """How far (in level units) a code may sit from a grid point and still count as on it."""
    return max(1e-4, 4 * torch.finfo(dtype).eps * max_half_width)


def fsq_codes_to_indices(codes: torch.Tensor, levels: Sequence[int], *,
                         variant: str = "tanh") -> torch.Tensor:
    """Flat index of each FSQ code: idx = sum_i c_i prod_{j<i} L_j (mixed radix, channel 0 fastest).

    ``codes``: real floating tensor [..., d] on the grid of `fsq_quantize` with the same ``levels``
    and ``variant``; c_i in {0, ..., L_i - 1} is the level index of channel i (code * w + w for
    tanh, (code + 1)(L - 1)/2 for sigmoid). Returns int64 [...] in {0, ..., K - 1}. Codes off the
    grid (beyond rounding error of their dtype) raise ValueError. Not differentiable.
    """
    levels = _check_levels(levels)
    _check_variant(variant, levels)
    _check_real("codes", codes)
    _check_last_dim("codes", codes, len(levels), "len(levels)")
    t = _fsq_constant_tensors(levels)
    d = len(levels)
    # float32 is exact for these small integers; float64 for float64 input or K > 2^24
    work = torch.float64 if codes.dtype == torch.float64 or math.prod(levels) > 2**24 \
        else torch.float32
    units = (t["half_width"] if variant == "tanh" else t["scale"] / 2).to(codes.device, work)
    top = t["scale"].to(codes.device, work)                              # L - 1 per channel
    x = codes.detach().reshape(-1, d)
    # elementwise work on rows of 64 values (16 codes of 4 channels), not of d: a broadcast over a
    # last dim of 4 runs several times slower than over a wide one
    rep = _row_repeat(x.shape[0], d)
    u, hi_ok = units.repeat(rep), top.repeat(rep)
    c = torch.addcmul(u, x.to(work).reshape(-1, u.numel()), u)          # (code + 1) * units
    # the nearest level index inside [0, L - 1]: a code off the grid or out of range is at least
    # one unit from it, so a single max-distance test checks both (NaN and inf fail it too)
    c_int = c.round().clamp_(min=torch.zeros_like(hi_ok), max=hi_ok)
    tol = _grid_tolerance(codes.dtype, float(units.max()))
    if c.numel() == 0:
        ok = True
    else:
        lo, hi = torch.aminmax(c - c_int)   # (a vector_norm of order inf is 6x slower on the CPU)
        ok = bool(lo >= -tol) and bool(hi <= tol)                     # NaN fails both
    c, c_int = c.reshape(-1, d), c_int.reshape(-1, d)
    if not ok:
        bad = ((c - c_int).abs() > tol) | (c_int < 0) | (c_int > top) | ~torch.isfinite(c)
        first = x[bad.any(-1)][0]
        raise ValueError(f"codes: expected values on the FSQ grid of levels {list(levels)} "
                         f"(variant={variant!r}), got the code {first.tolist()}")
    # sum_i c_i basis_i: a matrix-vector product, exact (integer partial sums below 2^24 / 2^53)
    idx = c_int @ t["basis"].to(codes.device, work)
    return idx.to(torch.int64).reshape(codes.shape[:-1])


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int], *,
                         variant: str = "tanh") -> torch.Tensor:
    """The FSQ code of each flat index: the inverse of `fsq_codes_to_indices`.

    ``indices``: integer tensor [...] with values in {0, ..., K - 1}, K = prod(levels). Level index
    c_i = (idx // prod_{j<i} L_j) mod L_i, then the normalisation of `fsq_quantize`. Returns
    float32 codes [..., d], bit-identical to what `fsq_quantize` outputs for that grid point.
    """
    levels = _check_levels(levels)
    _check_variant(variant, levels)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
    K = math.prod(levels)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
        raise ValueError(f"indices: expected values in [0, {K - 1}] for levels {list(levels)}, "
                         f"got values in [{int(indices.min())}, {int(indices.max())}]")
    c = _as_constants(_fsq_constant_tensors(levels), levels, indices.device, torch.float32)
    level = (indices.to(torch.int64)[..., None] // c.basis) % torch.tensor(levels, device=indices.device)
    if variant == "tanh":
        return (level - c.half_width.to(torch.int64)).to(torch.float32) / c.half_width
    return level.to(torch.float32) * c.step - 1


class FSQ(nn.Module):
    """Finite scalar quantizer with the quantizer protocol: ``forward(z) -> (z_q, indices, aux_loss)``.

    ``levels``: L_1..L_d (each >= 2); ``dim``: the size of z's last dim; when it differs from
    d = len(levels), linear projections dim -> d (before) and d -> dim (after) are added.
    ``variant``: "tanh" (the paper's bound) or "sigmoid" (Su's), as in `fsq_quantize`.

    forward: z [..., dim] -> z_q [..., dim] (dtype of z), indices int64 [...] in {0..K-1}, and a
    zero aux_loss (FSQ needs no auxiliary loss). A vector with a NaN or infinite entry gets the
    index -1 (its code is NaN). The constants stay float32 after ``.half()``/``.bfloat16()``.
    ``codebook_size`` is K = prod(levels) and ``codebook`` the implicit grid of codes [K, d]
    (before ``project_out``), row k = code of index k.
    """

    def __init__(self, levels: Sequence[int], dim: int | None = None, variant: str = "tanh"):
        super().__init__()
        self.levels = _check_levels(levels)
        _check_variant(variant, self.levels)
        self.variant = variant
        self.codebook_dim = len(self.levels)
        self.dim = self.codebook_dim if dim is None else check_int("dim", dim, 1)
        self.codebook_size = math.prod(self.levels)
        has_proj = self.dim != self.codebook_dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if has_proj else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if has_proj else nn.Identity()
        self._const_names = []
        for name, value in _fsq_constant_tensors(self.levels).items():
            self.register_buffer(f"_{name}", value if name == "basis" else value.float(), persistent=False)
            self._const_names.append(name)

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16()/.to(dtype) cast parameters and buffers; FSQ's constants (3.4965
        # would round to 3.5 in bf16 and move codes) keep their float32/int64 precision and
        # follow only the device.
        before = {n: getattr(self, f"_{n}") for n in self._const_names}
        out = super()._apply(fn, recurse)
        for n, old in before.items():
            new = getattr(self, f"_{n}")
            if new.dtype != old.dtype:
                setattr(self, f"_{n}", old.to(new.device))
        return out

    def _constants(self, dtype: torch.dtype) -> _FSQConstants:
        return _FSQConstants(levels=self.levels, **{
            n: (getattr(self, f"_{n}") if n == "basis" else getattr(self, f"_{n}").to(dtype))
            for n in self._const_names})

    def forward(self, z: torch.Tensor):
        _check_real("z", z)
        _check_last_dim("z", z, self.dim, "dim")
        h = self.project_in(z)
        cdt = _compute_dtype(h)
        codes, indices = _fsq_core(h.to(cdt), self._constants(cdt), self.variant, with_indices=True)
        z_q = self.project_out(codes.to(h.dtype))
        return z_q, indices, torch.zeros((), device=z.device, dtype=z_q.dtype)

    @property
    def codebook(self) -> torch.Tensor:
        """The implicit codebook [K, d]: row k is the code of flat index k."""
        idx = torch.arange(self.codebook_size, device=self._basis.device)
        return fsq_indices_to_codes(idx, self.levels, variant=self.variant)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, dim={self.dim}, variant={self.variant!r}, codebook_size={self.codebook_size}"


# ---- VQ: nearest codebook entry ------------------------------------------------------------------
@torch.no_grad()
def _nearest(z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = 2**24) -> torch.Tensor:
    """argmin_k ||z_n - e_k||^2 = argmin_k (||e_k||^2 - 2 z_n . e_k) for z [N, d], codebook [K, d].

    ||z_n||^2 is the same for every k and is dropped; rows of z go in chunks of about
    ``chunk_elements`` distances, so memory stays bounded for large N * K.
    """
    e_sq = codebook.pow(2).sum(-1)                                 # ||e_k||^2, [K]
    rows = max(1, chunk_elements // codebook.shape[0])
    return torch.cat([torch.addmm(e_sq, zc, codebook.T, alpha=-2).argmin(-1) for zc in z.split(rows)])


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25):
    """Vector quantization with a straight-through gradient (VQ-VAE): returns (z_q, indices, loss).

    ``z``: real floating [..., d]; ``codebook``: [K, d]. k = argmin_i ||z - e_i||^2 (squared
    Euclidean distance, in chunks), z_q = sg[e_k] + z - sg[z] (exactly e_k in value, identity
    Jacobian in z, no gradient to the codebook), and
        loss = mean ||e_k - sg[z]||^2 + beta * mean ||z - sg[e_k]||^2
    (codebook loss + beta * commitment loss, means over all N*d entries), which is where the
    codebook gets its gradient. Computed in float32 (float64 stays float64) with autocast off;
    z_q has z's dtype, indices are int64 [...], loss is a float32 (or float64) scalar.
    """
    _check_real("z", z)
    _check_real("codebook", codebook)
    if codebook.dim() != 2 or codebook.shape[0] < 1:
        raise ValueError(f"codebook: expected shape [K, d] with K >= 1, got {tuple(codebook.shape)}")
    _check_last_dim("z", z, codebook.shape[1], "codebook.shape[1]")
    if z.numel() == 0:
        raise ValueError(f"z: expected at least one vector, got shape {tuple(z.shape)}")
    check_range("beta", beta, 0.0)
    cdt = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    with _autocast_off(z.device):
        zf = z.reshape(-1, z.shape[-1]).to(cdt)
        e = codebook.to(cdt)
        idx = _nearest(zf.detach(), e.detach())                   # k = argmin ||z - e_k||
        e_k = e[idx]
        loss = F.mse_loss(e_k, zf.detach()) + beta * F.mse_loss(zf, e_k.detach())
        z_q = e_k.detach() + (zf - zf.detach())                    # straight-through: value e_k, grad to z
    return z_q.reshape(z.shape).to(z.dtype), idx.reshape(z.shape[:-1]), loss


class VectorQuantizer(nn.Module):
    """A learned codebook [codebook_size, dim] with the quantizer protocol (see `vq_quantize`).

    ``ema_decay=None``: the codebook is a parameter trained by the loss of `vq_quantize`
    (codebook + beta * commitment). ``ema_decay=a`` in (0, 1): the codebook is a buffer moved in
    training mode, after each forward, by e_k <- a e_k + (1 - a) mean{z_n : k_n = k} for every code
    used in the batch (k-means-like; one SGD step of size 1 - a on 1/2 sum_k ||e_k - mean_k||^2),
    and aux_loss is beta * commitment only. The codebook starts as N(0, 1); notebooks often
    overwrite it with encoder outputs (``vq.codebook.data.copy_(...)``).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, ema_decay: float | None = None):
        super().__init__()
        self.codebook_size = check_int("codebook_size", codebook_size, 1)
        self.dim = check_int("dim", dim, 1)
        check_range("beta", beta, 0.0)
        if ema_decay is not None:
            check_range("ema_decay", ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.beta, self.ema_decay = float(beta), ema_decay
        init = torch.randn(codebook_size, dim)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)

    def forward(self, z: torch.Tensor):
        z_q, idx, loss = vq_quantize(z, self.codebook, self.beta)
        if self.ema_decay is None:
            return z_q, idx, loss
        zf = z.reshape(-1, self.dim)
        aux = self.beta * F.mse_loss(zf.to(loss.dtype), z_q.reshape(-1, self.dim).detach().to(loss.dtype))
        if self.training:
            self._ema_update(zf.detach(), idx.reshape(-1))
        return z_q, idx, aux

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        if not bool(torch.isfinite(z).all()):  # one NaN would poison the codebook for good
            raise ValueError("z: the training batch has NaN or infinite values; the EMA codebook "
                             "was left unchanged")
        e = self.codebook
        counts = torch.bincount(idx, minlength=self.codebook_size).to(e.dtype)      # n_k
        sums = torch.zeros_like(e).index_add_(0, idx, z.to(e.dtype))                 # sum of z with k_n = k
        mean = sums / counts.clamp_min(1)[:, None]
        weight = torch.where(counts > 0, 1.0 - self.ema_decay, 0.0).to(e.dtype)      # 1 - a for used codes
        e.lerp_(mean, weight[:, None])                                               # a e_k + (1 - a) mean_k

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, "
                f"ema_decay={self.ema_decay}")


# ---- metrics and the test-bed autoencoder --------------------------------------------------------
def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """How much of a codebook a batch of indices uses: (fraction_used, perplexity).

    fraction_used = #{k : n_k > 0} / K; perplexity = exp(-sum_k p_k log p_k) with p_k = n_k / N
    (0 log 0 = 0), between 1 (one code) and min(K, N) (uniform). ``indices``: integer tensor of any
    shape with values in {0, ..., K - 1}. Returns Python floats.
    """
    K = check_int("codebook_size", codebook_size, 1)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
    if indices.numel() == 0:
        raise ValueError("indices: expected at least one index, got an empty tensor")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"indices: expected values in [0, {K - 1}], got values in [{lo}, {hi}]")
    counts = torch.bincount(indices.reshape(-1).to(torch.int64), minlength=K).to(torch.float64)
    p = counts / counts.sum()
    entropy = -torch.special.xlogy(p, p).sum()
    return float((counts > 0).to(torch.float64).mean()), float(entropy.exp())


class PatchAE(nn.Module):
    """The MLP autoencoder of the FSQ-vs-VQ experiment, around any quantizer with the protocol.

    encoder in_dim -> hidden -> hidden -> d, decoder d -> hidden -> hidden -> in_dim (GELU);
    ``quantizer`` maps [..., d] to (z_q, indices, aux_loss) (`FSQ`, `VectorQuantizer`, ...).
    forward: x [..., in_dim] -> (x_hat [..., in_dim], indices [...], aux_loss []).
    """

    def __init__(self, in_dim: int, d: int, quantizer: nn.Module, hidden: int = 64):
        super().__init__()
        check_int("in_dim", in_dim, 1)
        check_int("d", d, 1)
        check_int("hidden", hidden, 1)
        q_dim = getattr(quantizer, "dim", d)
        if q_dim != d:
            raise ValueError(f"quantizer: expected a quantizer of input dim d = {d}, got dim {q_dim}")
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                     nn.GELU(), nn.Linear(hidden, d))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                     nn.GELU(), nn.Linear(hidden, in_dim))

    def forward(self, x: torch.Tensor):
        z_q, indices, aux_loss = self.quantizer(self.encoder(x))
        return self.decoder(z_q), indices, aux_loss

# === end fsq ===
