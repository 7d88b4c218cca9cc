"""Two GAU layers against one MHA+FFN block of equal parameters: forward + backward time.

    python benchmarks/bench_gau.py                   # CPU: d=256, batch 2, T = 128 .. 1024
    python benchmarks/bench_gau.py --device cuda     # GPU: add --d-model 768 --batch-size 8 --lengths 512 1024 2048 4096

GAU-alpha (kexue.fm/archives/9052) replaces each Attention+FFN pair of a Transformer by two gated
attention units (companion.attention.GatedAttentionUnit, e = 2d, one head of key size s); the
baseline block is bias-free multi-head attention through F.scaled_dot_product_attention plus a GELU
FFN whose width makes the parameter counts equal. Both are Post-RMSNorm, causal, without RoPE.
Prints a markdown table with the median time of forward + backward, the ratio and (on CUDA) the
peak memory, and the device name.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from companion.attention import GatedAttentionUnit, gau_param_count
from _common import device_name  # noqa: E402


def rms_norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class MHAFFNBlock(nn.Module):
    def __init__(self, d, num_heads, d_ff):
        super().__init__()
        self.h = num_heads
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
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


def measure(module, x, device, min_run_time):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = Timer(stmt="step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return t.median, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--key-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, s = args.d_model, args.key_size
    p_gau = gau_param_count(d, 2, s)
    d_ff = round((2 * p_gau - 4 * d * d) / (2 * d))   # 4d^2 + 2 d d_ff = 2 (3ed + ds + 2s)
    torch.manual_seed(0)
    gau = GAUPair(d, s, train_length=max(args.lengths)).to(device, dtype)
    block = MHAFFNBlock(d, args.num_heads, d_ff).to(device, dtype)
    n_gau, n_block = (sum(q.numel() for q in m.parameters()) for m in (gau, block))

    print(f"device: {device_name(device)} ({device.type}), dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"d_model={d}, key_size={s}, heads={args.num_heads}, batch={args.batch_size}; parameters: "
          f"2 x GAU {n_gau:,}, MHA+FFN {n_block:,} (d_ff={d_ff})\n")
    mem = device.type == "cuda"
    head = "| T | 2 x GAU fwd+bwd | MHA+FFN fwd+bwd | GAU / MHA+FFN |"
    rule = "|---:|---:|---:|---:|"
    if mem:
        head += " GAU peak MiB | MHA+FFN peak MiB |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for n in args.lengths:
        x = torch.randn(args.batch_size, n, d, device=device, dtype=dtype)
        t_gau, m_gau = measure(gau, x, device, args.min_run_time)
        t_blk, m_blk = measure(block, x, device, args.min_run_time)
        row = f"| {n} | {t_gau * 1e3:.2f} ms | {t_blk * 1e3:.2f} ms | {t_gau / t_blk:.2f}x |"
        if mem:
            row += f" {m_gau / 2**20:.0f} | {m_blk / 2**20:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
