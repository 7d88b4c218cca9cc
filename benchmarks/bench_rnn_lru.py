"""DiagonalLinearRNN (the LRU layer) through rnn.linear_scan against a Python loop over time.

    python benchmarks/bench_rnn_lru.py                  # CPU: d_model = d_state = 64, batch 4
    python benchmarks/bench_rnn_lru.py --device cuda    # GPU: add --batch-size 16 --d-model 256

Both paths compute the same layer from the same parameters (eq. lra-lru of the lra-pretraining
notebook): h_t = lambda * h_{t-1} + gamma * (B x_t), y_t = Re(C h_t) + D * x_t. The scan path is
``DiagonalLinearRNN.forward`` (one ``linear_scan``, log-depth odd-even reduction); the loop path
takes T sequential steps. Their outputs are checked to agree before timing. Prints a markdown table
of the median forward + backward time (round robin, one run) and the loop / scan ratio, with the
device named, and writes it to benchmarks/results/lru-scan-<cpu|cuda>.md.

Memory-limit ratio, from the same round-robin run: "copies" = the scan's forward + backward time
/ one ``x.clone()`` of the input x [batch, T, d_model] (``_common.copy_unit``), beside its goal
for a log-depth scan over T steps, 2 log2 T.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from companion.rnn import DiagonalLinearRNN, linear_scan
from _common import copy_unit, device_name, round_robin_median, scan_copies_goal  # noqa: E402


def forward_loop(m: DiagonalLinearRNN, x: torch.Tensor) -> torch.Tensor:
    """The same layer, one time step at a time."""
    lam = m.eigenvalues()
    Bg = torch.complex(m.B_re, m.B_im) * torch.exp(m.gamma_log).unsqueeze(-1)
    C = torch.complex(m.C_re, m.C_im)
    Bu = x.to(Bg.dtype) @ Bg.mT                         # all inputs at once: not the recurrence
    h = torch.zeros(x.shape[0], m.d_state, dtype=Bg.dtype, device=x.device)
    states = []
    for t in range(x.shape[1]):
        h = lam * h + Bu[:, t]
        states.append(h)
    return (torch.stack(states, 1) @ C.mT).real + m.D * x


def step_of(fn, m, x):
    def step():
        m.zero_grad(set_to_none=True)
        fn(m, x).square().mean().backward()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (round robin)")
    p.add_argument("--out", default=None, help="markdown file (default: benchmarks/results/)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    m = DiagonalLinearRNN(args.d_model, args.d_state).to(device)
    lines = [f"device: {device_name(device)} ({device.type}), float32 / complex64, "
             f"torch {torch.__version__}, threads {torch.get_num_threads()}",
             f"d_model={args.d_model}, d_state={args.d_state}, batch={args.batch_size}; "
             "median of one forward + backward (round robin); goal: the scan faster than the "
             "loop at T = 4096; copies = scan time / x.clone() (same run)", "",
             "| T | scan fwd+bwd | loop fwd+bwd | loop / scan | x.clone() | scan: copies of x "
             "| copies goal (2 log2 T) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for line in lines:
        print(line)
    for T in args.lengths:
        x = torch.randn(args.batch_size, T, args.d_model, device=device)
        with torch.no_grad():
            ref, got = forward_loop(m, x), m(x)
            err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"scan and loop disagree at T={T}: relative error {err:.1e}"
        t = round_robin_median({"scan": step_of(DiagonalLinearRNN.__call__, m, x),
                                "loop": step_of(forward_loop, m, x),
                                "copy": copy_unit(x)},
                               device, warmup=1, repeats=args.repeats)
        row = (f"| {T} | {t['scan'] * 1e3:.1f} ms | {t['loop'] * 1e3:.1f} ms | "
               f"{t['loop'] / t['scan']:.1f}x | {t['copy'] * 1e3:.3g} ms | "
               f"{t['scan'] / t['copy']:.1f} | <= {scan_copies_goal(T):.3g} |")
        print(row, flush=True)
        lines.append(row)
    # the scan kernel alone: rnn.linear_scan over the layer's complex states b [B, T, d_state]
    # with a constant diagonal a, in copies of b (the layer above adds its projections)
    lines += ["", "rnn.linear_scan alone (constant diagonal a, b [B, T, d_state] complex64), "
              "in copies of b (same run):", "",
              "| T | scan forward | copies of b | scan fwd+bwd | copies of b | copies goal "
              "(2 log2 T) |", "|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines[-4:]))
    for T in args.lengths:
        a = torch.polar(0.4 + 0.5 * torch.rand(args.d_state), 6.28 * torch.rand(args.d_state))
        a = a.to(device)
        b = torch.randn(args.batch_size, T, args.d_state, dtype=torch.complex64, device=device)
        bg, g = b.clone().requires_grad_(), torch.randn_like(b)

        def scan_fb():
            bg.grad = None
            linear_scan(a, bg).backward(g)
        t = round_robin_median({"fwd": lambda: linear_scan(a, b), "fb": scan_fb,
                                "copy": copy_unit(b)}, device, warmup=1, repeats=args.repeats)
        row = (f"| {T} | {t['fwd'] * 1e3:.2f} ms | {t['fwd'] / t['copy']:.1f} | "
               f"{t['fb'] * 1e3:.2f} ms | {t['fb'] / t['copy']:.1f} | "
               f"<= {scan_copies_goal(T):.3g} |")
        print(row, flush=True)
        lines.append(row)
    command = "python benchmarks/bench_rnn_lru.py " + " ".join(sys.argv[1:])
    lines += ["", f"command: `{command.strip()}`"]
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"lru-scan-{device.type}.md")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
