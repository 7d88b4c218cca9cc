#!/usr/bin/env python3
"""Multi-label categorical cross-entropy: time and memory of forward + backward.

Compares ``companion.losses.multilabel_categorical_crossentropy`` (-inf masking, logsumexp over
``cat([masked, 0])``) with two straightforward implementations of the same loss and, as a reference
point for cost only, with ``F.binary_cross_entropy_with_logits`` (a different loss):

- "exp sums": ``log1p(sum (1-y) e^s) + log1p(sum y e^{-s})``, the formula typed as written; it
  overflows to inf once a logit exceeds ~88 in float32 (~11 in float16).
- "1e12 mask": the widely copied port that masks by subtracting 1e12 instead of using -inf.

Prints a markdown table: median time of forward + backward, the bytes autograd saves for the
backward pass, and (on CUDA) the peak memory allocated during the step, each with its ratio to ours.

    python benchmarks/bench_multilabel.py                 # cuda if available, else cpu
    python benchmarks/bench_multilabel.py --device cpu --sizes 256x10000
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from companion.losses import multilabel_categorical_crossentropy
from _common import device_name  # noqa: E402


def loss_exp_sums(logits, targets):
    y = targets.to(logits.dtype)
    return (torch.log1p(((1 - y) * logits.exp()).sum(-1)) + torch.log1p((y * (-logits).exp()).sum(-1))).mean()


def loss_mask_1e12(logits, targets):
    y = targets.to(logits.dtype)
    s = (1 - 2 * y) * logits
    zeros = torch.zeros_like(s[..., :1])
    neg = torch.logsumexp(torch.cat([s - y * 1e12, zeros], -1), -1)
    pos = torch.logsumexp(torch.cat([s - (1 - y) * 1e12, zeros], -1), -1)
    return (neg + pos).mean()


def loss_ours(logits, targets):
    return multilabel_categorical_crossentropy(logits, targets)


def loss_bce(logits, targets):
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


METHODS = {"ours (-inf mask)": loss_ours, "exp sums": loss_exp_sums, "1e12 mask": loss_mask_1e12,
           "BCE (reference point)": loss_bce}


def saved_bytes(fn, logits, targets) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of ``fn``."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits, targets)
    return sum(seen.values())


def step(fn, logits, targets):
    logits.grad = None
    fn(logits, targets).backward()


def measure(fn, logits, targets, min_run_time):
    step(fn, logits, targets)  # warm-up
    timer = benchmark.Timer(stmt="step(fn, logits, targets)",
                            globals=dict(step=step, fn=fn, logits=logits, targets=targets))
    t = timer.blocked_autorange(min_run_time=min_run_time).median
    peak = None
    if logits.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, logits, targets)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return t, saved_bytes(fn, logits, targets), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated BxN (default: 256x10000 on cpu; also 256x100000, 1024x100000 on cuda)")
    parser.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per entry")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ("256x10000,256x100000,1024x100000" if cuda else "256x10000")
    dtypes = args.dtypes or ("float32,bfloat16" if cuda else "float32")
    torch.manual_seed(0)

    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("forward + backward of the mean loss; targets have 1-5 positives per row; "
          "ratio = method / ours (time, memory)\n")
    head = "| B x n | dtype | method | time (ms) | ratio | saved for backward (MiB) | ratio |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if cuda:
        head += " peak (MiB) | ratio |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for size in sizes.split(","):
        b, n = (int(v) for v in size.lower().split("x"))
        for dtype_name in dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            logits = (torch.randn(b, n, device=device) * 3).to(dtype).requires_grad_(True)
            k = torch.randint(1, 6, (b, 1), device=device)
            targets = torch.rand(b, n, device=device).argsort(-1) < k  # bool, 1..5 positives
            rows = {name: measure(fn, logits, targets, args.min_run_time) for name, fn in METHODS.items()}
            t0, s0, p0 = rows["ours (-inf mask)"]
            for name, (t, s, p) in rows.items():
                line = (f"| {b} x {n} | {dtype_name} | {name} | {t * 1e3:.2f} | {t / t0:.2f}x | "
                        f"{s / 2**20:.1f} | {s / s0:.2f}x |")
                if cuda:
                    line += f" {p / 2**20:.1f} | {p / p0:.2f}x |"
                print(line)
            del logits, targets
            if cuda:
                torch.cuda.empty_cache()

    s = torch.tensor([[1e4, -1e4, 20.0]])
    y = torch.tensor([[False, True, False]])
    print("\nat logits +-1e4 (float32): " + ", ".join(
        f"{name} = {fn(s, y).item():.6g}" for name, fn in METHODS.items() if name != "BCE (reference point)"))


if __name__ == "__main__":
    main()
