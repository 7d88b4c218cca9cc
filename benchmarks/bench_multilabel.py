#!/usr/bin/env python3
"""Multi-label categorical cross-entropy: time and memory of forward + backward.

Compares ``companion.losses.multilabel_categorical_crossentropy`` (-inf masking, one fused softmax
over the two groups) with two straightforward implementations of the same loss and, as the plain
torch operation of the same shape, with ``F.binary_cross_entropy_with_logits`` (a different loss):

- "exp sums": ``log1p(sum (1-y) e^s) + log1p(sum y e^{-s})``, the formula typed as written; it
  overflows to inf once a logit exceeds ~88 in float32 (~11 in float16).
- "1e12 mask": the widely copied port that masks by subtracting 1e12 instead of using -inf.

Prints a markdown table: median time of forward + backward (round robin, so that a busy spell of
the machine falls on every method alike), its ratio to ours, to BCE and to a plain ``clone()`` of
the logits (the memory-bandwidth unit: "copies"), the bytes autograd saves for the backward pass,
and (on CUDA) the peak memory allocated during the step.

    python benchmarks/bench_multilabel.py                 # cuda if available, else cpu
    python benchmarks/bench_multilabel.py --device cpu --sizes 256x10000
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from companion.losses import multilabel_categorical_crossentropy
from _common import cuda_peak_bytes, device_name, round_robin_median  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated BxN (default: 256x10000 on cpu; also 256x100000, 1024x100000 on cuda)")
    parser.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (round robin)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ("256x10000,256x100000,1024x100000" if cuda else "256x10000")
    dtypes = args.dtypes or ("float32,bfloat16" if cuda else "float32")
    torch.manual_seed(0)

    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("forward + backward of the mean loss; targets have 1-5 positives per row; "
          "ratio = method / ours (time, memory); x BCE = time / BCE's; copies = time / "
          "a clone() of the logits\n")
    head = ("| B x n | dtype | method | time (ms) | ratio | x BCE | copies | "
            "saved for backward (MiB) | ratio |")
    sep = "|---|---|---|---:|---:|---:|---:|---:|---:|"
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
            runs = {name: (lambda fn=fn, x=logits, y=targets: step(fn, x, y))
                    for name, fn in METHODS.items()}
            runs["copy"] = logits.detach().clone
            t = round_robin_median(runs, device, warmup=3, repeats=args.repeats)
            t0, tb, tc = t["ours (-inf mask)"], t["BCE (reference point)"], t["copy"]
            s0 = saved_bytes(loss_ours, logits, targets)
            p0 = cuda_peak_bytes(runs["ours (-inf mask)"], device) if cuda else None
            for name, fn in METHODS.items():
                sb = saved_bytes(fn, logits, targets)
                line = (f"| {b} x {n} | {dtype_name} | {name} | {t[name] * 1e3:.2f} | "
                        f"{t[name] / t0:.2f}x | {t[name] / tb:.2f}x | {t[name] / tc:.1f} | "
                        f"{sb / 2**20:.1f} | {sb / s0:.2f}x |")
                if cuda:
                    p = cuda_peak_bytes(runs[name], device)
                    line += f" {p / 2**20:.1f} | {p / p0:.2f}x |"
                print(line, flush=True)
            del logits, targets
            if cuda:
                torch.cuda.empty_cache()

    s = torch.tensor([[1e4, -1e4, 20.0]])
    y = torch.tensor([[False, True, False]])
    print("\nat logits +-1e4 (float32): " + ", ".join(
        f"{name} = {fn(s, y).item():.6g}" for name, fn in METHODS.items() if name != "BCE (reference point)"))


if __name__ == "__main__":
    main()
