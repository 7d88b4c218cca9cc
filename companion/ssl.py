"""Self-supervised learning: SimSiam and the dynamics of its stop-gradient.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# === simsiam-dynamics ===
# Notebook: notebooks/simsiam-dynamics.ipynb (equation labels in brackets). SimSiam learns from
# two views of each input with a predictor on one branch and a stop-gradient on the other; the
# notebook reads its non-collapse as a property of the training dynamics.
import numpy as np
import torch.nn as nn

from ._validate import check_choice, check_floating, check_int, check_range, check_same_shape

__all__ += ["simsiam_loss", "scalar_simsiam_flow", "SimSiamHead", "output_std"]

_FLOW_MODES = ("full", "no_sg", "target_only")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` over the last dim, safe for huge, tiny and zero rows.

    Each row is first divided by its largest absolute entry (a detached scale: the direction does
    not depend on it, so the gradient is unchanged), which keeps the squared norm in range; an
    all-zero row stays zero instead of turning into NaN."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = x / scale
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def simsiam_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor | None = None,
                 z1: torch.Tensor | None = None) -> torch.Tensor:
    r"""SimSiam's loss: the negative cosine of prediction and stop-gradient target [simsiam-loss].

    ``D(p, z) = -mean_b <p_b/||p_b||, sg(z_b)/||z_b||>``, with ``sg`` the stop-gradient
    (``z.detach()``): no gradient reaches the target branch. With the second pair,
    ``(D(p1, z2) + D(p2, z1)) / 2``, the symmetrised loss of the paper. ``p1``, ``z2`` (and
    ``p2``, ``z1``): floating ``[..., d]`` of one shape; the mean runs over all leading dims.
    Returns a 0-dim tensor in [-1, 1]; a zero vector counts as cosine 0.
    """
    check_floating("p1", p1)
    check_floating("z2", z2)
    check_same_shape("p1", p1, "z2", z2)
    if p1.dim() < 1 or p1.shape[-1] == 0:
        raise ValueError(f"p1: expected shape [..., d] with d >= 1, got {tuple(p1.shape)}")
    if (p2 is None) != (z1 is None):
        raise ValueError("p2, z1: give both (symmetrised loss) or neither, got "
                         f"p2={'None' if p2 is None else 'a tensor'}, "
                         f"z1={'None' if z1 is None else 'a tensor'}")
    loss = -(_unit(p1) * _unit(z2.detach())).sum(-1).mean()
    if p2 is None:
        return loss
    check_floating("p2", p2)
    check_floating("z1", z1)
    check_same_shape("p1", p1, "p2", p2)
    check_same_shape("p1", p1, "z1", z1)
    return 0.5 * (loss - (_unit(p2) * _unit(z1.detach())).sum(-1).mean())


def scalar_simsiam_flow(t, state, mode: str = "full", *, predictor_rate: float = 1.0):
    r"""Right-hand side of the scalar SimSiam flow [toy-flow], for ``scipy.integrate.solve_ivp``.

    Encoder ``f(x) = theta x``, predictor ``h(z) = phi z``, per-unit-input loss
    ``l = (phi theta - theta)^2 / 2``: prediction ``phi theta``, target ``theta``. With the
    predictor's residual ``r = phi theta - theta`` (= dl/dh) and ``k = predictor_rate``::

        d phi / dt   = -k r theta                      (every mode)
        d theta / dt = -r phi          "full": gradient through the predictor branch only (SG)
                     = -r phi + r      "no_sg": both branches, = -theta (1 - phi)^2
                     = +r              "target_only": the target branch alone

    ``t`` is unused (autonomous flow). ``state``: ``(phi, theta)``, shape ``[2]`` or ``[2, m]``
    (``solve_ivp(..., vectorized=True)``). Returns a float64 ndarray of the same shape.
    """
    check_choice("mode", mode, _FLOW_MODES)
    check_range("predictor_rate", predictor_rate, 0.0, low_open=True)
    s = np.asarray(state, dtype=np.float64)
    if s.ndim not in (1, 2) or s.shape[0] != 2:
        raise ValueError(f"state: expected (phi, theta) of shape [2] or [2, m], got {s.shape}")
    phi, theta = s[0], s[1]
    r = phi * theta - theta
    d_phi = -predictor_rate * r * theta
    if mode == "full":
        d_theta = -r * phi
    elif mode == "no_sg":
        d_theta = -r * phi + r
    else:
        d_theta = r
    return np.stack([d_phi, d_theta])


class SimSiamHead(nn.Module):
    r"""Projector (the end of the encoder f) and predictor h of SimSiam.

    projector: ``Linear(in_dim, hidden_dim, bias=False) - BN - ReLU - Linear(hidden_dim, dim)``,
    then ``BN(dim, affine=False)`` when ``output_bn`` (the paper's CIFAR projector has two
    layers and an output BN; ImageNet's has three).
    predictor: ``Linear(dim, pred_dim, bias=False) - BN - ReLU - Linear(pred_dim, dim)``, a
    bottleneck with no BN on its output, as in the paper.
    ``forward(h) -> (z, p)``: ``z = projector(h)`` ``[B, dim]``, ``p = predictor(z)``
    ``[B, dim]``; feed two views' outputs to :func:`simsiam_loss` as ``(p1, z2, p2, z1)``.
    ``in_dim`` and ``hidden_dim`` default to ``dim``.
    """

    def __init__(self, dim: int, pred_dim: int, *, in_dim: int | None = None,
                 hidden_dim: int | None = None, output_bn: bool = True):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("pred_dim", pred_dim, 1)
        in_dim = dim if in_dim is None else check_int("in_dim", in_dim, 1)
        hidden_dim = dim if hidden_dim is None else check_int("hidden_dim", hidden_dim, 1)
        self.dim, self.pred_dim, self.in_dim = dim, pred_dim, in_dim
        layers = [nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                  nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)]
        if output_bn:
            layers.append(nn.BatchNorm1d(dim, affine=False))
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_floating("h", h)
        if h.dim() != 2 or h.shape[-1] != self.in_dim:
            raise ValueError(f"h: expected shape [B, {self.in_dim}], got {tuple(h.shape)}")
        z = self.projector(h)
        return z, self.predictor(z)


def output_std(z: torch.Tensor) -> float:
    r"""SimSiam's collapse diagnostic [output-std]: the standard deviation over the batch of the
    l2-normalised outputs, averaged over the d dimensions.

    ``z``: floating ``[B, d]``, ``B >= 2``. Returns a Python float: 0 when every output points
    the same way (collapse), about ``1/sqrt(d)`` when the unit vectors are spread isotropically
    (the reference the SimSiam paper plots). No gradient; computed in at least float32.
    """
    check_floating("z", z)
    if z.dim() != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z: expected shape [B, d] with B >= 2, d >= 1, got {tuple(z.shape)}")
    with torch.no_grad():
        u = _unit(z.detach().to(torch.promote_types(z.dtype, torch.float32)))
        return u.std(dim=0).mean().item()
