"""Parameter-efficient tuning: learned continuous prompts (P-tuning) and a ladder side network.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__: list[str] = []


# === p-tuning ===


# === ladder-side-tuning ===
__all__ += ["ladder_gate", "LadderSideNetwork", "backbone_hidden_states", "backprop_depth",
            "trainable_fraction"]

from typing import Sequence as _Sequence  # noqa: E402

import torch.nn.functional as _F  # noqa: E402

from ._validate import check_choice as _check_choice  # noqa: E402
from ._validate import check_floating as _check_floating  # noqa: E402
from ._validate import check_int as _check_int  # noqa: E402
from ._validate import check_range as _check_range  # noqa: E402
from ._validate import check_same_shape as _check_same_shape  # noqa: E402


def ladder_gate(tilde_h: torch.Tensor, z_prev: torch.Tensor, alpha: torch.Tensor,
                tau: float) -> torch.Tensor:
    """The ladder's mixing step (notebook {eq}`lst-gate`)::

        mu = sigmoid(alpha / tau),     out = mu * tilde_h + (1 - mu) * z_prev

    ``tilde_h`` (the down-projected backbone state) and ``z_prev`` (the side state) share one
    shape ``[..., d_s]``; ``alpha`` is a scalar tensor (or broadcasts against them); ``tau > 0``.
    ``alpha = 0`` gives ``mu = 1/2``. The sigmoid is evaluated stably for any ``alpha / tau``.
    """
    _check_floating("tilde_h", tilde_h)
    _check_floating("z_prev", z_prev)
    _check_same_shape("tilde_h", tilde_h, "z_prev", z_prev)
    _check_floating("alpha", alpha)
    _check_range("tau", tau, 0.0, low_open=True)
    mu = torch.sigmoid(alpha / tau)
    return mu * tilde_h + (1 - mu) * z_prev


class _SideBlock(nn.Module):
    """One side block g_i of width d_s, pre-LN: ``z + Attn(LN(z))`` (SDPA, bidirectional, keys
    masked by ``key_mask``) then ``z + FFN(LN(z))`` (GELU, width 4 d_s); ``"mlp"`` keeps only the
    FFN half."""

    def __init__(self, d_s: int, num_heads: int, kind: str):
        super().__init__()
        self.num_heads = num_heads
        if kind == "transformer":
            self.ln1 = nn.LayerNorm(d_s)
            self.qkv = nn.Linear(d_s, 3 * d_s)
            self.proj = nn.Linear(d_s, d_s)
        self.ln2 = nn.LayerNorm(d_s)
        self.fc = nn.Linear(d_s, 4 * d_s)
        self.out = nn.Linear(4 * d_s, d_s)

    def forward(self, z: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "qkv"):
            B, T, d_s = z.shape
            H = self.num_heads
            q, k, v = self.qkv(self.ln1(z)).view(B, T, 3, H, d_s // H).permute(2, 0, 3, 1, 4)
            mask = None if key_mask is None else key_mask[:, None, None, :]
            y = _F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            z = z + self.proj(y.transpose(1, 2).reshape(B, T, d_s))
        return z + self.out(_F.gelu(self.fc(self.ln2(z))))


class LadderSideNetwork(nn.Module):
    """Ladder side network (Sung et al. 2022) reading a frozen backbone's hidden states.

    ``forward(hidden_states, key_mask=None) -> z_L [B, T, d_s]`` with ``d_s = backbone_dim //
    reduction_factor`` (notebook {eq}`lst-side`)::

        z_0 = h_0 W_0,    z_i = g_i(ladder_gate(h_i W_i, z_{i-1}, alpha_i, tau)),  i = 1..L

    followed by a final LayerNorm. ``hidden_states``: ``L + 1`` tensors ``[B, T, d]`` (the
    embedding output and each layer's output), computed by the caller under ``torch.no_grad()``
    (see :func:`backbone_hidden_states`), so that backpropagation never enters the backbone.
    ``key_mask [B, T]`` bool, True for a real token, masks the side attention. The gates start at
    ``alpha_i = 0`` (``mu_i = 1/2``); ``side_block`` is ``"transformer"`` (attention + FFN, as in
    Su's CLUE code) or ``"mlp"`` (FFN only). Weights are initialised at random (no pruning).
    """

    def __init__(self, backbone_dim: int, num_layers: int, reduction_factor: int = 8,
                 side_block: str = "transformer", tau: float = 0.1, num_heads: int = 2):
        super().__init__()
        _check_int("backbone_dim", backbone_dim, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("reduction_factor", reduction_factor, 1)
        _check_choice("side_block", side_block, ("mlp", "transformer"))
        _check_range("tau", tau, 0.0, low_open=True)
        _check_int("num_heads", num_heads, 1)
        if backbone_dim % reduction_factor:
            raise ValueError(f"reduction_factor: expected a divisor of backbone_dim="
                             f"{backbone_dim}, got {reduction_factor}")
        d_s = backbone_dim // reduction_factor
        if side_block == "transformer" and d_s % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the side width d_s={d_s}, "
                             f"got {num_heads}")
        self.backbone_dim, self.num_layers, self.side_dim, self.tau = (
            backbone_dim, num_layers, d_s, float(tau))
        self.down = nn.ModuleList(nn.Linear(backbone_dim, d_s) for _ in range(num_layers + 1))
        self.alpha = nn.Parameter(torch.zeros(num_layers))
        self.blocks = nn.ModuleList(_SideBlock(d_s, num_heads, side_block)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_s)

    def forward(self, hidden_states: _Sequence[torch.Tensor],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        hs = list(hidden_states)
        if len(hs) != self.num_layers + 1:
            raise ValueError(f"hidden_states: expected num_layers + 1 = {self.num_layers + 1} "
                             f"tensors, got {len(hs)}")
        for i, h in enumerate(hs):
            _check_floating(f"hidden_states[{i}]", h)
            if h.dim() != 3 or h.shape[-1] != self.backbone_dim or h.shape != hs[0].shape:
                raise ValueError(f"hidden_states[{i}]: expected shape [B, T, "
                                 f"{self.backbone_dim}] like hidden_states[0], got "
                                 f"{tuple(h.shape)}")
        if key_mask is not None:
            if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
                raise TypeError("key_mask: expected a bool tensor (True = real token)")
            if tuple(key_mask.shape) != tuple(hs[0].shape[:2]):
                raise ValueError(f"key_mask: expected shape {tuple(hs[0].shape[:2])}, got "
                                 f"{tuple(key_mask.shape)}")
        z = self.down[0](hs[0])
        for i, block in enumerate(self.blocks):
            z = block(ladder_gate(self.down[i + 1](hs[i + 1]), z, self.alpha[i], self.tau),
                      key_mask)
        return self.ln_f(z)


def backbone_hidden_states(model: nn.Module, x, **kwargs) -> tuple[torch.Tensor, ...]:
    """The ``L + 1`` hidden states ``(h_0, ..., h_L)`` of a backbone, computed under
    ``torch.no_grad()`` (each ``[B, T, d]``, no autograd history).

    A Hugging Face model (one with a ``config``) is called with ``output_hidden_states=True``;
    any other module must keep its layers in an ``nn.ModuleList`` named ``blocks`` or
    ``layers`` (``companion.lm.GPT``, ``nn.TransformerEncoder``): forward hooks record the first
    layer's input (``h_0``) and every layer's output. ``kwargs`` go to ``model(x, ...)``. The
    model's train/eval mode is left as it is: put a frozen backbone in ``eval()`` (no dropout).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        if hasattr(model, "config") and not isinstance(getattr(model, "config"), dict):
            out = model(x, output_hidden_states=True, **kwargs)
            return tuple(out.hidden_states)
        layers = None
        for name in ("blocks", "layers"):
            if isinstance(getattr(model, name, None), nn.ModuleList):
                layers = getattr(model, name)
                break
        if layers is None or len(layers) == 0:
            raise ValueError("model: expected a Hugging Face model or a module whose layers are "
                             "an nn.ModuleList named 'blocks' or 'layers'")
        states: list[torch.Tensor] = []

        def first(module, args):
            states.append(args[0])

        def each(module, args, output):
            states.append(output[0] if isinstance(output, tuple) else output)

        handles = [layers[0].register_forward_pre_hook(first)]
        handles += [layer.register_forward_hook(each) for layer in layers]
        try:
            model(x, **kwargs)
        finally:
            for h in handles:
                h.remove()
    return tuple(states)


def _saved_tensors(node) -> list[torch.Tensor]:
    out = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed by an earlier backward
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        out += [v for v in values if isinstance(v, torch.Tensor)]
    return out


def backprop_depth(loss: torch.Tensor, layers: _Sequence[nn.Module]) -> int:
    """How many of ``layers`` the backward pass of ``loss`` must go through (notebook
    {eq}`lst-depth`).

    A layer counts when one of its parameters lies on ``loss``'s backward graph: either it is
    trained (an ``AccumulateGrad`` leaf of the graph) or a node of the graph saved it to pass the
    gradient on to an earlier input (a frozen ``Linear`` whose input needs a gradient). The graph
    is only read (no backward runs). A layer reached by no trainable path (a frozen backbone run
    under ``torch.no_grad()``) counts 0.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss: expected a torch.Tensor, got {type(loss).__name__}")
    layers = list(layers)
    if not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError("layers: expected a sequence of nn.Module")
    if loss.grad_fn is None:
        return 0
    seen_nodes, stack, ptrs = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            ptrs.add(variable.untyped_storage().data_ptr())
        for t in _saved_tensors(node):
            if t.numel():
                ptrs.add(t.untyped_storage().data_ptr())
        stack += [n for n, _ in node.next_functions]
    return sum(any(p.numel() and p.untyped_storage().data_ptr() in ptrs
                   for p in layer.parameters()) for layer in layers)


def trainable_fraction(model: nn.Module) -> float:
    """Parameters with ``requires_grad`` over all parameters of ``model`` (each counted once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if total == 0:
        raise ValueError("model: has no parameters")
    return trainable / total
