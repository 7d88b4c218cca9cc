"""Tests of companion.geometry (hubness section): ball volumes, k-occurrence, hubness skewness,
hub-filtered and truncated latents, k-NN precision/recall and the Frechet distance.

References: closed forms, scipy (gamma, sqrtm, skew), sklearn's NearestNeighbors and plain loops.
"""
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch
from sklearn.neighbors import NearestNeighbors

from companion.geometry import (ball_cube_ratio, ball_volume, frechet_distance,
                                hub_filter_latents, hubness_skew, k_occurrence,
                                log_ball_volume, precision_recall_knn, truncate_latents)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- ball volumes ----------------------------------------------------------------------------
@pytest.mark.parametrize("d,expected", [(1, 2.0), (2, math.pi), (3, 4 * math.pi / 3),
                                        (4, math.pi**2 / 2), (5, 8 * math.pi**2 / 15)])
def test_ball_volume_closed_forms(d, expected):
    assert ball_volume(d) == pytest.approx(expected, rel=1e-12)
    assert ball_volume(d, 2.5) == pytest.approx(expected * 2.5**d, rel=1e-12)


def test_log_ball_volume_matches_scipy_and_recursion():
    for d in [1, 2, 7, 50, 333, 5000]:
        ref = d / 2 * math.log(math.pi) - scipy.special.gammaln(d / 2 + 1)
        assert log_ball_volume(d) == pytest.approx(ref, rel=1e-13, abs=1e-12)
        # V_d = (2 pi / d) V_{d-2}, a recursion independent of the Gamma function
        if d > 2:
            rec = math.log(2 * math.pi / d) + log_ball_volume(d - 2)
            assert log_ball_volume(d) == pytest.approx(rec, rel=1e-12, abs=1e-12)


def test_ball_volume_extremes():
    assert math.isfinite(log_ball_volume(100_000))  # V_d underflows, its log does not
    assert ball_volume(100_000) == 0.0
    assert log_ball_volume(3, 0.0) == -math.inf and ball_volume(3, 0.0) == 0.0
    assert ball_cube_ratio(1) == pytest.approx(1.0, rel=1e-14)
    assert ball_cube_ratio(2) == pytest.approx(math.pi / 4, rel=1e-14)


def test_ball_cube_ratio_decreases_and_matches_monte_carlo():
    ratios = [ball_cube_ratio(d) for d in range(1, 60)]
    assert all(b < a for a, b in zip(ratios, ratios[1:]))
    u = torch.rand(200_000, 4, generator=gen(0), dtype=torch.float64) * 2 - 1
    frac = float((u.square().sum(1) <= 1).double().mean())
    se = math.sqrt(frac * (1 - frac) / u.shape[0])
    assert abs(frac - ball_cube_ratio(4)) < 4 * se


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ball_volume(0), ValueError, "d: expected a value in"),
    (lambda: ball_volume(2.0), TypeError, "d: expected an int"),
    (lambda: log_ball_volume(3, -1.0), ValueError, "r: expected a value in"),
    (lambda: log_ball_volume(3, math.inf), ValueError, "r: expected a finite radius"),
    (lambda: ball_cube_ratio(-2), ValueError, "d: expected"),
])
def test_ball_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- k-occurrence ----------------------------------------------------------------------------
def sklearn_counts(x, k, queries=None):
    nn = NearestNeighbors(n_neighbors=k).fit(x.numpy())
    ind = nn.kneighbors(None if queries is None else queries.numpy(), return_distance=False)
    return np.bincount(ind.ravel(), minlength=x.shape[0])


def loop_counts(x, k, queries=None):
    """Double loop over pairs: sort (distance, index) per query, drop the query itself."""
    pts = x.tolist()
    qs = pts if queries is None else queries.tolist()
    counts = [0] * len(pts)
    for i, q in enumerate(qs):
        cand = [(math.dist(q, p), j) for j, p in enumerate(pts) if queries is not None or j != i]
        for _, j in sorted(cand)[:k]:
            counts[j] += 1
    return counts


@pytest.mark.parametrize("d,k", [(2, 1), (16, 5), (64, 10)])
def test_k_occurrence_matches_sklearn(d, k):
    x = torch.randn(600, d, generator=gen(d), dtype=torch.float64)
    c = k_occurrence(x, k, chunk=128)
    assert c.dtype == torch.long and c.shape == (600,)
    np.testing.assert_array_equal(c.numpy(), sklearn_counts(x, k))
    assert int(c.sum()) == 600 * k


