"""Number puzzles in pure Python integers (no torch): the minimum of a + b + c with N = ab + c.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

__all__: list[str] = []


# === n-equals-ab-plus-c ===
# Minimise S = a + b + c over non-negative integers with N = ab + c. Every function returns the
# tuple (S, a, b, c) with a <= b and, among the optimal pairs, the one with the smallest a (for
# N <= 5 that is a = b = 0, c = N). All arithmetic is exact: floors and ceilings of square roots
# come from math.isqrt, never from floats, which go wrong from N ~ 1e15 on.
import math
import operator

__all__ += ["min_abc_bruteforce", "min_abc_sqrt", "min_abc_quartic", "min_abc_search_range"]

BRUTEFORCE_MAX_N = 10**7


def _check_n(N, name: str = "N") -> int:
    """N as a plain int >= 0: TypeError for floats, bools and other types, ValueError if < 0."""
    if isinstance(N, bool) or not hasattr(type(N), "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(N).__name__}")
    N = operator.index(N)  # numpy integers become plain Python ints
    if N < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {N}")
    return N


def _ceil_sqrt(m: int) -> int:
    """The smallest integer r with r * r >= m, for m >= 0."""
    return 0 if m <= 0 else math.isqrt(m - 1) + 1


def _upper_bound(N: int) -> int:
    """floor(U), U = 2 sqrt(N) + 2 + sqrt(1 + 4 sqrt(N)): the bound S* <= U of eq. abc-upper,
    computed exactly. With t = m - 2 > 2 sqrt(N), ``m <= U`` is equivalent to
    ``(t^2 + 4N - 1)^2 <= 16 N (t + 1)^2`` (square twice; both sides positive)."""

    def below(m: int) -> bool:  # m <= U ?
        t = m - 2
        if t * t <= 4 * N:  # t <= 2 sqrt(N): certainly below
            return True
        return (t * t + 4 * N - 1) ** 2 <= 16 * N * (t + 1) ** 2

    m = math.isqrt(4 * N) + 2 + math.isqrt(1 + 2 * math.isqrt(4 * N))  # U - 2 < m <= U + ...
    while not below(m):
        m -= 1
    while below(m + 1):
        m += 1
    return m


def min_abc_bruteforce(N: int) -> tuple[int, int, int, int]:
    """(S, a, b, c) by enumerating every pair a <= b with ab <= N (c = N - ab): the reference.

    a = 0 allows b = 0..N; a >= 1 allows b = a..N // a. About N log(sqrt N) pairs, so N is
    limited to 1e7 (ValueError above). Ties go to the smallest a, then the smallest b."""
    N = _check_n(N)
    if N > BRUTEFORCE_MAX_N:
        raise ValueError(f"N: brute force is limited to N <= {BRUTEFORCE_MAX_N}, got {N}")
    best = (N, 0, 0, N)  # a = 0: S = b + N, smallest at b = 0
    for a in range(1, math.isqrt(N) + 1):
        bs = range(a, N // a + 1)  # every b with a <= b and ab <= N
        s = min(N - a * b + a + b for b in bs)
        if s < best[0]:
            b = next(b for b in bs if N - a * b + a + b == s)  # the smallest such b
            best = (s, a, b, N - a * b)
    return best


def _sqrt_range(N: int, bounds: str) -> tuple[int, int]:
    """The integer range [a_lo, a_hi] of a searched by :func:`min_abc_sqrt`."""
    a_hi = math.isqrt(N)
    if bounds == "article":  # a in (sqrt(N/2), sqrt(N)]: the smallest a with 2 a^2 > N
        a_lo = math.isqrt(N // 2)
        while 2 * a_lo * a_lo <= N:
            a_lo += 1
        return a_lo, a_hi
    # rigorous: S(a) >= a + N/a (eq. abc-frac) and S* <= floor(U) =: s_max, so the optimal a
    # satisfies a^2 - s_max a + N <= 0; a_lo is the smallest such integer
    s_max = _upper_bound(N)
    a_lo = max(1, (s_max - math.isqrt(s_max * s_max - 4 * N)) // 2)
    while a_lo > 1 and (a_lo - 1) * (a_lo - 1 - s_max) + N <= 0:
        a_lo -= 1
    while a_lo * (a_lo - s_max) + N > 0:
        a_lo += 1
    return a_lo, a_hi


def min_abc_sqrt(N: int, bounds: str = "rigorous") -> tuple[int, int, int, int]:
    """(S, a, b, c) by searching a over a range below sqrt(N) with b = N // a (eq. abc-frac).

    ``bounds="rigorous"`` searches [a_lo, floor(sqrt N)], a_lo the smallest a with
    a + N/a <= floor(U), from S(a) >= a + N/a and S* <= U (eqs. abc-frac, abc-upper,
    abc-rigorous-range): exact for every N, about sqrt(2) N^(3/8) values of a.
    ``bounds="article"`` searches (sqrt(N/2), sqrt(N)] as published: about 0.29 sqrt(N) values,
    and it misses the optimum for 28 values of N (all <= 2890); kept to show those failures.
    Ties go to the smallest a."""
    N = _check_n(N)
    if bounds not in ("rigorous", "article"):
        raise ValueError(f"bounds: expected 'rigorous' or 'article', got {bounds!r}")
    if N <= 5:  # a = 0 is optimal (N = 4 and N = 5 tie with a = b = 2)
        return (N, 0, 0, N)
    a_lo, a_hi = _sqrt_range(N, bounds)
    best_s, best_a = N + 1, 1  # a = 1 (S = N + 1) loses to every a in range
    for a in range(a_lo, a_hi + 1):
        b, c = divmod(N, a)
        s = a + b + c
        if s < best_s:
            best_s, best_a = s, a
    b, c = divmod(N, best_a)
    return (best_s, best_a, b, c)


def min_abc_search_range(N: int) -> tuple[int, int]:
    """The integer range [p_lo, p_hi] of p = a + b that :func:`min_abc_quartic` may visit:
    p_lo = floor(2 sqrt(N)) (the best p with p^2 <= 4N) and p_hi = floor(U) with
    U = 2 sqrt(N) + 2 + sqrt(1 + 4 sqrt(N)) (eq. abc-upper), both exact. The range holds at
    most ceil(sqrt(1 + 4 sqrt N)) + 3 values: O(N^(1/4)). For a perfect square N it is
    (2 sqrt N, 2 sqrt N)."""
    N = _check_n(N)
    r = math.isqrt(N)
    if r * r == N:
        return (2 * r, 2 * r)
    return (math.isqrt(4 * N), _upper_bound(N))


def min_abc_quartic(N: int, return_count: bool = False):
    """(S, a, b, c) with O(N^(1/4)) candidates, from p = a + b and q = b - a (eq. abc-pq).

    For each p in :func:`min_abc_search_range` the best q is the smallest q >= 0 of p's parity
    with q^2 >= p^2 - 4N, and 4S = 4p + q^2 - (p^2 - 4N). Because S >= p, the scan stops as soon
    as p exceeds the best S found so far (at the latest at p_hi). ``return_count=True`` also
    returns the number of (p, q) candidates evaluated. Ties go to the smallest a."""
    N = _check_n(N)
    if N <= 5:  # a = 0 is optimal (N = 4 and N = 5 tie with a = b = 2)
        out = (N, 0, 0, N)
        return (out, 1) if return_count else out
    r = math.isqrt(N)
    if r * r == N:  # a = b = sqrt(N), c = 0 reaches the lower bound 2 sqrt(N) of S
        out = (2 * r, r, r, 0)
        return (out, 1) if return_count else out
    p_lo, p_hi = min_abc_search_range(N)
    four_n = 4 * N
    # p = p_lo: p^2 < 4N, q = p mod 2
    q = p_lo & 1
    best4, best_p, best_q = 4 * p_lo + q - (p_lo * p_lo - four_n), p_lo, q  # 4S
    count = 1
    isqrt = math.isqrt
    for p in range(p_lo + 1, p_hi + 1):
        if 4 * p > best4:  # S >= p: no later p can reach the best S (ties included)
            break
        m = p * p - four_n  # > 0 here
        q = isqrt(m)
        if q * q != m:
            q += 1
        if (q ^ p) & 1:
            q += 1
        s4 = 4 * p + q * q - m
        count += 1
        if s4 < best4 or (s4 == best4 and q > best_q + p - best_p):  # tie: smaller a wins
            best4, best_p, best_q = s4, p, q
    a, b = (best_p - best_q) // 2, (best_p + best_q) // 2
    out = (best4 // 4, a, b, N - a * b)
    return (out, count) if return_count else out
