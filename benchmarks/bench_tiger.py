"""Tiger against lion-pytorch's Lion and torch's AdamW on a GPT of a few million parameters.

    python benchmarks/bench_tiger.py                  # CPU, writes nothing; paste the table
    python benchmarks/bench_tiger.py --device cuda

companion.optim.Tiger (foreach over each device/dtype bucket; the token embedding in its own
"embedding" group with row-wise RMS, with and without lazy rows; and without the RMS factor,
the configuration that equals Lion with beta1 = beta2) beside lion_pytorch.Lion (a Python loop
over parameters) and torch.optim.AdamW (foreach). Timed: optimizer.step() alone on fixed
gradients, median of round-robin runs. The speed ratio is Lion's step time / ours (goal >= 1).
State bytes from companion.memory.optimizer_state_bytes after one step (goal: one buffer).

Memory-limit ratio: "copies" = step time / one copy of every parameter, timed in the same
round robin by ``_common.time_optimizer_steps`` (a step is elementwise over the parameters, so
this is its bandwidth unit); goal <= 8.
"""
from __future__ import annotations

import argparse

import torch
from lion_pytorch import Lion
from companion.lm import GPTConfig
from companion.optim import Tiger
from _common import (COPIES_GOAL, COPY_OF_PARAMETERS, device_name,  # noqa: E402
                     gpt_with_gradients, time_optimizer_steps)



def tiger_groups(params, names):
    emb = [p for n, p in zip(names, params) if n == "tok_emb.weight"]
    rest = [p for n, p in zip(names, params) if n != "tok_emb.weight"]
    return [{"params": emb, "embedding": True}, {"params": rest}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = GPTConfig(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, block_size=128)
    base = gpt_with_gradients(cfg, 8, 128, dev)
    names = [n for n, _ in base.named_parameters()]
    n = sum(p.numel() for p in base.parameters())

    makers = {
        "companion Tiger (RMS, embedding rows)": lambda ps: Tiger(tiger_groups(ps, names)),
        "companion Tiger (RMS, lazy rows)": lambda ps: Tiger(tiger_groups(ps, names),
                                                             lazy_embeddings=True),
        "companion Tiger (no RMS = Lion b1=b2)": lambda ps: Tiger(ps, rms_scale=False),
        "lion-pytorch Lion": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.01),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    }
    t, state = time_optimizer_steps(base, makers, dev, warmup=2, repeats=args.repeats)
    lion_t = t["lion-pytorch Lion"]
    print(f"device: {device_name(dev)} ({dev.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"GPT: {cfg.num_layers} layers, d={cfg.d_model}, vocabulary {cfg.vocab_size}: "
          f"{n / 1e6:.2f}M parameters ({n * 4 / 2**20:.2f} MiB in float32); time of "
          f"optimizer.step() on fixed gradients, median of {args.repeats}\n")
    print("| optimizer | step time | speed ratio (Lion / this) "
          f"| copies (goal <= {COPIES_GOAL}) | state bytes | state / parameter bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in makers:
        print(f"| {name} | {t[name] * 1e3:.1f} ms | {lion_t / t[name]:.2f}x | "
              f"{t[name] / t[COPY_OF_PARAMETERS]:.1f} | {state[name] / 2**20:.2f} MiB | "
              f"{state[name] / (4 * n):.2f} |")
    print(f"\nmemory-limit unit: one copy of every parameter into buffers allocated once "
          f"({len(names)} tensors) = {t[COPY_OF_PARAMETERS] * 1e3:.3g} ms (same run); "
          "copies = step time / that")


if __name__ == "__main__":
    main()
