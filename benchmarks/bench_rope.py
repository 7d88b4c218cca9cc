"""Benchmark: companion.position.apply_rope against a plain rotate-half RoPE, in copies of x.

x is [batch*heads, T, head dim] float32 ([64, 4096, 64] by default, 64 MiB) at the positions
``torch.arange(T)``, with apply_rope's default frequencies ``rope_frequencies(head dim)``. The
plain reference is RoPE as commonly written (GPT-NeoX / LLaMA style): cos and sin tables [T, d]
precomputed once, outside the timing (as a model caches them), then
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``. It rotates the pairs
(x[i], x[i + d/2]) where apply_rope rotates the interleaved pairs (x[2i], x[2i+1]); the script
checks with assert_close, before timing, that the two agree (forward and gradient) once the last
dimension is de-interleaved. apply_rope computes its angles and their cos / sin ([T, d/2]) on each
call.

Times the forward alone (no autograd) and the forward + backward (a fixed upstream gradient), the
median of one round-robin run (``_common.round_robin_median``) that also times ``x.clone()``, the
memory-limit unit (``_common.copy_unit``). Prints a markdown table: "copies" = time / the clone
of x (goal <= 8: RoPE is arithmetic only), "x plain" = apply_rope's time / the plain reference's
(goal <= 1.5).

    python benchmarks/bench_rope.py                   # cuda if available, else cpu
    python benchmarks/bench_rope.py --device cpu --threads 2
"""
from __future__ import annotations

import argparse

import torch

from companion.position import apply_rope, rope_frequencies
from _common import (COPIES_GOAL, PLAIN_GOAL, copy_unit, device_name,  # noqa: E402
                     round_robin_median)


def rope_tables(positions: torch.Tensor, freqs: torch.Tensor):
    """The cos and sin tables [T, d] of the rotate-half layout (each angle twice)."""
    angles = torch.outer(positions.float(), freqs.float())        # [T, d/2]
    emb = torch.cat((angles, angles), dim=-1)                      # [T, d]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as commonly written: the pairs (x[i], x[i + d/2]), precomputed tables."""
    return x * cos + rotate_half(x) * sin


def check_same(x, positions, cos, sin, grad) -> None:
    """apply_rope on x equals the plain reference on x de-interleaved ((x0, x2, .., x1, x3, ..)),
    forward and gradient."""
    d = x.shape[-1]
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2))).to(x.device)
    xa = x.clone().requires_grad_()
    xb = x[..., perm].clone().requires_grad_()
    ya, yb = apply_rope(xa, positions), plain_rope(xb, cos, sin)
    torch.testing.assert_close(ya[..., perm], yb)
    ya.backward(grad)
    yb.backward(grad[..., perm])
    torch.testing.assert_close(xa.grad[..., perm], xb.grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-heads", type=int, default=64, help="batch * heads (x's first dim)")
    p.add_argument("--length", type=int, default=4096, help="T, tokens (positions 0 .. T-1)")
    p.add_argument("--head-dim", type=int, default=64, help="d, even")
    p.add_argument("--repeats", type=int, default=None, help="default 30 on cuda, 7 on cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (30 if device.type == "cuda" else 7)
    bh, T, d = args.batch_heads, args.length, args.head_dim

    g = torch.Generator().manual_seed(0)
    x = torch.randn(bh, T, d, generator=g).to(device)
    grad = torch.randn(bh, T, d, generator=g).to(device)
    positions = torch.arange(T, device=device)
    cos, sin = rope_tables(positions, rope_frequencies(d, device=device))
    check_same(x, positions, cos, sin, grad)

    xg = x.clone().requires_grad_()

    def forward(fn, *a):
        def run():
            with torch.no_grad():
                fn(x, *a)
        return run

    def forward_backward(fn, *a):
        def run():
            xg.grad = None
            fn(xg, *a).backward(grad)
        return run

    t = round_robin_median({
        "copy": copy_unit(x),
        "ours_f": forward(apply_rope, positions), "plain_f": forward(plain_rope, cos, sin),
        "ours_fb": forward_backward(apply_rope, positions),
        "plain_fb": forward_backward(plain_rope, cos, sin),
    }, device, warmup=2, repeats=repeats)

    mib = x.numel() * x.element_size() / 2**20
    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"x [{bh}, {T}, {d}] float32 ({mib:.0f} MiB), positions arange({T}); apply_rope and "
          "the plain rotate-half reference agree (assert_close, forward and gradient); median "
          f"of {repeats} (round robin)\n")
    print(f"| pass | apply_rope | copies of x (goal <= {COPIES_GOAL}) | plain rotate-half "
          f"| plain: copies of x | x plain (goal <= {PLAIN_GOAL}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key in (("forward", "f"), ("forward + backward", "fb")):
        ours, plain = t[f"ours_{key}"], t[f"plain_{key}"]
        print(f"| {label} | {ours * 1e3:.2f} ms | {ours / t['copy']:.1f} | {plain * 1e3:.2f} ms "
              f"| {plain / t['copy']:.1f} | {ours / plain:.2f}x |")
    print(f"\nmemory-limit unit: x.clone() = {t['copy'] * 1e3:.3g} ms (same run); copies = time / "
          "that, x plain = apply_rope's time / the plain reference's (whose cos / sin tables are "
          "precomputed, outside the timing)")


if __name__ == "__main__":
    main()
