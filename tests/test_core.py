"""companion/__init__.py: the scale switch, seeds, device and threads."""
import random

import numpy as np
import pytest
import torch

import companion


def test_scale_follows_cuda_when_unset(monkeypatch):
    monkeypatch.delenv("COMPANION_SCALE", raising=False)
    assert companion.scale() == ("full" if torch.cuda.is_available() else "ci")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert companion.scale() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert companion.scale() == "ci"


@pytest.mark.parametrize("value,expected", [("ci", "ci"), ("full", "full"), (" FULL ", "full"), ("", None)])
def test_scale_env_override(monkeypatch, value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("COMPANION_SCALE", value)
    assert companion.scale() == (expected or "ci")


@pytest.mark.parametrize("bad", ["gpu", "CI2", "1"])
def test_scale_env_bad_value(monkeypatch, bad):
    monkeypatch.setenv("COMPANION_SCALE", bad)
    with pytest.raises(ValueError, match=r"COMPANION_SCALE must be one of ci, full.*" + bad):
        companion.scale()


def test_device_is_cpu_at_ci_scale(monkeypatch):
    monkeypatch.setenv("COMPANION_SCALE", "ci")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert companion.device() == torch.device("cpu")
    monkeypatch.setenv("COMPANION_SCALE", "full")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert companion.device() == torch.device("cpu")  # full scale without CUDA still runs


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    companion.seed_everything(123)
    a = draw()
    companion.seed_everything(123)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    companion.seed_everything(124)
    assert draw()[0] != a[0]


@pytest.mark.parametrize("bad,err", [(1.5, TypeError), ("1", TypeError), (True, TypeError), (-1, ValueError), (2**32, ValueError)])
def test_seed_everything_bad(bad, err):
    with pytest.raises(err, match="seed"):
        companion.seed_everything(bad)


def test_set_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("COMPANION_NUM_THREADS", "1")
        assert companion.set_num_threads() == 1
        monkeypatch.delenv("COMPANION_NUM_THREADS")
        assert companion.set_num_threads(2) == 2
        for bad in ("0", "two"):
            monkeypatch.setenv("COMPANION_NUM_THREADS", bad)
            with pytest.raises(ValueError, match="COMPANION_NUM_THREADS must be a positive integer"):
                companion.set_num_threads()
    finally:
        torch.set_num_threads(before)


def test_lazy_submodules():
    assert companion.data.__name__ == "companion.data"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        companion.nope
