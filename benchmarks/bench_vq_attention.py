#!/usr/bin/env python3
"""VQ attention (companion.attention.vq_attention) against causal SDPA: time and peak memory vs T.

Both compute causal softmax attention over T positions for batch 1, a few heads, head dim 64.
The VQ path includes the nearest-code assignment of the keys (argmin over the codebook, taken
over 1024 positions at a time so that the [T, c] distances do not dominate the peak), so both
start from the same q, k, v. SDPA is quadratic in T (flash/memory-efficient kernels keep its
memory linear, not its time); VQ attention is linear in T in time and memory.

    python benchmarks/bench_vq_attention.py                    # CPU: T = 1k .. 32k
    python benchmarks/bench_vq_attention.py --device cuda      # GPU: T = 4k .. 128k, bfloat16

Prints a markdown table with the device name, the times (median of repeats after a warm-up),
the ratio SDPA / VQ (> 1: VQ faster), peak memory of each call and their ratio VQ / SDPA, and
the crossover length.
On the CPU, peak memory is the rise of the process's peak resident set (VmHWM, reset before each
call through /proc/self/clear_refs; allocator caching can hide small tensors); on CUDA it is
torch.cuda.max_memory_allocated above what was allocated before the call.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from companion.attention import vq_attention  # noqa: E402
from _common import device_name  # noqa: E402


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def peak_bytes(fn, device: torch.device) -> float:
    """Peak extra memory of one call of ``fn`` (see the module docstring); NaN if unavailable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        Path("/proc/self/clear_refs").write_text("5")       # reset VmHWM to the current RSS
    except OSError:
        return math.nan
    base = _rss_kib("VmRSS")
    fn()
    return float(max(_rss_kib("VmHWM") - base, 0) * 1024)


def median_time(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()                                                     # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_peaks_in_child(argv: list[str]) -> dict[tuple[str, int], float]:
    """Peak memory on the CPU, measured in a child process started with glibc's malloc told to
    map every allocation above 128 KiB afresh and to give freed memory back (otherwise freed
    memory is reused without touching the OS and the peak RSS misses new tensors). Timing stays
    in this process, whose malloc is left as it is."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-only"], env=env,
                         capture_output=True, text=True, check=True).stdout
    peaks = {}
    for line in out.splitlines():
        name, n, value = line.split()
        peaks[(name, int(n))] = float(value)
    return peaks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths (default: 1k..32k on CPU, 4k..128k on CUDA)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA (VQ attention computes in float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384, 32768] if device.type == "cpu"
                               else [4096, 8192, 16384, 32768, 65536, 131072])
    h, d, c, l = args.heads, args.head_dim, args.codebook_size, args.block_size
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(c, d, generator=g).to(device, dtype)

    def make(n):
        q, k, v = (torch.randn(1, h, n, d, generator=g).to(device, dtype) for _ in range(3))

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def vq():
            sq = (codebook * codebook).sum(-1)
            codes = torch.cat([(sq - 2 * kc @ codebook.T).argmin(-1)  # ||C_j||^2 - 2 k.C_j:
                               for kc in k.split(1024, dim=-2)], -1)   # nearest code of each key
            return vq_attention(q, codes, v, codebook, causal=True, block_size=l)
        return {"sdpa": sdpa, "vq": vq}

    if args.memory_only:                                               # the child of cpu_peaks_in_child
        for n in lengths:
            fns = make(n)
            with torch.no_grad():
                for name, fn in fns.items():
                    fn()                                               # warm-up, as for timing
                    print(name, n, peak_bytes(fn, device), flush=True)
        return

    peaks = {}
    if device.type == "cpu":
        peaks = cpu_peaks_in_child(list(argv if argv is not None else sys.argv[1:]))
    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {dtype}; batch 1, "
          f"{h} heads, head dim {d}, codebook {c}, block {l}; forward pass, median of "
          f"{args.repeats}\n")
    print("| T | SDPA causal (ms) | VQ attention (ms) | SDPA / VQ | SDPA peak (MiB) "
          "| VQ peak (MiB) | VQ / SDPA peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in lengths:
        fns = make(n)
        with torch.no_grad():
            t = {name: median_time(fn, device, args.repeats) for name, fn in fns.items()}
            if device.type == "cuda":                                  # after the warm-up above
                peaks.update({(name, n): peak_bytes(fn, device) for name, fn in fns.items()})
        rows.append((n, t["sdpa"], t["vq"]))
        mib = {name: peaks.get((name, n), math.nan) / 2**20 for name in fns}
        mib["ratio"] = mib["vq"] / mib["sdpa"] if mib["sdpa"] > 0 else math.nan
        print(f"| {n} | {t['sdpa'] * 1e3:.1f} | {t['vq'] * 1e3:.1f} | {t['sdpa'] / t['vq']:.2f}x "
              f"| {mib['sdpa']:.0f} | {mib['vq']:.0f} | {mib['ratio']:.1f}x |",
              flush=True)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()

    faster = [n for n, ts, tv in rows if tv < ts]
    print()
    print(f"crossover: VQ attention is faster from T = {faster[0]} on" if faster
          else "crossover: VQ attention was not faster at any measured T on", device_name(device))
    if len(rows) > 1:
        (n0, s0, v0), (n1, s1, v1) = rows[0], rows[-1]
        span = math.log(n1 / n0)
        print(f"growth exponent over T = {n0}..{n1} (time ~ T^p): "
              f"SDPA p = {math.log(s1 / s0) / span:.2f}, VQ p = {math.log(v1 / v0) / span:.2f}")


if __name__ == "__main__":
    main()
