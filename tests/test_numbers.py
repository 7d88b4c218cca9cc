"""companion.numbers: the minimum of a + b + c with N = ab + c (notebook n-equals-ab-plus-c).

References: min_abc_bruteforce (every pair) for every N <= 3000, and an exhaustive numpy table
of S*(N) for every N <= 10^5 (independent of the package); the rigorous square-root search
against the O(N^(1/4)) one up to 10^5 and on random N near 10^12; known optima far beyond
float precision."""
import math
import random
from decimal import Decimal, getcontext

import numpy as np
import pytest

from companion.numbers import (min_abc_bruteforce, min_abc_quartic, min_abc_search_range,
                               min_abc_sqrt)

# The N <= 10^5 where the article's range (sqrt(N/2), sqrt(N)] misses every optimum.
ARTICLE_FAILURES = [8, 18, 19, 32, 33, 34, 98, 128, 129, 162, 163, 164, 200, 201, 202, 203,
                    512, 882, 883, 968, 969, 970, 971, 2048, 2049, 2888, 2889, 2890]


def exhaustive_table(n_max: int) -> np.ndarray:
    """S*(N) for N = 0..n_max from every pair a <= b with ab <= n_max, vectorised:
    S*(N) = N + min over m <= N of h(m), h(m) = min over ab = m of (a + b - m)."""
    h = np.full(n_max + 1, np.iinfo(np.int64).max // 2, dtype=np.int64)
    h[0] = 0  # a = b = 0
    for a in range(1, math.isqrt(n_max) + 1):
        b = np.arange(a, n_max // a + 1, dtype=np.int64)
        m = a * b  # distinct for a fixed a, so a plain fancy-index update is exact
        h[m] = np.minimum(h[m], a + b - m)
    return np.arange(n_max + 1, dtype=np.int64) + np.minimum.accumulate(h)


@pytest.fixture(scope="module")
def table():
    return exhaustive_table(10**5)


def is_valid(N, out):
    s, a, b, c = out
    return all(type(v) is int for v in out) and 0 <= a <= b and c >= 0 and a * b + c == N \
        and s == a + b + c


def test_every_method_equals_brute_force_up_to_3000(table):
    for N in range(3001):
        ref = min_abc_bruteforce(N)
        assert is_valid(N, ref) and ref[0] == table[N], N
        assert min_abc_sqrt(N) == ref, N          # the same triple: ties go to the smallest a
        assert min_abc_quartic(N) == ref, N


def test_rigorous_sqrt_and_quartic_agree_up_to_1e5(table):
    for N in range(3001, 10**5 + 1):
        fast = min_abc_quartic(N)
        assert fast == min_abc_sqrt(N), N
        assert fast[0] == table[N], N
    assert is_valid(10**5, min_abc_quartic(10**5))


def test_random_large_n_sqrt_equals_quartic():
    rng = random.Random(0)
    for _ in range(60):
        N = rng.randrange(10**11, 10**12)
        out = min_abc_quartic(N)
        assert is_valid(N, out) and out == min_abc_sqrt(N), N


def test_counterexample_130():
    assert min_abc_quartic(130) == (23, 10, 13, 0)
    assert min_abc_bruteforce(130)[0] == 23
    r = math.isqrt(130)  # the naive guess a = b = 11 (a = 11, b = 12 overshoots: 132 > 130)
    assert r * (r + 1) > 130 and 2 * r + 130 - r * r == 31


def test_article_range_fails_exactly_on_the_listed_n(table):
    fails = [N for N in range(3001) if min_abc_sqrt(N, "article")[0] != table[N]]
    assert fails == [N for N in ARTICLE_FAILURES if N <= 3000]
    assert min_abc_sqrt(19, "article")[0] == 11 and min_abc_sqrt(19) == (10, 3, 6, 1)
    for N in ARTICLE_FAILURES:  # the optimum sits at a = k <= sqrt(N / 2), b = 2k
        s, a, b, c = min_abc_bruteforce(N)
        assert b == 2 * a and 2 * a * a <= N, N


def test_upper_bound_and_candidate_count():
    getcontext().prec = 60
    rng = random.Random(1)
    ns = list(range(6, 2000)) + [rng.randrange(10**k, 10**(k + 1)) for k in range(3, 30)
                                 for _ in range(5)]
    for N in ns:
        if math.isqrt(N) ** 2 == N:
            continue
        p_lo, p_hi = min_abc_search_range(N)
        sq = Decimal(N).sqrt()
        u = 2 * sq + 2 + (1 + 4 * sq).sqrt()
        assert p_lo == int(2 * sq) and p_hi <= u < p_hi + 1, N   # floors, exactly
        out, count = min_abc_quartic(N, return_count=True)
        assert is_valid(N, out) and out[0] <= p_hi, N
        assert count <= p_hi - p_lo + 1 <= math.ceil((1 + 4 * sq).sqrt()) + 3, N


def test_known_optima_beyond_float_precision():
    for k in (10**8 + 7, 3 * 10**12 + 1, 10**20 + 3, 7**40):
        assert min_abc_quartic(k * k) == (2 * k, k, k, 0)
        assert min_abc_quartic(k * (k + 1)) == (2 * k + 1, k, k + 1, 0)   # 2 sqrt(N) > 2k
        assert min_abc_quartic(k * k - 1) == (2 * k, k - 1, k + 1, 0)     # ceil(2 sqrt N) = 2k
    # float square roots give a wrong answer at this size; math.isqrt does not
    k = 10**8 + 7
    assert int(math.sqrt(k * k - 1)) == k  # the float floor is off by one


def test_numpy_integers_and_types():
    out = min_abc_quartic(np.int64(130))
    assert out == (23, 10, 13, 0) and all(type(v) is int for v in out)
    assert min_abc_sqrt(np.uint32(130)) == out and min_abc_bruteforce(np.int16(130)) == out
    out, count = min_abc_quartic(10**6 + 1, return_count=True)
    assert type(count) is int and count >= 1
    assert min_abc_search_range(np.int64(10**6 + 1)) == min_abc_search_range(10**6 + 1)


@pytest.mark.parametrize("fn", [min_abc_bruteforce, min_abc_sqrt, min_abc_quartic,
                                min_abc_search_range])
def test_bad_input(fn):
    with pytest.raises(TypeError, match="N: expected an int, got float"):
        fn(130.0)
    with pytest.raises(TypeError, match="N: expected an int, got bool"):
        fn(True)
    with pytest.raises(TypeError, match="N: expected an int, got str"):
        fn("130")
    with pytest.raises(ValueError, match="N: expected an integer >= 0, got -1"):
        fn(-1)


def test_bad_options():
    with pytest.raises(ValueError, match="N: brute force is limited to N <= 10000000"):
        min_abc_bruteforce(10**7 + 1)
    with pytest.raises(ValueError, match="bounds: expected 'rigorous' or 'article', got 'x'"):
        min_abc_sqrt(130, bounds="x")
