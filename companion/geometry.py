"""High-dimensional geometry: ball volumes, hubness of nearest neighbours, points in a sector,
and the point-cloud metrics (Frechet distance, k-NN precision/recall) the generative notebooks use.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# === hubness ===
import math

from ._validate import check_floating, check_int, check_range

__all__ += [
    "ball_volume", "log_ball_volume", "ball_cube_ratio", "k_occurrence", "hubness_skew",
    "hub_filter_latents", "truncate_latents", "precision_recall_knn", "frechet_distance",
]


# ---- volumes: V_d(r) = pi^(d/2) r^d / Gamma(d/2 + 1)  (hubness notebook, eq. ball-volume) ---
def log_ball_volume(d: int, r: float = 1.0) -> float:
    r"""``log V_d(r)``, the log volume of the ``d``-dimensional Euclidean ball of radius ``r``::

        log V_d(r) = (d/2) log(pi) - lgamma(d/2 + 1) + d log(r)

    Exact to float64 rounding for every ``d`` (no overflow: V_d itself underflows past d ~ 1300).
    ``d``: int >= 1; ``r``: number >= 0 (``r = 0`` gives ``-inf``). Returns a Python float.
    """
    check_int("d", d, 1)
    check_range("r", r, 0.0)
    if math.isinf(r):
        raise ValueError(f"r: expected a finite radius, got {r!r}")
    log_r = math.log(r) if r > 0 else -math.inf
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0) + d * log_r


def ball_volume(d: int, r: float = 1.0) -> float:
    r"""``V_d(r) = pi^(d/2) r^d / Gamma(d/2 + 1)``: pi r^2 for d = 2, 4 pi r^3 / 3 for d = 3.

    ``exp(log_ball_volume(d, r))``; 0.0 where it underflows. ``d``: int >= 1, ``r`` >= 0.
    """
    return math.exp(log_ball_volume(d, r))


def ball_cube_ratio(d: int) -> float:
    r"""``V_d(1) / 2^d``: the fraction of the cube ``[-1, 1]^d`` filled by its inscribed unit ball.

    1 at d = 1, pi/4 at d = 2, then falling faster than any exponential (eq. ball-cube-ratio):
    the acceptance rate of rejection-sampling the ball from the cube. ``d``: int >= 1.
    """
    return math.exp(log_ball_volume(d) - d * math.log(2.0))


# ---- k-occurrence (hub value) N_k and its skewness  (hubness notebook, eq. k-occurrence) ------
def k_occurrence(x: torch.Tensor, k: int, queries: torch.Tensor | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    r"""Hub values ``N_k``: how often each point of ``x`` is among the k nearest neighbours.

    ``N_k(x_j) = #{ i : x_j in kNN(q_i) }`` over the queries ``q_i`` (eq. k-occurrence), with
    Euclidean distance. ``queries=None`` means the points themselves, and then each point is
    excluded from its own list *by index* (an exact duplicate elsewhere still counts, as in
    ``sklearn.neighbors.NearestNeighbors().kneighbors()``); the counts then sum to ``N k``.

    Ties: when several points are equally far at the k-th place, the lower index wins (a stable
    sort of the distance row), so the result is deterministic. Only rows with such a tie pay for
    the sort; the others use ``topk``.

    ``x``: ``[N, D]`` floating; ``queries``: ``[M, D]`` (same dtype and device) or None;
    ``k``: int, ``1 <= k < N`` (``k <= N`` with explicit queries); ``chunk``: queries per block,
    memory ``chunk * N`` distances (10,000^2 float32 at once would be 400 MB). Each row is
    ranked by ``|x_j|^2 - 2 q.x_j`` (the squared distance less the row's constant ``|q|^2``,
    one ``addmm`` per block) in the dtype of ``x``, so "tied" means equal after that rounding.
    Returns ``LongTensor[N]`` on the device of ``x``.
    """
    check_floating("x", x)
    if x.is_complex() or x.dim() != 2:
        raise ValueError(f"x: expected a real 2-D tensor [N, D], got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    n = x.shape[0]
    check_int("chunk", chunk, 1)
    if queries is None:
        check_int("k", k, 1)
        if k >= n:
            raise ValueError(f"k: expected k < N = {n} (a point is not its own neighbour), "
                             f"got {k}")
        q = x
    else:
        check_floating("queries", queries)
        if queries.dim() != 2 or queries.shape[1] != x.shape[1]:
            raise ValueError(f"queries: expected a 2-D tensor [M, {x.shape[1]}], got shape "
                             f"{tuple(queries.shape)}")
        if queries.dtype != x.dtype or queries.device != x.device:
            raise ValueError(f"queries: expected dtype {x.dtype} on {x.device}, got "
                             f"{queries.dtype} on {queries.device}")
        check_int("k", k, 1, n)
        q = queries
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(q).all()):
        raise ValueError("x, queries: expected finite values, found NaN or inf")
    counts = torch.zeros(n, dtype=torch.long, device=x.device)
    x_sq = x.square().sum(1)
    for s in range(0, q.shape[0], chunk):
        # |q - x_j|^2 - |q|^2 = |x_j|^2 - 2 q.x_j: one fused matrix product per block; the
        # dropped |q|^2 is constant along a row, so each row's ranking is unchanged
        d = torch.addmm(x_sq, q[s:s + chunk], x.T, beta=1, alpha=-2)  # [c, N]
        if queries is None:
            rows = torch.arange(d.shape[0], device=x.device)
            d[rows, rows + s] = math.inf  # a point is never its own neighbour
        m = min(k + 1, n)
        vals, idx = d.topk(m, dim=1, largest=False, sorted=True)
        idx = idx[:, :k]
        if m > k:  # a tie straddling place k: settle it by index with a stable sort
            tied = vals[:, k - 1] == vals[:, k]
            if bool(tied.any()):
                order = torch.sort(d[tied], dim=1, stable=True).indices[:, :k]
                idx = idx.clone()
                idx[tied] = order
        counts += torch.bincount(idx.reshape(-1), minlength=n)
    return counts


def hubness_skew(counts) -> float:
    r"""Sample skewness of the hub values, ``m_3 / m_2^{3/2}`` with central moments ``m_j``.

    The biased (Fisher-Pearson) estimator, the default of ``scipy.stats.skew``; 0 for a
    symmetric distribution, large and positive when a few hubs collect most occurrences.
    ``counts``: 1-D tensor (any real dtype) or sequence, at least 2 values, not all equal.
    Computed in float64; returns a Python float.
    """
    c = counts if isinstance(counts, torch.Tensor) else torch.as_tensor(counts)
    if c.dim() != 1 or c.numel() < 2 or c.dtype == torch.bool or c.is_complex():
        raise ValueError(f"counts: expected a real 1-D tensor with at least 2 values, got "
                         f"{c.dtype} of shape {tuple(c.shape)}")
    c = c.to(torch.float64)
    dev = c - c.mean()
    m2, m3 = dev.square().mean(), dev.pow(3).mean()
    if float(m2) <= 0.0:
        raise ValueError("counts: skewness is undefined when all values are equal")
    return float(m3 / m2.pow(1.5))


# ---- latent sampling -------------------------------------------------------------------------
def hub_filter_latents(n_keep: int, dim: int, k: int = 5, t: int = 50, pool: int = 10_000,
                       generator: torch.Generator | None = None, *, max_pools: int = 1000,
                       chunk: int = 1024, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Gaussian latents kept only where they are hubs (Liang et al. 2022; eq. hub-filter).

    Repeats: draw ``pool`` latents ``z ~ N(0, I_dim)``, compute ``N_k`` within that pool
    (``k_occurrence(z, k)``), keep the z with ``N_k >= t``; until ``n_keep`` are kept (the
    first ``n_keep`` in drawing order are returned). ``t`` is relative to the mean hub value
    k: with pool 10,000 and k = 5, t = 50 keeps about 1 % of 512-D latents.

    ``n_keep``, ``dim``, ``k``, ``pool``: ints >= 1 with ``k < pool``; ``t``: int >= 0;
    ``generator``: torch.Generator on ``device`` (or None). Raises RuntimeError naming the
    acceptance rate after ``max_pools`` pools. Returns ``[n_keep, dim]`` of ``dtype``.
    """
    for name, v in (("n_keep", n_keep), ("dim", dim), ("pool", pool), ("max_pools", max_pools)):
        check_int(name, v, 1)
    check_int("k", k, 1)
    check_int("t", t, 0)
    if k >= pool:
        raise ValueError(f"k: expected k < pool = {pool}, got {k}")
    kept, total, drawn = [], 0, 0
    while total < n_keep:
        if drawn == max_pools:
            raise RuntimeError(
                f"hub_filter_latents: only {total} of {n_keep} latents kept after {max_pools} "
                f"pools of {pool} (acceptance {total / (max_pools * pool):.2g}); lower t or "
                f"raise max_pools")
        z = torch.randn(pool, dim, generator=generator, device=device, dtype=dtype)
        drawn += 1
        z = z[k_occurrence(z, k, chunk=chunk) >= t]
        kept.append(z)
        total += z.shape[0]
    return torch.cat(kept)[:n_keep]


