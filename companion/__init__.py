"""companion: the implementations behind the notebooks of the book.

Each notebook of the book reproduces one article by 苏剑林 (Su Jianlin, https://kexue.fm) and
calls this package for the code. One module per part of the book (``companion.losses``,
``companion.quantize``, ``companion.rnn``, ...); each can be copied into a project alone.

This file holds what every notebook needs first: the scale switch, seeds, the device and the
number of CPU threads. Submodules load lazily, so ``import companion`` stays light.
"""
from __future__ import annotations

import importlib
import os
import random

__version__ = "0.1.0"

__all__ = ["scale", "seed_everything", "device", "set_num_threads", "glue", "glued", "SCALES"]

SCALES = ("ci", "full")
_SCALE_ENV = "COMPANION_SCALE"
_THREADS_ENV = "COMPANION_NUM_THREADS"
_SUBMODULES = {
    "attention", "data", "diffusion", "gan", "geometry", "heads", "init", "lm",
    "losses", "memory", "numbers", "optim", "peft", "position", "quantize", "rnn",
    "ssl", "vae", "variational"
}


def scale() -> str:
    """The scale a notebook runs at: ``"ci"`` (small, CPU, seconds) or ``"full"`` (GPU, minutes).

    ``"full"`` when CUDA is available, ``"ci"`` otherwise. The environment variable
    ``COMPANION_SCALE=ci|full`` overrides the guess; any other value raises ValueError.
    """
    forced = os.environ.get(_SCALE_ENV)
    if forced is not None and forced.strip() != "":
        value = forced.strip().lower()
        if value not in SCALES:
            raise ValueError(
                f"{_SCALE_ENV} must be one of {', '.join(SCALES)} (or unset), got {forced!r}"
            )
        return value
    import torch

    return "full" if torch.cuda.is_available() else "ci"


def device():
    """``torch.device("cuda")`` when ``scale() == "full"`` and CUDA is present, else the CPU.

    Tying the device to the scale keeps the stored ci-scale outputs on the CPU path.
    """
    import torch

    if scale() == "full" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected 0 <= seed < 2**32, got {seed}")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    import torch

    torch.manual_seed(seed)  # also seeds every CUDA device


def set_num_threads(default: int | None = None) -> int:
    """Set torch's CPU threads from ``COMPANION_NUM_THREADS`` (or ``default``); return the count.

    The test command runs notebooks in parallel with one thread each, so that two notebooks
    never fight over the same cores. Unset and with no default, torch's own choice is kept.
    """
    import torch

    raw = os.environ.get(_THREADS_ENV)
    n = default
    if raw is not None and raw.strip() != "":
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{_THREADS_ENV} must be a positive integer, got {raw!r}") from None
        if n < 1:
            raise ValueError(f"{_THREADS_ENV} must be a positive integer, got {raw!r}")
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


_GLUED: dict[str, str] = {}


def glue(name: str, value) -> None:
    """Record a headline figure of a notebook under ``name``.

    In a Jupyter kernel with myst-nb installed it is also glued (``myst_nb.glue(...,
    display=False)``), so that the book's reproductions page shows the number from the stored
    outputs instead of a copy typed by hand; ``python3 tasks.py full`` reads what
    :func:`glued` returns after a full-scale run. ``value`` is kept as ``str(value)``: format
    numbers to the precision their spread supports before gluing them.
    """
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"name: expected letters, digits, '-' or '_', got {name!r}")
    text = str(value)
    _GLUED[name] = text
    try:
        from IPython import get_ipython

        in_kernel = get_ipython() is not None and hasattr(get_ipython(), "kernel")
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        in_kernel = False
    if in_kernel:
        try:
            from myst_nb import glue as _myst_glue
        except ImportError:  # on Colab, without the book's tools: nothing to glue into
            pass
        else:
            _myst_glue(name, _Plain(text), display=False)


class _Plain:
    """A string that Jupyter shows without quotes (so that a pasted glue value reads as text)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.text)


def glued() -> dict[str, str]:
    """A copy of everything :func:`glue` recorded in this process, by name."""
    return dict(_GLUED)


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
