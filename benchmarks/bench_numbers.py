"""min a + b + c with N = ab + c: the O(N^(1/4)) search against the square-root search and brute force.

    python benchmarks/bench_numbers.py      # about a minute on one CPU core; writes results/numbers-cpu.md

For each order of magnitude 10^k (k = 4 .. 18) it draws a fixed set of random N in [10^k, 10^(k+1))
and times, per N, companion.numbers.min_abc_quartic (p = a + b, stopped once p exceeds the best S),
min_abc_sqrt with the rigorous range (about sqrt(2) N^(3/8) values of a) and min_abc_bruteforce
(every pair, up to its 10^7 limit), all in pure Python integers; the functions take turns (round
robin) and every answer is checked against the others where they overlap. It fits the growth
exponent of the time per N (log-log least squares over 10^8 .. 10^18) and of the candidate counts.
"""
from __future__ import annotations

import math
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from companion.numbers import (min_abc_bruteforce, min_abc_quartic,  # noqa: E402
                               min_abc_search_range, min_abc_sqrt)
from _common import device_name, round_robin_median  # noqa: E402

EXPONENTS = range(4, 19)
SQRT_MAX, BRUTE_MAX = 10**15, 10**7
PER_DECADE = {"quartic": 200, "sqrt": 20, "brute": 3}  # brute force: one N in [1e6, 1e7)


def fit_slope(xs, ys):
    """Least-squares slope of log10(y) against log10(x)."""
    lx, ly = [math.log10(x) for x in xs], [math.log10(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main():
    rng = random.Random(0)
    rows = []
    for k in EXPONENTS:
        ns = [rng.randrange(10**k, 10 ** (k + 1)) for _ in range(PER_DECADE["quartic"])]
        runs = {"quartic": lambda ns=ns: [min_abc_quartic(n) for n in ns]}
        n_sqrt = ns[: PER_DECADE["sqrt"]] if 10**k < SQRT_MAX else []
        n_brute = ns[: PER_DECADE["brute"] if 10 ** (k + 1) < BRUTE_MAX else 1]
        n_brute = n_brute if 10**k < BRUTE_MAX else []
        if n_sqrt:
            runs["sqrt"] = lambda ns=n_sqrt: [min_abc_sqrt(n) for n in ns]
        if n_brute and 10 ** (k + 1) < BRUTE_MAX:
            runs["brute"] = lambda ns=n_brute: [min_abc_bruteforce(n) for n in ns]
        t = round_robin_median(runs, "cpu", warmup=1, repeats=3 if k < 13 else 1)
        if n_brute and "brute" not in runs:  # about 10 s per N: timed once, alone
            t0 = time.perf_counter()
            min_abc_bruteforce(n_brute[0])
            t["brute"] = time.perf_counter() - t0
        counts = [min_abc_quartic(n, return_count=True)[1] for n in ns]
        widths = [(lambda r: r[1] - r[0] + 1)(min_abc_search_range(n)) for n in ns]
        fast = [min_abc_quartic(n) for n in n_sqrt]
        assert fast == [min_abc_sqrt(n) for n in n_sqrt], k
        assert [f[0] for f in fast[: len(n_brute)]] == [min_abc_bruteforce(n)[0]
                                                       for n in n_brute], k
        row = dict(k=k, quartic=t["quartic"] / len(ns), count=sum(counts) / len(ns),
                   max_count=max(counts),
                   width=sum(widths) / len(ns))
        if n_sqrt:
            row["sqrt"] = t["sqrt"] / len(n_sqrt)
        if n_brute:
            row["brute"] = t["brute"] / len(n_brute)
        rows.append(row)
        print(row, flush=True)

    big = [r for r in rows if r["k"] >= 8]
    xs = [10 ** (r["k"] + 0.5) for r in big]  # N is drawn from [10^k, 10^(k+1))
    slope_q = fit_slope(xs, [r["quartic"] for r in big])
    slope_c = fit_slope(xs, [r["count"] for r in big])
    slope_w = fit_slope(xs, [r["width"] for r in big])
    sq = [r for r in big if "sqrt" in r]
    slope_s = fit_slope([10 ** (r["k"] + 0.5) for r in sq], [r["sqrt"] for r in sq])
    at12 = next(r for r in rows if r["k"] == 12)

    def ms(x):
        return f"{1e3 * x:.3f} ms"

    lines = [
        f"device: {device_name('cpu')} (cpu), Python {platform.python_version()}, one thread, "
        "pure Python integers",
        f"command: python benchmarks/bench_numbers.py  ({time.strftime('%Y-%m-%d')})",
        "",
        f"Time per N, the median of round-robin runs over {PER_DECADE['quartic']} random N per "
        f"decade (square-root search: the first {PER_DECADE['sqrt']}, brute force: the first "
        f"{PER_DECADE['brute']}); every answer checked against the slower methods. 'candidates' "
        "is the mean number of p the O(N^(1/4)) search evaluates (it stops once p exceeds the "
        "best S), 'max' the largest of these counts; 'range' the mean size of the a-priori range of "
        "p (eq. abc-upper), the worst case. Brute force in [1e6, 1e7): one N, one run.",
        "",
        "| N in | quartic | sqrt (rigorous) | brute force | sqrt / quartic | candidates | max | range |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = ms(r["sqrt"]) if "sqrt" in r else "-"
        b = ms(r["brute"]) if "brute" in r else "-"
        ratio = f"{r['sqrt'] / r['quartic']:.0f}x" if "sqrt" in r else "-"
        lines.append(f"| [1e{r['k']}, 1e{r['k'] + 1}) | {ms(r['quartic'])} | {s} | {b} | "
                     f"{ratio} | {r['count']:.1f} | {r['max_count']} | {r['width']:.0f} |")
    lines += [
        "",
        f"Fitted growth exponents over N = 1e8 .. 1e19 (log-log least squares): quartic time "
        f"{slope_q:.3f}, its candidate count {slope_c:.3f}, its a-priori range {slope_w:.3f}; "
        f"square-root search time {slope_s:.3f} (theory 3/8 = 0.375).",
        "The early stop makes the typical count grow more slowly than the worst case: the "
        "optimum's excess S* - 2 sqrt(N) is typically of order N^(1/6) (see the notebook), while "
        "the guaranteed range grows as N^(1/4).",
        f"Goal: exponent about 1/4 and under 1 ms per N at 1e12: measured {ms(at12['quartic'])} "
        f"per N in [1e12, 1e13) -> {'met' if at12['quartic'] < 1e-3 else 'NOT met'}.",
    ]
    out = Path(__file__).resolve().parent / "results" / "numbers-cpu.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
