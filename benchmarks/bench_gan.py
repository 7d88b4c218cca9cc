"""One ring-GAN training step per designed loss against the vanilla GAN: time ratio.

    python benchmarks/bench_gan.py                  # CPU, writes benchmarks/results/gan-cpu.md
    python benchmarks/bench_gan.py --device cuda    # GPU (prints the table only)

A training step of the designing-gans notebook's ring GAN (kexue.fm/archives/7210): a critic
update with the design's loss (companion.gan.discriminator_loss) and a generator update with its
own beta (companion.gan.generator_loss), on a batch of companion.data.gaussian_ring. Generator
2-H-H-2 and critic 2-H-H-1 (leaky ReLU), Adam. The baseline is the vanilla GAN of practice:
the vanilla design with the non-saturating generator loss (C). Every loss differs from it only in
a few elementwise functions, so the goal is a ratio of about 1.0x: the designed losses cost
nothing. Timed round robin (median), in one run.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from companion.data import gaussian_ring
from companion.gan import designs, discriminator_loss, generator_loss
from _common import device_name, round_robin_median  # noqa: E402

LOSSES = {  # name: (critic design, generator beta; None = the design's psi)
    "C non-saturating (baseline)": ("vanilla", F.softplus),
    "A saturating": ("vanilla", None),
    "B beta=t": ("vanilla", lambda t: t),
    "D LSGAN c=0": ("lsgan", torch.square),
    "E exp design": ("exp_half_log", None),
    "F LSGAN c=a": ("lsgan", lambda t: (t + 1) ** 2),
}


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers[:-1])


def make_step(key, beta, hidden, z_dim, batch, device, dtype):
    torch.manual_seed(0)
    G = mlp([z_dim, hidden, hidden, 2]).to(device, dtype)
    D = mlp([2, hidden, hidden, 1]).to(device, dtype)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    design = designs[key]
    g = torch.Generator().manual_seed(0)
    x_real = gaussian_ring(batch, generator=g)[0].to(device, dtype)
    z = torch.randn(2, batch, z_dim, generator=g).to(device, dtype)

    def step():
        loss_d = discriminator_loss(design, D(x_real).squeeze(-1),
                                    D(G(z[0]).detach()).squeeze(-1))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = generator_loss(design, D(G(z[1])).squeeze(-1), beta=beta)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=100, help="timed rounds (round robin)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="markdown file (default on CPU: "
                   "benchmarks/results/gan-cpu.md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lines = [
        f"device: {device_name(device)} ({device.type}), dtype {args.dtype}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"one step = critic update + generator update (Adam), batch {args.batch_size}, "
        f"z_dim {args.z_dim}; median of {args.repeats} round-robin rounds; ratio = time / "
        "time of the vanilla GAN (C, non-saturating) at the same width",
        "",
        "| H | loss | critic design | step time | ratio to vanilla GAN |",
        "|---:|---|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for hidden in args.hidden:
        runs = {name: make_step(key, beta, hidden, args.z_dim, args.batch_size, device, dtype)
                for name, (key, beta) in LOSSES.items()}
        t = round_robin_median(runs, device, warmup=10, repeats=args.repeats)
        base = t["C non-saturating (baseline)"]
        for name, (key, _) in LOSSES.items():
            row = (f"| {hidden} | {name} | {key} | {t[name] * 1e3:.3f} ms | "
                   f"{t[name] / base:.2f}x |")
            lines.append(row)
            print(row, flush=True)
    out = args.out or ("benchmarks/results/gan-cpu.md" if device.type == "cpu" else None)
    if out:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        text = "\n".join([f"Command: `{command}`", ""] + lines) + "\n"
        Path(out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