def test_k_occurrence_with_queries_matches_sklearn():
    x = torch.randn(300, 8, generator=gen(1), dtype=torch.float64)
    q = torch.randn(450, 8, generator=gen(2), dtype=torch.float64)
    c = k_occurrence(x, 7, queries=q, chunk=100)
    np.testing.assert_array_equal(c.numpy(), sklearn_counts(x, 7, q))
    assert int(c.sum()) == 450 * 7
    assert int(k_occurrence(x, 300, queries=q).min()) == 450  # k = N: everyone everywhere


def test_k_occurrence_brute_force_double_loop():
    x = torch.randn(200, 5, generator=gen(3), dtype=torch.float64)
    assert k_occurrence(x, 4, chunk=37).tolist() == loop_counts(x, 4)


def test_k_occurrence_self_excluded_and_duplicates_kept():
    x = torch.randn(50, 3, generator=gen(4))
    # k = N - 1: every other point is a neighbour, and the point itself never is
    assert k_occurrence(x, 49).tolist() == [49] * 50
    # each point duplicated: its twin (distance 0) is its nearest neighbour, not itself
    y = torch.cat([x, x]).double()
    assert k_occurrence(y, 1).tolist() == [1] * 100
    np.testing.assert_array_equal(k_occurrence(y, 3).numpy(), sklearn_counts(y, 3))


def test_k_occurrence_ties_lower_index_wins():
    # integer grid: many exactly equal distances, so ties straddle place k in most rows;
    # the docstring's rule (stable sort by distance, then index) is the loop's sorted()
    x = torch.tensor(list(itertools.product(range(5), range(5))), dtype=torch.float32)
    for k in [1, 2, 3, 4, 6]:
        assert k_occurrence(x, k, chunk=7).tolist() == loop_counts(x, k), k


def test_k_occurrence_chunk_invariance_float32_and_inference_mode():
    x = torch.randn(500, 12, generator=gen(5))
    ref = k_occurrence(x, 5)
    with torch.inference_mode():
        assert torch.equal(k_occurrence(x, 5, chunk=1), ref)
    assert torch.equal(k_occurrence(x, 5, chunk=10_000), ref)
    np.testing.assert_array_equal(ref.numpy(), sklearn_counts(x.double(), 5))


def test_k_occurrence_compiles():
    x = torch.randn(300, 6, generator=gen(6))
    fn = torch.compile(k_occurrence, backend="eager", dynamic=True)
    assert torch.equal(fn(x, 3, chunk=64), k_occurrence(x, 3, chunk=64))


def test_k_occurrence_extreme_scale():
    x = torch.randn(200, 4, generator=gen(7), dtype=torch.float64)
    ref = k_occurrence(x, 5)
    assert torch.equal(k_occurrence(x * 1e150, 5), ref)
    assert torch.equal(k_occurrence(x * 1e-150, 5), ref)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: k_occurrence(x, 10), ValueError, r"k: expected k < N = 10"),
    (lambda x: k_occurrence(x, 0), ValueError, "k: expected a value in"),
    (lambda x: k_occurrence(x[0], 2), ValueError, r"x: expected a real 2-D tensor"),
    (lambda x: k_occurrence(x.long(), 2), TypeError, "x: expected a floating-point"),
    (lambda x: k_occurrence(x, 2, chunk=0), ValueError, "chunk: expected"),
    (lambda x: k_occurrence(x, 2, queries=x[:, :2]), ValueError, r"queries: expected a 2-D"),
    (lambda x: k_occurrence(x, 2, queries=x.double()), ValueError, "queries: expected dtype"),
    (lambda x: k_occurrence(x, 11, queries=x), ValueError, "k: expected a value in"),
    (lambda x: k_occurrence(x.index_fill(0, torch.tensor([3]), math.nan), 2), ValueError,
     "expected finite values"),
])
def test_k_occurrence_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(10, 3, generator=gen(8)))


# ---- hubness skewness ------------------------------------------------------------------------
def test_hubness_skew_matches_scipy():
    counts = torch.poisson(torch.full((1000,), 3.0), generator=gen(9)).long()
    assert hubness_skew(counts) == pytest.approx(float(scipy.stats.skew(counts.numpy())),
                                                 rel=1e-12)
    assert hubness_skew([1, 2, 3]) == pytest.approx(0.0, abs=1e-15)
    assert hubness_skew([0, 0, 0, 0, 100]) == pytest.approx(
        float(scipy.stats.skew([0, 0, 0, 0, 100])), rel=1e-12)


