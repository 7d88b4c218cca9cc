"""Benchmark: infonce_loss and flatnce_loss against plain F.cross_entropy on the same scores.

SimCLR-style in-batch scores from ``nt_xent_scores`` of two views of ``--batch`` examples
(d = ``--dim``): a [2B, 2B - 1] matrix, 8192 x 8191 at the default B = 4096 on a GPU. Times the
forward + backward of each loss (median of repeats after warm-up) and its peak memory above the
inputs (CUDA: ``torch.cuda.max_memory_allocated``; CPU, Linux only: the rise of the peak resident
set of a fresh subprocess per loss), and prints a markdown table with ratios to F.cross_entropy.

Memory-limit ratios, from the same round-robin run: "copies" = forward + backward time / one
``scores.clone()`` (``_common.copy_unit``: the bandwidth unit of the [2B, 2B - 1] input);
"x plain" = time / that of F.cross_entropy on the same scores (the plain softmax cross-entropy
of the same shape, the baseline row), forward + backward alike.

    python benchmarks/bench_flatnce.py                  # cuda if available, else cpu
    python benchmarks/bench_flatnce.py --device cuda --batch 4096
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from companion.losses import flatnce_loss, infonce_loss, nt_xent_scores
from _common import (COPIES_GOAL, PLAIN_GOAL, copy_unit, cuda_peak_bytes,  # noqa: E402
                     device_name, report_worker_result, round_robin_median, rss_peak_bytes,
                     run_worker)

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


def peak_cpu_worker(args) -> None:
    """In a fresh process (Linux): the peak resident-set rise of one forward + backward."""
    fn = LOSSES[args.worker]
    scores, positive = make_inputs(args.batch, args.dim, args.tau, torch.device("cpu"),
                                   getattr(torch, args.dtype))
    report_worker_result(rss_peak_bytes(lambda: step(fn, scores, positive)))


def peak_cpu(name, args) -> int | None:
    return run_worker([sys.executable, __file__, "--worker", name, "--batch", str(args.batch),
                       "--dim", str(args.dim), "--tau", str(args.tau), "--dtype", args.dtype,
                       "--threads", str(args.threads)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="examples per batch B (scores are 2B x (2B-1)); "
                        "default 4096 on cuda, 1024 on cpu")
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
    print(f"scores: nt_xent_scores of 2 x {args.batch} views, d = {args.dim} -> [{n}, {k}] "
          f"{args.dtype} ({scores.numel() * scores.element_size() / 2**20:.0f} MiB)")
    if device.type == "cpu" and args.batch < 4096:
        print(f"(CPU run at B = {args.batch}, smaller than the GPU's 4096 to stay within a couple "
              f"of minutes; pass --batch 4096 for the full size)")
    print(f"forward + backward, median of {repeats} after warm-up (round robin); "
          "peak = memory above the inputs\n")

    copy_key = "scores.clone()"
    runs = {name: (lambda fn=fn: step(fn, scores, positive)) for name, fn in LOSSES.items()}
    times = round_robin_median({**runs, copy_key: copy_unit(scores)},
                               device, warmup=2, repeats=repeats)
    peaks = {name: cuda_peak_bytes(run, device) if device.type == "cuda" else peak_cpu(name, args)
             for name, run in runs.items()}
    t0, m0, t_copy = times[BASELINE], peaks[BASELINE], times[copy_key]
    print(f"| loss | time | copies (goal <= {COPIES_GOAL}) | x plain (goal <= {PLAIN_GOAL}) "
          "| peak memory | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in LOSSES:
        t, peak = times[name], peaks[name]
        mem = "n/a | n/a" if peak is None else f"{peak / 2**20:.0f} MiB | {peak / max(m0, 1):.2f}x"
        print(f"| {name} | {t * 1e3:.1f} ms | {t / t_copy:.1f} | {t / t0:.2f}x | {mem} |")
    print(f"\nmemory-limit unit: {copy_key} = {t_copy * 1e3:.3g} ms (same run); copies = time / "
          "that, x plain = time / F.cross_entropy's time (the baseline)")


if __name__ == "__main__":
    main()
