"""LinearChainCRF (companion.heads) against pytorch-crf: equal outputs and speed.

    python benchmarks/bench_heads.py                  # CPU, 1 thread: batch 64, T = 128, 20 tags
    python benchmarks/bench_heads.py --device cuda    # the same on a GPU

Both CRFs get the same parameters (random, copied from pytorch-crf's initialisation), the same
emissions, tags and a right-padded mask (lengths drawn in [T/2, T]). Timed: NLL forward +
backward (pytorch-crf's negated log likelihood, reduction "mean") and Viterbi decoding (ours
returns a [B, T] tensor, pytorch-crf a list of lists). Prints a markdown table with the median
times (round robin, one run), the ratio theirs / ours (goal >= 1.0), the largest NLL and
gradient differences and whether every Viterbi path is identical; ``--out`` writes it to a file.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torchcrf
from companion.heads import LinearChainCRF
from _common import device_name, round_robin_median  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--num-tags", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (round robin)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: per-step kernels of this size do not gain "
                        "from more, and a shared machine makes extra threads noisy)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    device, (B, T, K) = torch.device(args.device), (args.batch_size, args.length, args.num_tags)
    torch.manual_seed(0)
    ref = torchcrf.CRF(K, batch_first=True).to(device)
    ours = LinearChainCRF(K).to(device)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    em = torch.randn(B, T, K, generator=g).to(device)
    tags = torch.randint(0, K, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)

    # equal outputs (float32 and float64)
    lines = []
    for dtype in (torch.float32, torch.float64):
        r, o = ref.to(dtype), ours.to(dtype)
        e1, e2 = (em.to(dtype).detach().clone().requires_grad_() for _ in range(2))
        a, b = o.nll(e1, tags, mask, reduction="none"), -r(e2, tags, mask, reduction="none")
        a.sum().backward()
        b.sum().backward()
        ours_paths, ref_paths = o.viterbi(em.to(dtype), mask), r.decode(em.to(dtype), mask)
        same = all(ours_paths[i, :len(q)].tolist() == q for i, q in enumerate(ref_paths))
        lines.append(f"{str(dtype).removeprefix('torch.')}: max |NLL diff| "
                     f"{(a - b).abs().max().item():.1e} (NLL about {b.abs().mean().item():.0f}), "
                     f"max |grad diff| {(e1.grad - e2.grad).abs().max().item():.1e}, "
                     f"Viterbi paths identical: {same} ({B} sequences)")
    ref, ours = ref.float(), ours.float()

    x = em.clone().requires_grad_()

    def nll_ours():
        x.grad = None
        ours.nll(x, tags, mask).backward()

    def nll_ref():
        x.grad = None
        (-ref(x, tags, mask, reduction="mean")).backward()

    runs = {"nll_ours": nll_ours, "nll_ref": nll_ref,
            "vit_ours": lambda: ours.viterbi(em, mask), "vit_ref": lambda: ref.decode(em, mask)}
    t = round_robin_median(runs, device, warmup=2, repeats=args.repeats)

    out = [f"device: {device_name(device)} ({device.type}), float32, torch {torch.__version__}, "
           f"threads {torch.get_num_threads()}",
           f"batch {B}, T = {T}, {K} tags, right-padded lengths in [{T // 2}, {T}]; "
           f"median of {args.repeats} round-robin repeats",
           "", *lines, "",
           "| operation | companion LinearChainCRF | pytorch-crf | ratio theirs / ours |",
           "|---|---:|---:|---:|"]
    for name, key in (("NLL forward + backward", "nll"), ("Viterbi decode", "vit")):
        mine, theirs = t[f"{key}_ours"], t[f"{key}_ref"]
        out.append(f"| {name} | {mine * 1e3:.2f} ms | {theirs * 1e3:.2f} ms | "
                   f"{theirs / mine:.2f}x |")
    cmd = " ".join(["python benchmarks/bench_heads.py", *sys.argv[1:]])
    out += ["", f"command: `{cmd}`"]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text.rstrip() + "\n")


if __name__ == "__main__":
    main()
