"""Small helpers shared by several test files."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (memory-order checks)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


class OpsOnLargeTensors(TorchDispatchMode):
    """Records the names of the ops in ``names`` whose first argument has at least ``numel``
    elements (e.g. to check that a loss takes no elementwise ``exp`` over its logits)."""

    def __init__(self, names, numel):
        super().__init__()
        self.names, self.numel, self.seen = set(names), numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        if name in self.names and isinstance(first, torch.Tensor) and first.numel() >= self.numel:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