@pytest.mark.parametrize("counts,match", [
    ([3, 3, 3], "undefined when all values are equal"), ([4], "at least 2 values"),
    (torch.ones(2, 2), "a real 1-D tensor"), (torch.tensor([True, False]), "a real 1-D"),
])
def test_hubness_skew_bad_input(counts, match):
    with pytest.raises(ValueError, match=match):
        hubness_skew(counts)


# ---- latents ---------------------------------------------------------------------------------
def test_hub_filter_latents_threshold_zero_is_plain_sampling():
    z = hub_filter_latents(40, 8, k=3, t=0, pool=100, generator=gen(10))
    ref = torch.randn(100, 8, generator=gen(10))[:40]
    assert torch.equal(z, ref)


def test_hub_filter_latents_keeps_hubs_of_each_pool():
    z = hub_filter_latents(150, 16, k=5, t=12, pool=1000, generator=gen(11))
    assert z.shape == (150, 16) and z.dtype == torch.float32
    g = gen(11)
    pool = torch.randn(1000, 16, generator=g)
    hubs = pool[k_occurrence(pool, 5) >= 12]
    n = min(len(hubs), 150)
    assert torch.equal(z[:n], hubs[:n])  # the first pool's hubs, in drawing order
    # hubs sit nearer the centre: smaller norms than plain Gaussian latents
    assert z.norm(dim=1).mean() < 0.9 * pool.norm(dim=1).mean()
    z2 = hub_filter_latents(150, 16, k=5, t=12, pool=1000, generator=gen(11))
    assert torch.equal(z, z2)


def test_hub_filter_latents_bad_input_and_give_up():
    with pytest.raises(RuntimeError, match="only 0 of 5 latents kept after 2 pools"):
        hub_filter_latents(5, 4, k=2, t=1000, pool=50, max_pools=2, generator=gen(12))
    with pytest.raises(ValueError, match="k: expected k < pool = 10"):
        hub_filter_latents(5, 4, k=10, pool=10)
    with pytest.raises(ValueError, match="t: expected"):
        hub_filter_latents(5, 4, t=-1)
    with pytest.raises(TypeError, match="n_keep: expected an int"):
        hub_filter_latents(5.0, 4)


def test_truncate_latents():
    z = torch.randn(20, 6, generator=gen(13))
    assert torch.equal(truncate_latents(z, 0.7), z * 0.7)
    c = torch.randn(6, generator=gen(14))
    torch.testing.assert_close(truncate_latents(z, 0.7, center=c), c + 0.7 * (z - c))
    assert torch.equal(truncate_latents(z, 1.0, center=c), z)
    with pytest.raises(ValueError, match="psi: expected a finite"):
        truncate_latents(z, math.inf)
    with pytest.raises(TypeError, match="psi: expected a number"):
        truncate_latents(z, "0.5")
    with torch.inference_mode():
        assert torch.equal(truncate_latents(z, 0.5), z * 0.5)


# ---- precision / recall ----------------------------------------------------------------------
def naive_precision_recall(real, fake, k):
    """sklearn radii (k-th other neighbour), then a dense distance test (<=)."""
    def radii(x):
        dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors()
        return dist[:, -1]

    d = scipy.spatial.distance.cdist(fake, real)
    precision = (d <= radii(real)[None, :]).any(1).mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_naive(k):
    real = torch.randn(400, 6, generator=gen(15), dtype=torch.float64)
    fake = 0.6 * torch.randn(300, 6, generator=gen(16), dtype=torch.float64) + 0.3
    p, r = precision_recall_knn(real, fake, k, chunk=64)
    p_ref, r_ref = naive_precision_recall(real.numpy(), fake.numpy(), k)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12)
    assert p > r  # a narrow fake set: precise, poor recall


def test_precision_recall_limits_and_numpy_input():
    x = np.random.default_rng(17).normal(size=(200, 4))
    assert precision_recall_knn(x, x.copy()) == (1.0, 1.0)
    assert precision_recall_knn(torch.as_tensor(x), torch.as_tensor(x + 100.0)) == (0.0, 0.0)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a: precision_recall_knn(a, a[:, :3]), ValueError, "fake_feats: expected the feature"),
    (lambda a: precision_recall_knn(a, a[:3]), ValueError, "fake_feats: expected at least 4 rows"),
    (lambda a: precision_recall_knn(a, a, k=0), ValueError, "k: expected"),
    (lambda a: precision_recall_knn(a.long(), a), TypeError, "real_feats: expected a floating"),
    (lambda a: precision_recall_knn(a, [[1.0]]), TypeError, "fake_feats: expected a torch"),
])
def test_precision_recall_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(20, 5, generator=gen(18)))


