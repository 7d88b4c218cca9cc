"""Initialisation and expansion: residual-branch scaling (DeepNet) and function-preserving
widening of a trained Transformer.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import torch
import torch.nn as nn

from ._validate import check_choice, check_floating, check_int, check_range, check_tensor

__all__: list[str] = []


# === deepnet-why-residual ===
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
__all__ += ["repeat_expand", "expand_linear", "expand_layernorm", "expand_attention",
            "expand_gpt_state"]


def repeat_expand(x: torch.Tensor, k: int = 2, dim: int = -1, pairwise: bool = False,
                  scale: bool = True) -> torch.Tensor:
    """The widening map ``x~ = E x`` of eq. (expand-map): every component of ``x`` along ``dim``
    is repeated ``k`` times in place, ``[x1, x2] -> [x1, x1, x2, x2]`` (``k = 2``), and divided by
    ``sqrt(k)`` (``scale=False``: plain repetition). ``pairwise=True`` repeats consecutive pairs
    instead, ``[x1, x2, x3, x4] -> [x1, x2, x1, x2, x3, x4, x3, x4]`` (the RoPE layout, eq.
    rope-pairs). The size along ``dim`` goes from ``n`` to ``k n``; with ``scale`` the map is an
    isometry, ``|E x| = |x|``."""
    check_tensor("x", x)
    check_int("k", k, 1)
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    if scale and not x.is_floating_point():
        raise TypeError(f"x: scale=True needs a floating-point tensor, got dtype {x.dtype}")
    n = x.shape[dim]
    if pairwise:
        if n % 2:
            raise ValueError(f"x: pairwise=True needs an even size along dim={dim}, got {n}")
        y = x.movedim(dim, -1).unflatten(-1, (n // 2, 2))
        y = y.repeat_interleave(k, dim=-2).flatten(-2).movedim(-1, dim)
    else:
        y = x.repeat_interleave(k, dim=dim)
    return y / math.sqrt(k) if scale else y


def _check_factor(name, value):
    check_range(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def expand_linear(weight: torch.Tensor, bias: torch.Tensor | None, k: int, in_factor: float,
                  out_factor: float, pairwise_out: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Widen a linear layer ``y = W x + b`` (torch layout: ``weight [out, in]``, ``bias [out]``)
    by ``k`` on both axes, eq. (expand-linear)::

        W~ = out_factor * in_factor * R_out W R_in^T,     b~ = out_factor * R_out b

    with ``R`` the plain repetition (``pairwise_out`` repeats output pairs). If the wide input
    is ``a R x``, the wide output is ``(in_factor k a) out_factor R (W x) + out_factor R b``:
    choose ``in_factor = 1 / (k a)`` (``1/sqrt(k)`` for an ``E``-mapped input, ``1/k`` for a
    plainly repeated one) and the output is ``out_factor R y`` (``out_factor = 1/sqrt(k)``: the
    output is ``E y``). Returns ``(weight [k out, k in], bias [k out] | None)``."""
    check_floating("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [out, in], got {tuple(weight.shape)}")
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (out), got "
                             f"{tuple(bias.shape)}")
    check_int("k", k, 1)
    in_factor = _check_factor("in_factor", in_factor)
    out_factor = _check_factor("out_factor", out_factor)
    if pairwise_out and weight.shape[0] % 2:
        raise ValueError(f"weight: pairwise_out=True needs an even number of outputs, got "
                         f"{weight.shape[0]}")
    w = repeat_expand(weight, k, dim=0, pairwise=pairwise_out, scale=False)
    w = repeat_expand(w, k, dim=1, scale=False) * (out_factor * in_factor)
    b = None
    if bias is not None:
        b = repeat_expand(bias, k, dim=0, pairwise=pairwise_out, scale=False) * out_factor
    return w, b


