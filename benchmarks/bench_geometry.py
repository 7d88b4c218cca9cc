"""k-occurrence (hub values) of a point cloud: companion's chunked k_occurrence against sklearn.

    python benchmarks/bench_geometry.py                  # CPU: 20,000 points in d = 64, k = 10
    python benchmarks/bench_geometry.py --device cuda    # GPU: add --n 100000

``companion.geometry.k_occurrence(x, k, chunk=c)`` computes distances for ``c`` queries at a time
(``torch.cdist``), keeps the k nearest with ``topk`` and counts them with ``bincount``, so its
memory is ``c * N`` distances instead of ``N^2``. The baseline is what one would write with
scikit-learn: ``NearestNeighbors(n_neighbors=k).fit(x).kneighbors()`` (self excluded), then
``bincount`` of the neighbour indices, with the brute-force and the default ("auto") algorithm.
Prints a markdown table: median wall-clock time (round robin, one run), the ratio to sklearn
brute, the peak memory of a fresh process, and whether the counts equal sklearn's exactly.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from companion.geometry import k_occurrence
from _common import (cuda_peak_bytes, device_name, report_worker_result,  # noqa: E402
                     round_robin_median, rss_peak_bytes, run_worker)


def data(n, d, seed=0):
    """Standard Gaussian points, float64 (sklearn's precision); torch gets a float32 copy."""
    return np.random.default_rng(seed).standard_normal((n, d))


def runners(x64, k, chunks, device):
    x32 = torch.as_tensor(x64, dtype=torch.float32, device=device)
    out = {f"k_occurrence chunk={c}": (lambda c=c: k_occurrence(x32, k, chunk=c).cpu().numpy())
           for c in chunks}
    if device.type == "cpu":
        for algo in ("brute", "auto"):
            def run(algo=algo):
                ind = NearestNeighbors(n_neighbors=k, algorithm=algo).fit(x64).kneighbors(
                    return_distance=False)
                return np.bincount(ind.ravel(), minlength=len(x64))
            out[f"sklearn NearestNeighbors ({algo})"] = run
    return out


def worker(args):
    """A fresh process: the peak resident set of one call of one method (CPU)."""
    run = runners(data(args.n, args.d), args.k, args.chunks, torch.device("cpu"))[args.worker]
    report_worker_result(rss_peak_bytes(run))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (round robin)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    x64 = data(args.n, args.d)
    runs = runners(x64, args.k, args.chunks, device)
    ref = np.bincount(NearestNeighbors(n_neighbors=args.k, algorithm="brute").fit(x64)
                      .kneighbors(return_distance=False).ravel(), minlength=args.n)
    t = round_robin_median(runs, device, warmup=1, repeats=args.repeats)
    base = t.get("sklearn NearestNeighbors (brute)")
    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"N={args.n:,} Gaussian points in d={args.d}, k={args.k}; companion in float32, "
          f"sklearn in float64; 'equal counts': the hub values equal sklearn brute's, point by "
          f"point; peak memory of one call (CUDA allocator, or the resident set of a fresh "
          f"CPU process)\n")
    print("| method | median time | time / sklearn brute | peak MiB | equal counts |")
    print("|---|---:|---:|---:|---|")
    for name, run in runs.items():
        if device.type == "cuda":
            mem = cuda_peak_bytes(run, device)
        else:
            cmd = [sys.executable, __file__, "--device", "cpu", "--n", str(args.n), "--d",
                   str(args.d), "--k", str(args.k), "--chunks", *map(str, args.chunks),
                   "--worker", name]
            mem = run_worker(cmd) or 0
        counts = run()
        differ = int((counts != ref).sum())
        equal = "yes" if differ == 0 else f"no ({differ} points differ)"
        ratio = f"{t[name] / base:.2f}x" if base else "-"
        print(f"| {name} | {t[name]:.2f} s | {ratio} | {mem / 2**20:.0f} | {equal} |",
              flush=True)


if __name__ == "__main__":
    main()
