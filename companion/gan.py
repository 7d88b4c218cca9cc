"""GANs: loss pairs designed from a divergence, and idempotent generative networks.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_floating, check_int, check_range

__all__: list[str] = []


# === designing-gans ===
__all__ += ["mode_coverage"]


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float, *,
                  num_std: float = 3.0, min_share: float = 0.01) -> tuple[int, float]:
    """Modes covered and share of high-quality samples, for a mixture of equal isotropic
    Gaussians such as ``companion.data.gaussian_ring``.

    ``samples`` ``[n, d]`` and ``centers`` ``[K, d]`` floating; ``std`` the mixture's per-axis
    standard deviation. The rule, the usual one for the ring benchmark:

    * a sample is *high quality* when its Euclidean distance to the nearest centre is at most
      ``num_std * std`` (3 std by default; in 2-D a true sample passes with probability
      ``1 - exp(-9/2) = 0.989``);
    * a mode is *covered* when its high-quality samples are at least ``min_share`` of all
      ``n`` samples (1% by default, i.e. 10 of 1000).

    Returns ``(num_modes, hq_fraction)``: an ``int`` in ``0..K`` and a ``float`` in [0, 1].
    """
    check_floating("samples", samples)
    check_floating("centers", centers)
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples: expected shape [n, d] with n >= 1, got {tuple(samples.shape)}")
    if centers.dim() != 2 or centers.shape[0] == 0 or centers.shape[1] != samples.shape[1]:
        raise ValueError(f"centers: expected shape [K, {samples.shape[1]}] with K >= 1, "
                         f"got {tuple(centers.shape)}")
    check_range("std", std, 0.0, low_open=True)
    check_range("num_std", num_std, 0.0, low_open=True)
    check_range("min_share", min_share, 0.0, 1.0)
    with torch.no_grad():
        x = samples.detach().to(torch.float64)
        c = centers.detach().to(device=x.device, dtype=torch.float64)
        dist = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")  # [n, K]
        nearest_dist, nearest = dist.min(dim=1)
        good = nearest_dist <= num_std * std
        counts = torch.bincount(nearest[good], minlength=c.shape[0])  # [K]
        num_modes = int((counts >= min_share * x.shape[0]).sum())
        hq_fraction = float(good.to(torch.float64).mean())
    return num_modes, hq_fraction


# ---- dual designs: phi(t) + r psi(t), maximised at t = omega(r) ------------------------------
__all__ += [
    "DualDesign", "design_from_omega_rho", "designs", "pointwise_optimum", "d_of_r",
    "discriminator_loss", "generator_loss", "density_ratio_from_critic",
]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class DualDesign:
    r"""A GAN loss pair designed in the dual space (notebook designing-gans).

    Convention: ``p`` is the data, ``q`` the generator, ``r = q / p``, and the critic ``t(x)``
    (real label 0, fake label 1) maximises ``E_p phi(t) + E_q psi(t)`` (eq. ``dual-objective``).
    Conclusion 1 (eq. ``recipe``): pick ``omega`` strictly increasing and ``rho > 0`` on
    ``Omega = omega([0, inf))``; then ``psi' = rho``, ``phi' = -omega_inv * rho``, the pointwise
    maximiser is ``t* = omega(r)`` and ``d(r) = phi(omega(r)) + r psi(omega(r))`` is convex with
    its minimum at ``r = 1`` once ``psi(omega(1)) = 0``.

    Every field is a plain callable on tensors (elementwise); ``domain = (low, high)`` is the
    closure of ``Omega`` (``+-inf`` allowed).
    """

    phi: Callable[[torch.Tensor], torch.Tensor]
    psi: Callable[[torch.Tensor], torch.Tensor]
    omega: Callable[[torch.Tensor], torch.Tensor]
    omega_inv: Callable[[torch.Tensor], torch.Tensor]
    rho: Callable[[torch.Tensor], torch.Tensor]
    domain: tuple[float, float]
    name: str


def _lsgan(a: float = -1.0, b: float = 1.0) -> DualDesign:
    """LSGAN's discriminator pair: omega(r) = (a + b r) / (1 + r), rho = 2 (b - t)."""
    return DualDesign(
        phi=lambda t: -(t - a).square(),
        psi=lambda t: 0.25 * (b - a) ** 2 - (t - b).square(),
        omega=lambda r: (a + b * r) / (1 + r),
        omega_inv=lambda t: (t - a) / (b - t),
        rho=lambda t: 2 * (b - t),
        domain=(a, b),
        name="lsgan",
    )


