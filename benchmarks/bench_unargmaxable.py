"""find_unargmaxable on a large random output layer: the cheap witness, then HiGHS LPs under a
time budget.

    python benchmarks/bench_unargmaxable.py                  # n=32768, d=256, sigma=0.5, 60 s
    python benchmarks/bench_unargmaxable.py --lp-budget 600 # a longer LP budget

The layer (no bias, as a tied LM head): n unit directions in d dimensions, row i scaled by
exp(sigma * xi_i), xi_i ~ N(0, 1), the norm spread of the notebook's phase diagram
(notebooks/unargmaxable-tokens.ipynb). companion.lm.find_unargmaxable first certifies every class
that wins at z = w_k (one pass of float32 matrix products in row chunks, with a rounding slack),
then runs the margin LP (scipy HiGHS, constraint generation) class by class until the time budget
is spent; the classes not reached are reported undecided. Prints a markdown table: seconds of each
stage, the fraction certified by the witness, LP-decided and undecided counts, the time per LP,
the LP-only time the whole layer would need at that rate (an extrapolation, marked as such), and
the peak resident memory of the run (this script is a fresh process; the peak is measured from
the resident set just before the call). Writes benchmarks/results/unargmaxable-cpu.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import _status_kib, device_name  # noqa: E402
from companion.lm import find_unargmaxable  # noqa: E402


def layer(n, d, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    return W * torch.exp(sigma * torch.randn(n, 1, generator=g))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--lp-budget", type=float, default=60.0, help="seconds for all LPs")
    p.add_argument("--bound", type=float, default=1e2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "unargmaxable-cpu.md"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    W = layer(a.n, a.d, a.sigma)
    find_unargmaxable(W[:50], time_budget=1.0)            # imports scipy, warms HiGHS

    # stage 1 alone: the witness (a zero LP budget leaves every other class undecided)
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak to the current RSS
        f.write("5")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    res = find_unargmaxable(W, bound=a.bound, time_budget=0.0)
    t_witness = time.perf_counter() - t0
    certified = res.decided_by.count("witness")

    # the whole pipeline: the witness again, then LPs until the budget is spent
    t0 = time.perf_counter()
    res = find_unargmaxable(W, bound=a.bound, time_budget=a.lp_budget)
    t_total = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - rss0) * 1024
    t_lp = t_total - t_witness
    by_lp = res.decided_by.count("lp")
    per_lp = t_lp / max(by_lp, 1)
    left = len(res.undecided)
    lp_only = a.n * per_lp
    with_witness = t_witness + (a.n - certified) * per_lp

    lines = [
        f"device: {device_name('cpu')} (cpu), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        f"layer: n={a.n} x d={a.d}, no bias, unit directions times lognormal norms "
        f"(sigma={a.sigma}), seed 0, float32; box |z_j| <= {a.bound:g}; LP time budget "
        f"{a.lp_budget:g} s (scipy HiGHS)",
        "",
        "| stage | seconds | classes | note |",
        "|---|---:|---:|---|",
        f"| witness z = w_k (float32 GEMM, row chunks) | {t_witness:.1f} | {certified} "
        f"| {certified / a.n:.1%} of {a.n} certified argmaxable before any LP |",
        f"| margin LPs (HiGHS, constraint generation) | {t_lp:.1f} | {by_lp} "
        f"| decided: {len(res.indices)} unargmaxable, {by_lp - len(res.indices)} argmaxable; "
        f"{per_lp:.2f} s per LP |",
        f"| undecided after the budget | | {left} | ~{left * per_lp / 60:.0f} min more at "
        f"this rate (extrapolated) |",
        f"| total | {t_total:.1f} | {a.n} | peak resident memory above the layer: "
        f"{peak / 2**20:.0f} MiB |",
        "",
        f"LP-only (certify_first=False) would need ~{lp_only / 60:.0f} min at the measured "
        f"rate (extrapolated); with the witness first: ~{with_witness / 60:.0f} min, "
        f"a ratio of {lp_only / with_witness:.1f}x.",
        "",
        f"command: `python benchmarks/bench_unargmaxable.py --n {a.n} --d {a.d} --sigma {a.sigma} "
        f"--lp-budget {a.lp_budget:g}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
