import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """One torch thread per test worker when COMPANION_NUM_THREADS=1 (as `python3 tasks.py test`
    sets it): the suite runs in two workers on two cores, and oversubscription slows it tenfold."""
    import torch

    import companion

    before = torch.get_num_threads()
    companion.set_num_threads()
    yield
    torch.set_num_threads(before)