#: The closed-form designs of the notebook (eqs. ``tv``, ``vanilla``, ``vanilla-prob``,
#: ``exp-half-log``, ``lsgan``). ``total_variation`` is the degenerate limit: omega is the step
#: ``sign(r - 1)`` (a limit of ``tanh(k log r)``), so every interior t means r = 1; we write it
#: with the signs flipped against the usual ``E_p t - E_q t`` so that rho = +1, as the recipe needs.
designs: dict[str, DualDesign] = {
    "total_variation": DualDesign(
        phi=lambda t: -t,
        psi=lambda t: t,
        omega=lambda r: torch.sign(r - 1),
        omega_inv=lambda t: torch.ones_like(t),
        rho=lambda t: torch.ones_like(t),
        domain=(-1.0, 1.0),
        name="total_variation",
    ),
    "vanilla": DualDesign(  # binary cross-entropy on the logit t, fake label 1
        phi=lambda t: -F.softplus(t),
        psi=lambda t: _LOG2 - F.softplus(-t),
        omega=torch.log,
        omega_inv=torch.exp,
        rho=lambda t: torch.sigmoid(-t),
        domain=(-math.inf, math.inf),
        name="vanilla",
    ),
    "vanilla_prob": DualDesign(  # the same GAN with t = sigmoid(logit) in (0, 1)
        phi=lambda t: torch.log1p(-t),
        psi=lambda t: _LOG2 + torch.log(t),
        omega=lambda r: r / (1 + r),
        omega_inv=lambda t: t / (1 - t),
        rho=lambda t: 1 / t,
        domain=(0.0, 1.0),
        name="vanilla_prob",
    ),
    "exp_half_log": DualDesign(  # d(r) = (sqrt(r) - 1)^2 - 1; -exp(t) overflows for t > 88
        phi=lambda t: -torch.exp(t),
        psi=lambda t: 1 - torch.exp(-t),
        omega=lambda r: 0.5 * torch.log(r),
        omega_inv=lambda t: torch.exp(2 * t),
        rho=lambda t: torch.exp(-t),
        domain=(-math.inf, math.inf),
        name="exp_half_log",
    ),
    "lsgan": _lsgan(-1.0, 1.0),
}


def _as_float64(name: str, r) -> tuple[torch.Tensor, bool]:
    """``r`` as a float64 tensor, and whether it came as a NumPy array (or a number)."""
    if isinstance(r, torch.Tensor):
        check_floating(name, r)
        if r.is_complex():
            raise TypeError(f"{name}: expected a real floating-point tensor, got {r.dtype}")
        return r, False
    try:
        arr = np.asarray(r, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a tensor or an array of numbers, "
                        f"got {type(r).__name__}") from None
    return torch.from_numpy(arr), True


def _check_design(design) -> None:
    if not isinstance(design, DualDesign):
        raise TypeError(f"design: expected a DualDesign (e.g. companion.gan.designs['vanilla']), "
                        f"got {type(design).__name__}")


def _check_ratio(r: torch.Tensor) -> None:
    if bool((r < 0).any()) or bool(r.isnan().any()):
        raise ValueError("r: expected density ratios q/p >= 0")


def d_of_r(design: DualDesign, r, alpha=None, beta=None):
    r"""``d(r) = alpha(omega(r)) + r beta(omega(r))`` (eq. ``d-general``), elementwise.

    ``alpha=None, beta=None``: Conclusion 1, ``alpha = phi`` and ``beta = psi`` (eq. ``d``).
    Conclusion 2 (the generator's own loss): pass ``beta``; ``alpha`` then defaults to 0
    (it does not involve q, so the generator never sees it), e.g. ``beta = lambda t: t``
    gives ``r log r`` for the vanilla design, ``alpha = beta = softplus`` the non-saturating
    ``(1 + r) log(1 + r)``. ``r`` is a tensor (its dtype kept) or array-like (NumPy out,
    computed in float64); ``r >= 0``, with ``0 * beta = 0`` at ``r = 0``.
    """
    _check_design(design)
    rt, as_numpy = _as_float64("r", r)
    _check_ratio(rt)
    if alpha is None:
        alpha = design.phi if beta is None else (lambda t: torch.zeros_like(t))
    if beta is None:
        beta = design.psi
    t = design.omega(rt)
    rb = torch.where(rt == 0, torch.zeros_like(rt), rt * beta(t))
    out = alpha(t) + rb
    return out.numpy() if as_numpy else out