def truncate_latents(z: torch.Tensor, psi: float, center: torch.Tensor | None = None):
    r"""The truncation trick: ``center + psi (z - center)`` (``center`` defaults to 0).

    ``z``: ``[..., dim]`` floating; ``psi``: number in [0, 1] typically (any finite value is
    allowed: psi > 1 widens); ``center``: broadcastable to z (e.g. StyleGAN's mean w).
    """
    check_floating("z", z)
    check_range("psi", psi)
    if math.isinf(psi):
        raise ValueError(f"psi: expected a finite number, got {psi!r}")
    if center is None:
        return z * psi
    check_floating("center", center)
    return torch.lerp(center.to(z.dtype), z, psi)


# ---- feature-set checks shared by frechet_distance and precision_recall_knn -------------------
def _feature_matrix(name: str, x, min_rows: int = 1) -> torch.Tensor:
    """A ``[n, D]`` finite floating tensor (NumPy arrays are converted, without a copy)."""
    if not isinstance(x, torch.Tensor) and hasattr(x, "__array_interface__"):
        x = torch.as_tensor(x)  # a NumPy array: shares its memory
    check_floating(name, x)
    if x.is_complex():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [n, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(
            f"{name}: expected at least {min_rows} rows and 1 column, got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return x


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_b}: expected the feature dimension of {name_a} ({a.shape[1]}), "
            f"got {b.shape[1]}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected the device of {name_a} ({a.device}), got {b.device}")


