"""Benchmark: companion's FSQ against vector_quantize_pytorch's FSQ, same levels, same inputs.

For each level tuple it first checks that the two give identical outputs (codes and indices) on
inputs whose bounded values sit away from the rounding edges (where the paper's (1 - eps) bound
and the library's (1 + eps) bound must agree), and reports how often they agree on plain
Gaussian inputs. Then it times a forward pass (codes + indices, no autograd) and a forward +
backward pass over a batch of N vectors, and prints a markdown table with the speed ratio
(>1 means ours is faster).

Memory-limit ratios, timed in the same round-robin run (``_common.copy_unit``): our forward in
copies of z (time / ``z.clone()``); ``fsq_quantize`` (codes only) against the plain
``torch.round(torch.tanh(z) * 2)`` of the same z ("x plain": the same transcendental and
rounding, without the FSQ bound); ``fsq_codes_to_indices`` on our codes in copies of the codes.

    python benchmarks/bench_fsq.py                 # cuda if available, else cpu
    python benchmarks/bench_fsq.py --device cpu --n 1048576
"""
from __future__ import annotations

import argparse
import math

import torch

from companion.quantize import FSQ, FSQ_RECOMMENDED_LEVELS, fsq_codes_to_indices, fsq_quantize
from _common import (COPIES_GOAL, PLAIN_GOAL, copy_unit, device_name,  # noqa: E402
                     round_robin_median)

try:
    from vector_quantize_pytorch import FSQ as TheirFSQ
except ImportError:  # main() says what to install
    TheirFSQ = None

EPS = 1e-3


def bin_centre_inputs(levels, n, device, generator, jitter=0.3):
    """z [1, n, d] whose tanh-bounded values lie within `jitter` level units of a grid point."""
    cols = []
    for L in levels:
        c = torch.randint(0, L, (n,), generator=generator).double()
        noise = 2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1
        u = (c + jitter * noise).clamp(0.05, L - 1.05)
        h, o = (L - 1) * (1 - EPS) / 2, (0.5 if L % 2 == 0 else 0.0)
        cols.append(torch.atanh((u - L // 2 + o) / h) - math.tan(o / h))
    return torch.stack(cols, -1).float()[None].to(device)


def bench_levels(levels, n, device, gen, repeats):
    """Checks and timings of one level tuple: (levels, K, agreement rate, median seconds)."""
    ours, theirs = FSQ(levels).to(device), TheirFSQ(list(levels)).to(device)

    # 1. identical outputs where the two bounds must agree; agreement rate elsewhere
    z = bin_centre_inputs(levels, n, device, gen)
    with torch.no_grad():
        codes_o, idx_o, _ = ours(z)
        codes_t, idx_t = theirs(z)
    assert torch.equal(codes_o, codes_t), f"levels {levels}: codes differ"
    assert torch.equal(idx_o, idx_t.long()), f"levels {levels}: indices differ"
    assert torch.equal(ours.codebook, theirs.implicit_codebook.to(device)), \
        f"levels {levels}: codebooks differ"
    assert torch.equal(fsq_quantize(z, levels), codes_o), \
        f"levels {levels}: fsq_quantize differs from FSQ"
    assert torch.equal(fsq_codes_to_indices(codes_o, levels), idx_o), \
        f"levels {levels}: fsq_codes_to_indices differs from FSQ's indices"
    zg = torch.randn(1, min(n, 2**20), len(levels), generator=gen).to(device)
    with torch.no_grad():
        agree = (ours(zg)[1] == theirs(zg)[1].long()).float().mean().item()

    # 2. timings, one round robin: forward (no autograd) and forward + backward against the
    # library; the memory-limit units (clones) and the plain torch operation of the same z
    zg_ = z.clone().requires_grad_()
    grad = torch.randn(z.shape, generator=gen).to(device)

    def fwd(q):
        def run():
            with torch.no_grad():
                q(z)
        return run

    def fwd_bwd(q):
        def run():
            zg_.grad = None
            q(zg_)[0].backward(grad)
        return run

    def no_grad(fn, *a):
        def run():
            with torch.no_grad():
                fn(*a)
        return run

    t = round_robin_median({
        "ours_f": fwd(ours), "theirs_f": fwd(theirs),
        "ours_fb": fwd_bwd(ours), "theirs_fb": fwd_bwd(theirs),
        "copy_z": copy_unit(z),
        "fsq_quantize": no_grad(fsq_quantize, z, levels),
        "plain": no_grad(lambda x: torch.round(torch.tanh(x) * 2), z),
        "copy_codes": copy_unit(codes_o),
        "to_indices": no_grad(fsq_codes_to_indices, codes_o, levels),
    }, device, warmup=2, repeats=repeats)
    return levels, ours.codebook_size, agree, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=None,
                        help="vectors per batch (default 2^20 on CPU, 2^24 on GPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (median; default 7 CPU, 25 GPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.n or (2**24 if device.type == "cuda" else 2**20)
    repeats = args.repeats or (25 if device.type == "cuda" else 7)
    if TheirFSQ is None:
        raise SystemExit("this benchmark compares against vector-quantize-pytorch: "
                         "pip install vector-quantize-pytorch")

    gen = torch.Generator().manual_seed(0)
    rows = [bench_levels(FSQ_RECOMMENDED_LEVELS[key], n, device, gen, repeats)
            for key in (2**10, 2**16)]

    print(f"FSQ forward (codes + indices) over {n:,} vectors on {device_name(device)} "
          f"({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"median of {repeats} (round robin)\n")
    print("| levels | K | outputs identical | agreement on N(0,1) inputs "
          "| forward: ours | forward: theirs | ratio | fwd+bwd: ours | fwd+bwd: theirs | ratio "
          f"| forward: copies of z (goal <= {COPIES_GOAL}) "
          f"| fsq_quantize: x plain (goal <= {PLAIN_GOAL}) "
          f"| codes to indices: copies of codes (goal <= {COPIES_GOAL}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for levels, K, agree, t in rows:
        print(f"| {list(levels)} | {K} | yes | {100 * agree:.2f}% "
              f"| {t['ours_f'] * 1e3:.1f} ms | {t['theirs_f'] * 1e3:.1f} ms "
              f"| {t['theirs_f'] / t['ours_f']:.2f}x "
              f"| {t['ours_fb'] * 1e3:.1f} ms | {t['theirs_fb'] * 1e3:.1f} ms "
              f"| {t['theirs_fb'] / t['ours_fb']:.2f}x "
              f"| {t['ours_f'] / t['copy_z']:.1f} | {t['fsq_quantize'] / t['plain']:.2f}x "
              f"| {t['to_indices'] / t['copy_codes']:.1f} |")
    print("\nratio = their time / our time (> 1: ours is faster). The two bounds differ by design "
          "((1 - eps) and tan in the paper, (1 + eps) and atanh in the library), so on Gaussian "
          "inputs they disagree on the few vectors that fall within ~L*eps of a rounding edge.")
    print("\nThe times behind the memory-limit ratios (same run; z and the codes are "
          f"[1, {n:,}, d] float32):\n")
    print("| levels | z.clone() | fsq_quantize(z) | torch.round(torch.tanh(z) * 2) "
          "| codes.clone() | fsq_codes_to_indices(codes) |")
    print("|---|---:|---:|---:|---:|---:|")
    for levels, _, _, t in rows:
        print(f"| {list(levels)} | " + " | ".join(
            f"{t[k] * 1e3:.3g} ms" for k in
            ("copy_z", "fsq_quantize", "plain", "copy_codes", "to_indices")) + " |")


if __name__ == "__main__":
    main()
