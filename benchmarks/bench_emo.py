"""EMO vs cross-entropy at a 32k vocabulary: forward+backward time and peak memory, same run.

    python benchmarks/bench_emo.py                 # cuda if available, else cpu (smaller N)
    python benchmarks/bench_emo.py --device cpu --tokens 512 --threads 2

All times come from one round-robin run (``_common.round_robin_median``: the losses and the
memory-limit unit take turns). "copies" = forward+backward time / one ``logits.clone()`` (the
bandwidth unit, ``_common.copy_unit``); "x plain" = time / that of ``F.cross_entropy`` on the
same logits (the plain softmax cross-entropy of the same shape), forward+backward alike.

EMO's closed form through unit embeddings, 1 - <Σ_i p_i ê_i, ê_t>, adds one [N, V] x [V, d]
matmul to the softmax that cross-entropy computes anyway: its memory is O(N V + N d + V d), the
same order as CE, never the O(V^2) of an explicit cost matrix (which the last row only estimates).
Memory is measured three ways: torch.cuda.max_memory_allocated on a GPU; on a CPU the peak of
live tensor bytes replayed from torch.profiler's allocation events, and the RSS peak (psutil,
sampled every millisecond) above the RSS before the call. "largest tensor" is the largest
number of elements any op of the forward and backward pass produced.
"""
from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from companion.losses import emo_loss, emo_mle_loss
from _common import (COPIES_GOAL, PLAIN_GOAL, copy_unit, cuda_peak_bytes,  # noqa: E402
                     device_name, round_robin_median)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def fwd_bwd(loss_fn, logits, target, emb):
    logits.grad = None
    loss_fn(logits, target, emb).backward()


def cpu_peak_bytes(fn):
    """Peak of live tensor bytes during fn, replayed from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def rss_peak_delta(fn):
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(peak[0], proc.memory_info().rss) - base


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=None, help="N (default 2048 on cuda, 512 on cpu)")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    n = args.tokens or (2048 if dev.type == "cuda" else 512)
    v, d = args.vocab, args.dim
    repeats = args.repeats or (20 if dev.type == "cuda" else 5)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g).to(dev).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g).to(dev)
    emb = torch.randn(v, d, generator=g).to(dev)

    losses = {
        "F.cross_entropy": lambda z, t, e: F.cross_entropy(z, t),
        "emo_loss": emo_loss,
        "emo_mle_loss": lambda z, t, e: emo_mle_loss(z, t, e)[0],
    }
    fns = {name: (lambda loss_fn=loss_fn: fwd_bwd(loss_fn, logits, target, emb))
           for name, loss_fn in losses.items()}
    copy_key = "logits.clone()"
    times = round_robin_median({**fns, copy_key: copy_unit(logits)}, dev, warmup=1,
                               repeats=repeats)
    rows = []
    for name, fn in fns.items():
        with LargestTensor() as mode:
            fn()
        if dev.type == "cuda":
            mem, rss = cuda_peak_bytes(fn, dev), None
        else:
            mem, rss = cpu_peak_bytes(fn), rss_peak_delta(fn)
        rows.append((name, times[name], mem, rss, mode.largest))

    mib = 2.0 ** 20
    print(f"device: {device_name(dev)} ({dev.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; N = {n} tokens, V = {v}, d = {d}; median of "
          f"{repeats} forward+backward passes after a warm-up (round robin)\n")
    mem_col = "peak CUDA memory" if dev.type == "cuda" else "peak tensor memory (profiler)"
    print(f"| loss | time | copies (goal <= {COPIES_GOAL}) | x plain (goal <= {PLAIN_GOAL}) "
          f"| {mem_col} | ratio vs CE | RSS peak delta | largest tensor |")
    print("|---|---|---|---|---|---|---|---|")
    _, t_ce, m_ce, _, _ = rows[0]
    t_copy = times[copy_key]
    for name, t, mem, rss, largest in rows:
        rss_s = "n/a" if rss is None else f"{rss / mib:.0f} MiB"
        print(f"| {name} | {t * 1e3:.1f} ms | {t / t_copy:.1f} | {t / t_ce:.2f}x "
              f"| {mem / mib:.0f} MiB | {mem / m_ce:.2f}x | {rss_s} | {largest:,} elements |")
    print(f"| explicit V x V cost (not run) | | | | >= {v * v * 4 / mib:,.0f} MiB | "
          f"{v * v * 4 / m_ce:.0f}x | | {v * v:,} elements |")
    print(f"\nmemory-limit unit: {copy_key} of the N x V logits = {t_copy * 1e3:.3g} ms "
          "(same run); copies = time / that, x plain = time / F.cross_entropy's time")
    print(f"reference sizes: N x V logits = {n * v * 4 / mib:.0f} MiB, "
          f"N x d = {n * d * 4 / mib:.1f} MiB, V x d = {v * d * 4 / mib:.0f} MiB (float32)")


if __name__ == "__main__":
    main()
