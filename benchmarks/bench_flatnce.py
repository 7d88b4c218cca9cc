"""Benchmark: infonce_loss and flatnce_loss against plain F.cross_entropy on the same scores.

SimCLR-style in-batch scores from ``nt_xent_scores`` of two views of ``--batch`` examples
(d = ``--dim``): a [2B, 2B - 1] matrix, 8192 x 8191 at the default B = 4096 on a GPU. Times the
forward + backward of each loss (median of repeats after warm-up) and its peak memory above the
inputs (CUDA: ``torch.cuda.max_memory_allocated``; CPU, Linux only: the rise of the peak resident
set of a fresh subprocess per loss), and prints a markdown table with ratios to F.cross_entropy.

    python benchmarks/bench_flatnce.py                  # cuda if available, else cpu
    python benchmarks/bench_flatnce.py --device cuda --batch 4096
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from companion.losses import flatnce_loss, infonce_loss, nt_xent_scores
from _common import device_name  # noqa: E402

BASELINE = "F.cross_entropy (baseline)"
LOSSES = {
    BASELINE: lambda s, p: F.cross_entropy(s, p),
    "infonce_loss": lambda s, p: infonce_loss(s, p),
    "flatnce_loss": lambda s, p: flatnce_loss(s, p),
}


def make_inputs(batch: int, dim: int, tau: float, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(batch, dim, generator=g).to(device, dtype)
    z2 = (z1.float().cpu() + 0.5 * torch.randn(batch, dim, generator=g)).to(device, dtype)
    scores, positive = nt_xent_scores(z1, z2, tau)
    return scores.detach(), positive


def step(fn, scores, positive):
    s = scores.requires_grad_()
    fn(s, positive).backward()
    s.grad = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_losses(scores, positive, device, warmup, repeats) -> dict[str, float]:
    """Median forward + backward time of each loss; the losses take turns, so that a slow
    period of a shared machine does not fall on one of them only."""
    for fn in LOSSES.values():
        for _ in range(warmup):
            step(fn, scores, positive)
    sync(device)
    times = {name: [] for name in LOSSES}
    for _ in range(repeats):
        for name, fn in LOSSES.items():
            t0 = time.perf_counter()
            step(fn, scores, positive)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_cuda(fn, scores, positive, device) -> int:
    step(fn, scores, positive)  # warm-up (kernels, workspaces)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(fn, scores, positive)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_cpu_worker(args) -> None:
    """Run in a fresh process (Linux): reset the peak resident set after the inputs are made,
    run one forward + backward, print how far the peak rose above the resident set before it."""
    dtype = getattr(torch, args.dtype)
    fn = LOSSES[args.worker]
    scores, positive = make_inputs(args.batch, args.dim, args.tau, torch.device("cpu"), dtype)
    step(fn, scores, positive)                      # warm-up
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM to the current VmRSS
        f.write("5")
    before = _status_kib("VmRSS")
    step(fn, scores, positive)
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_cpu(name, args) -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    cmd = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch), "--dim", str(args.dim),
           "--tau", str(args.tau), "--dtype", args.dtype, "--threads", str(args.threads)]
    # large blocks straight from mmap, so that freed memory leaves the resident set at once
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="examples per batch B (scores are 2B x (2B-1)); default 4096 on cuda, 1024 on cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 4096 if device.type == "cuda" else 1024
    if args.worker is not None:
        peak_cpu_worker(args)
        return
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or 20
    scores, positive = make_inputs(args.batch, args.dim, args.tau, device, dtype)
    n, k = scores.shape

    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"scores: nt_xent_scores of 2 x {args.batch} views, d = {args.dim} -> [{n}, {k}] {args.dtype} "
          f"({scores.numel() * scores.element_size() / 2**20:.0f} MiB)")
    if device.type == "cpu" and args.batch < 4096:
        print(f"(CPU run at B = {args.batch}, smaller than the GPU's 4096 to stay within a couple of minutes; "
              f"pass --batch 4096 for the full size)")
    print(f"forward + backward, median of {repeats} after warm-up; peak = memory above the inputs\n")

    times = time_losses(scores, positive, device, warmup=2, repeats=repeats)
    peaks = {name: peak_cuda(fn, scores, positive, device) if device.type == "cuda" else peak_cpu(name, args)
             for name, fn in LOSSES.items()}
    t0, m0 = times[BASELINE], peaks[BASELINE]
    print("| loss | time | vs baseline | peak memory | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name in LOSSES:
        t, peak = times[name], peaks[name]
        mem = "n/a | n/a" if peak is None else f"{peak / 2**20:.0f} MiB | {peak / max(m0, 1):.2f}x"
        print(f"| {name} | {t * 1e3:.1f} ms | {t / t0:.2f}x | {mem} |")


if __name__ == "__main__":
    main()
