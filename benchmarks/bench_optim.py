"""AdaFactor against torch.optim.Adafactor and torch.optim.AdamW on a ~20M-parameter GPT.

    python benchmarks/bench_optim.py                  # CPU
    python benchmarks/bench_optim.py --device cuda

companion.optim.Adafactor (the readable reference, one tensor at a time, in torch's clamp mode and
in the paper's add-eps1 mode) beside torch.optim.Adafactor (foreach) and AdamW (foreach). Timed:
optimizer.step() alone on fixed gradients (the part that differs), median of round-robin runs.
Optimizer-state bytes from companion.memory.optimizer_state_bytes after one step. Prints a
markdown table with the device named.

Memory-limit ratio: "copies" = step time / one copy of every parameter, timed in the same
round robin by ``_common.time_optimizer_steps`` (a step is elementwise over the parameters, so
this is its bandwidth unit); goal <= 8.
"""
from __future__ import annotations

import argparse

import torch
from companion.lm import GPTConfig
from companion.optim import Adafactor
from _common import (COPIES_GOAL, COPY_OF_PARAMETERS, device_name,  # noqa: E402
                     gpt_with_gradients, time_optimizer_steps)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
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
          f"{n / 1e6:.1f}M parameters; time of optimizer.step() on fixed gradients, median of "
          f"{args.repeats} (round robin)\n")
    print(f"| optimizer | step time | time / torch Adafactor | copies (goal <= {COPIES_GOAL}) "
          "| state bytes | state / torch Adafactor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in makers:
        print(f"| {name} | {t[name] * 1e3:.1f} ms | {t[name] / ref_t:.2f}x | "
              f"{t[name] / t[COPY_OF_PARAMETERS]:.1f} | {state[name] / 2**20:.2f} MiB | "
              f"{state[name] / ref_s:.2f}x |")
    print(f"\nmemory-limit unit: one copy of every parameter into buffers allocated once "
          f"({len(list(base.parameters()))} tensors) = {t[COPY_OF_PARAMETERS] * 1e3:.3g} ms "
          "(same run); copies = step time / that")
    print(f"\nAdamW state / Adafactor state: {state['torch AdamW'] / ref_s:.1f}x")


if __name__ == "__main__":
    main()
