"""Gradient checkpointing on a 24-layer GPT: activation memory and step time.

    python benchmarks/bench_memory.py                  # CPU: d=256, T=128, batch 2, 1 thread
    python benchmarks/bench_memory.py --device cuda --d-model 768 --num-heads 12 \\
        --seq-len 1024 --batch-size 8 --out benchmarks/results/checkpoint-h100.md

One training step (forward + backward of the language-model loss) of ``companion.lm.GPT`` with
its blocks run four ways: plainly; through ``companion.memory.CheckpointedStack`` with one segment
per block; and, at equal segment counts k, through ``CheckpointedStack(blocks, k)`` and through
``torch.utils.checkpoint.checkpoint_sequential`` (both ``use_reentrant=False``). Recomputation is
``torch.utils.checkpoint`` in every arm. Reports, against no checkpointing measured in the same
run: the bytes saved for backward after the forward pass (``saved_activation_bytes``), the peak
of live activation bytes during the whole step (a dispatch mode that follows every storage the
forward and the recomputation allocate; on CUDA also the allocator's peak), and the median step
time (round robin). Goal (issue 12): per-block memory <= 1/3 at <= 1.4x the time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint_sequential

from companion.lm import GPT, GPTConfig
from companion.memory import CheckpointedStack, saved_activation_bytes
from _common import cuda_peak_bytes, device_name, round_robin_median  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while grad mode is on (the forward pass
    and checkpoint's recomputation inside the backward), sampled after every op; a storage
    counts while any reference to it lives. The same tracker as notebooks/recompute.ipynb."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {p: v for p, v in self.live.items() if not v[0].expired()}
        if torch.is_grad_enabled():
            old = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor)} | self.live.keys()
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    st = t.untyped_storage()
                    if st.data_ptr() not in old:
                        self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def lm_loss(model, stack, idx, targets):
    """GPT.forward for the "gpt2" block order, with the loop over blocks given as ``stack``."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    h = model.drop(model.tok_emb(idx) + model.pos_emb(pos))
    logits = model.ln_f(stack(h)) @ model.tok_emb.weight.T
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def arms(model, segments):
    blocks = model.blocks
    out = {"none": nn.Sequential(*blocks), "CheckpointedStack per block": CheckpointedStack(blocks)}
    for k in segments:
        out[f"CheckpointedStack k={k}"] = CheckpointedStack(blocks, k)
        out[f"checkpoint_sequential k={k}"] = (
            lambda x, k=k: checkpoint_sequential(nn.Sequential(*blocks), k, x,
                                                 use_reentrant=False))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--segments", type=int, nargs="+", default=[4, 6],
                   help="segment counts compared with checkpoint_sequential")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (round robin)")
    p.add_argument("--out", default="benchmarks/results/checkpoint-cpu.md")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab_size, num_layers=args.num_layers,
                    num_heads=args.num_heads, d_model=args.d_model, block_size=args.seq_len)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    tgt = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    runs = arms(model, args.segments)

    def step_of(stack):
        def step():
            model.zero_grad(set_to_none=True)
            lm_loss(model, stack, idx, tgt).backward()
        return step

    saved, peak, cuda_peak = {}, {}, {}
    for name, stack in runs.items():
        saved[name] = saved_activation_bytes(lm_loss, model, stack, idx, tgt)
        with LiveBytes() as mode:
            step_of(stack)()
        peak[name] = mode.peak
        if device.type == "cuda":
            cuda_peak[name] = cuda_peak_bytes(step_of(stack), device)
    cpu_secs = {k: [] for k in runs}

    def timed(name, stack):
        step = step_of(stack)

        def run():
            t0 = time.process_time()
            step()
            cpu_secs[name].append(time.process_time() - t0)
        return run

    times = round_robin_median({k: timed(k, s) for k, s in runs.items()}, device,
                               warmup=1, repeats=args.repeats)
    cpu = {k: statistics.median(v[1:]) for k, v in cpu_secs.items()}   # after the warm-up

    a = args.batch_size * args.seq_len * args.d_model * 4
    lines = [
        f"device: {device_name(device)} ({device.type}), float32, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        f"GPT: {args.num_layers} layers, d_model={args.d_model}, heads={args.num_heads}, "
        f"T={args.seq_len}, batch={args.batch_size}, vocab={args.vocab_size}; one block input "
        f"a = {a / 2**20:.2f} MiB",
        "One training step (LM loss forward + backward). 'saved' = bytes kept for backward "
        "after the forward pass (saved-tensor hooks); 'peak' = live activation bytes at their "
        "peak during the step (forward and recomputation allocations, gradients excluded)"
        + ("; 'CUDA peak' = allocator peak above the step's start" if cuda_peak else "")
        + "; time = median wall-clock of the round robin (_common.round_robin_median)"
        + (", CPU = median process CPU time of the same calls" if device.type == "cpu" else "")
        + "; ratios against 'none' from this one run"
        + (" on a shared, heavily loaded machine (timings are noisy)" if device.type == "cpu"
           else "") + ".",
        "",
    ]
    head = "| arm | saved MiB | peak MiB | peak / none |"
    rule = "|---|---:|---:|---:|"
    if cuda_peak:
        head += " CUDA peak MiB | CUDA / none |"
        rule += "---:|---:|"
    head += " step time | time / none |"
    rule += "---:|---:|"
    if device.type == "cpu":
        head += " CPU time | CPU / none |"
        rule += "---:|---:|"
    lines += [head, rule]
    for name in runs:
        row = (f"| {name} | {saved[name] / 2**20:.2f} | {peak[name] / 2**20:.2f} | "
               f"{peak[name] / peak['none']:.3f} |")
        if cuda_peak:
            row += (f" {cuda_peak[name] / 2**20:.0f} | "
                    f"{cuda_peak[name] / cuda_peak['none']:.3f} |")
        row += f" {times[name] * 1e3:.0f} ms | {times[name] / times['none']:.2f}x |"
        if device.type == "cpu":
            row += f" {cpu[name] * 1e3:.0f} ms | {cpu[name] / cpu['none']:.2f}x |"
        lines.append(row)
    pb = "CheckpointedStack per block"
    t = cpu if device.type == "cpu" else times
    ok = peak[pb] <= peak["none"] / 3 and t[pb] <= 1.4 * t["none"]
    lines += ["", f"Goal (memory <= 1/3 at <= 1.4x the time) for per-block checkpointing: "
              f"{'met' if ok else 'not met'} in this run (memory x{peak[pb] / peak['none']:.3f},"
              f" {'CPU ' if device.type == 'cpu' else ''}time {t[pb] / t['none']:.2f}x).",
              "", "Command: `python benchmarks/bench_memory.py " + " ".join(
                  a_ for a_ in sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
