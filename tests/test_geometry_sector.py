"""companion.geometry, points-in-sector section: sampling, spacings, the sector criterion and
the inclusion-exclusion formula, against brute force, exact rationals, scipy and Monte Carlo."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from companion.geometry import (fits_in_sector, max_spacing_sf, sample_disc,
                                sector_probability, spacings, wendel_hemisphere_probability)

TWO_PI = 2 * math.pi


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fits_bruteforce(phi, theta):
    """Try every point as the clockwise edge of the sector: all others within theta of it."""
    phi = [p % TWO_PI for p in phi]
    return any(all((q - p) % TWO_PI <= theta + 1e-12 for q in phi) for p in phi)


def test_sample_disc_shape_radius_and_angle():
    x = sample_disc(100_000, 3, gen(), dtype=torch.float64)
    assert x.shape == (100_000, 3, 2) and x.dtype == torch.float64
    r = x.norm(dim=-1).flatten()
    assert r.max() <= 1.0
    se = math.sqrt(0.25 * 0.75 / r.numel())
    assert abs((r <= 0.5).double().mean().item() - 0.25) < 4 * se      # P(r <= 1/2) = 1/4
    phi = torch.atan2(x[..., 1], x[..., 0]).flatten()
    assert abs((phi > 0).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / phi.numel())
    assert torch.equal(sample_disc(5, 4, gen(1)), sample_disc(5, 4, gen(1)))
    assert sample_disc(0, 4).shape == (0, 4, 2)


def test_spacings_against_a_loop():
    phi = 10 * torch.randn(200, 5, generator=gen(), dtype=torch.float64)  # outside [0, 2pi)
    gaps = spacings(phi)
    assert gaps.shape == phi.shape and bool((gaps >= 0).all())
    assert torch.allclose(gaps.sum(-1), torch.ones(200, dtype=torch.float64), atol=1e-12)
    for row, g in zip(phi.tolist(), gaps.tolist()):
        s = sorted(p % TWO_PI for p in row)
        ref = [b - a for a, b in zip(s, s[1:])] + [s[0] + TWO_PI - s[-1]]
        assert np.allclose(g, np.array(ref) / TWO_PI, atol=1e-12)
    # rotation invariance (as a multiset), and one point has the gap 1
    rot = spacings(phi + 1.234).sort(-1).values
    assert torch.allclose(rot, gaps.sort(-1).values, atol=1e-12)
    assert spacings(torch.tensor([[3.0]])).item() == 1.0


def test_fits_in_sector_equals_brute_force():
    g = gen(2)
    for n in (1, 2, 3, 5, 8):
        phi = TWO_PI * torch.rand(2000, n, generator=g, dtype=torch.float64)
        for theta in (0.3, math.pi / 2, math.pi, 4.5, 6.0):
            ours = fits_in_sector(phi, theta, angles=True).tolist()
            ref = [fits_bruteforce(row, theta) for row in phi.tolist()]
            assert ours == ref, (n, theta)


def test_points_and_angles_agree_and_edges():
    x = sample_disc(1000, 4, gen(3), dtype=torch.float64)
    phi = torch.atan2(x[..., 1], x[..., 0])
    for theta in (1.0, math.pi, 5.0):
        assert torch.equal(fits_in_sector(x, theta), fits_in_sector(phi, theta))
    assert bool(fits_in_sector(x, TWO_PI).all())
    assert bool(fits_in_sector(x[:, :1], 0.0).all())                    # one point always fits
    theta = torch.full((1000,), math.pi, dtype=torch.float64)           # tensor theta
    assert torch.equal(fits_in_sector(x, theta), fits_in_sector(x, math.pi))
    with torch.inference_mode():
        assert fits_in_sector(x, 2.0).shape == (1000,)


def test_sf_float_equals_exact_and_identity():
    for n in range(1, 13):
        for x in (Fraction(1, 50), Fraction(1, 7), Fraction(1, 3), Fraction(1, 2),
                  Fraction(5, 8), Fraction(99, 100)):
            exact = max_spacing_sf(n, x)
            assert isinstance(exact, Fraction) and 0 <= exact <= 1
            assert abs(float(max_spacing_sf(n, float(x))) - float(exact)) < 1e-12
            # without the truncation (1 - kx)_+ the alternating sum is identically 1
            full = sum((-1) ** (k - 1) * math.comb(n, k) * (1 - k * x) ** (n - 1)
                       for k in range(1, n + 1))
            assert full == 1
    assert max_spacing_sf(4, Fraction(1, 2)) == Fraction(1, 2)
    assert max_spacing_sf(5, 0) == 1 and max_spacing_sf(5, 1) == 0


def test_sf_first_spacing_is_beta_and_monte_carlo():
    n = 6
    u = torch.rand(200_000, n - 1, generator=gen(4), dtype=torch.float64)
    cuts = torch.cat((torch.zeros(200_000, 1, dtype=torch.float64), u.sort(-1).values,
                      torch.ones(200_000, 1, dtype=torch.float64)), -1)
    pieces = cuts.diff(dim=-1)
    # the first piece is Beta(1, n - 1)
    assert stats.kstest(pieces[:5000, 0].numpy(), stats.beta(1, n - 1).cdf).pvalue > 0.01
    for x in (0.15, 0.3, 0.6):
        mc = (pieces.amax(-1) > x).double().mean().item()
        p = float(max_spacing_sf(n, x))
        assert abs(mc - p) < 4 * math.sqrt(p * (1 - p) / 200_000) + 1e-9, x


def test_sf_large_n_is_exact_not_cancelled():
    n, x = 60, 0.01
    val = float(max_spacing_sf(n, x))
    exact = float(max_spacing_sf(n, Fraction(x)))
    assert val == exact and 0.0 <= val <= 1.0
    naive = sum((-1) ** (k - 1) * math.comb(n, k) * max(1 - k * x, 0.0) ** (n - 1)
                for k in range(1, n + 1))
    assert abs(naive - exact) > 1e-6    # the plain float sum is visibly wrong here
    arr = max_spacing_sf(n, np.array([[0.02, 0.1], [0.3, 0.9]]))
    assert arr.shape == (2, 2) and bool(((arr >= 0) & (arr <= 1)).all())


def test_sector_probability_closed_form_and_monte_carlo():
    assert float(sector_probability(4, math.pi)) == pytest.approx(0.5, abs=1e-15)
    theta = np.linspace(0, math.pi, 9)
    for n in (2, 3, 5):
        assert np.allclose(sector_probability(n, theta), n * (theta / TWO_PI) ** (n - 1),
                           rtol=0, atol=1e-14)
    x = sample_disc(100_000, 5, gen(5), dtype=torch.float64)
    for theta in (math.pi / 3, math.pi, 4 * math.pi / 3, 1.9 * math.pi):
        mc = fits_in_sector(x, theta).double().mean().item()
        p = float(sector_probability(5, theta))
        assert abs(mc - p) < 4 * math.sqrt(p * (1 - p) / 100_000) + 1e-9, theta


def test_sector_probability_monotone_and_limits():
    theta = np.linspace(0, TWO_PI, 2001)
    for n in (2, 3, 8, 12):
        p = sector_probability(n, theta)
        assert bool((np.diff(p) >= -1e-12).all()) and abs(p[-1] - 1) < 1e-12 and p[0] == 0
    assert bool((sector_probability(1, theta) == 1).all())
    p30 = sector_probability(30, theta[::100])                          # exact path, n > 20
    assert bool((np.diff(p30) >= 0).all()) and abs(p30[-1] - 1) < 1e-12


def test_wendel():
    for n in range(1, 12):
        assert wendel_hemisphere_probability(n, 2) == pytest.approx(
            float(sector_probability(n, math.pi)), abs=1e-14)
        assert wendel_hemisphere_probability(n, n) == 1.0
        assert wendel_hemisphere_probability(n, 1) == 2.0 ** (1 - n)
    assert wendel_hemisphere_probability(4, 3) == 7 / 8


def test_bad_input():
    with pytest.raises(TypeError, match="n: expected an int, got float"):
        sector_probability(4.0, 1.0)
    with pytest.raises(ValueError, match=r"n: expected a value in \[1, inf\], got 0"):
        sector_probability(0, 1.0)
    with pytest.raises(ValueError, match=r"theta: expected angles in \[0, 2 pi\]"):
        sector_probability(4, 7.0)
    with pytest.raises(ValueError, match=r"theta: expected a value in \[0.0, "):
        fits_in_sector(torch.rand(3, 4), -0.1)
    with pytest.raises(TypeError, match="points_or_angles: expected a floating-point tensor"):
        fits_in_sector(torch.ones(3, 4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match=r"points need shape \[..., n, 2\]"):
        fits_in_sector(torch.rand(3, 4), 1.0, angles=False)
    with pytest.raises(TypeError, match="angles: expected a floating-point tensor"):
        spacings(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected real numbers, got NaN"):
        max_spacing_sf(3, float("nan"))
    with pytest.raises(ValueError, match=r"d: expected a value in \[1, inf\], got 0"):
        wendel_hemisphere_probability(3, 0)
    with pytest.raises(TypeError, match="n_trials: expected an int, got float"):
        sample_disc(10.0, 3)