def pointwise_optimum(design: DualDesign, r):
    r"""The pointwise maximiser and maximum of ``phi(t) + r psi(t)`` over the domain:
    ``(t_star, d) = (omega(r), phi(omega(r)) + r psi(omega(r)))`` (eqs. ``t-star``, ``d``).

    ``r`` (``>= 0``): a NumPy array or number (NumPy float64 out) or a tensor (same dtype).
    """
    _check_design(design)
    rt, as_numpy = _as_float64("r", r)
    _check_ratio(rt)
    t = design.omega(rt)
    d = d_of_r(design, rt)
    return (t.numpy(), d.numpy()) if as_numpy else (t, d)


def discriminator_loss(design: DualDesign, t_real: torch.Tensor,
                       t_fake: torch.Tensor) -> torch.Tensor:
    r"""``-(mean phi(t_real) + mean psi(t_fake))``: the critic's objective (eq.
    ``dual-objective``) negated, to minimise. ``t_real`` ``[B]`` and ``t_fake`` ``[B']`` are the
    critic's outputs on data and on generated samples (any shapes, averaged), in the design's
    domain: a sigmoid output for ``vanilla_prob``, raw logits for ``vanilla``. Returns ``[]``.
    With ``designs['vanilla']`` this is binary cross-entropy with real label 0, fake label 1,
    minus ``log 2``.
    """
    _check_design(design)
    check_floating("t_real", t_real)
    check_floating("t_fake", t_fake)
    return -(design.phi(t_real).mean() + design.psi(t_fake).mean())


def generator_loss(design: DualDesign, t_fake: torch.Tensor, beta=None) -> torch.Tensor:
    r"""``mean beta(t_fake)``, the generator's loss at a fixed critic (eq. ``conclusion-2``).

    ``beta=None`` is ``psi``: the same objective as the critic, minimised (Conclusion 1, the
    saturating loss for the vanilla design). Pass ``beta=torch.nn.functional.softplus`` for the
    non-saturating loss, ``beta=lambda t: t`` for ``E_q t``, ``lambda t: t ** 2`` for LSGAN.
    ``t_fake``: critic outputs on generated samples, any shape; returns ``[]``.
    """
    _check_design(design)
    check_floating("t_fake", t_fake)
    if beta is None:
        beta = design.psi
    elif not callable(beta):
        raise TypeError(f"beta: expected a callable on tensors, got {type(beta).__name__}")
    return beta(t_fake).mean()


def density_ratio_from_critic(design: DualDesign, t: torch.Tensor) -> torch.Tensor:
    r"""``omega_inv(t)``: the ratio ``q/p`` an optimal critic encodes (eq. ``ratio``).

    ``t``: critic outputs, any shape, inside ``design.domain``; raises ValueError otherwise.
    For ``total_variation`` every interior t reads as r = 1 (the critic carries no ratio).
    """
    _check_design(design)
    check_floating("t", t)
    low, high = design.domain
    if bool(((t < low) | (t > high) | t.isnan()).any()):
        raise ValueError(f"t: expected critic outputs in the domain [{low}, {high}] of design "
                         f"{design.name!r}, got values in [{float(t.min())}, {float(t.max())}]")
    return design.omega_inv(t)


# ---- numerical design: phi, psi from omega and rho ---------------------------------------------
_GAUSS_X = (0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10)  # 3-point Gauss on [0, 1]
_GAUSS_W = (5 / 18, 8 / 18, 5 / 18)


