"""DEER (``companion.rnn.deer_solve``) against the sequential loop of the same recurrent cell.

    python benchmarks/bench_deer.py                      # cuda if available, else cpu
    python benchmarks/bench_deer.py --device cpu --threads 1 --T 1000,10000 --batch 16 --hidden 8

For each cell (``nn.GRUCell``, and a tanh RNN h_t = tanh(A h_{t-1} + u_t) with ||A||_2 = 0.9)
and each length T, times the forward pass (all T states) and forward + backward (a scalar loss of
all states; BPTT through the loop against deer_solve's implicit gradient), as the median of
``--repeats`` runs after a warm-up, and prints a markdown table with the ratios (loop time / DEER
time: > 1 means DEER is faster), the Newton iterations used, the largest difference between the two
outputs and, on CUDA, the peak memory of forward + backward. Both sides run in the same process, on
the same device, in the same dtype (float32 by default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import companion  # noqa: E402
from companion.rnn import deer_solve  # noqa: E402
from _common import device_name  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_cell(kind: str, hidden: int, device, dtype):
    """(step(h, u) for deer_solve, loop(h0, x) -> [B, T, H], input size D, parameters)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "gru":
        torch.manual_seed(0)
        cell = torch.nn.GRUCell(4, hidden).to(device=device, dtype=dtype)

        def loop(h0, x):
            h, out = h0, []
            for t in range(x.shape[1]):
                h = cell(x[:, t], h)
                out.append(h)
            return torch.stack(out, 1)

        return (lambda h, u: cell(u, h)), loop, 4, list(cell.parameters())
    if kind == "tanh":
        A = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64)
        A = (0.9 * A / torch.linalg.matrix_norm(A, 2)).to(device=device, dtype=dtype)
        A.requires_grad_(True)

        def loop(h0, x):
            h, out = h0, []
            for t in range(x.shape[1]):
                h = torch.tanh(h @ A.T + x[:, t])
                out.append(h)
            return torch.stack(out, 1)

        return (lambda h, u: torch.tanh(h @ A.T + u)), loop, hidden, [A]
    raise ValueError(f"--cells: expected gru and/or tanh, got {kind!r}")


def bench_one(kind, T, batch, hidden, device, dtype, repeats):
    step, loop, D, params = make_cell(kind, hidden, device, dtype)
    x = torch.randn(batch, T, D, device=device, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(batch, hidden, device=device, dtype=dtype)
    with torch.no_grad():
        ref = loop(h0, x)
        out, num_iters = deer_solve(step, h0, x, return_num_iters=True)
    diff = (out - ref).abs().max().item()

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def forward_backward(fn):
        def run():
            loss = fn().square().mean()
            torch.autograd.grad(loss, [x, *params])
        return run

    row = dict(cell=kind, T=T, B=batch, H=hidden, newton=int(num_iters.max()), diff=diff)
    for name, fn in (("loop", lambda: loop(h0, x)), ("deer", lambda: deer_solve(step, h0, x))):
        row[f"{name}_f"] = median_time(forward(fn), device, repeats)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        row[f"{name}_fb"] = median_time(forward_backward(fn), device, repeats)
        if device.type == "cuda":
            row[f"{name}_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--T", default="1000,10000", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--cells", default="gru,tanh", help="comma-separated: gru, tanh")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: $COMPANION_NUM_THREADS, else torch's choice)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (default 5 on cuda, 1 on cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (5 if device.type == "cuda" else 1)
    lengths = [int(float(t)) for t in args.T.split(",")]
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        companion.set_num_threads()

    for kind in cells:  # warm-up: first calls (vmap, cuBLAS handles, allocator) are not timed
        bench_one(kind, 64, 2, args.hidden, device, dtype, 1)

    rows = [bench_one(kind, T, args.batch, args.hidden, device, dtype, repeats)
            for kind in cells for T in lengths]
    print("DEER (deer_solve, Newton + parallel scan, implicit gradient) vs the sequential loop")
    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"{args.dtype}, "
          f"{torch.get_num_threads()} CPU thread(s), median of {repeats} run(s); "
          f"ratio = loop time / DEER time\n")
    header = ("| cell | T | B | H | Newton iters | loop fwd | DEER fwd | ratio | loop fwd+bwd "
              "| DEER fwd+bwd | ratio | max abs diff |")
    if device.type == "cuda":
        header += " peak MiB loop / DEER (fwd+bwd) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        line = (f"| {r['cell']} | {r['T']} | {r['B']} | {r['H']} | {r['newton']} "
                f"| {r['loop_f'] * 1e3:.1f} ms | {r['deer_f'] * 1e3:.1f} ms "
                f"| {r['loop_f'] / r['deer_f']:.1f}x | {r['loop_fb'] * 1e3:.1f} ms "
                f"| {r['deer_fb'] * 1e3:.1f} ms | {r['loop_fb'] / r['deer_fb']:.1f}x "
                f"| {r['diff']:.1e} |")
        if device.type == "cuda":
            line += f" {r['loop_mib']:.0f} / {r['deer_mib']:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
