"""P(n random points of a disc lie in one sector of angle theta): closed form against Monte Carlo.

    python benchmarks/bench_sector.py      # under a minute on the CPU; writes results/sector-cpu.md

For each (n, theta) the Monte Carlo estimate is run to a standard error of 1e-3, that is
T = p (1 - p) / 1e-6 configurations (p from the closed form), drawn with
companion.geometry.sample_disc and tested with fits_in_sector in chunks of 2^17; the closed form is
companion.geometry.sector_probability (inclusion-exclusion, eq. sector-prob) for one theta,
chosen so that P = 0.1, 0.5, 0.9 (n = 32 takes the exact-integer path, n > 20). Both
are timed in one run, round robin (median of repeats), on one thread, and the Monte Carlo answer
is checked to lie within 4 standard errors of the formula.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import brentq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from companion.geometry import fits_in_sector, sample_disc, sector_probability  # noqa: E402
from _common import device_name, round_robin_median  # noqa: E402

SE_TARGET = 1e-3
CHUNK = 2**17
TARGETS = (0.1, 0.5, 0.9)  # theta chosen so that P takes these values


def cases():
    for n in (4, 8, 16, 32):
        for target in TARGETS:
            theta = brentq(lambda t: float(sector_probability(n, t)) - target, 1e-6,
                           2 * math.pi - 1e-9)
            yield n, theta


def monte_carlo(n, theta, trials, generator):
    hits, done = 0, 0
    while done < trials:
        m = min(CHUNK, trials - done)
        hits += int(fits_in_sector(sample_disc(m, n, generator), theta).sum())
        done += m
    return hits / trials


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, theta in cases():
        p = float(sector_probability(n, theta))
        trials = math.ceil(p * (1 - p) / SE_TARGET**2)
        est = monte_carlo(n, theta, trials, g)
        se = math.sqrt(max(p * (1 - p), 1e-12) / trials)
        assert abs(est - p) < 4 * se + 1e-12, (n, theta, est, p)
        t = round_robin_median({"closed": lambda: sector_probability(n, theta),
                                "mc": lambda: monte_carlo(n, theta, trials, g)},
                               "cpu", warmup=1, repeats=3)
        rows.append((n, theta, p, est, trials, t["closed"], t["mc"]))
        print(rows[-1], flush=True)

    def fmt(s):
        return f"{1e6 * s:.1f} us" if s < 1e-3 else f"{1e3 * s:.1f} ms"

    lines = [
        f"device: {device_name('cpu')} (cpu), torch {torch.__version__}, one thread",
        f"command: python benchmarks/bench_sector.py  ({time.strftime('%Y-%m-%d')})",
        "",
        "Closed form `sector_probability(n, theta)` (one theta) against Monte Carlo with "
        "`sample_disc` + `fits_in_sector` run to a standard error of 1e-3 (T = p(1-p)/1e-6 "
        "configurations, float32, chunks of 2^17); median of 3 round-robin runs.",
        "",
        "| n | theta | P (closed form) | Monte Carlo | T | closed form | Monte Carlo | MC / closed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, theta, p, est, trials, tc, tm in rows:
        lines.append(f"| {n} | {theta / math.pi:.3f} pi | {p:.4f} | {est:.4f} | {trials:,} | "
                     f"{fmt(tc)} | {fmt(tm)} | {tm / tc:,.0f}x |")
    ratios = sorted(tm / tc for *_, tc, tm in rows)
    lines += ["", f"Monte Carlo to SE 1e-3 costs {ratios[0]:,.0f}x to {ratios[-1]:,.0f}x the time "
              f"of the closed form (median {ratios[len(ratios) // 2]:,.0f}x)."]
    out = Path(__file__).resolve().parent / "results" / "sector-cpu.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