def _hermite(t: torch.Tensor, knots: torch.Tensor, values: torch.Tensor,
             slopes: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation through (knots, values) with the given slopes; linear
    continuation beyond the end knots. Differentiable in t."""
    knots, values, slopes = (v.to(device=t.device, dtype=t.dtype) for v in (knots, values, slopes))
    i = torch.searchsorted(knots, t.detach().contiguous()).clamp(1, knots.numel() - 1) - 1
    t0, t1 = knots[i], knots[i + 1]
    h = t1 - t0
    s = ((t - t0) / h).clamp(0.0, 1.0)
    s2, s3 = s * s, s * s * s
    inside = (2 * s3 - 3 * s2 + 1) * values[i] + (s3 - 2 * s2 + s) * h * slopes[i] \
        + (-2 * s3 + 3 * s2) * values[i + 1] + (s3 - s2) * h * slopes[i + 1]
    below = values[0] + slopes[0] * (t - knots[0])
    above = values[-1] + slopes[-1] * (t - knots[-1])
    return torch.where(t < knots[0], below, torch.where(t > knots[-1], above, inside))


def design_from_omega_rho(omega, omega_inv, rho, domain, t_ref=None, *,
                          r_range: tuple[float, float] = (1e-6, 1e6), num_points: int = 2001,
                          name: str = "custom") -> DualDesign:
    r"""Conclusion 1 by numerical integration: ``psi(t) = int_{t_ref}^t rho`` and
    ``phi(t) = -int_{t_ref}^t omega_inv * rho`` (eq. ``recipe``).

    ``omega``, ``omega_inv``, ``rho``: callables on float64 tensors; ``domain = (low, high)``.
    ``t_ref`` defaults to ``omega(1)``, which makes ``psi(omega(1)) = 0`` (and ``phi`` too).
    The integrals are taken on the knots ``t_i = omega(r_i)``, ``r_i`` log-spaced over
    ``r_range`` (so the grid follows omega), by 3-point Gauss-Legendre per interval; phi and psi
    are then cubic Hermite interpolants with the exact slopes ``-omega_inv * rho`` and ``rho``
    (error O(h^4)), continued linearly outside ``omega(r_range)``.
    Raises ValueError when omega is not strictly increasing on the knots, a knot leaves the
    domain, rho <= 0 at a knot, or omega_inv(omega(r)) differs from r by more than 1e-6
    relative.
    """
    for nm, f in (("omega", omega), ("omega_inv", omega_inv), ("rho", rho)):
        if not callable(f):
            raise TypeError(f"{nm}: expected a callable on tensors, got {type(f).__name__}")
    if not (isinstance(domain, (tuple, list)) and len(domain) == 2
            and float(domain[0]) < float(domain[1])):
        raise ValueError(f"domain: expected (low, high) with low < high, got {domain!r}")
    low, high = float(domain[0]), float(domain[1])
    r_lo, r_hi = r_range
    check_range("r_range[0]", float(r_lo), 0.0, low_open=True)
    check_range("r_range[1]", float(r_hi), float(r_lo), low_open=True)
    check_int("num_points", num_points, 3)
    f64 = torch.float64
    r = torch.logspace(math.log10(r_lo), math.log10(r_hi), num_points, dtype=f64)
    knots = omega(r).to(f64)
    if not bool(torch.isfinite(knots).all()) or not bool((knots.diff() > 0).all()):
        raise ValueError("omega: expected a strictly increasing function of r with finite "
                         f"values on r in [{r_lo:g}, {r_hi:g}]")
    if bool((knots < low).any()) or bool((knots > high).any()):
        raise ValueError(f"domain: omega(r) leaves [{low}, {high}] for r in [{r_lo:g}, {r_hi:g}]")
    back = omega_inv(knots).to(f64)
    if not bool(torch.allclose(back, r, rtol=1e-6, atol=0.0)):
        raise ValueError("omega_inv: expected the inverse function of omega, "
                         "omega_inv(omega(r)) != r")
    rho_k = rho(knots).to(f64)
    if not bool((rho_k > 0).all()):
        raise ValueError("rho: expected rho(t) > 0 everywhere on the domain, found rho <= 0")
    h = knots.diff()
    inc_psi = torch.zeros_like(h)
    inc_phi = torch.zeros_like(h)
    for x, w in zip(_GAUSS_X, _GAUSS_W):
        tg = knots[:-1] + x * h
        rho_g = rho(tg).to(f64)
        inc_psi += w * h * rho_g
        inc_phi -= w * h * omega_inv(tg).to(f64) * rho_g
    psi_k = torch.cat([torch.zeros(1, dtype=f64), inc_psi.cumsum(0)])
    phi_k = torch.cat([torch.zeros(1, dtype=f64), inc_phi.cumsum(0)])
    slope_psi, slope_phi = rho_k, -back * rho_k
    # shift so that psi(t_ref) = phi(t_ref) = 0
    t_ref = float(omega(torch.ones((), dtype=f64))) if t_ref is None else float(t_ref)
    ref = torch.tensor([t_ref], dtype=f64)
    psi_k = psi_k - _hermite(ref, knots, psi_k, slope_psi)
    phi_k = phi_k - _hermite(ref, knots, phi_k, slope_phi)
    return DualDesign(
        phi=lambda t: _hermite(t, knots, phi_k, slope_phi),
        psi=lambda t: _hermite(t, knots, psi_k, slope_psi),
        omega=omega, omega_inv=omega_inv, rho=rho, domain=(low, high), name=name,
    )


# === idempotent-generative-network ===
__all__ += ["ign_losses", "ign_losses_sg", "gan_single_loss_sg", "IGNMLP"]


def _ign_distance(a: torch.Tensor, b: torch.Tensor, dist: str) -> torch.Tensor:
    """Per-sample distance ``D(a, b)`` ``[B]``: mean over the non-batch dims of ``|a - b|``
    ("l1", the paper's) or of ``(a - b)^2`` ("l2", the article's squared Euclidean)."""
    diff = (a - b).flatten(1)
    return diff.abs().mean(1) if dist == "l1" else diff.square().mean(1)


def _ign_check(x, z, lam_rec, lam_idem, lam_tight, dist, tight_clamp) -> None:
    check_floating("x", x)
    check_floating("z", z)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    if z.dim() != x.dim() or z.shape[1:] != x.shape[1:] or z.shape[0] == 0:
        raise ValueError(f"z: expected shape [B', {', '.join(map(str, x.shape[1:]))}] "
                         f"(the data's shape), got {tuple(z.shape)}")
    for name, lam in (("lam_rec", lam_rec), ("lam_idem", lam_idem), ("lam_tight", lam_tight)):
        check_range(name, lam, 0.0)
    check_choice("dist", dist, ("l1", "l2"))
    if tight_clamp is not None:
        check_range("tight_clamp", tight_clamp, 0.0, low_open=True)


def _ign_tight(tight_raw: torch.Tensor, rec: torch.Tensor, tight_clamp) -> torch.Tensor:
    r"""``L_tight = -a sg(L_rec) tanh(L~_tight / (a sg(L_rec)))`` (eq. ``ign-clamp``), or
    ``-L~_tight`` when ``tight_clamp`` (a) is None. ``sg(L_rec)`` is detached, so the clamp
    sends no gradient into the reconstruction path."""
    if tight_clamp is None:
        return -tight_raw
    scale = (tight_clamp * rec.detach()).clamp_min(torch.finfo(rec.dtype).tiny)
    return -scale * torch.tanh(tight_raw / scale)


def _ign_total(rec, idem, tight, tight_raw, lam_rec, lam_idem, lam_tight) -> dict:
    return {"loss": lam_rec * rec + lam_idem * idem + lam_tight * tight,
            "rec": rec, "idem": idem, "tight": tight, "tight_raw": tight_raw}


def ign_losses(f, f_copy, x: torch.Tensor, z: torch.Tensor, lam_rec: float = 20.0,
               lam_idem: float = 20.0, lam_tight: float = 2.5, dist: str = "l1",
               tight_clamp: float | None = 1.5) -> dict[str, torch.Tensor]:
    r"""The three IGN losses (eq. ``ign-total``) built as in the paper, with a frozen copy of f.

    ``f``: a module mapping ``[B, ...]`` to the same shape; ``f_copy``: a copy of it holding the
    same weights (``f_copy.load_state_dict(f.state_dict())`` before each call) whose parameters
    have ``requires_grad=False``. ``x`` ``[B, ...]`` data, ``z`` ``[B', ...]`` noise of the same
    per-sample shape. With ``u = f(z)`` and the per-sample distance ``D`` of ``dist``:

    * ``rec  = mean D(f(x), x)``                       (trains f as the critic)
    * ``idem = mean D(f_copy(u), u)``                  (only the inner f, the generator)
    * ``tight_raw = mean D(f(sg u), sg u)``            (only the outer f, the critic)
    * ``tight = -tight_raw`` or its clamp (eq. ``ign-clamp``) with ``a = tight_clamp``

    Returns a dict of 0-dim tensors: ``loss = lam_rec rec + lam_idem idem + lam_tight tight``,
    and ``rec``, ``idem``, ``tight``, ``tight_raw``. Defaults are the paper's (L1, 20, 20, 2.5,
    a = 1.5). ``ign_losses_sg`` gives the same values and gradients without the copy.
    """
    _ign_check(x, z, lam_rec, lam_idem, lam_tight, dist, tight_clamp)
    if not callable(f) or not callable(f_copy):
        raise TypeError("f, f_copy: expected callables (modules) mapping [B, ...] to [B, ...]")
    if f_copy is f:
        raise ValueError("f_copy: expected a frozen copy of f, got f itself")
    params = list(f_copy.parameters()) if isinstance(f_copy, nn.Module) else []
    if any(p.requires_grad for p in params):
        raise ValueError("f_copy: expected parameters with requires_grad=False "
                         "(call f_copy.requires_grad_(False) once after copying)")
    rec = _ign_distance(f(x), x, dist).mean()
    u = f(z)
    idem = _ign_distance(f_copy(u), u, dist).mean()
    u_sg = u.detach()
    tight_raw = _ign_distance(f(u_sg), u_sg, dist).mean()
    tight = _ign_tight(tight_raw, rec, tight_clamp)
    return _ign_total(rec, idem, tight, tight_raw, lam_rec, lam_idem, lam_tight)


def ign_losses_sg(f, x: torch.Tensor, z: torch.Tensor, lam_rec: float = 20.0,
                  lam_idem: float = 20.0, lam_tight: float = 2.5, dist: str = "l1",
                  tight_clamp: float | None = 1.5) -> dict[str, torch.Tensor]:
    r"""``ign_losses`` without a copy of the network, by stop-gradients (eq. ``ign-sg``).

    With ``u = f(z)``, ``delta(v) = mean D(f(v), v)`` has the full gradient (inner + outer f)
    and ``delta(sg u)`` the outer one only, so ``delta(u) - delta(sg u)`` carries only the
    inner gradient. ``idem`` is returned as ``delta(u) - delta(sg u) + sg(delta(sg u))``: its
    value is ``L_idem`` and its gradient the inner one, so the dict equals ``ign_losses``'s in
    values and in parameter gradients (the clamp uses the detached ``rec`` in both).
    Same arguments and return as ``ign_losses``, without ``f_copy``.
    """
    _ign_check(x, z, lam_rec, lam_idem, lam_tight, dist, tight_clamp)
    if not callable(f):
        raise TypeError("f: expected a callable (module) mapping [B, ...] to [B, ...]")
    rec = _ign_distance(f(x), x, dist).mean()
    u = f(z)
    u_sg = u.detach()
    delta_full = _ign_distance(f(u), u, dist).mean()
    tight_raw = _ign_distance(f(u_sg), u_sg, dist).mean()   # delta(sg u): outer f only
    idem = delta_full - tight_raw + tight_raw.detach()
    tight = _ign_tight(tight_raw, rec, tight_clamp)
    return _ign_total(rec, idem, tight, tight_raw, lam_rec, lam_idem, lam_tight)


def gan_single_loss_sg(D, G, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r"""One loss for both players of a WGAN-style GAN (eq. ``gan-sg``), critic low = real:

    ``mean D(x) - 2 mean D(sg G(z)) + mean D(G(z))``.

    Its gradient in D's parameters is that of the critic loss ``mean D(x) - mean D(G(z))``, in
    G's that of the generator loss ``mean D(G(z))``, so one backward pass and one optimizer
    step over both networks replace the alternating pair. ``D`` maps ``[B, ...]`` to ``[B]`` or
    ``[B, 1]``; ``G`` maps ``z`` ``[B', ...]`` to samples shaped like ``x``. Returns ``[]``;
    its value is ``mean D(x) - mean D(G(z))``. No Lipschitz constraint is included: add a
    gradient penalty or clip weights as WGAN requires.
    """
    check_floating("x", x)
    check_floating("z", z)
    if not callable(D) or not callable(G):
        raise TypeError("D, G: expected callables (modules)")
    g = G(z)
    if g.shape[1:] != x.shape[1:]:
        raise ValueError(f"G: expected samples shaped like x {tuple(x.shape[1:])}, "
                         f"got {tuple(g.shape[1:])}")
    return D(x).mean() - 2 * D(g.detach()).mean() + D(g).mean()


class IGNMLP(nn.Module):
    r"""The network f of an IGN on vectors: ``dim -> hidden (x depth, tanh) -> dim``.

    ``residual=True`` returns ``x + mlp(x)``, so the identity on data (``L_rec = 0``) is easy to
    reach, as the paper's encoder-decoder with skip connections makes it for images. Input and
    output ``[B, dim]``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 2, residual: bool = True):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("hidden", hidden, 1)
        check_int("depth", depth, 1)
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)
        self.dim, self.residual = dim, bool(residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape [B, {self.dim}], got {tuple(x.shape)}")
        out = self.net(x)
        return x + out if self.residual else out
