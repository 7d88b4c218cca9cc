"""Argument checks shared by the companion modules: each error names the argument and what was
expected, so that bad input never turns into a silent wrong answer."""
from __future__ import annotations

from typing import Iterable

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(name: str, x) -> torch.Tensor:
    """``x`` must be a real or complex floating-point tensor."""
    check_tensor(name, x)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_b}: expected the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        options = " | ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """``low <= value <= high`` (strict where ``low_open``/``high_open``); either bound may be None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or value != value:  # value != value catches NaN
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")


def check_int(name: str, value, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    check_range(name, value, low, high)
    return value


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` ("none" | "mean" | "sum") as ``torch.nn.functional`` does."""
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
