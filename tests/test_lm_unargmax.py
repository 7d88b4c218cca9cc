"""Tests of companion.lm's unargmaxable-tokens section: the margin LP (scipy HiGHS), the
witness, Frank-Wolfe and the convex-hull test, checked against each other and against Qhull."""
import pytest
import torch

from companion.lm import (argmax_margin, argmax_region_grid, find_unargmaxable,
                          frank_wolfe_min_norm)

spatial = pytest.importorskip("scipy.spatial")

# the article's 2-D example: w5 = (1, 1) sits in the middle of w5 +- e1, w5 +- e2
EXAMPLE = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 0.0], [1.0, 2.0], [1.0, 1.0]],
                       dtype=torch.float64)


def random_layer(n, d, seed, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True) * torch.exp(sigma * torch.randn(n, 1, generator=g,
                                                                            dtype=torch.float64))


def hull_unargmaxable(W):
    """Naive reference (no bias): the rows that are not vertices of Qhull's hull."""
    return sorted(set(range(len(W))) - set(spatial.ConvexHull(W.numpy()).vertices.tolist()))


def test_example_margins():
    t = [argmax_margin(EXAMPLE, None, k) for k in range(5)]
    assert abs(t[4]) <= 1e-9
    assert min(t[:4]) > 0.1
    # the margin of class 0 by hand: z = (-100, 0) beats w1 by 200, w2 and w3 by 100 ... but
    # w4 = (1, 2) differs from w0 = (0, 1) by (1, 1), so the best z is on the box corner:
    # max_z min(2 z1, z1 + z2 - ... ) -> t* = 100 for the box |z_j| <= 100
    assert t[0] == pytest.approx(100.0, abs=1e-6)
    res = find_unargmaxable(EXAMPLE)
    assert res.indices.tolist() == [4] and res.mask.tolist() == [False] * 4 + [True]
    assert len(res.undecided) == 0 and res.decided_by[4] == "lp"
    alpha, norm = frank_wolfe_min_norm(EXAMPLE[4] - EXAMPLE[:4])
    assert float(norm) <= 1e-6 and float(alpha.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("d", [2, 3])
def test_lp_fw_hull_agree_without_bias(d):
    for seed in range(2):
        W = random_layer(20, d, seed, sigma=1.0)
        ref = hull_unargmaxable(W)
        for certify in (True, False):
            assert find_unargmaxable(W, certify_first=certify).indices.tolist() == ref
            assert find_unargmaxable(W, method="hull", certify_first=certify
                                     ).indices.tolist() == ref
        # Frank-Wolfe decides by a certificate and may leave a near-degenerate class open
        res = find_unargmaxable(W, method="frank_wolfe", certify_first=False)
        decided = set(range(20)) - set(res.undecided.tolist())
        assert sorted(set(res.indices.tolist()) & decided) == sorted(set(ref) & decided)
        assert len(res.undecided) <= 1


def test_lp_matches_lifted_upper_hull_with_bias():
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        W = torch.randn(12, 2, generator=g, dtype=torch.float64)
        b = torch.randn(12, generator=g, dtype=torch.float64)
        lp = find_unargmaxable(W, b, bound=1e3).indices.tolist()
        hull = find_unargmaxable(W, b, method="hull").indices.tolist()
        assert lp == hull, seed


def test_equal_norms_are_all_certified():
    W = random_layer(300, 3, 0, sigma=0.0)
    res = find_unargmaxable(W)
    assert len(res.indices) == 0 and set(res.decided_by) == {"witness"}


def test_witness_is_sound_for_large_layers():
    # n > 4096 takes the float32 path with a rounding slack: every class it certifies must
    # also win at z = w_k in exact-enough float64 arithmetic
    W = random_layer(5000, 32, 1, sigma=0.5)
    res = find_unargmaxable(W, time_budget=0.0)
    certified = torch.tensor([how == "witness" for how in res.decided_by])
    assert 0.1 < float(certified.double().mean()) < 1.0
    assert len(res.undecided) == 5000 - int(certified.sum())   # zero budget: no LP ran
    L = W @ W.T
    own = L.diagonal().clone()
    L.fill_diagonal_(-float("inf"))
    margin64 = own - L.amax(1)
    assert bool((margin64[certified] > 0).all())
    # the slack costs little: almost every class with a float64 margin above 1e-3 is certified
    assert float(certified[margin64 > 1e-3].double().mean()) > 0.99


def test_frank_wolfe_min_norm_against_lp_distance():
    # min-norm point of the segment [(1, 1), (1, -1)] is (1, 0), of a triangle around 0 is 0
    D = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    alpha, norm = frank_wolfe_min_norm(D)
    assert float(norm) == pytest.approx(1.0, abs=1e-6)
    assert alpha.tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    # batched, against a dense brute-force search over the simplex of 3 points
    g = torch.Generator().manual_seed(0)
    D = torch.randn(5, 3, 2, generator=g, dtype=torch.float64) + 0.8
    _, norms = frank_wolfe_min_norm(D, iters=5000, tol=1e-14)
    s = torch.linspace(0, 1, 401, dtype=torch.float64)
    a, c = torch.meshgrid(s, s, indexing="ij")
    keep = a + c <= 1
    A = torch.stack([a[keep], c[keep], 1 - a[keep] - c[keep]], 1)       # [P, 3]
    brute = (A @ D).norm(dim=-1).min(1).values
    assert torch.allclose(norms, brute, atol=2e-3)
    assert bool((norms <= brute + 1e-9).all())


def test_plain_frank_wolfe_is_slower_than_away_steps():
    W = random_layer(30, 2, 3, sigma=1.0)
    D = W[0] - W[1:]
    _, n_away = frank_wolfe_min_norm(D, iters=200, tol=0.0)
    _, n_plain = frank_wolfe_min_norm(D, iters=200, tol=0.0, away_steps=False)
    assert float(n_away) <= float(n_plain) + 1e-12


def test_region_grid_matches_naive_argmax():
    W = torch.randn(7, 2, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    grid = argmax_region_grid(W, b, 3.0, 9)
    assert grid.shape == (9, 9) and grid.dtype == torch.long
    xs = torch.linspace(-3, 3, 9, dtype=torch.float64)
    for r in range(9):
        for c in range(9):
            z = torch.stack([xs[c], xs[r]])
            assert int(grid[r, c]) == int((W @ z + b).argmax())
    with torch.inference_mode():
        assert torch.equal(argmax_region_grid(W, b, 3.0, 9), grid)
    compiled = torch.compile(argmax_region_grid, backend="eager")
    assert torch.equal(compiled(W, b, 3.0, 9), grid)
    # the example's middle class owns no cell of any grid
    assert 4 not in argmax_region_grid(EXAMPLE, None, 5.0, 101).unique().tolist()


def test_extreme_inputs():
    # huge and tiny scales: the decision is scale-free without bias
    for scale in (1e-6, 1e6):
        assert find_unargmaxable(EXAMPLE * scale).indices.tolist() == [4]
    # duplicated rows never strictly win; a single class always does
    W = torch.cat([EXAMPLE[:4], EXAMPLE[:1]])
    assert find_unargmaxable(W).indices.tolist() == [0, 4]
    assert find_unargmaxable(W, method="hull").indices.tolist() == [0, 4]
    assert argmax_margin(EXAMPLE[:1], None, 0) == float("inf")
    assert find_unargmaxable(EXAMPLE[:1]).indices.tolist() == []
    # float32 input gives the float64 answer
    assert find_unargmaxable(EXAMPLE.float()).indices.tolist() == [4]


def test_box_bound_matters_with_bias():
    # class 0's bias is far below the others: it wins only far out along its own direction
    W = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([-100.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert 0 in find_unargmaxable(W, b, bound=10.0).indices.tolist()
    assert 0 not in find_unargmaxable(W, b, bound=1e3).indices.tolist()
    assert argmax_margin(W, b, 0, bound=10.0) < 0 < argmax_margin(W, b, 0, bound=1e3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="W: expected shape"):
        find_unargmaxable(torch.zeros(3))
    with pytest.raises(TypeError, match="W: expected a floating-point"):
        find_unargmaxable(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"b: expected shape \(3,\)"):
        find_unargmaxable(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="method: 'hull' is limited to d <= 8"):
        find_unargmaxable(torch.randn(20, 9), method="hull")
    with pytest.raises(ValueError, match="method: expected one of"):
        find_unargmaxable(torch.randn(5, 2), method="simplex")
    with pytest.raises(ValueError, match="b: method='frank_wolfe' handles no bias"):
        find_unargmaxable(torch.randn(5, 2), torch.randn(5), method="frank_wolfe")
    with pytest.raises(ValueError, match="bound: expected a value in"):
        argmax_margin(torch.randn(5, 2), None, 0, bound=0.0)
    with pytest.raises(ValueError, match=r"k: expected a value in \[0, 4\]"):
        argmax_margin(torch.randn(5, 2), None, 5)
    with pytest.raises(ValueError, match="W: expected finite"):
        argmax_margin(torch.tensor([[float("nan"), 0.0]]), None, 0)
    with pytest.raises(ValueError, match="D: expected shape"):
        frank_wolfe_min_norm(torch.zeros(3))
    with pytest.raises(ValueError, match=r"W: expected shape \[n, 2\]"):
        argmax_region_grid(torch.zeros(3, 3), None, 1.0, 10)
    with pytest.raises(ValueError, match="res: expected"):
        argmax_region_grid(torch.zeros(3, 2), None, 1.0, 1)