# ---- Frechet distance ------------------------------------------------------------------------
def scipy_fid(a, b):
    """The usual FID code: covariances, then scipy.linalg.sqrtm of their product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.trace(covmean))


def eigh_fid(a, b):
    """Independent route for singular covariances: tr (S_a^1/2 S_b S_a^1/2)^1/2 by eigh."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = scipy.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(scipy.linalg.eigvalsh(root @ s_b @ root), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * cross)


@pytest.mark.parametrize("n_a,n_b,d", [(500, 400, 8), (300, 300, 32), (2000, 50, 3)])
def test_frechet_matches_scipy_sqrtm(n_a, n_b, d):
    rng = np.random.default_rng(n_a + d)
    mix = rng.normal(size=(d, d))
    a = rng.normal(size=(n_a, d)) @ mix
    b = 1.3 * rng.normal(size=(n_b, d)) @ mix.T + 0.4
    assert frechet_distance(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-9)
    assert frechet_distance(torch.as_tensor(a), torch.as_tensor(b)) == frechet_distance(a, b)


def test_frechet_one_dimensional_closed_form():
    a = torch.randn(1000, 1, generator=gen(19), dtype=torch.float64)
    b = 2.0 * torch.randn(700, 1, generator=gen(20), dtype=torch.float64) + 3.0
    ref = float((a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-12)


def test_frechet_singular_covariances():
    rng = np.random.default_rng(21)
    a, b = rng.normal(size=(10, 50)), 2.0 * rng.normal(size=(12, 50))  # n < D: rank 9 and 11
    assert frechet_distance(a, b) == pytest.approx(eigh_fid(a, b), rel=1e-6)
    shift = rng.normal(size=50)
    # a shift moves only the means: FD(a, a + c) = |c|^2 exactly, however singular Sigma_a is
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-12)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    const = np.zeros((30, 5))
    const[:, 0] = rng.normal(size=30)  # four constant features
    assert frechet_distance(const, const + 1.0) == pytest.approx(5.0, rel=1e-12)


def test_frechet_invariances_and_float32():
    a = torch.randn(200, 16, generator=gen(22), dtype=torch.float64)
    b = torch.randn(150, 16, generator=gen(23), dtype=torch.float64) * 0.8 + 0.1
    fd = frechet_distance(a, b)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(24), dtype=torch.float64))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(a[torch.randperm(200, generator=gen(25))], b) == pytest.approx(
        fd, rel=1e-10)
    assert frechet_distance(3 * a, 3 * b) == pytest.approx(9 * fd, rel=1e-10)
    # float32 input is computed in float64: the same value as the float64 copy of that input
    a32, b32 = a.float(), b.float()
    assert frechet_distance(a32, b32) == frechet_distance(a32.double(), b32.double())
    with torch.inference_mode():
        assert frechet_distance(a, b) == pytest.approx(fd, rel=1e-14)


def test_frechet_extreme_scale():
    a = torch.randn(100, 4, generator=gen(26), dtype=torch.float64)
    b = torch.randn(100, 4, generator=gen(27), dtype=torch.float64) + 1
    fd = frechet_distance(a, b)
    assert frechet_distance(a * 1e100, b * 1e100) == pytest.approx(fd * 1e200, rel=1e-10)
    assert frechet_distance(a * 1e-100, b * 1e-100) == pytest.approx(fd * 1e-200, rel=1e-10)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a: frechet_distance(a, a[:, :3]), ValueError, "feats_b: expected the feature"),
    (lambda a: frechet_distance(a[:1], a), ValueError, "feats_a: expected at least 2 rows"),
    (lambda a: frechet_distance(a[0], a), ValueError, r"feats_a: expected a 2-D tensor"),
    (lambda a: frechet_distance(a, a.int()), TypeError, "feats_b: expected a floating"),
    (lambda a: frechet_distance(a.to(torch.complex64), a), TypeError, "feats_a: expected a real"),
    (lambda a: frechet_distance(a, a.index_fill(0, torch.tensor([1]), math.inf)), ValueError,
     "feats_b: expected finite values"),
    (lambda a: frechet_distance(a.tolist(), a), TypeError, "feats_a: expected a torch.Tensor"),
])
def test_frechet_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(20, 5, generator=gen(28)))