def expand_layernorm(gamma: torch.Tensor, beta: torch.Tensor | None, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Widen a LayerNorm's ``gamma [d]`` and ``beta [d]`` (or None) to ``E gamma``, ``E beta``
    ``[k d]``, eq. (expand-ln): then ``LN~(E x) = E LN(x)`` exactly, provided the wide layer
    uses ``eps / k`` (the variance of ``E x`` is ``var(x) / k``)."""
    check_floating("gamma", gamma)
    if gamma.dim() != 1:
        raise ValueError(f"gamma: expected shape [d], got {tuple(gamma.shape)}")
    if beta is not None:
        check_floating("beta", beta)
        if beta.shape != gamma.shape:
            raise ValueError(f"beta: expected the shape of gamma {tuple(gamma.shape)}, got "
                             f"{tuple(beta.shape)}")
    check_int("k", k, 1)
    return (repeat_expand(gamma, k),
            None if beta is None else repeat_expand(beta, k))


def expand_attention(wq, bq, wk, bk, wv, bv, wo, bo, k: int, scaled: bool = True,
                     rope: bool = False) -> tuple:
    """Widen multi-head attention by ``k`` (same number of heads, head size times ``k``),
    eqs. (expand-qk) and (expand-vo). Weights in torch layout ``[out, in]``, biases ``[out]``
    or None; the heads are contiguous blocks of the projections' outputs (as in SDPA models and
    ``nn.MultiheadAttention``). Queries and keys get ``E`` times ``k**0.25`` when the scores are
    divided by ``sqrt(head size)`` (``scaled``), so that ``q~.k~ / sqrt(k d_h) = q.k /
    sqrt(d_h)``; values and the output projection get ``E``. ``rope=True`` repeats query/key
    components in pairs (only approximately lossless: the wide head's RoPE frequencies differ).
    Returns ``(wq, bq, wk, bk, wv, bv, wo, bo)`` widened; input and output are ``E``-mapped."""
    check_int("k", k, 1)
    names = ("wq", "wk", "wv", "wo")
    for name, w in zip(names, (wq, wk, wv, wo)):
        check_floating(name, w)
        if w.dim() != 2:
            raise ValueError(f"{name}: expected shape [out, in], got {tuple(w.shape)}")
    if wq.shape != wk.shape:
        raise ValueError(f"wk: expected the shape of wq {tuple(wq.shape)}, got "
                         f"{tuple(wk.shape)}")
    if wo.shape[1] != wv.shape[0]:
        raise ValueError(f"wo: expected {wv.shape[0]} inputs (the rows of wv), got "
                         f"{wo.shape[1]}")
    s = 1.0 / math.sqrt(k)
    s_qk = s * k ** 0.25 if scaled else s
    out = []
    for name, (w, b, f, pair) in zip(names, ((wq, bq, s_qk, rope), (wk, bk, s_qk, rope),
                                             (wv, bv, s, False), (wo, bo, s, False))):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"b{name[1]}: expected shape [{w.shape[0]}], got "
                             f"{tuple(b.shape)}")
        out.extend(expand_linear(w, b, k, s, f, pairwise_out=pair))
    return tuple(out)


_GPT_KEY = re.compile(r"^(tok_emb|pos_emb|emb_ln|ln_f|head)\.(weight|bias)$|"
                       r"^blocks\.(\d+)\.(ln1|ln2|attn\.qkv|attn\.proj|mlp\.fc|mlp\.proj)"
                       r"\.(weight|bias)$")


def expand_gpt_state(state_dict, cfg, k: int = 2, noise_std: float = 0.0,
                     generator: torch.Generator | None = None):
    """Widen a ``companion.lm.GPT`` by ``k``: returns ``(state_dict, cfg)`` of a model with
    ``d_model * k`` and the same layers and heads whose logits equal the original's.

    Every hidden vector becomes ``E h`` (eq. expand-map): embeddings and LayerNorms by
    :func:`expand_layernorm`'s rule, attention by :func:`expand_attention` (the fused ``qkv``
    is split into q, k, v), the MLP by eq. (expand-linear) with ``E`` on both layers for
    ``activation="relu"`` and the GeLU map of eq. (expand-gelu) otherwise; a tied output
    ``h E^T`` is unchanged, an untied ``head`` gets ``W E^T``. The config comes back through
    ``dataclasses.replace`` with ``d_model * k`` and ``layer_norm_eps / k`` (exactness needs
    it). Works for the three block styles. ``noise_std > 0`` adds i.i.d. ``N(0, noise_std^2)``
    noise (from ``generator``) to every expanded weight matrix (embeddings, linear weights) to
    break the symmetry between copies; biases and LayerNorms stay exact.
    ``cfg`` is any dataclass with the fields of ``GPTConfig``; ``state_dict`` maps its keys
    (``tok_emb``, ``pos_emb``, ``emb_ln``, ``blocks.{i}.{ln1, attn.qkv, attn.proj, ln2,
    mlp.fc, mlp.proj}``, ``ln_f``, ``head``) to floating-point tensors."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"cfg: expected a GPTConfig-like dataclass instance, got "
                        f"{type(cfg).__name__}")
    for field in ("d_model", "num_heads", "activation", "layer_norm_eps"):
        if not hasattr(cfg, field):
            raise TypeError(f"cfg: expected a GPTConfig-like dataclass with a {field!r} field")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    check_int("k", k, 1)
    check_range("noise_std", noise_std, 0.0)
    if cfg.activation not in ("relu", "gelu", "gelu_tanh"):
        raise ValueError(f"cfg.activation: expected one of 'relu' | 'gelu' | 'gelu_tanh', got "
                         f"{cfg.activation!r}")
    d = cfg.d_model
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"state_dict[{name!r}]: expected a floating-point tensor, got "
                            f"{what}")
        if not _GPT_KEY.match(name):
            raise ValueError(f"state_dict: unexpected key {name!r} (not in the GPT layout)")
    s = 1.0 / math.sqrt(k)
    relu = cfg.activation == "relu"
    # MLP factors (in_factor, out_factor): ReLU commutes with E; GeLU sees plain repeats
    fc_f, proj_f = ((s, s), (s, s)) if relu else ((s, 1.0), (1.0 / k, s))
    new = {}

    def get(name):
        return state_dict.get(name)

    for name in state_dict:
        stem, _, kind = name.rpartition(".")
        if name in new or kind not in ("weight", "bias"):
            continue
        t = state_dict[name]
        if stem in ("tok_emb", "pos_emb"):
            new[name] = repeat_expand(t, k, dim=-1)
        elif stem == "head":  # untied output W [V, d]: W E^T leaves W h unchanged
            new[name] = repeat_expand(t, k, dim=-1)
        elif stem in ("emb_ln", "ln_f") or stem.endswith((".ln1", ".ln2")):
            g, b = expand_layernorm(get(stem + ".weight"), get(stem + ".bias"), k)
            new[stem + ".weight"] = g
            if b is not None:
                new[stem + ".bias"] = b
        elif stem.endswith(".attn.qkv") or stem.endswith(".attn.proj"):
            base = stem.rsplit(".", 1)[0]
            wqkv, bqkv = get(base + ".qkv.weight"), get(base + ".qkv.bias")
            if wqkv is None or wqkv.shape != (3 * d, d):
                raise ValueError(f"state_dict[{base + '.qkv.weight'!r}]: expected shape "
                                 f"[{3 * d}, {d}], got "
                                 f"{None if wqkv is None else tuple(wqkv.shape)}")
            wq, wk, wv = wqkv.chunk(3, dim=0)
            bq, bk, bv = (None,) * 3 if bqkv is None else bqkv.chunk(3, dim=0)
            wo, bo = get(base + ".proj.weight"), get(base + ".proj.bias")
            e = expand_attention(wq, bq, wk, bk, wv, bv, wo, bo, k, scaled=True)
            new[base + ".qkv.weight"] = torch.cat(e[0:6:2], dim=0)
            if bqkv is not None:
                new[base + ".qkv.bias"] = torch.cat(e[1:6:2], dim=0)
            new[base + ".proj.weight"] = e[6]
            if bo is not None:
                new[base + ".proj.bias"] = e[7]
        elif stem.endswith((".mlp.fc", ".mlp.proj")):
            f = fc_f if stem.endswith(".fc") else proj_f
            w, b = expand_linear(get(stem + ".weight"), get(stem + ".bias"), k, *f)
            new[stem + ".weight"] = w
            if b is not None:
                new[stem + ".bias"] = b
    if noise_std > 0:
        for name, t in new.items():
            if t.dim() == 2:
                noise = torch.randn(t.shape, generator=generator, dtype=t.dtype,
                                    device=generator.device if generator is not None
                                    else t.device)
                new[name] = t + noise_std * noise.to(t.device)
    new_cfg = dataclasses.replace(cfg, d_model=d * k, layer_norm_eps=cfg.layer_norm_eps / k)
    return new, new_cfg
