"""AMED against Euler, Heun and DPM-Solver-2 at the same NFE: Frechet distance to the data.

    python benchmarks/bench_amed.py                  # CPU, about 2 minutes
    python benchmarks/bench_amed.py --device cuda --n-eval 8192 --n-train 512

Two exact denoisers, so that the ODE solver is the only source of error
(companion.diffusion, notebooks/amed-ode-sampler):

* ``gmm``: an 8-mode ring in 2-D (radius 2, std 0.1), ``gmm_denoiser``; FD of the samples to
  ``n_data`` fresh draws of the mixture.
* ``digits``: the 1,797 8x8 digits (64-D, standardised to unit variance overall),
  ``empirical_denoiser``; FD of the samples to the digits.

Each solver runs ``ode_sample`` on EDM's grid (sigma 80 -> 0.002, rho 7) from the same
``n_eval`` starting points at NFE 4, 6, 8 and, with the analytical first step (AFS), 3 and 5:
Euler takes NFE steps, Heun / DPM-2 / AMED NFE/2. AMED's per-step scalars are fitted by
``fit_amed`` on ``n_train`` other paths (Heun teacher, M = 8, Adam). The "reference" line is a
``ref_steps``-step Heun solve from the same points: the FD floor of ``n_eval`` samples. The
ratio columns divide the better of Heun / DPM-2 (AMED's own family, 2 NFE per step), and Euler,
by AMED's FD: above 1, AMED is better.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from companion.data import gaussian_mixture, load_digits
from companion.diffusion import (edm_timesteps, empirical_denoiser, fit_amed, gmm_denoiser,
                                 ode_sample)
from companion.geometry import frechet_distance
from _common import device_name  # noqa: E402

SOLVERS = ("euler", "heun", "dpm2", "amed")
ROWS = [(4, False), (6, False), (8, False), (3, True), (5, True)]


def problems(device, n_data, seed):
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    mix = dict(means=2.0 * torch.stack([angles.cos(), angles.sin()], 1),
               stds=torch.full((8,), 0.1, dtype=torch.float64),
               weights=torch.full((8,), 1 / 8, dtype=torch.float64))
    ring, _ = gaussian_mixture(n_data, mix["means"], mix["stds"], mix["weights"], generator=g)
    mix = {k: v.to(device) for k, v in mix.items()}
    digits, _ = load_digits()
    digits = ((digits - digits.mean(0)) / digits.std()).to(device)
    return {
        "gmm": (lambda x, t: gmm_denoiser(x, t, **mix), ring.to(device, torch.float64), 2,
                torch.float64),
        "digits": (lambda x, t: empirical_denoiser(x, t, digits.to(x.dtype)), digits, 64,
                   torch.float32),
    }


def run(name, D, data, dim, dtype, args, device):
    g = torch.Generator().manual_seed(args.seed)
    x_eval = (80 * torch.randn(args.n_eval, dim, generator=g, dtype=dtype)).to(device)
    x_train = (80 * torch.randn(args.n_train, dim, generator=g, dtype=dtype)).to(device)
    with torch.no_grad():
        ref, _ = ode_sample(D, x_eval, edm_timesteps(args.ref_steps + 1), "heun")
    table, fit_s = {}, 0.0
    for nfe_target, afs in ROWS:
        k = nfe_target + (1 if afs else 0)
        for solver in SOLVERS:
            ts = edm_timesteps((k if solver == "euler" else k // 2) + 1)
            amed = None
            if solver == "amed":
                t0 = time.perf_counter()
                amed = fit_amed(D, ts, args.n_train, 8, args.fit_steps, args.lr,
                                x_T=x_train, afs=afs)
                fit_s += time.perf_counter() - t0
            with torch.no_grad():
                x, nfe = ode_sample(D, x_eval, ts, solver, afs=afs, amed=amed)
            assert nfe == nfe_target, (solver, nfe)
            table[nfe_target, afs, solver] = frechet_distance(x, data)
    return table, frechet_distance(ref, data), fit_s


def fmt(v):
    return f"{v:.3f}" if v < 10 else (f"{v:.1f}" if v < 1e4 else f"{v:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-data", type=int, default=20000, help="mixture draws the FD compares to")
    p.add_argument("--fit-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ref-steps", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    t_start = time.perf_counter()
    print(f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"n_eval={args.n_eval} paths per solver, AMED fitted on n_train={args.n_train} "
          f"other paths ({args.fit_steps} Adam steps, lr {args.lr}, teacher Heun M=8), "
          f"reference {args.ref_steps}-step Heun, seed {args.seed}")
    print("command: python benchmarks/bench_amed.py " + " ".join(sys.argv[1:]) + "\n")
    for name, (D, data, dim, dtype) in problems(device, args.n_data, args.seed).items():
        table, fd_ref, fit_s = run(name, D, data, dim, dtype, args, device)
        print(f"### {name}: Frechet distance to the data (reference {fmt(fd_ref)}; "
              f"five AMED fits took {fit_s:.1f} s)\n")
        print("| NFE | Euler | Heun | DPM-2 | AMED | min(Heun, DPM-2) / AMED | Euler / AMED |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for nfe, afs in ROWS:
            vals = [table[nfe, afs, s] for s in SOLVERS]
            print(f"| {nfe}{' (AFS)' if afs else ''} | "
                  + " | ".join(fmt(v) for v in vals)
                  + f" | {min(vals[1:3]) / vals[3]:.2f}x | {vals[0] / vals[3]:.2f}x |")
        print()
    print(f"total time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
