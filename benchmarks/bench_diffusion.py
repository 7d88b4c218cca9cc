"""The empirical denoiser in chunks against the naive [M, N] form: time and peak memory.

    python benchmarks/bench_diffusion.py                  # CPU: N = 10^5 data, M = 10^4 queries
    python benchmarks/bench_diffusion.py --device cuda    # GPU

``companion.diffusion.empirical_denoiser(x, sigma, data, chunk)`` is E[x0 | x] when x0 is uniform
on the N rows of ``data`` and x = x0 + sigma eps: a softmax over all N data points for each of the
M queries. The naive form materialises the [M, N] logits (and their softmax) at once; the chunked
one visits ``chunk`` data rows at a time with a running log-sum-exp, so its working memory is
[M, chunk]. Goal (issue 13): memory bounded by the chunk, time within 1.2x of the naive form.
Prints a markdown table with the device named; peak memory is the CUDA allocator's, or on the
CPU the rise of the resident set of a fresh worker process.
"""
from __future__ import annotations

import argparse
import sys

import torch
from companion.diffusion import empirical_denoiser
from _common import (cuda_peak_bytes, device_name, report_worker_result,  # noqa: E402
                     round_robin_median, rss_peak_bytes, run_worker, sync)


def naive(x, sigma, data):
    """All [M, N] logits at once (the |x|^2 term, constant per query, dropped as in the
    chunked form), then one softmax and one matrix product."""
    logits = (x @ data.T - 0.5 * (data * data).sum(-1)) / sigma**2
    return torch.softmax(logits, dim=-1) @ data


def inputs(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(args.n_data, args.dim, generator=g, dtype=dtype).to(device)
    x = data[:args.n_query] + args.sigma * torch.randn(args.n_query, args.dim, generator=g,
                                                       dtype=dtype).to(device)
    return x, data


def runs_of(args, x, data):
    runs = {"naive": lambda: naive(x, args.sigma, data)}
    for c in args.chunks:
        runs[f"chunk {c}"] = (lambda c=c: empirical_denoiser(x, args.sigma, data, chunk=c))
    return runs


def worker(args):
    x, data = inputs(args, torch.device("cpu"), getattr(torch, args.dtype))
    report_worker_result(rss_peak_bytes(runs_of(args, x, data)[args.worker]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-data", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--sigma", type=float, default=3.0)
    p.add_argument("--chunks", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (round robin)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    x, data = inputs(args, device, dtype)
    runs = runs_of(args, x, data)
    ref = runs["naive"]()
    err = {k: (r() - ref).abs().max().item() for k, r in runs.items() if k != "naive"}
    sync(device)
    t = round_robin_median(runs, device, warmup=1, repeats=args.repeats)
    if device.type == "cuda":
        mem = {k: cuda_peak_bytes(r, device) for k, r in runs.items()}
    else:
        base = [sys.executable, __file__, "--device", "cpu", "--n-data", str(args.n_data),
                "--n-query", str(args.n_query), "--dim", str(args.dim), "--sigma",
                str(args.sigma), "--dtype", args.dtype, "--chunks", *map(str, args.chunks)]
        mem = {k: run_worker(base + ["--worker", k]) or 0 for k in runs}
    M, N, item = args.n_query, args.n_data, torch.finfo(dtype).bits // 8
    print(f"device: {device_name(device)} ({device.type}), dtype {args.dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"N = {N:,} data points, M = {M:,} queries, D = {args.dim}, sigma = {args.sigma}; "
          f"one [M, N] tensor is {M * N * item / 2**20:,.0f} MiB, one [M, chunk] tensor "
          f"{M * item / 2**20:.3f} MiB per chunk row. Time: median of {args.repeats} round-robin "
          "runs; peak: rise of the CUDA allocator or of a fresh process's resident set.\n")
    print("| form | time | time / naive | peak MiB | peak / naive | [M, chunk] MiB | "
          "max abs diff vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in runs:
        chunk = N if k == "naive" else int(k.split()[1])
        diff = "-" if k == "naive" else f"{err[k]:.1e}"
        print(f"| {k} | {t[k]:.2f} s | {t[k] / t['naive']:.2f}x | {mem[k] / 2**20:,.0f} | "
              f"{mem[k] / max(mem['naive'], 1):.3f}x | {M * min(chunk, N) * item / 2**20:,.0f} | "
              f"{diff} |", flush=True)


if __name__ == "__main__":
    main()