def frechet_distance(feats_a, feats_b) -> float:
    r"""Frechet distance between Gaussians fitted to two feature sets: the FID formula.

    ``feats_a``: ``[n_a, D]``, ``feats_b``: ``[n_b, D]`` real tensors or NumPy arrays, n >= 2;
    computed in float64 on their device. With sample means ``mu`` and unbiased covariances
    ``Sigma`` (divisor n - 1)::

        FD = |mu_a - mu_b|^2 + tr Sigma_a + tr Sigma_b - 2 tr (Sigma_a^{1/2} Sigma_b Sigma_a^{1/2})^{1/2}

    The last trace is computed without any matrix square root: with centred data A, B and
    their QR factors A = Q_a R_a, B = Q_b R_b, ``Sigma_a = R_a^T R_a / (n_a - 1)``, and the
    eigenvalues of ``Sigma_a Sigma_b`` are the squared singular values of ``R_a R_b^T`` over
    ``(n_a - 1)(n_b - 1)``, so the trace is the nuclear norm ``||R_a R_b^T||_* / sqrt(...)``.
    This stays exact when the covariances are singular (n < D, duplicated or constant
    features), where ``scipy.linalg.sqrtm(Sigma_a @ Sigma_b)`` returns complex noise.
    Returns a Python float >= 0 (a rounding-level negative value is clipped to 0).
    """
    a = _feature_matrix("feats_a", feats_a, min_rows=2)
    b = _feature_matrix("feats_b", feats_b, min_rows=2)
    _check_pair("feats_a", a, "feats_b", b)
    a, b = a.to(torch.float64), b.to(torch.float64)
    n_a, n_b = a.shape[0], b.shape[0]
    mu_a, mu_b = a.mean(0), b.mean(0)
    A, B = a - mu_a, b - mu_b
    R_a = torch.linalg.qr(A, mode="r")[1]  # [min(n_a, D), D]
    R_b = torch.linalg.qr(B, mode="r")[1]
    cross = torch.linalg.svdvals(R_a @ R_b.T).sum() / math.sqrt((n_a - 1) * (n_b - 1))
    fd = ((mu_a - mu_b).square().sum() + A.square().sum() / (n_a - 1)
          + B.square().sum() / (n_b - 1) - 2.0 * cross)
    return max(float(fd), 0.0)


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest *other* row (self excluded by index)."""
    n = x.shape[0]
    out = []
    for s in range(0, n, chunk):
        d = torch.cdist(x[s:s + chunk], x)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + s] = math.inf
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def _fraction_covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                      chunk: int) -> float:
    """Fraction of ``points`` within distance ``radii[j]`` (<=) of some ``centres[j]``."""
    inside = 0
    for s in range(0, points.shape[0], chunk):
        d = torch.cdist(points[s:s + chunk], centres)
        inside += int((d <= radii).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall_knn(real_feats, fake_feats, k: int = 3, *, chunk: int = 1024):
    r"""Improved precision and recall of Kynkaenniemi et al. (2019) on any features.

    Each real point carries a ball whose radius is the distance to its k-th nearest other real
    point; the union of these balls estimates the real manifold. ``precision`` is the fraction
    of fake points inside it (distance <= radius); ``recall`` swaps the roles (fake balls, real
    points). The point itself is excluded by index, so an exact duplicate of a point still
    counts as a neighbour (radius 0 if k duplicates exist).

    ``real_feats``: ``[n_r, D]``, ``fake_feats``: ``[n_f, D]`` real tensors or NumPy arrays,
    same D and device, each with more than k rows; ``k``: int >= 1; ``chunk``: rows per
    distance block (memory ``chunk * n`` floats). Computed in the inputs' common dtype.
    Returns ``(precision, recall)`` as Python floats in [0, 1].
    """
    check_int("k", k, 1)
    check_int("chunk", chunk, 1)
    real = _feature_matrix("real_feats", real_feats, min_rows=k + 1)
    fake = _feature_matrix("fake_feats", fake_feats, min_rows=k + 1)
    _check_pair("real_feats", real, "fake_feats", fake)
    dtype = torch.promote_types(real.dtype, fake.dtype)
    real, fake = real.to(dtype), fake.to(dtype)
    r_real = _kth_neighbour_distance(real, k, chunk)
    r_fake = _kth_neighbour_distance(fake, k, chunk)
    precision = _fraction_covered(fake, real, r_real, chunk)
    recall = _fraction_covered(real, fake, r_fake, chunk)
    return precision, recall


# === points-in-sector ===
# n random points in a disc lie in one sector of central angle theta (apex at the centre) iff the
# largest of their n circular gaps is at least 2 pi - theta. Normalised by 2 pi, the gaps are
# uniform on the simplex, and inclusion-exclusion over "gap i exceeds x" gives (notebook
# points-in-sector, eq. sector-sf)
#     P(max gap > x) = sum_{k >= 1, kx < 1} (-1)^(k-1) C(n, k) (1 - kx)^(n-1),  x = 1 - theta/2pi.
from fractions import Fraction
from numbers import Rational

import numpy as np

__all__ += [
    "sample_disc", "spacings", "fits_in_sector", "max_spacing_sf", "sector_probability",
    "wendel_hemisphere_probability",
]

_FLOAT_TERMS_MAX_N = 20  # above this the alternating float sum cancels: exact integers instead


def sample_disc(n_trials: int, n: int, generator=None, *, device=None,
                dtype=None) -> torch.Tensor:
    """``n_trials`` sets of ``n`` points uniform in the unit disc: ``[n_trials, n, 2]``.

    The angle is uniform on [0, 2 pi) and the radius is ``sqrt(U)`` (area-uniform: P(r <= s) =
    s^2). ``dtype`` defaults to torch's default float dtype; randomness only from ``generator``."""
    check_int("n_trials", n_trials, 0)
    check_int("n", n, 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    kw = dict(generator=generator, device=device, dtype=dtype)
    phi = 2 * math.pi * torch.rand(n_trials, n, **kw)
    r = torch.rand(n_trials, n, **kw).sqrt()
    return torch.stack((r * phi.cos(), r * phi.sin()), dim=-1)


def _angles(x: torch.Tensor, angles) -> torch.Tensor:
    """Angles ``[..., n]`` from angles, or from points ``[..., n, 2]`` via atan2."""
    if angles is None:
        angles = not (x.dim() >= 2 and x.shape[-1] == 2)
    if angles:
        return x
    if x.dim() < 2 or x.shape[-1] != 2:
        raise ValueError(f"points_or_angles: points need shape [..., n, 2], got {tuple(x.shape)}")
    return torch.atan2(x[..., 1], x[..., 0])


def spacings(angles: torch.Tensor) -> torch.Tensor:
    """The n circular gaps between ``n`` angles (radians, any real values), divided by 2 pi.

    ``angles``: floating ``[..., n]``, n >= 1. Returns ``[..., n]``, non-negative, summing to 1:
    the gap after each point in counter-clockwise order, the last one wrapping around,
    ``2 pi + phi_(1) - phi_(n)``. A single point has the one gap 1. The gaps as a set are
    exchangeable, but not position by position: the last one covers angle 0 and is
    size-biased; for the gaps seen from a given point, measure angles from that point."""
    check_floating("angles", angles)
    if angles.dim() < 1 or angles.shape[-1] < 1:
        raise ValueError(f"angles: expected shape [..., n] with n >= 1, got {tuple(angles.shape)}")
    two_pi = 2 * math.pi
    phi = torch.remainder(angles, two_pi).sort(dim=-1).values
    wrap = two_pi - (phi[..., -1:] - phi[..., :1])  # exactly 2 pi for a single point
    return torch.cat((phi[..., 1:] - phi[..., :-1], wrap), dim=-1) / two_pi


def fits_in_sector(points_or_angles: torch.Tensor, theta, *, angles: bool | None = None
                   ) -> torch.Tensor:
    """Whether all n points lie in one closed sector of central angle ``theta`` (apex at 0).

    ``points_or_angles``: points ``[..., n, 2]`` or angles ``[..., n]`` in radians. By default a
    tensor of two or more dims whose last size is 2 is read as points; pass ``angles=True`` for
    angles of n = 2 points. ``theta``: float or tensor broadcastable to ``[...]``, in [0, 2 pi].
    Returns a bool tensor ``[...]``: largest gap >= 1 - theta / (2 pi) (eq. sector-criterion)."""
    check_floating("points_or_angles", points_or_angles)
    if isinstance(theta, torch.Tensor):
        bad = (theta < 0) | (theta > 2 * math.pi) | theta.isnan()
        if bool(bad.any()):
            raise ValueError("theta: expected angles in [0, 2 pi]")
    else:
        check_range("theta", theta, 0.0, 2 * math.pi)
    phi = _angles(points_or_angles, angles)
    if phi.dim() < 1 or phi.shape[-1] < 1:
        raise ValueError(f"points_or_angles: expected at least one point, got shape "
                         f"{tuple(points_or_angles.shape)}")
    gap = spacings(phi).amax(dim=-1)
    return gap >= 1 - theta / (2 * math.pi)


def _sf_exact(n: int, x: Fraction) -> Fraction:
    """Eq. sector-sf in exact rationals: x = u / v, terms (v - k u)^(n-1) / v^(n-1)."""
    if x <= 0:
        return Fraction(1)
    u, v = x.numerator, x.denominator
    total, k = 0, 1
    while k <= n and k * u < v:  # 1 - kx > 0
        total += (-1) ** (k - 1) * math.comb(n, k) * (v - k * u) ** (n - 1)
        k += 1
    return Fraction(total, v ** (n - 1))


def max_spacing_sf(n: int, x):
    """P(largest of the n spacings of the unit circle > x) (eq. sector-sf).

    ``n``: int >= 1. ``x``: a Python int or ``fractions.Fraction`` gives an exact ``Fraction``;
    a float or array gives a float64 ``ndarray`` of the same shape. The float path sums the
    alternating terms directly for n <= 20 and otherwise evaluates each entry exactly (the float
    is converted to its exact rational value), since the terms grow like C(n, n/2) while the
    result lies in [0, 1]. x <= 0 gives 1 and x >= 1 gives 0."""
    check_int("n", n, 1)
    if isinstance(x, Rational) and not isinstance(x, bool):
        return _sf_exact(n, Fraction(x))
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("x: expected real numbers, got NaN")
    if n > _FLOAT_TERMS_MAX_N:
        flat = [float(_sf_exact(n, Fraction(float(v)))) for v in x.ravel()]
        return np.array(flat, dtype=np.float64).reshape(x.shape)
    if x.ndim == 0:  # one value: plain Python floats, no array overhead
        v = float(x)
        if v <= 0:
            return np.float64(1.0)
        total, k = 0.0, 1
        while k <= n and k * v < 1:
            total += (-1) ** (k - 1) * math.comb(n, k) * (1.0 - k * v) ** (n - 1)
            k += 1
        return np.float64(min(max(total, 0.0), 1.0))
    out = np.zeros_like(x)
    for k in range(1, n + 1):
        base = np.clip(1.0 - k * x, 0.0, None)  # (1 - kx)_+
        out += (-1) ** (k - 1) * math.comb(n, k) * base ** (n - 1)
    return np.where(x <= 0, 1.0, np.clip(out, 0.0, 1.0))


def sector_probability(n: int, theta):
    """P(n points uniform in a disc lie in one sector of central angle ``theta``) (eq. sector-prob).

    ``n``: int >= 1; ``theta``: float or array of radians in [0, 2 pi]. Returns a float64
    ``ndarray`` shaped like ``theta``: ``max_spacing_sf(n, 1 - theta / 2 pi)``, which is
    ``n (theta / 2 pi)^(n-1)`` for theta <= pi. One point always fits (P = 1)."""
    check_int("n", n, 1)
    if isinstance(theta, torch.Tensor):
        theta = theta.detach().cpu().numpy()
    theta = np.asarray(theta, dtype=np.float64)
    if np.isnan(theta).any() or (theta < 0).any() or (theta > 2 * math.pi).any():
        raise ValueError("theta: expected angles in [0, 2 pi]")
    if n == 1:
        return np.ones_like(theta)[()] if theta.ndim == 0 else np.ones_like(theta)
    return max_spacing_sf(n, 1.0 - theta / (2 * math.pi))


def wendel_hemisphere_probability(n: int, d: int) -> float:
    """P(n points of a distribution on R^d symmetric about 0 lie in one half-space through 0),
    Wendel (1962): ``2^-(n-1) sum_{k<d} C(n-1, k)`` (eq. sector-wendel), for points in general
    position. ``n``, ``d``: ints >= 1. d = 2 equals ``sector_probability(n, pi)``."""
    check_int("n", n, 1)
    check_int("d", d, 1)
    return float(Fraction(sum(math.comb(n - 1, k) for k in range(d)), 2 ** (n - 1)))
