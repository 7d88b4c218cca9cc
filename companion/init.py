"""Initialisation and expansion: residual-branch scaling (DeepNet) and function-preserving
widening of a trained Transformer.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__: list[str] = []


# === deepnet-why-residual ===
import copy
import math

from ._validate import check_choice, check_int, check_range

__all__ += ["residual_branch_scale", "deepnorm_constants", "ResidualMLP",
            "first_update_change"]


def residual_branch_scale(num_layers: int, kind: str = "sqrt") -> float:
    """The branch scale epsilon of ``y = x + epsilon f(x)`` for a stack of ``num_layers`` blocks.

    ``kind="sqrt"`` gives ``1/sqrt(num_layers)``: with SGD the first update of the output then
    stays O(1) at any depth (notebook ``eq-sgd-depth``); ``kind="linear"`` gives
    ``1/num_layers``, what Adam's sign-like first step needs (``eq-adam-depth``).
    """
    check_int("num_layers", num_layers, 1)
    check_choice("kind", kind, ("sqrt", "linear"))
    return 1.0 / math.sqrt(num_layers) if kind == "sqrt" else 1.0 / num_layers


def deepnorm_constants(num_encoder_layers: int = 0,
                       num_decoder_layers: int = 0) -> dict[str, tuple[float, float]]:
    """DeepNorm's ``(alpha, beta)`` per stack (Wang et al. 2022, DeepNet, Table 1).

    A Post-LN sublayer computes ``LN(alpha * x + G(x))`` with the weights of ``G`` (FFN,
    attention value and output projections; not queries and keys) initialised Xavier-normal
    times ``beta``. With N encoder and M decoder layers:

    - encoder only (M = 0): alpha = (2N)^(1/4), beta = (8N)^(-1/4);
    - decoder only (N = 0): alpha = (2M)^(1/4), beta = (8M)^(-1/4);
    - both: encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16),
      decoder alpha = (3M)^(1/4), beta = (12M)^(-1/4).

    Returns ``{"encoder": (alpha, beta)}``, ``{"decoder": ...}`` or both keys. (microsoft/
    torchscale divides the encoder-decoder encoder weights by (N^4 M)^(1/16) / 1.15, i.e.
    multiplies them by 1.15 (N^4 M)^(-1/16); the paper's 0.87 is followed here.)
    """
    n = check_int("num_encoder_layers", num_encoder_layers, 0)
    m = check_int("num_decoder_layers", num_decoder_layers, 0)
    if n == 0 and m == 0:
        raise ValueError("num_encoder_layers, num_decoder_layers: expected at least one "
                         "of them to be positive, got 0 and 0")
    if n > 0 and m > 0:
        g = float(n) ** 4 * m
        return {"encoder": (0.81 * g ** (1 / 16), 0.87 * g ** (-1 / 16)),
                "decoder": ((3.0 * m) ** 0.25, (12.0 * m) ** -0.25)}
    key, count = ("encoder", n) if n > 0 else ("decoder", m)
    return {key: ((2.0 * count) ** 0.25, (8.0 * count) ** -0.25)}


class ResidualMLP(nn.Module):
    """A deep MLP with or without residual connections, for update-size experiments.

    ``h_0 = x W_in + b_in``; each of the ``depth`` blocks computes the layer
    ``phi(h) = tanh(LN(h W_l + b_l))`` (LN a LayerNorm, or nothing with ``norm="none"``) and
    either replaces ``h <- phi(h)`` (``residual=False``, the plain stack) or adds it,
    ``h <- h + epsilon * phi(h)`` with ``epsilon = branch_scale`` (notebook ``eq-residual``);
    the output is ``h_depth W_out + b_out``. Every weight is initialised N(0, 1/fan_in) (the
    forward-stable choice of ``eq-forward``), every bias zero.

    Input ``[..., in_dim]``, output ``[..., out_dim]``, any floating dtype.
    """

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int,
                 residual: bool = True, branch_scale: float = 1.0, norm: str = "layer"):
        super().__init__()
        check_int("in_dim", in_dim, 1)
        check_int("width", width, 1)
        check_int("depth", depth, 0)
        check_int("out_dim", out_dim, 1)
        if not isinstance(residual, bool):
            raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
        check_range("branch_scale", branch_scale, 0.0)
        if not residual and branch_scale != 1.0:
            raise ValueError("branch_scale: only a residual stack scales its branches; "
                             f"expected 1.0 with residual=False, got {branch_scale!r}")
        check_choice("norm", norm, ("layer", "none"))
        self.residual, self.branch_scale, self.norm = residual, float(branch_scale), norm
        self.embed = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) if norm == "layer" else nn.Identity()
                                   for _ in range(depth))
        self.head = nn.Linear(width, out_dim)
        for lin in (self.embed, *self.layers, self.head):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer, norm in zip(self.layers, self.norms):
            phi = torch.tanh(norm(layer(h)))
            h = h + self.branch_scale * phi if self.residual else phi
        return self.head(h)

    def extra_repr(self) -> str:
        return (f"residual={self.residual}, branch_scale={self.branch_scale:g}, "
                f"norm={self.norm!r}")


def first_update_change(model, loss_fn, batch, make_optimizer) -> dict[str, float]:
    """Measure one real optimiser step on a deep copy of ``model`` (``model`` is untouched).

    ``batch = (inputs, target)``; the loss is ``loss_fn(model(inputs), target)`` (a scalar);
    ``make_optimizer(params)`` builds the optimiser (learning rate included) for the copy's
    trainable parameters. The copy keeps ``model``'s train/eval mode: use eval mode for a
    model with dropout, or the output change includes the noise. Returns Python floats:

    - ``loss_before``, ``loss_after``: the loss at theta_0 and at theta_1 = theta_0 + dtheta;
    - ``loss_change``: loss_after - loss_before;
    - ``predicted_loss_change``: <grad L(theta_0), dtheta>, the first-order estimate
      (notebook ``eq-increment``);
    - ``output_change``: root mean square over all entries of model(inputs; theta_1) -
      model(inputs; theta_0);
    - ``output_rms``: root mean square of model(inputs; theta_0);
    - ``grad_norm``: ||grad L(theta_0)||_2; ``update_norm``: ||dtheta||_2 (over all trainable
      parameters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("make_optimizer", make_optimizer)):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch: expected a pair (inputs, target), got "
                         f"{type(batch).__name__} {batch!r:.40}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("first_update_change: takes a gradient step, so it cannot run "
                           "under torch.inference_mode()")
    inputs, target = batch
    net = copy.deepcopy(model)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected at least one parameter with requires_grad=True")
    optimizer = make_optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("make_optimizer: expected it to return a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out0 = net(inputs)
        loss0 = loss_fn(out0, target)
        if not isinstance(loss0, torch.Tensor) or loss0.numel() != 1:
            raise ValueError("loss_fn: expected a scalar tensor loss")
        loss0.backward()
    out0, loss0 = out0.detach(), loss0.detach()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for p in params]
    before = [p.detach().clone() for p in params]
    optimizer.step()
    with torch.no_grad():
        out1 = net(inputs)
        loss1 = loss_fn(out1, target)
        deltas = [p.detach() - b for p, b in zip(params, before)]
        f64 = torch.float64
        inner = sum((g.to(f64) * d.to(f64)).sum() for g, d in zip(grads, deltas))
        grad_sq = sum(g.to(f64).square().sum() for g in grads)
        update_sq = sum(d.to(f64).square().sum() for d in deltas)
        diff = (out1.to(f64) - out0.to(f64)).square().mean()
    return {
        "loss_before": float(loss0),
        "loss_after": float(loss1),
        "loss_change": float(loss1.to(f64) - loss0.to(f64)),
        "predicted_loss_change": float(inner),
        "output_change": float(diff.sqrt()),
        "output_rms": float(out0.to(f64).square().mean().sqrt()),
        "grad_norm": float(grad_sq.sqrt()),
        "update_norm": float(update_sq.sqrt()),
    }



# === lossless-model-expansion ===
