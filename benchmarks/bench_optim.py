"""AdaFactor against torch.optim.Adafactor and torch.optim.AdamW on a ~20M-parameter GPT.

    python benchmarks/bench_optim.py                  # CPU
    python benchmarks/bench_optim.py --device cuda

companion.optim.Adafactor (the readable reference, one tensor at a time, in torch's clamp mode and
in the paper's add-eps1 mode) beside torch.optim.Adafactor (foreach) and AdamW (foreach). Timed:
optimizer.step() alone on fixed gradients (the part that differs), median of round-robin runs.
Optimizer-state bytes from companion.memory.optimizer_state_bytes after one step. Prints a
markdown table with the device named.
"""
from __future__ import annotations

import argparse

import torch
from companion.lm import GPTConfig
from companion.optim import Adafactor
from _common import device_name, gpt_with_gradients, time_optimizer_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = GPTConfig(vocab_size=8192, num_layers=8, num_heads=8, d_model=384, block_size=256)
    base = gpt_with_gradients(cfg, 4, 128, dev)
    n = sum(p.numel() for p in base.parameters())

    makers = {
        "companion Adafactor (clamp)": lambda ps: Adafactor(ps, lr=1e-2, eps=(None, 1e-3),
                                                            eps_mode="clamp"),
        "companion Adafactor (add)": lambda ps: Adafactor(ps, lr=1e-2),
        "torch Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    }
    t, state = time_optimizer_steps(base, makers, dev, warmup=1, repeats=args.repeats)
    ref_t, ref_s = t["torch Adafactor"], state["torch Adafactor"]
    print(f"device: {device_name(dev)} ({dev.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"GPT: {cfg.num_layers} layers, d={cfg.d_model}, vocabulary {cfg.vocab_size}: "
          f"{n / 1e6:.1f}M parameters; time of optimizer.step() on fixed gradients\n")
    print("| optimizer | step time | time / torch Adafactor | state bytes | "
          "state / torch Adafactor |")
    print("|---|---:|---:|---:|---:|")
    for name in makers:
        print(f"| {name} | {t[name] * 1e3:.1f} ms | {t[name] / ref_t:.2f}x | "
              f"{state[name] / 2**20:.2f} MiB | {state[name] / ref_s:.2f}x |")
    print(f"\nAdamW state / Adafactor state: {state['torch AdamW'] / ref_s:.1f}x")


if __name__ == "__main__":
    main()
