"""Benchmark: companion's FSQ against vector_quantize_pytorch's FSQ, same levels, same inputs.

For each level tuple it first checks that the two give identical outputs (codes and indices) on
inputs whose bounded values sit away from the rounding edges (where the paper's (1 - eps) bound
and the library's (1 + eps) bound must agree), and reports how often they agree on plain
Gaussian inputs. Then it times a forward pass (codes + indices, no autograd) and a forward +
backward pass over a batch of N vectors, and prints a markdown table with the speed ratio
(>1 means ours is faster).

    python benchmarks/bench_fsq.py                 # cuda if available, else cpu
    python benchmarks/bench_fsq.py --device cpu --n 1048576
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from companion.quantize import FSQ, FSQ_RECOMMENDED_LEVELS
from _common import device_name  # noqa: E402

EPS = 1e-3


def bin_centre_inputs(levels, n, device, generator, jitter=0.3):
    """z [1, n, d] whose tanh-bounded values lie within `jitter` level units of a grid point."""
    cols = []
    for L in levels:
        c = torch.randint(0, L, (n,), generator=generator).double()
        u = (c + jitter * (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)).clamp(0.05, L - 1.05)
        h, o = (L - 1) * (1 - EPS) / 2, (0.5 if L % 2 == 0 else 0.0)
        cols.append(torch.atanh((u - L // 2 + o) / h) - math.tan(o / h))
    return torch.stack(cols, -1).float()[None].to(device)


def timed(fns: dict, device, repeats, warmup=2) -> dict:
    """Median wall time of each function; the functions take turns, so that a busy machine slows
    all of them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=None, help="vectors per batch (default 2^20 on CPU, 2^24 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median; default 7 CPU, 25 GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.n or (2**24 if device.type == "cuda" else 2**20)
    repeats = args.repeats or (25 if device.type == "cuda" else 7)
    try:
        from vector_quantize_pytorch import FSQ as TheirFSQ
    except ImportError:
        raise SystemExit("this benchmark compares against vector-quantize-pytorch: pip install vector-quantize-pytorch")

    gen = torch.Generator().manual_seed(0)
    rows = []
    for key in (2**10, 2**16):
        levels = FSQ_RECOMMENDED_LEVELS[key]
        ours, theirs = FSQ(levels).to(device), TheirFSQ(list(levels)).to(device)

        # 1. identical outputs where the two bounds must agree; agreement rate elsewhere
        z = bin_centre_inputs(levels, n, device, gen)
        with torch.no_grad():
            codes_o, idx_o, _ = ours(z)
            codes_t, idx_t = theirs(z)
        assert torch.equal(codes_o, codes_t), f"levels {levels}: codes differ"
        assert torch.equal(idx_o, idx_t.long()), f"levels {levels}: indices differ"
        assert torch.equal(ours.codebook, theirs.implicit_codebook.to(device)), f"levels {levels}: codebooks differ"
        zg = torch.randn(1, min(n, 2**20), len(levels), generator=gen).to(device)
        with torch.no_grad():
            agree = (ours(zg)[1] == theirs(zg)[1].long()).float().mean().item()

        # 2. timings: forward (no autograd) and forward + backward
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

        t = timed({"ours_f": fwd(ours), "theirs_f": fwd(theirs),
                   "ours_fb": fwd_bwd(ours), "theirs_fb": fwd_bwd(theirs)}, device, repeats)
        rows.append((levels, ours.codebook_size, agree, t))
        del z, zg, zg_, grad

    print(f"FSQ forward (codes + indices) over {n:,} vectors on {device_name(device)}, "
          f"torch {torch.__version__}; median of {repeats}\n")
    print("| levels | K | outputs identical | agreement on N(0,1) inputs | forward: ours | forward: theirs "
          "| ratio | fwd+bwd: ours | fwd+bwd: theirs | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for levels, K, agree, t in rows:
        print(f"| {list(levels)} | {K} | yes | {100 * agree:.2f}% "
              f"| {t['ours_f'] * 1e3:.1f} ms | {t['theirs_f'] * 1e3:.1f} ms | {t['theirs_f'] / t['ours_f']:.2f}x "
              f"| {t['ours_fb'] * 1e3:.1f} ms | {t['theirs_fb'] * 1e3:.1f} ms | {t['theirs_fb'] / t['ours_fb']:.2f}x |")
    print("\nratio = their time / our time (> 1: ours is faster). The two bounds differ by design "
          "((1 - eps) and tan in the paper, (1 + eps) and atanh in the library), so on Gaussian "
          "inputs they disagree on the few vectors that fall within ~L*eps of a rounding edge.")


if __name__ == "__main__":
    main()
