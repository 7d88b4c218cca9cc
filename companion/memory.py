"""Memory: byte accounting for training (weights, gradients, optimizer state, saved activations).

All byte counts of the book live here. Each section below belongs to one notebook of the book
(notebooks/<slug>.ipynb); the first is shared by gpt2-chinese, adafactor and ladder-side-tuning.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._validate import check_choice, check_int

__all__: list[str] = []


# === byte accounting (gpt2-chinese, adafactor, ladder-side-tuning, recompute) ===
__all__ += ["saved_activation_bytes", "optimizer_state_bytes", "training_memory_bytes"]


def _is_parameter_like(t: torch.Tensor) -> bool:
    """An ``nn.Parameter``, or a view of one (``W.T`` saved by a matmul)."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def saved_activation_bytes(fn, *args, **kwargs) -> int:
    """Bytes that autograd keeps for the backward pass while ``fn(*args, **kwargs)`` runs forward.

    Every tensor saved for backward is recorded through ``torch.autograd.graph.saved_tensors_hooks``
    and counted once per storage (views of one buffer count once), whole storage; parameters and
    views of parameters are not activations and are left out. The output of ``fn`` is dropped, so
    nothing is kept after the call. Under ``torch.no_grad()`` the count is 0.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not _is_parameter_like(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out
    return int(sum(seen.values()))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, factored statistics, and the scalar
    ``step`` counters torch keeps per parameter), each storage counted once."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    seen: dict[tuple, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                s = value.untyped_storage()
                seen[(value.device, s.data_ptr())] = s.nbytes()
    return int(sum(seen.values()))


def _adafactor_state_numel(shape: torch.Size) -> int:
    """Factored second moment of one parameter, as ``torch.optim.Adafactor`` stores it: a row and a
    column statistic per trailing matrix (``prod(lead) * (m + n)``), the full vector for 1-D."""
    if len(shape) < 2:
        return math.prod(shape)
    *lead, m, n = shape
    return math.prod(lead) * (m + n)


def training_memory_bytes(model_or_num_params, optimizer: str = "adam",
                          dtype_bytes: int = 4) -> int:
    """Bytes of weights + gradients + optimizer state for one training step (no activations)::

        sgd:        2 N b          (weights, gradients; no momentum)
        adam:       4 N b          (+ first and second moments)
        adafactor:  2 N b + b sum_W (m + n)   (factored second moment, no momentum)

    with ``b = dtype_bytes`` and, for Adafactor, the sum over each parameter's trailing ``m x n``
    matrix (1-D parameters keep a full vector). ``model_or_num_params``: an ``nn.Module`` (its
    parameters that require grad) or an integer N; with an integer, Adafactor's factored state is
    not known and is left out (a lower bound, small for large matrices: ``m + n << m n``).
    The per-parameter ``step`` counters torch also keeps (4 bytes each) are not included.
    """
    check_choice("optimizer", optimizer, ("adam", "adafactor", "sgd"))
    check_int("dtype_bytes", dtype_bytes, 1)
    if isinstance(model_or_num_params, nn.Module):
        shapes = [p.shape for p in model_or_num_params.parameters() if p.requires_grad]
        n = sum(math.prod(s) for s in shapes)
    elif isinstance(model_or_num_params, int) and not isinstance(model_or_num_params, bool):
        if model_or_num_params < 0:
            raise ValueError(f"model_or_num_params: expected N >= 0, got {model_or_num_params}")
        shapes, n = None, model_or_num_params
    else:
        raise TypeError("model_or_num_params: expected an nn.Module or an int, got "
                        f"{type(model_or_num_params).__name__}")
    total = 2 * n
    if optimizer == "adam":
        total += 2 * n
    elif optimizer == "adafactor" and shapes is not None:
        total += sum(_adafactor_state_numel(s) for s in shapes)
    return total * dtype_bytes


# === recompute ===
__all__ += ["checkpoint_activation_bytes", "optimal_segments", "CheckpointedStack"]


def _check_sizes(num_layers: int, seg_input_bytes: int, layer_bytes: int) -> None:
    check_int("num_layers", num_layers, 1)
    check_int("seg_input_bytes", seg_input_bytes, 0)
    check_int("layer_bytes", layer_bytes, 0)


def checkpoint_activation_bytes(num_layers: int, seg_input_bytes: int, layer_bytes: int,
                                segments: int) -> int:
    """Peak saved-activation bytes of a chain of ``n = num_layers`` layers cut into ``k =
    segments`` checkpointed segments (Chen et al. 2016)::

        M(k) = k a + ceil(n / k) s

    ``a = seg_input_bytes`` is what a segment keeps (its input), ``s = layer_bytes`` what one layer
    saves for backward; during the backward pass one segment at a time is recomputed, so its
    ``ceil(n / k)`` layers' activations live beside the k stored inputs. ``k = n`` is
    per-layer checkpointing (``n a + s``), ``k = 1`` the whole chain (``a + n s``, no saving).
    When k does not divide n this is an upper bound: with :class:`CheckpointedStack`'s segments
    (sizes ``n_j``, the larger first) the exact peak is ``max_j (j a + n_j s)``, which can be
    smaller, so :func:`optimal_segments` minimises the bound (the recompute notebook measures
    both)."""
    _check_sizes(num_layers, seg_input_bytes, layer_bytes)
    check_int("segments", segments, 1, num_layers)
    return segments * seg_input_bytes + -(-num_layers // segments) * layer_bytes


def optimal_segments(num_layers: int, seg_input_bytes: int, layer_bytes: int) -> int:
    """The integer ``k`` in ``[1, num_layers]`` minimising :func:`checkpoint_activation_bytes`
    (the smallest such k on ties, i.e. the fewest recomputed boundaries); close to the continuous
    optimum ``sqrt(n s / a)``, where ``M* = 2 sqrt(n a s)``."""
    _check_sizes(num_layers, seg_input_bytes, layer_bytes)
    return min(range(1, num_layers + 1), key=lambda k: (
        checkpoint_activation_bytes(num_layers, seg_input_bytes, layer_bytes, k), k))


class CheckpointedStack(nn.Module):
    """A sequence of blocks ``x -> block(x)`` run with ``torch.utils.checkpoint.checkpoint``
    (``use_reentrant=False``, RNG state preserved so that dropout recomputes identically).

    ``segments=None``: every block is its own segment (per-layer checkpointing, the usual choice);
    ``segments=k``: k consecutive segments whose sizes differ by at most one (the first ones
    larger), each checkpointed, which is the memory model of :func:`checkpoint_activation_bytes`.
    ``torch.utils.checkpoint.checkpoint_sequential`` differs in two ways: its segments have
    ``n // k`` blocks with the remainder added to the last one, and it does not checkpoint the last
    segment (its activations are the first the backward needs, so this saves one recomputation).
    Without gradients (``torch.no_grad``, inference) the blocks run plainly. ``blocks`` is kept as
    an ``nn.ModuleList`` (e.g. ``companion.lm.GPT(...).blocks``)."""

    def __init__(self, blocks, segments: int | None = None):
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks: expected a non-empty sequence of nn.Module")
        if segments is not None:
            check_int("segments", segments, 1, len(blocks))
        self.blocks = nn.ModuleList(blocks)
        self.segments = segments

    def segment_bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` of the checkpointed segments."""
        n = len(self.blocks)
        k = n if self.segments is None else self.segments
        sizes = [n // k + (i < n % k) for i in range(k)]
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        return bounds

    def _run(self, start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._run(0, len(self.blocks), x)
        from torch.utils.checkpoint import checkpoint

        for start, stop in self.segment_bounds():
            x = checkpoint(self._run, start, stop, x, use_reentrant=False,
                           preserve_rng_state=True)
        return x
