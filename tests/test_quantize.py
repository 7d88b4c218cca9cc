"""Tests of companion.quantize (notebook: fsq): STE rounding, FSQ, VQ, codebook usage, PatchAE."""
import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import companion.quantize as quantize
from companion.quantize import (
    FSQ, FSQ_RECOMMENDED_LEVELS, PatchAE, VectorQuantizer, codebook_usage, fsq_codes_to_indices,
    fsq_indices_to_codes, fsq_quantize, ste_round, vq_quantize,
)

PAPER_LEVELS = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5), (8, 8, 8, 5, 5, 5)]
VARIANTS = ("tanh", "sigmoid")
EPS = 1e-3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- naive references, one scalar at a time, in Python floats ------------------------------------
def _fsq_scalar(t: float, L: int, variant: str) -> float:
    """The paper's bound (tanh, with its tan shift) or Su's sigmoid bound, rounded and normalised."""
    if variant == "tanh":
        h = (L - 1) * (1 - EPS) / 2
        o = 0.5 if L % 2 == 0 else 0.0
        q = round(math.tanh(t + math.tan(o / h)) * h - o)     # Python rounds ties to even, like torch
        return q / (L // 2)
    c = round((L - 1) / (1 + math.exp(-t)))
    return 2 * c / (L - 1) - 1


def _fsq_naive(z: torch.Tensor, levels, variant):
    flat = z.reshape(-1, len(levels)).tolist()
    out = [[_fsq_scalar(t, L, variant) for t, L in zip(row, levels)] for row in flat]
    return torch.tensor(out, dtype=torch.float64).reshape(z.shape)


def _level_index(code: float, L: int, variant: str) -> int:
    return round(code * (L // 2) + L // 2) if variant == "tanh" else round((code + 1) * (L - 1) / 2)


def _index_naive(code_row, levels, variant):
    """idx = c_1 + L_1 (c_2 + L_2 (c_3 + ...)): Horner's rule, the mixed-radix number read backwards."""
    idx = 0
    for code, L in reversed(list(zip(code_row, levels))):
        idx = idx * L + _level_index(code, L, variant)
    return idx


def _bin_centre_inputs(levels, variant, n, seed=0, jitter=0.3):
    """z whose bounded value lies within `jitter` (in level units) of a random grid point, far
    from every rounding edge, so that any two correct FSQ bounds must agree on them."""
    g = _gen(seed)
    cols = []
    for L in levels:
        c = torch.randint(0, L, (n,), generator=g, dtype=torch.float64)
        u = (c + jitter * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)).clamp(0.05, L - 1.05)
        if variant == "tanh":
            h, o = (L - 1) * (1 - EPS) / 2, (0.5 if L % 2 == 0 else 0.0)
            cols.append(torch.atanh((u - L // 2 + o) / h) - math.tan(o / h))
        else:
            cols.append(torch.logit(u / (L - 1)))
    return torch.stack(cols, -1).float()


# --- ste_round -----------------------------------------------------------------------------------
def test_ste_round_value_is_round_and_gradient_is_one():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64, requires_grad=True)
    y = ste_round(x)
    assert torch.equal(y, x.detach().round())
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, torch.ones_like(x))
    # the same as the stop-gradient formula x + sg[round(x) - x], value and gradient
    y_sg = x + (x.round() - x).detach()
    assert torch.equal(y, y_sg)
    w = torch.randn(1001, dtype=torch.float64, generator=_gen())
    assert torch.equal(torch.autograd.grad((y * w).sum(), x)[0], torch.autograd.grad((y_sg * w).sum(), x)[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_ste_round_under_torch_func_and_low_precision():
    x = torch.randn(7, dtype=torch.float64, generator=_gen())
    assert torch.equal(torch.func.jacrev(ste_round)(x), torch.eye(7, dtype=torch.float64))
    assert torch.equal(torch.func.vmap(ste_round)(x[None].expand(3, 7)), x.round()[None].expand(3, 7))
    for dtype in (torch.float16, torch.bfloat16):
        xh = (100 * torch.randn(50, generator=_gen(1))).to(dtype).requires_grad_()
        y = ste_round(xh)
        assert y.dtype == dtype and torch.equal(y, xh.detach().round())
        y.sum().backward()
        assert torch.equal(xh.grad, torch.ones_like(xh))


def test_ste_round_rejects_integer_input():
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        ste_round(torch.arange(3))


# --- fsq_quantize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsq_quantize_matches_scalar_reference(variant):
    levels = (2, 3, 4, 5, 8)
    z = 3 * torch.randn(400, 5, dtype=torch.float64, generator=_gen())
    got = fsq_quantize(z, levels, variant=variant)
    assert got.dtype == torch.float64 and got.shape == z.shape
    torch.testing.assert_close(got, _fsq_naive(z, levels, variant), rtol=0, atol=1e-15)
    z32 = z.float()
    torch.testing.assert_close(fsq_quantize(z32, levels, variant=variant).double(),
                               _fsq_naive(z32.double(), levels, variant), rtol=0, atol=3e-7)  # ulps, far below a step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("L", range(2, 10))
def test_fsq_gives_exactly_L_levels(L, variant):
    t = torch.linspace(-20, 20, 200_001, dtype=torch.float32)[:, None]
    codes = fsq_quantize(t, [L], variant=variant)
    values = sorted(set((codes + 0.0).flatten().tolist()))       # + 0.0 turns -0.0 into 0.0
    if variant == "sigmoid":
        want = [2 * c / (L - 1) - 1 for c in range(L)]          # symmetric, endpoints +-1
    elif L % 2 == 1:
        want = [k / (L // 2) for k in range(-(L // 2), L // 2 + 1)]
    else:
        want = [k / (L // 2) for k in range(-(L // 2), L // 2)]
    assert len(values) == L
    torch.testing.assert_close(torch.tensor(values), torch.tensor(want, dtype=torch.float32), rtol=0, atol=3e-7)
    assert min(values) >= -1 and max(values) <= 1


def test_fsq_tanh_is_centred_at_zero_for_odd_L_and_shift_only_recentres():
    # odd L: z = 0 maps to code 0 and the grid is symmetric; even L: the tan shift moves z = 0 to the
    # bounded value tanh(s) h - o, within 1e-3 of 0 once L >= 4 (the exact centring atanh(o / h) is
    # NaN at L = 2, where o / h > 1)
    for L in range(3, 10, 2):
        assert fsq_quantize(torch.zeros(1, 1), [L]).item() == 0.0
    for L in range(4, 10, 2):
        h, o = (L - 1) * (1 - EPS) / 2, 0.5
        assert abs(math.tanh(math.tan(o / h)) * h - o) < 1e-3
    assert torch.isnan(torch.atanh(torch.tensor(0.5 / (0.5 * (1 - EPS)))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsq_gradient_is_straight_through_on_the_bounded_value(variant, monkeypatch):
    levels = (2, 3, 4, 5, 8)
    z = torch.randn(6, 5, dtype=torch.float64, generator=_gen(), requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: fsq_quantize(x, levels, variant=variant), z)
    # closed form: d code / dz = h (1 - tanh^2(z + s)) / w  or  2 sigma(z)(1 - sigma(z))
    want = torch.empty_like(z)
    for i, L in enumerate(levels):
        if variant == "tanh":
            h, o = (L - 1) * (1 - EPS) / 2, (0.5 if L % 2 == 0 else 0.0)
            want[:, i] = h * (1 - torch.tanh(z[:, i] + math.tan(o / h)) ** 2) / (L // 2)
        else:
            s = torch.sigmoid(z[:, i])
            want[:, i] = (L - 1) * s * (1 - s) * 2 / (L - 1)
    diag = torch.einsum("ijij->ij", jac)
    torch.testing.assert_close(diag, want.detach(), rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(jac) == torch.count_nonzero(diag)   # channels do not mix
    # the STE path is the smooth function with rounding replaced by the identity: gradcheck it
    monkeypatch.setattr(quantize, "ste_round", lambda x: x)
    assert torch.autograd.gradcheck(lambda x: fsq_quantize(x, levels, variant=variant), (z,))
    smooth_jac = torch.autograd.functional.jacobian(lambda x: fsq_quantize(x, levels, variant=variant), z)
    torch.testing.assert_close(jac, smooth_jac, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsq_low_precision_autocast_and_extreme_inputs(variant):
    levels = (8, 5, 5, 5)
    z = 2 * torch.randn(300, 4, generator=_gen())
    ref = fsq_quantize(z, levels, variant=variant)
    for dtype in (torch.float16, torch.bfloat16):
        zh = z.to(dtype)
        got = fsq_quantize(zh, levels, variant=variant)
        assert got.dtype == dtype
        # computed in float32 from the rounded input, then cast
        assert torch.equal(got, fsq_quantize(zh.float(), levels, variant=variant).to(dtype))
        # so it is float32's grid point except where rounding z moved it across an edge (one step)
        assert (got.float() - ref).abs().max() <= 2 / 4 + 1e-2
        same = fsq_codes_to_indices(got, levels, variant=variant) == fsq_codes_to_indices(ref, levels, variant=variant)
        assert same.float().mean() > 0.95
        zh.requires_grad_()
        fsq_quantize(zh, levels, variant=variant).float().sum().backward()
        assert zh.grad.dtype == dtype and torch.isfinite(zh.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fsq_quantize(z, levels, variant=variant), ref)
    big = torch.tensor([[1e4, -1e4, 1e30, -float("inf")]], requires_grad=True)
    out = fsq_quantize(big, levels, variant=variant)
    top = 0.75 if variant == "tanh" else 1.0                       # even L = 8: top code (L/2 - 1)/(L/2)
    assert out.tolist() == [[top, -1.0, 1.0, -1.0]]
    out.sum().backward()
    assert torch.isfinite(big.grad).all()


def test_fsq_quantize_bad_inputs():
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"levels: every level must be >= 2, got \[1, 5\]"):
        fsq_quantize(z, [1, 5])
    with pytest.raises(ValueError, match=r"z: expected the last dim to be len\(levels\) = 3, got shape \(4, 2\)"):
        fsq_quantize(z, [5, 5, 5])
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        fsq_quantize(torch.ones(4, 2, dtype=torch.int64), [5, 5])
    with pytest.raises(TypeError, match="z: expected a real floating-point tensor"):
        fsq_quantize(torch.ones(4, 2, dtype=torch.complex64), [5, 5])
    with pytest.raises(TypeError, match="levels: expected a sequence of ints"):
        fsq_quantize(z, [5.0, 5])
    with pytest.raises(TypeError, match="levels: expected a sequence of ints"):
        fsq_quantize(z, 5)
    with pytest.raises(ValueError, match="levels: expected at least one level"):
        fsq_quantize(z, [])
    with pytest.raises(ValueError, match=r"levels: the tanh bound reaches every level only for L <= 1000"):
        fsq_quantize(z, [5, 1001])
    assert fsq_quantize(torch.tensor([[30.0, 30.0]]), [5, 1001], variant="sigmoid").tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="variant: expected one of 'tanh' | 'sigmoid', got 'round'"):
        fsq_quantize(z, [5, 5], variant="round")
    with pytest.raises(TypeError):
        fsq_quantize(z, [5, 5], "sigmoid")                       # variant is keyword-only


# --- codes <-> indices ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("levels", PAPER_LEVELS)
def test_indices_round_trip_on_every_code(levels, variant):
    K = math.prod(levels)
    idx = torch.arange(K)
    codes = fsq_indices_to_codes(idx, levels, variant=variant)
    assert codes.shape == (K, len(levels)) and codes.dtype == torch.float32
    assert torch.equal(fsq_codes_to_indices(codes, levels, variant=variant), idx)
    assert torch.unique(codes, dim=0).shape[0] == K               # K distinct codes: a bijection
    # the table holds exactly what fsq_quantize outputs, bit for bit
    q = fsq_quantize(_bin_centre_inputs(levels, variant, 2000), levels, variant=variant)
    assert torch.equal(codes[fsq_codes_to_indices(q, levels, variant=variant)], q)


@pytest.mark.parametrize("variant", VARIANTS)
def test_indices_match_the_naive_mixed_radix_and_cover_the_codebook(variant):
    levels = (7, 5, 5, 5, 5)
    z = 3 * torch.randn(5000, 5, generator=_gen())
    codes = fsq_quantize(z, levels, variant=variant)
    idx = fsq_codes_to_indices(codes, levels, variant=variant)
    assert idx.dtype == torch.int64 and idx.shape == (5000,)
    assert idx.tolist() == [_index_naive(row, levels, variant) for row in codes.tolist()]
    # the index set of the whole grid is exactly {0, ..., K - 1}
    grid = torch.tensor(list(itertools.product(*[range(L) for L in levels])), dtype=torch.float32)
    scale = torch.tensor([L // 2 if variant == "tanh" else (L - 1) / 2 for L in levels])
    shift = torch.tensor([float(L // 2) if variant == "tanh" else (L - 1) / 2 for L in levels])
    all_idx = fsq_codes_to_indices((grid - shift) / scale, levels, variant=variant)
    assert sorted(all_idx.tolist()) == list(range(math.prod(levels)))


def test_indices_to_codes_and_back_with_batch_dims_and_low_precision():
    levels = (8, 6, 5)
    idx = torch.randint(0, 240, (3, 4, 5), generator=_gen(), dtype=torch.int32)
    codes = fsq_indices_to_codes(idx, levels)
    assert codes.shape == (3, 4, 5, 3)
    assert torch.equal(fsq_codes_to_indices(codes, levels), idx.long())
    for dtype in (torch.float16, torch.bfloat16):               # codes like 1/3 are inexact there
        assert torch.equal(fsq_codes_to_indices(codes.to(dtype), levels), idx.long())


def test_codes_indices_bad_inputs():
    levels = [8, 6, 5]
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 239\]"):
        fsq_indices_to_codes(torch.tensor([0, 240]), levels)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 239\]"):
        fsq_indices_to_codes(torch.tensor([-1]), levels)
    with pytest.raises(TypeError, match="indices: expected an integer tensor"):
        fsq_indices_to_codes(torch.tensor([1.0]), levels)
    with pytest.raises(ValueError, match=r"codes: expected values on the FSQ grid of levels \[8, 6, 5\]"):
        fsq_codes_to_indices(torch.tensor([[0.1, 0.0, 0.0]]), levels)      # between grid points
    with pytest.raises(ValueError, match="codes: expected values on the FSQ grid"):
        fsq_codes_to_indices(torch.tensor([[1.0, 0.0, 0.0]]), levels)      # even L = 8: +1 is off the grid
    with pytest.raises(ValueError, match="codes: expected values on the FSQ grid"):
        fsq_codes_to_indices(torch.tensor([[0.0, 0.0, float("nan")]]), levels)
    with pytest.raises(ValueError, match=r"codes: expected the last dim to be len\(levels\) = 3"):
        fsq_codes_to_indices(torch.zeros(2, 4), levels)
    with pytest.raises(TypeError, match="codes: expected a floating-point tensor"):
        fsq_codes_to_indices(torch.zeros(2, 3, dtype=torch.int64), levels)
    # +1 is on the sigmoid grid for every L
    assert fsq_codes_to_indices(torch.tensor([[1.0, 1.0, 1.0]]), levels, variant="sigmoid").item() == 239


# --- the FSQ module -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsq_module_protocol(variant):
    levels = (8, 5, 5, 5)
    fsq = FSQ(levels, variant=variant)
    z = torch.randn(2, 7, 4, generator=_gen())
    z_q, idx, aux = fsq(z)
    assert torch.equal(z_q, fsq_quantize(z, levels, variant=variant))
    assert torch.equal(idx, fsq_codes_to_indices(z_q, levels, variant=variant))
    assert aux.shape == () and aux.item() == 0.0
    assert fsq.codebook_size == 1000 and fsq.dim == 4
    assert torch.equal(fsq.codebook, fsq_indices_to_codes(torch.arange(1000), levels, variant=variant))
    assert torch.equal(fsq.codebook[idx], z_q)
    assert list(fsq.state_dict()) == []                           # no parameters, no persistent state
    with torch.autocast("cpu", dtype=torch.bfloat16):             # autocast changes nothing
        z_q16, idx16, _ = fsq(z)
    assert torch.equal(z_q16, z_q) and torch.equal(idx16, idx)
    big_z = 3 * torch.randn(5000, 4, generator=_gen(2))            # every index, exactly, with autocast on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_big = fsq(big_z)[1]
    assert torch.equal(idx_big, fsq_codes_to_indices(fsq_quantize(big_z, levels, variant=variant), levels, variant=variant))


def test_fsq_module_with_projections_low_precision_and_huge_codebooks():
    torch.manual_seed(0)
    fsq = FSQ([7, 5, 5, 5, 5], dim=32)
    z = torch.randn(64, 32, requires_grad=True)
    z_q, idx, aux = fsq(z)
    assert z_q.shape == (64, 32) and idx.shape == (64,)
    codes = fsq_quantize(fsq.project_in(z), fsq.levels)
    assert torch.equal(idx, fsq_codes_to_indices(codes, fsq.levels))
    torch.testing.assert_close(z_q, fsq.project_out(codes))
    (z_q.square().sum() + aux).backward()
    assert z.grad.abs().sum() > 0 and fsq.project_in.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq16, idx16, _ = fsq(z)
        h16 = fsq.project_in(z)                                    # the projection runs in bf16 ...
    assert zq16.dtype == torch.bfloat16 and h16.dtype == torch.bfloat16 and idx16.dtype == torch.int64
    # ... the quantizer in float32, and the index is exact (no bf16 matmul rounds it)
    assert torch.equal(idx16, fsq_codes_to_indices(fsq_quantize(h16.float(), fsq.levels), fsq.levels))
    # K = 1000 * 1000 * 17 > 2^24: indices stay exact (float64 accumulation)
    big = FSQ([1000, 1000, 17])
    zb = torch.cat([torch.tensor([[20.0, 20.0, 20.0], [-20.0, -20.0, -20.0]]), torch.randn(50, 3)])
    _, idx_big, _ = big(zb)
    codes_big = fsq_quantize(zb, big.levels)
    assert idx_big.tolist() == [_index_naive(r, big.levels, "tanh") for r in codes_big.tolist()]
    assert idx_big[0].item() == 1000 * 1000 * 17 - 1 and idx_big[1].item() == 0


def test_fsq_module_compiles_to_one_graph():
    fsq = FSQ([8, 6, 5], dim=16)
    compiled = torch.compile(fsq, backend="aot_eager", fullgraph=True)   # no graph break
    z = torch.randn(50, 16, generator=_gen(), requires_grad=True)
    got, want = compiled(z), fsq(z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (g,) = torch.autograd.grad(got[0].sum(), z)
    torch.testing.assert_close(g, torch.autograd.grad(want[0].sum(), z)[0])


def test_fsq_module_bad_inputs_and_recommended_levels():
    with pytest.raises(ValueError, match=r"levels: every level must be >= 2, got \[1, 5\]"):
        FSQ([1, 5])
    with pytest.raises(ValueError, match=r"z: expected the last dim to be dim = 3, got shape \(2, 4\)"):
        FSQ([8, 6, 5])(torch.randn(2, 4))
    with pytest.raises(ValueError, match="variant: expected one of"):
        FSQ([8, 6, 5], variant="atanh")
    assert {k: math.prod(v) for k, v in FSQ_RECOMMENDED_LEVELS.items()} == {
        256: 240, 1024: 1000, 4096: 4375, 16384: 15360, 65536: 64000}
    assert [tuple(v) for v in FSQ_RECOMMENDED_LEVELS.values()] == PAPER_LEVELS


# --- against vector_quantize_pytorch (lucidrains) -------------------------------------------------
@pytest.mark.parametrize("levels", PAPER_LEVELS + [(4, 4), (4, 4, 4)])
def test_same_codebook_and_index_order_as_vector_quantize_pytorch(levels):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    theirs = vqp.FSQ(list(levels))
    ours = FSQ(levels)
    assert theirs.codebook_size == ours.codebook_size
    assert torch.equal(theirs.implicit_codebook, ours.codebook)            # same grid, same order
    assert torch.equal(theirs.codes_to_indices(ours.codebook).long(), torch.arange(ours.codebook_size))
    # their bound uses (1 + eps) and atanh where the paper (and we) use (1 - eps) and tan: the two
    # agree wherever the bounded value is not within ~L * eps of a rounding edge
    z = _bin_centre_inputs(levels, "tanh", 4000)
    codes_t, idx_t = theirs(z[None])
    codes_o, idx_o, _ = ours(z)
    assert torch.equal(codes_t[0], codes_o) and torch.equal(idx_t[0].long(), idx_o)
    zg = 2 * torch.randn(20000, len(levels), generator=_gen(1))
    agree = (theirs(zg[None])[0][0] == ours(zg)[0]).all(-1).float().mean()
    assert agree > 0.97


@pytest.mark.parametrize("levels", [(2, 3, 4), (8, 6, 5), (8, 5, 5, 5)])
def test_sigmoid_variant_is_their_symmetry_preserving_fsq_at_twice_the_input(levels):
    # round((L-1) sigmoid(z)) = round((L-1)(tanh(z/2) + 1)/2): their preserve_symmetry quantizer at z/2
    vqp = pytest.importorskip("vector_quantize_pytorch")
    theirs = vqp.FSQ(list(levels), preserve_symmetry=True)
    z = _bin_centre_inputs(levels, "sigmoid", 4000)
    codes_t, idx_t = theirs(z[None] / 2)
    codes_o, idx_o, _ = FSQ(levels, variant="sigmoid")(z)
    assert torch.equal(codes_t[0], codes_o) and torch.equal(idx_t[0].long(), idx_o)


# --- VQ -------------------------------------------------------------------------------------------
def test_vq_nearest_matches_cdist_argmin_and_chunks():
    g = _gen()
    z = torch.randn(3, 50, 8, dtype=torch.float64, generator=g)
    codebook = torch.randn(300, 8, dtype=torch.float64, generator=g)
    z_q, idx, loss = vq_quantize(z, codebook)
    brute = torch.cdist(z.reshape(-1, 8), codebook).argmin(-1).reshape(3, 50)
    assert torch.equal(idx, brute)
    assert torch.equal(z_q, codebook[idx])                          # exactly e_k in value
    small_chunks = quantize._nearest(z.reshape(-1, 8), codebook, chunk_elements=1000)
    assert torch.equal(small_chunks.reshape(3, 50), brute)
    e = codebook[idx]
    torch.testing.assert_close(loss, 1.25 * ((e - z) ** 2).mean(), rtol=1e-12, atol=0)


def test_vq_gradients_straight_through_and_the_aux_loss_identity():
    g = _gen()
    z = torch.randn(40, 6, dtype=torch.float64, generator=g, requires_grad=True)
    codebook = torch.randn(16, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, generator=g)
    z_q, idx, loss = vq_quantize(z, codebook, beta=0.25)
    gz, ge = torch.autograd.grad((z_q * w).sum() + loss, (z, codebook))
    e = codebook.detach()[idx]
    n = z.numel()
    # STE: the upstream gradient w reaches z unchanged; commitment adds 2 beta (z - e) / n
    torch.testing.assert_close(gz, w + 0.25 * 2 * (z.detach() - e) / n, rtol=1e-12, atol=1e-15)
    # the codebook gets only the codebook loss: sum over assigned z of 2 (e_k - z) / n
    want = torch.zeros_like(codebook).index_add_(0, idx, 2 * (e - z.detach()) / n)
    torch.testing.assert_close(ge, want, rtol=1e-12, atol=1e-15)
    # the identity behind the split: grad ||e - z||^2 = grad (||e - sg z||^2 + ||z - sg e||^2)
    ek = codebook[idx]
    g_joint = torch.autograd.grad(((ek - z) ** 2).sum(), (z, codebook), retain_graph=True)
    g_split = torch.autograd.grad(((ek - z.detach()) ** 2).sum() + ((z - ek.detach()) ** 2).sum(), (z, codebook))
    for a, b in zip(g_joint, g_split):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_vq_low_precision_and_autocast():
    g = _gen()
    z = torch.randn(200, 16, generator=g)
    codebook = torch.randn(64, 16, generator=g)
    _, idx32, loss32 = vq_quantize(z, codebook)
    for dtype in (torch.float16, torch.bfloat16):
        z_q, idx, loss = vq_quantize(z.to(dtype), codebook)
        assert z_q.dtype == dtype and loss.dtype == torch.float32 and torch.isfinite(loss)
        assert (idx == idx32).float().mean() > 0.95
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, loss = vq_quantize(z, codebook)
    assert torch.equal(idx, idx32) and loss.dtype == torch.float32  # distances stay in float32
    big = torch.full((2, 16), 1e4)
    z_q, idx, loss = vq_quantize(big, codebook)
    assert torch.isfinite(z_q).all() and torch.isfinite(loss)


def test_vq_bad_inputs():
    with pytest.raises(ValueError, match=r"z: expected the last dim to be codebook.shape\[1\] = 8, got shape \(4, 3\)"):
        vq_quantize(torch.randn(4, 3), torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"codebook: expected shape \[K, d\]"):
        vq_quantize(torch.randn(4, 3), torch.randn(3))
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        vq_quantize(torch.ones(4, 3, dtype=torch.int64), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"beta: expected a value in \[0.0, inf\]"):
        vq_quantize(torch.randn(4, 3), torch.randn(10, 3), beta=-1.0)
    with pytest.raises(ValueError, match="z: expected at least one vector"):
        vq_quantize(torch.randn(0, 3), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"ema_decay: expected a value in \(0.0, 1.0\)"):
        VectorQuantizer(10, 3, ema_decay=1.0)
    with pytest.raises(ValueError, match=r"codebook_size: expected a value in \[1, inf\]"):
        VectorQuantizer(0, 3)


def test_vector_quantizer_plain_and_ema():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4)
    z = torch.randn(100, 4)
    z_q, idx, aux = vq(z)
    want = vq_quantize(z, vq.codebook)
    assert torch.equal(z_q, want[0]) and torch.equal(idx, want[1]) and torch.equal(aux, want[2])
    assert [n for n, _ in vq.named_parameters()] == ["codebook"]

    ema = VectorQuantizer(32, 4, beta=0.5, ema_decay=0.9)
    assert list(ema.parameters()) == []
    before = ema.codebook.clone()
    zr = z.clone().requires_grad_()
    z_q, idx, aux = ema(zr)
    torch.testing.assert_close(aux, 0.5 * ((zr.detach() - before[idx]) ** 2).mean())   # commitment only
    # Su's update e_k <- a e_k + (1 - a) mean_k, for the codes used in the batch
    want = before.clone()
    for k in idx.unique().tolist():
        want[k] = 0.9 * before[k] + 0.1 * z[idx == k].mean(0)
    torch.testing.assert_close(ema.codebook, want, rtol=1e-6, atol=1e-6)
    # ... which is one SGD step of size 1 - a on 1/2 sum_k ||e_k - mean_k||^2
    e = before.clone().requires_grad_()
    means = torch.stack([z[idx == k].mean(0) if (idx == k).any() else before[k] for k in range(32)])
    opt = torch.optim.SGD([e], lr=0.1)
    (0.5 * ((e - means) ** 2).sum()).backward()
    opt.step()
    torch.testing.assert_close(ema.codebook, e.detach(), rtol=1e-6, atol=1e-6)
    aux.backward()
    assert zr.grad.abs().sum() > 0
    ema.eval()
    frozen = ema.codebook.clone()
    ema(z)
    assert torch.equal(ema.codebook, frozen)                        # no update in eval mode


# --- codebook_usage and PatchAE -------------------------------------------------------------------
def test_codebook_usage_matches_counting():
    idx = torch.randint(0, 50, (3, 400), generator=_gen())
    frac, ppl = codebook_usage(idx, 64)
    counts = Counter(idx.flatten().tolist())
    n = idx.numel()
    assert frac == len(counts) / 64
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    assert abs(ppl - math.exp(entropy)) < 1e-9
    assert codebook_usage(torch.arange(64), 64) == (1.0, pytest.approx(64.0, rel=1e-12))
    assert codebook_usage(torch.zeros(10, dtype=torch.int64), 64) == (1 / 64, 1.0)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 63\], got values in \[0, 64\]"):
        codebook_usage(torch.tensor([0, 64]), 64)
    with pytest.raises(TypeError, match="indices: expected an integer tensor"):
        codebook_usage(torch.tensor([0.0]), 64)


def test_patch_ae_trains_through_either_quantizer():
    torch.manual_seed(0)
    x = torch.rand(256, 16)
    for quantizer, d in ((FSQ([8, 5, 5, 5]), 4), (VectorQuantizer(64, 16), 16)):
        model = PatchAE(16, d, quantizer)
        x_hat, idx, aux = model(x)
        assert x_hat.shape == x.shape and idx.shape == (256,) and aux.shape == ()
        (F.mse_loss(x_hat, x) + aux).backward()
        assert model.encoder[0].weight.grad.abs().sum() > 0        # gradient reaches the encoder
    with pytest.raises(ValueError, match="quantizer: expected a quantizer of input dim d = 3, got dim 4"):
        PatchAE(16, 3, FSQ([8, 5, 5, 5]))


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_fsq_module_constants_survive_dtype_casts(cast):
    torch.manual_seed(0)
    levels = [8, 5, 5, 5]
    z = torch.randn(200_000, 4) * 2
    ref_idx = FSQ(levels)(z)[1]
    q = getattr(FSQ(levels), cast)()
    assert q._half_range.dtype == torch.float32 and q._basis.dtype == torch.int64
    zc = z.to(getattr(torch, "bfloat16" if cast == "bfloat16" else "float16"))
    codes, idx, _ = q(zc)
    assert torch.equal(codes.float(), fsq_quantize(zc, levels).float())
    back = q.float()
    assert torch.equal(back(z)[1], ref_idx)


def test_fsq_non_finite_rows_get_index_minus_one():
    q = FSQ([8, 5, 5])
    z = torch.randn(5, 3)
    z[1, 0], z[3, 2] = float("nan"), float("inf")
    _, idx, _ = q(z)
    assert idx[1].item() == -1 and idx[3].item() == -1
    assert (idx[[0, 2, 4]] >= 0).all()


def test_ema_codebook_rejects_non_finite_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, ema_decay=0.9)
    vq(torch.randn(32, 4))
    before = vq.codebook.clone()
    z = torch.randn(32, 4)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        vq(z)
    assert torch.equal(vq.codebook, before)
