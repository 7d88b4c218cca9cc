"""Tests of companion.memory's byte accounting: the formulas against the bytes real torch optimizers
hold after a step, and the saved-activation count against hand counts."""
import pytest
import torch
import torch.nn as nn

from companion.lm import GPT, GPTConfig
from companion.memory import (CheckpointedStack, checkpoint_activation_bytes, optimal_segments,
                              optimizer_state_bytes, saved_activation_bytes, training_memory_bytes)


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
    # sin saves its input: an input that requires grad counts, a parameter does not
    xg = x.clone().requires_grad_()
    assert saved_activation_bytes(lambda: xg.sin()) == 100 * 50 * 4
    assert saved_activation_bytes(lambda: nn.Parameter(x.clone()).sin()) == 0
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


# ---- recompute: the segment memory model and CheckpointedStack -----------------------------
def mlp_blocks(n, d=16, p_drop=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p_drop), nn.Linear(4 * d, d))
            .to(dtype) for _ in range(n)]


def grads(stack, x, seed=1):
    torch.manual_seed(seed)
    stack.zero_grad()
    xg = x.clone().requires_grad_()
    stack(xg).square().sum().backward()
    return [xg.grad] + [p.grad.clone() for p in stack.parameters()]


@pytest.mark.parametrize("segments", [None, 1, 3, 16])
@pytest.mark.parametrize("p_drop", [0.0, 0.2])
def test_checkpointed_gradients_equal_plain_exactly(segments, p_drop):
    blocks = mlp_blocks(16, p_drop=p_drop)
    x = torch.randn(4, 16, dtype=torch.float64)
    plain = grads(nn.Sequential(*blocks), x)
    ckpt = grads(CheckpointedStack(blocks, segments), x)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_checkpointed_saved_bytes_are_the_segment_inputs():
    """Per-block checkpointing keeps exactly the n block inputs (a = B d floats each); k segments
    keep k; the plain stack keeps every block's internals, counted from the shapes."""
    n, B, d = 16, 8, 16
    blocks = mlp_blocks(n, d=d, dtype=torch.float32)
    x = torch.randn(B, d, requires_grad=True)
    a = B * d * 4
    assert saved_activation_bytes(CheckpointedStack(blocks), x) == n * a
    for k in (1, 2, 4, 8):
        assert saved_activation_bytes(CheckpointedStack(blocks, k), x) == k * a
    # plain: per block the first linear's input (B d), GELU's input (B 4d) and the second linear's
    # input (B 4d, GELU's output; dropout p=0 is the identity and saves nothing)
    s = (B * d + 2 * B * 4 * d) * 4
    assert saved_activation_bytes(nn.Sequential(*blocks), x) == n * s


def test_memory_model_and_optimal_segments():
    n, a, s = 16, 100, 1600
    assert checkpoint_activation_bytes(n, a, s, n) == n * a + s
    assert checkpoint_activation_bytes(n, a, s, 1) == a + n * s
    assert checkpoint_activation_bytes(n, a, s, 3) == 3 * a + 6 * s
    for n, a, s in [(16, 100, 1600), (24, 1, 1), (100, 7, 3000), (5, 1000, 1), (1, 3, 4)]:
        brute = min(range(1, n + 1), key=lambda k: (k * a + -(-n // k) * s, k))
        k = optimal_segments(n, a, s)
        assert k == brute
        assert abs(k - (n * s / a) ** 0.5) <= max(1.0, 0.35 * (n * s / a) ** 0.5) or k in (1, n)


def test_no_grad_runs_plainly_and_bad_inputs():
    blocks = mlp_blocks(4)
    x = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(CheckpointedStack(blocks, 2)(x), nn.Sequential(*blocks)(x))
    with torch.inference_mode():
        torch.testing.assert_close(CheckpointedStack(blocks)(x), nn.Sequential(*blocks)(x))
    with pytest.raises(ValueError, match="segments"):
        CheckpointedStack(blocks, 5)
    with pytest.raises(TypeError, match="blocks: expected a non-empty sequence"):
        CheckpointedStack([])
    with pytest.raises(ValueError, match="segments"):
        checkpoint_activation_bytes(4, 1, 1, 0)
    with pytest.raises(ValueError, match="layer_bytes"):
        optimal_segments(4, 1, -1)


def test_checkpointed_stack_compiles():
    blocks = mlp_blocks(4, dtype=torch.float32)
    stack = CheckpointedStack(blocks, 2)
    compiled = torch.compile(stack, backend="aot_eager")
    x = torch.randn(3, 16, requires_grad=True)
    torch.testing.assert_close(compiled(x), nn.Sequential(*blocks)(x))
