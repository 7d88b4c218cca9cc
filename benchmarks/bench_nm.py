"""Benchmark: nm_crossentropy (and its centred variant) against plain F.cross_entropy on the
same logits.

Two cases, each with n = --n positions per sequence (10k by default) and a batch of --batch
sequences:
  * m = --m classes (4): logits [B, n, m] with int targets; F.cross_entropy sums the n
    per-position CEs and averages over the batch, nm_crossentropy puts the positions of each class
    in one log.
  * m = 2, the multi-label case: nm_crossentropy on [B, n, 2], multilabel_categorical_crossentropy
    on the score difference [B, n], F.cross_entropy on the same [B, n, 2] logits.
Times forward + backward (median of repeats after warm-up, the losses taking turns) and the peak
memory above the inputs (CUDA: torch.cuda.max_memory_allocated; CPU, Linux: the rise of the peak
resident set of a fresh subprocess per loss, after a warm-up step), and prints markdown tables
with ratios to the baseline.

Memory-limit ratios, from the same round-robin run: "copies" = forward + backward time / one
clone of the loss's own input (``_common.copy_unit``: the [B, n, m] logits, or the [B, n] score
difference for multilabel_categorical_crossentropy); "x plain" = time / that of F.cross_entropy
on the case's logits (the plain softmax cross-entropy of the same shape, the baseline row).

    python benchmarks/bench_nm.py                    # cuda if available, else cpu
    python benchmarks/bench_nm.py --device cpu --threads 1 --batch 16
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from companion.losses import (multilabel_categorical_crossentropy, nm_centered_crossentropy,
                              nm_crossentropy)
from _common import (COPIES_GOAL, PLAIN_GOAL, copy_unit, cuda_peak_bytes,  # noqa: E402
                     device_name, report_worker_result, round_robin_median, rss_peak_bytes,
                     run_worker)

BASELINE = "F.cross_entropy (baseline)"


def cases(m: int) -> dict[str, dict[str, callable]]:
    """case -> {loss name: fn(logits, target)}; the logits of each fn are the leaf that gets a
    gradient."""
    def plain_ce(z, y):  # summed over positions, averaged over the batch: nm_crossentropy's scale
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                               reduction="sum") / y.shape[0]
    return {
        f"m = {m}": {BASELINE: plain_ce, "nm_crossentropy": nm_crossentropy,
                     "nm_centered_crossentropy": nm_centered_crossentropy},
        "m = 2 (multi-label)": {BASELINE: plain_ce, "nm_crossentropy": nm_crossentropy,
                                "multilabel_categorical_crossentropy":
                                    lambda u, y: multilabel_categorical_crossentropy(u, y)},
    }


def make_inputs(case: str, name: str, args, device, dtype):
    """Logits and targets of a case; multilabel_categorical_crossentropy gets the score
    difference."""
    m = 2 if case.startswith("m = 2 ") else args.m
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(args.batch, args.n, m, generator=g)).to(device, dtype)
    target = torch.randint(0, m, (args.batch, args.n), generator=g).to(device)
    if name == "multilabel_categorical_crossentropy":
        return (logits[..., 1] - logits[..., 0]).contiguous(), target
    return logits, target


def step(fn, logits, target):
    z = logits.requires_grad_()
    fn(z, target).backward()
    z.grad = None


def cpu_worker(args) -> None:
    """In a fresh process (Linux): the peak resident-set rise of one forward + backward."""
    case, name = args.worker.split("|")
    fn = cases(args.m)[case][name]
    logits, target = make_inputs(case, name, args, torch.device("cpu"), getattr(torch, args.dtype))
    report_worker_result(rss_peak_bytes(lambda: step(fn, logits, target)))


def peak_cpu(case, name, args) -> int | None:
    return run_worker([sys.executable, __file__, "--worker", f"{case}|{name}",
                       "--batch", str(args.batch), "--n", str(args.n), "--m", str(args.m),
                       "--dtype", args.dtype, "--threads", str(args.threads)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch B")
    p.add_argument("--n", type=int, default=10_000, help="positions per sequence")
    p.add_argument("--m", type=int, default=4, help="classes in the first case")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=None, help="default 30 on cuda, 7 on cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        cpu_worker(args)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (30 if device.type == "cuda" else 7)
    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"batch {args.batch} x n = {args.n} positions, {args.dtype}; forward + backward, "
          f"median of {repeats} after warm-up (round robin); peak = memory above the inputs")
    for case, losses in cases(args.m).items():
        inputs = {name: make_inputs(case, name, args, device, dtype) for name in losses}
        runs = {name: (lambda fn=fn, name=name: step(fn, *inputs[name]))
                for name, fn in losses.items()}
        # the bandwidth unit of each loss: one clone of its own input, one entry per input shape
        unit_of = {name: f"clone {list(inputs[name][0].shape)}" for name in losses}
        units = {unit_of[name]: copy_unit(inputs[name][0]) for name in losses}
        times = round_robin_median({**runs, **units}, device, warmup=2, repeats=repeats)
        peaks = {name: cuda_peak_bytes(run, device) if device.type == "cuda"
                 else peak_cpu(case, name, args) for name, run in runs.items()}
        t0, m0 = times[BASELINE], peaks[BASELINE]
        print(f"\n{case}, logits {tuple(inputs[BASELINE][0].shape)}\n")
        print(f"| loss | time | copies (goal <= {COPIES_GOAL}) | x plain (goal <= {PLAIN_GOAL}) "
              "| peak memory | vs baseline |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in losses:
            t, peak = times[name], peaks[name]
            mem = ("n/a | n/a" if peak is None
                   else f"{peak / 2**20:.1f} MiB | {peak / max(m0, 1):.2f}x")
            print(f"| {name} | {t * 1e3:.1f} ms | {t / times[unit_of[name]]:.1f} "
                  f"| {t / t0:.2f}x | {mem} |")
        print("\nmemory-limit units (same run): " + ", ".join(
            f"{unit} = {times[unit] * 1e3:.3g} ms" for unit in units)
            + "; copies = time / the clone of the loss's own input, "
            "x plain = time / F.cross_entropy's time (the baseline)")


if __name__ == "__main__":
    main()
