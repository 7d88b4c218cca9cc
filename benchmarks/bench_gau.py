"""Two GAU layers against one MHA+FFN block of equal parameters: forward + backward time.

    python benchmarks/bench_gau.py                   # CPU: d=256, batch 2, T = 128 .. 1024
    python benchmarks/bench_gau.py --device cuda     # GPU: add --d-model 768 --batch-size 8 --lengths 512 1024 2048 4096

GAU-alpha (kexue.fm/archives/9052) replaces each Attention+FFN pair of a Transformer by two gated
attention units (companion.attention.GatedAttentionUnit, e = 2d, one head of key size s); the
baseline block is bias-free multi-head attention through F.scaled_dot_product_attention plus a GELU
FFN whose width makes the parameter counts equal. Both are Post-RMSNorm, causal, without RoPE.
Prints a markdown table: median time of forward + backward (round robin, one run), the measured
ratio beside the ratio the multiply-add counts predict, and the peak memory of each, with the
device named. Memory is measured twice: with fused attention on both sides (SDPA: no n x n matrix
is kept for the backward pass), and with explicit attention on both sides (the score and
probability matrices materialised, as in the frameworks of the article's time): one matrix per GAU
layer against one per head.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from companion.attention import GatedAttentionUnit, gau_param_count
from _common import (cuda_peak_bytes, device_name, report_worker_result,  # noqa: E402
                     round_robin_median, rss_peak_bytes, run_worker)


def rms_norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class MHAFFNBlock(nn.Module):
    def __init__(self, d, num_heads, d_ff):
        super().__init__()
        self.h, self.explicit = num_heads, False
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        if self.explicit:  # the h score matrices materialised (and kept for backward)
            scores = q @ k.transpose(-1, -2) / (d // self.h) ** 0.5
            tri = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            att = torch.softmax(scores.masked_fill(~tri, float("-inf")), -1) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = rms_norm(x + self.o(att.transpose(1, 2).reshape(B, n, d)))
        return rms_norm(x + self.down(F.gelu(self.up(x))))


class GAUPair(nn.Module):
    def __init__(self, d, key_size, train_length):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedAttentionUnit(d, expansion=2, key_size=key_size, normalization="softmax_plus",
                               causal=True, train_length=train_length) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = rms_norm(x + layer(x))
        return x


def macs_per_token(d, s, e, d_ff, n):
    """Multiply-adds per token of the forward pass (the backward costs about twice as much for
    both, so the ratio holds for forward + backward): projections plus attention over n keys
    (counted in full; a causal kernel that skips the masked half halves both attention terms)."""
    gau = 2 * (d * (2 * e + s) + e * d + n * (s + e))          # two GAU layers
    mha = 3 * d * d + d * d + 2 * d * d_ff + n * (d + d)       # QKV, O, FFN; QK^T and AV
    return gau, mha


def build(d, s, heads, d_ff, train_length, device, dtype):
    torch.manual_seed(0)
    return {"gau": GAUPair(d, s, train_length).to(device, dtype),
            "mha": MHAFFNBlock(d, heads, d_ff).to(device, dtype)}


def step_of(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
    return step


def set_explicit(models, explicit: bool):
    """Explicit attention on both sides (True), or SDPA on both (False)."""
    for layer in models["gau"].layers:
        layer.use_sdpa = not explicit
    models["mha"].explicit = explicit


def worker(args, d_ff):
    """A fresh process: the peak resident set of one forward+backward of one model (CPU)."""
    models = build(args.d_model, args.key_size, args.num_heads, d_ff, max(args.lengths),
                   torch.device("cpu"), getattr(torch, args.dtype))
    set_explicit(models, args.explicit)
    x = torch.randn(args.batch_size, args.worker_length, args.d_model, dtype=getattr(torch, args.dtype))
    report_worker_result(rss_peak_bytes(step_of(models[args.worker], x)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--key-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (round robin)")
    p.add_argument("--worker", choices=["gau", "mha"], help=argparse.SUPPRESS)
    p.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--explicit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, s = args.d_model, args.key_size
    e = 2 * d
    p_gau = gau_param_count(d, 2, s)
    d_ff = round((2 * p_gau - 4 * d * d) / (2 * d))   # 4d^2 + 2 d d_ff = 2 (3ed + ds + 2s)
    if args.worker:
        return worker(args, d_ff)
    models = build(d, s, args.num_heads, d_ff, max(args.lengths), device, dtype)
    n_gau, n_block = (sum(q.numel() for q in m.parameters()) for m in models.values())

    print(f"device: {device_name(device)} ({device.type}), dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"d_model={d}, key_size={s}, e={e}, heads={args.num_heads}, batch={args.batch_size}; "
          f"parameters: 2 x GAU {n_gau:,}, MHA+FFN {n_block:,} (d_ff={d_ff})")
    print("GAU attention runs through SDPA (softmax_plus: the row factor folded into Q); "
          "'predicted' is the ratio of multiply-adds per token, 'measured / predicted' how far "
          "GAU's time is from what its FLOPs imply (goal <= 1.1); peak memory of one "
          "forward+backward (CUDA allocator, or the resident set of a fresh CPU process), with "
          "fused attention (SDPA) on both sides, then with explicit attention on both sides\n")
    print("| T | 2 x GAU fwd+bwd | MHA+FFN fwd+bwd | measured GAU / MHA | predicted (MACs) | "
          "measured / predicted | GAU peak MiB | MHA+FFN peak MiB | GAU / MHA memory | "
          "explicit: GAU peak MiB | explicit: MHA+FFN peak MiB | explicit: GAU / MHA memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        x = torch.randn(args.batch_size, n, d, device=device, dtype=dtype)
        runs = {k: step_of(m, x) for k, m in models.items()}
        t = round_robin_median(runs, device, warmup=2, repeats=args.repeats)
        mem = {}
        for explicit in (False, True):
            if device.type == "cuda":
                set_explicit(models, explicit)
                mem[explicit] = {k: cuda_peak_bytes(r, device) for k, r in runs.items()}
            else:
                mem[explicit] = {
                    k: run_worker([sys.executable, __file__, "--device", "cpu", "--dtype", args.dtype,
                                   "--d-model", str(d), "--key-size", str(s), "--num-heads",
                                   str(args.num_heads), "--batch-size", str(args.batch_size),
                                   "--lengths", *map(str, args.lengths), "--worker", k,
                                   "--worker-length", str(n)] + ["--explicit"] * explicit) or 0
                    for k in runs}
        set_explicit(models, False)
        mac_gau, mac_mha = macs_per_token(d, s, e, d_ff, n)
        measured, predicted = t["gau"] / t["mha"], mac_gau / mac_mha
        fused, expl = mem[False], mem[True]
        print(f"| {n} | {t['gau'] * 1e3:.2f} ms | {t['mha'] * 1e3:.2f} ms | {measured:.2f}x | "
              f"{predicted:.2f}x | {measured / predicted:.2f} | {fused['gau'] / 2**20:.0f} | "
              f"{fused['mha'] / 2**20:.0f} | {fused['gau'] / max(fused['mha'], 1):.2f}x | "
              f"{expl['gau'] / 2**20:.0f} | {expl['mha'] / 2**20:.0f} | "
              f"{expl['gau'] / max(expl['mha'], 1):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
