"""Top-k generation with a KV cache against recomputing the whole prefix at every step.

    python benchmarks/bench_lm.py                  # CPU, the two models below
    python benchmarks/bench_lm.py --device cuda

companion.lm.generate_topk(use_cache=True) runs the prompt once and then feeds one token per step,
reusing every block's keys and values (companion.lm.KVCache); use_cache=False re-encodes the whole
sequence at every step (what a plain GPT.forward loop does). Both sample the same tokens from the
same generator (checked here). 256 new tokens from a 64-token prompt, batch 1, for the gpt2-chinese
notebook's small GPT (2 layers, d = 64) and a 6-layer d = 384 one (the notebook's full scale).
Prints a markdown table: median seconds per call (round robin, one run), tokens/s, and the ratio.
"""
from __future__ import annotations

import argparse

import torch
from companion.lm import GPT, GPTConfig, generate_topk
from _common import device_name, round_robin_median  # noqa: E402

MODELS = {
    "small (L=2, d=64, 4 heads)": dict(num_layers=2, num_heads=4, d_model=64),
    "6 layers, d=384, 6 heads": dict(num_layers=6, num_heads=6, d_model=384),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"device: {device_name(dev)} ({dev.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"batch 1, prompt {args.prompt} tokens, {args.new_tokens} new tokens, top-k 5, "
          f"vocabulary 98, block_size {args.prompt + args.new_tokens}\n")
    print("| model | with cache | recompute | tokens/s cached | tokens/s recompute | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, sizes in MODELS.items():
        cfg = GPTConfig(vocab_size=98, block_size=args.prompt + args.new_tokens, **sizes)
        torch.manual_seed(0)
        model = GPT(cfg).to(dev).eval()
        prompt = torch.randint(0, 98, (1, args.prompt), device=dev)

        def gen(use_cache):
            g = torch.Generator(device=dev).manual_seed(0)
            return generate_topk(model, prompt, args.new_tokens, k=5, generator=g,
                                 use_cache=use_cache)

        same = torch.equal(gen(True), gen(False))
        t = round_robin_median({"cache": lambda: gen(True), "full": lambda: gen(False)}, dev,
                               warmup=1, repeats=args.repeats)
        n = args.new_tokens
        print(f"| {label} | {t['cache']:.3f} s | {t['full']:.3f} s | {n / t['cache']:.0f} | "
              f"{n / t['full']:.0f} | {t['full'] / t['cache']:.1f}x |"
              + ("" if same else " (tokens differ!)"))


if __name__ == "__main__":
    main()
