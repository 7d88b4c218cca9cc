"""Ladder side-tuning against full fine-tuning and LoRA (peft): memory and step time at equal batch.

    python benchmarks/bench_ladder.py                  # CPU: GPT 6 x d=256, batch 8, T = 64
    python benchmarks/bench_ladder.py --device cuda    # GPU: add --d-model 768 --num-layers 12 --batch-size 32 --seq-len 512

The backbone is companion.lm.GPT (pre-LN GPT-2 blocks, random weights: memory and time do not
depend on them) with a mean-pool classification head. Full fine-tuning trains everything; LoRA is
peft's, injected into every nn.Linear of the blocks (rank 8); LST is
companion.peft.LadderSideNetwork on hidden states taken under torch.no_grad() (side blocks of
width d/r, r = 4 and 8). One training step = forward, backward, AdamW step. Columns: trainable
parameters; saved-activation bytes (companion.memory.saved_activation_bytes, exact) and their
ratio to full fine-tuning beside the ratio the notebook derives (eq. lst-ratio, c = 16 floats per
token per unit width: (c + 2) / (c r) + (L + 1) / (c L)); trainable state (weights, gradients,
Adam moments); median step time (round robin, one run) and its ratio to full fine-tuning; peak
memory of one step (CUDA allocator, or the resident set of a fresh CPU process).
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from companion.lm import GPT, GPTConfig
from companion.memory import saved_activation_bytes, training_memory_bytes
from companion.peft import LadderSideNetwork, backbone_hidden_states
from _common import (cuda_peak_bytes, device_name, report_worker_result,  # noqa: E402
                     round_robin_median, rss_peak_bytes, run_worker)

METHODS = ("full", "lora", "lst4", "lst8")


def encode(model, x):
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1], device=x.device))
    for block in model.blocks:
        h = block(h)
    return model.ln_f(h)


class Tuned(nn.Module):
    def __init__(self, backbone, method, lora_rank):
        super().__init__()
        d, L = backbone.cfg.d_model, backbone.cfg.num_layers
        self.method = method
        self.backbone = copy.deepcopy(backbone)
        if method == "full":
            self.head = nn.Linear(d, 2)
            return
        self.backbone.requires_grad_(False)
        if method == "lora":
            warnings.filterwarnings("ignore", message="IProgress not found")
            from peft import LoraConfig, inject_adapter_in_model
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                               target_modules=["qkv", "proj", "fc"]),
                                    self.backbone)
            self.head = nn.Linear(d, 2)
        else:
            self.side = LadderSideNetwork(d, L, reduction_factor=int(method[3:]))
            self.head = nn.Linear(self.side.side_dim, 2)

    def forward(self, x):
        if self.method.startswith("lst"):
            return self.head(self.side(backbone_hidden_states(self.backbone, x)).mean(1))
        return self.head(encode(self.backbone, x).mean(1))


def build(args, device):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab_size, num_layers=args.num_layers,
                    num_heads=args.num_heads, d_model=args.d_model, block_size=args.seq_len)
    backbone = GPT(cfg).eval()
    return {m: Tuned(backbone, m, args.lora_rank).to(device) for m in METHODS}


def step_of(model, x, y):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def data(args, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g)
    return x.to(device), torch.randint(0, 2, (args.batch_size,), generator=g).to(device)


def worker(args):
    model = build(args, torch.device("cpu"))[args.worker]
    report_worker_result(rss_peak_bytes(step_of(model, *data(args, "cpu"))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (round robin)")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    models = build(args, device)
    x, y = data(args, device)
    L, c = args.num_layers, 16
    predicted = {"full": 1.0, "lst4": (c + 2) / (c * 4) + (L + 1) / (c * L),
                 "lst8": (c + 2) / (c * 8) + (L + 1) / (c * L)}
    acts = {m: saved_activation_bytes(lambda: models[m](x).sum()) for m in METHODS}
    runs = {m: step_of(models[m], x, y) for m in METHODS}
    t = round_robin_median(runs, device, warmup=2, repeats=args.repeats)
    if device.type == "cuda":
        peak = {m: cuda_peak_bytes(r, device) for m, r in runs.items()}
    else:
        peak = {m: run_worker([sys.executable, __file__, "--device", "cpu", "--d-model",
                               str(args.d_model), "--num-layers", str(L), "--num-heads",
                               str(args.num_heads), "--vocab-size", str(args.vocab_size),
                               "--batch-size", str(args.batch_size), "--seq-len",
                               str(args.seq_len), "--lora-rank", str(args.lora_rank),
                               "--worker", m]) or 0 for m in METHODS}
    names = {"full": "full fine-tuning", "lora": f"LoRA r={args.lora_rank} (peft)",
             "lst4": "LST r=4", "lst8": "LST r=8"}
    print(f"device: {device_name(device)} ({device.type}), float32, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"backbone: GPT {L} x d={args.d_model}, {args.num_heads} heads, "
          f"{sum(q.numel() for q in models['full'].backbone.parameters()):,} parameters; "
          f"batch {args.batch_size}, T = {args.seq_len}; step = forward + backward + AdamW")
    print("activations: saved for backward (exact count); predicted: eq. lst-ratio with c = 16; "
          "state: trainable weights + grads + Adam; peak: one step above the model "
          "(CUDA allocator, or the resident set of a fresh CPU process)\n")
    print("| method | trainable | activations MiB | / full | predicted | state MiB | step | "
          "step / full | peak MiB | peak / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in METHODS:
        n = sum(q.numel() for q in models[m].parameters() if q.requires_grad)
        pred = f"{predicted[m]:.3f}" if m in predicted else "-"
        print(f"| {names[m]} | {n:,} | {acts[m] / 2**20:.1f} | {acts[m] / acts['full']:.3f} | "
              f"{pred} | {training_memory_bytes(models[m], 'adam') / 2**20:.2f} | "
              f"{t[m] * 1e3:.1f} ms | {t[m] / t['full']:.2f}x | {peak[m] / 2**20:.0f} | "
              f"{peak[m] / max(peak['full'], 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
