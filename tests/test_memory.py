"""Tests of companion.memory's byte accounting: the formulas against the bytes real torch optimizers
hold after a step, and the saved-activation count against hand counts."""
import pytest
import torch
import torch.nn as nn

from companion.lm import GPT, GPTConfig
from companion.memory import optimizer_state_bytes, saved_activation_bytes, training_memory_bytes


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, num_layers=2, num_heads=4, d_model=32, block_size=24))


def one_step(m, opt):
    idx = torch.randint(0, 50, (2, 10))
    m.zero_grad()
    m(idx, idx)[1].backward()
    opt.step()


@pytest.mark.parametrize("name, make", [
    ("adam", lambda p: torch.optim.Adam(p)),
    ("adam", lambda p: torch.optim.AdamW(p)),
    ("adafactor", lambda p: torch.optim.Adafactor(p)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
])
def test_training_memory_equals_what_torch_holds(name, make):
    """weights + grads + optimizer.state after one real step, less torch's 4-byte step counters."""
    m = gpt()
    opt = make(m.parameters())
    one_step(m, opt)
    params = list(m.parameters())
    steps = sum(4 for p in params if "step" in opt.state.get(p, {}))
    held = sum(p.numel() * p.element_size() for p in params) \
        + sum(p.grad.numel() * p.grad.element_size() for p in params) \
        + optimizer_state_bytes(opt) - steps
    assert training_memory_bytes(m, name) == held


def test_training_memory_closed_forms_for_a_count():
    n = 1_500_000_000
    assert training_memory_bytes(n, "adam") == 16 * n        # 24 GB at 1.5e9 parameters
    assert training_memory_bytes(n, "adafactor") == 8 * n    # lower bound: factored state left out
    assert training_memory_bytes(n, "sgd", dtype_bytes=2) == 4 * n


def test_adafactor_state_is_rows_plus_columns():
    lin = nn.Linear(300, 200, bias=True)
    assert training_memory_bytes(lin, "adafactor") == 4 * (2 * (300 * 200 + 200) + 500 + 200)


def test_optimizer_state_counts_each_storage_once():
    p = nn.Parameter(torch.zeros(10, 10))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 400
    opt.state[p]["alias"] = opt.state[p]["momentum_buffer"].view(-1)   # a view: no new bytes
    assert optimizer_state_bytes(opt) == 400


def test_saved_activations_hand_counts():
    x = torch.randn(100, 50)
    w = nn.Parameter(torch.randn(50, 20))
    # exp saves its output (100x50 floats); the parameter w saved by the matmul is left out,
    # the matmul's other input is exp's output itself (counted once)
    assert saved_activation_bytes(lambda: x.exp() @ w) == 100 * 50 * 4
    # sin saves its input; x is a plain tensor here, so it counts
    xg = x.clone().requires_grad_()
    assert saved_activation_bytes(lambda: xg.sin()) == 0   # a leaf that requires grad: a parameter
    assert saved_activation_bytes(lambda: (xg * 2).sin()) == 100 * 50 * 4
    with torch.no_grad():
        assert saved_activation_bytes(lambda: x.exp() @ w) == 0


def test_saved_activations_grow_with_depth():
    """A check that can fail: twice the layers, about twice the saved bytes."""
    def mlp(depth):
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh())
                               for _ in range(depth)])
    x = torch.randn(32, 64)
    a, b = (saved_activation_bytes(mlp(d), x) for d in (4, 8))
    # each linear saves its input and each tanh its output, 32 x 64 floats; a tanh output is the
    # next linear's input (one storage, counted once), so depth + 1 buffers: x and the outputs
    assert a == 32 * 64 * 4 * (4 + 1) and b == 32 * 64 * 4 * (8 + 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="optimizer"):
        training_memory_bytes(10, "lamb")
    with pytest.raises(TypeError, match="model_or_num_params"):
        training_memory_bytes(10.0)
    with pytest.raises(ValueError, match="model_or_num_params: expected N >= 0"):
        training_memory_bytes(-1)
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        optimizer_state_bytes("adam")
    with pytest.raises(TypeError, match="fn: expected a callable"):
        saved_activation_bytes(3)
