"""Tests of companion.optim's Tiger part: the optimizer against a naive per-parameter loop and
against lion-pytorch's Lion, lazy embedding rows, the state (one buffer, state_dict round trip),
and the closed forms of the sign drift and of Adam's ghost drift against simulation."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from companion.memory import optimizer_state_bytes
from companion.optim import (Tiger, adam_ghost_drift, lazy_rows_mask, sign_drift_closed_form,
                             sign_update_fixed_point)

F64 = torch.float64


class Tiny(nn.Module):
    """An embedding (sparse row gradients), a matrix, a bias and a LayerNorm."""

    def __init__(self, V=12, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, d)
        self.fc = nn.Linear(d, 5)
        self.ln = nn.LayerNorm(5)

    def forward(self, idx):
        return self.ln(self.fc(self.emb(idx))).square().mean()


def groups(model, **emb):
    return [{"params": [model.emb.weight], "embedding": True, **emb},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("emb")]}]


def batches(n, V=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V // 2, (4,), generator=g) for _ in range(n)]  # rows >= V/2 unused


def naive_tiger(model, data, lr, beta, wd, rms_scale, lazy=False, emb_rows=True):
    """Per-parameter, per-element reference of eq. (tiger), written independently."""
    m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for idx in data:
        model.zero_grad()
        model(idx).backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = p.grad
                is_emb = n.startswith("emb") and emb_rows
                rms = math.sqrt(float((p ** 2).mean()))      # of the tensor before the step
                for i in range(p.shape[0]):
                    if is_emb and lazy and not bool((g[i] != 0).any()):
                        continue
                    m[n][i] = beta * m[n][i] + (1 - beta) * g[i]
                    if rms_scale and is_emb:
                        eta = lr * math.sqrt(float((p[i] ** 2).mean()))
                    elif rms_scale and p.dim() >= 2:
                        eta = lr * rms
                    else:
                        eta = lr
                    p[i] = p[i] - eta * (torch.sign(m[n][i]) + wd * p[i])
    return model


@pytest.mark.parametrize("rms_scale", [True, False])
@pytest.mark.parametrize("lazy", [True, False])
def test_tiger_equals_naive_loop(rms_scale, lazy):
    data = batches(20)
    a, b = Tiny(), Tiny()
    opt = Tiger(groups(a), lr=3e-2, beta=0.9, weight_decay=0.1, rms_scale=rms_scale,
                lazy_embeddings=lazy)
    for idx in data:
        opt.zero_grad()
        a(idx).backward()
        opt.step()
    naive_tiger(b, data, 3e-2, 0.9, 0.1, rms_scale, lazy)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)


def test_tiger_untagged_uses_tensor_rms_and_weight_decay_alone():
    """No gradient signal (g = 0 after a first step): only the frozen sign and the decay act."""
    model = Tiny()
    data = batches(20)
    opt = Tiger(model.parameters(), lr=1e-2, beta=0.9, weight_decay=0.5)
    for idx in data:
        opt.zero_grad()
        model(idx).backward()
        opt.step()
    ref = naive_tiger(Tiny(), data, 1e-2, 0.9, 0.5, True, emb_rows=False)
    for pa, pb in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    # pure weight decay: with g = 0 and m = 0, sign(m) = 0 and theta shrinks by (1 - lr wd)
    p = nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = Tiger([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -3.0]) * (1 - 0.1 * 0.5))


def test_tiger_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    data = batches(20)
    a, b = Tiny(), Tiny()
    beta = 0.95
    opt_a = Tiger(a.parameters(), lr=1e-2, beta=beta, weight_decay=0.1, rms_scale=False)
    opt_b = lion_pytorch.Lion(b.parameters(), lr=1e-2, betas=(beta, beta), weight_decay=0.1)
    for idx in data:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(idx).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_lazy_rows_bit_identical_and_eager_rows_drift():
    model = Tiny()
    opt = Tiger(groups(model), lr=1e-2, weight_decay=0.1, lazy_embeddings=True)
    eager = Tiny()
    opt_e = Tiger(groups(eager), lr=1e-2, weight_decay=0.1)
    for i, idx in enumerate(batches(10)):
        before = model.emb.weight.detach().clone()
        m_before = opt.state[model.emb.weight]["momentum"].clone() if i else None
        for mdl, o in ((model, opt), (eager, opt_e)):
            o.zero_grad()
            mdl(idx).backward()
            o.step()
        untouched = ~lazy_rows_mask(model.emb.weight.grad)
        assert untouched.sum() >= 6
        assert torch.equal(model.emb.weight[untouched], before[untouched])
        if m_before is not None:
            m = opt.state[model.emb.weight]["momentum"]
            assert torch.equal(m[untouched], m_before[untouched])
        assert not torch.equal(model.emb.weight[~untouched], before[~untouched])
    # an eagerly updated row that got a gradient once keeps moving without one
    seen = torch.unique(torch.cat(batches(10)))
    last = batches(10)[-1]
    ghost = [int(k) for k in seen if k not in last]
    assert ghost
    w0 = eager.emb.weight.detach()[ghost].clone()
    opt_e.zero_grad()
    eager(torch.tensor([11])).backward()
    opt_e.step()
    assert not torch.equal(eager.emb.weight.detach()[ghost], w0)


def test_lazy_rows_mask_reference_and_bad_input():
    g = torch.zeros(5, 3)
    g[1, 2] = 1e-30
    g[3] = -2.0
    assert lazy_rows_mask(g).tolist() == [False, True, False, True, False]
    g3 = torch.zeros(4, 2, 2)
    g3[2, 1, 1] = 1.0
    assert lazy_rows_mask(g3).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="grad: expected a gradient of rows"):
        lazy_rows_mask(torch.ones(3))
    with pytest.raises(TypeError, match="grad: expected a floating-point tensor"):
        lazy_rows_mask(torch.ones(3, 2, dtype=torch.long))


def test_state_is_one_buffer_and_state_dict_round_trip_bitwise():
    data = batches(16)
    model = Tiny()
    opt = Tiger(groups(model), lr=1e-2, weight_decay=0.1, lazy_embeddings=True)

    def run(mdl, o, chunk):
        for idx in chunk:
            o.zero_grad()
            mdl(idx).backward()
            o.step()

    run(model, opt, data[:8])
    for p in model.parameters():
        assert list(opt.state[p]) == ["momentum"]
    n_params = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) == 4 * n_params
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, data[8:])
    clone = Tiny(seed=5)
    clone.load_state_dict(saved_model)
    opt2 = Tiger(groups(clone), lr=1e-2, weight_decay=0.1, lazy_embeddings=True)
    opt2.load_state_dict(saved_opt)
    run(clone, opt2, data[8:])
    for pa, pb in zip(model.parameters(), clone.parameters()):
        assert torch.equal(pa, pb)


def test_tiger_bad_hyperparameters():
    p = [nn.Parameter(torch.ones(3, 2))]
    with pytest.raises(ValueError, match="lr: expected"):
        Tiger(p, lr=-1.0)
    with pytest.raises(ValueError, match="beta: expected"):
        Tiger(p, beta=1.0)
    with pytest.raises(ValueError, match="weight_decay: expected"):
        Tiger(p, weight_decay=-0.1)
    with pytest.raises(TypeError, match="rms_scale: expected a bool"):
        Tiger(p, rms_scale=1)
    with pytest.raises(ValueError, match="lazy_embeddings: True needs a param group"):
        Tiger(p, lazy_embeddings=True)
    with pytest.raises(ValueError, match="beta: expected"):
        Tiger([{"params": p, "beta": -0.5}])
    with pytest.raises(ValueError, match="an embedding group holds"):
        Tiger([{"params": [nn.Parameter(torch.ones(3))], "embedding": True}])
    emb = nn.Embedding(4, 2, sparse=True)
    opt = Tiger(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_tiger_under_compile_and_float64():
    model = Tiny().double()
    opt = Tiger(groups(model), lr=1e-2, weight_decay=0.1)
    ref = naive_tiger(Tiny().double(), batches(5), 1e-2, 0.965, 0.1, True)

    @torch.compile(backend="eager")
    def step():
        opt.step()

    for idx in batches(5):
        opt.zero_grad()
        model(idx).backward()
        step()
    for pa, pb in zip(model.parameters(), ref.parameters()):
        assert pa.dtype == F64
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12)


def test_sign_update_fixed_point():
    assert sign_update_fixed_point(0.01) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="weight_decay: expected"):
        sign_update_fixed_point(0.0)


def test_sign_drift_closed_form_against_recursion():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(50, dtype=F64, generator=g)
    s = torch.sign(torch.randn(50, dtype=F64, generator=g))
    theta0 = theta.clone()
    lr, wd = 1e-2, 0.3
    for _ in range(500):
        theta = theta - lr * (s + wd * theta)
    torch.testing.assert_close(sign_drift_closed_form(theta0, s, lr, wd, 500), theta,
                               rtol=1e-10, atol=0)
    # a trajectory through a step tensor, lambda = 0, and the limit -s / lambda
    traj = sign_drift_closed_form(theta0, s, lr, wd, torch.arange(3)[:, None])
    assert traj.shape == (3, 50)
    torch.testing.assert_close(traj[0], theta0)
    torch.testing.assert_close(sign_drift_closed_form(theta0, s, lr, 0.0, 7), theta0 - 7 * lr * s)
    far = sign_drift_closed_form(theta0, s, lr, wd, int(40 / (lr * wd)))
    torch.testing.assert_close(far, -s / wd, rtol=0, atol=1e-9)
    # extreme input: a huge step count stays finite
    assert torch.isfinite(sign_drift_closed_form(theta0, s, lr, wd, 10 ** 12)).all()
    with pytest.raises(ValueError, match="steps: expected"):
        sign_drift_closed_form(theta0, s, lr, wd, -1)
    with pytest.raises(ValueError, match="lr: expected lr \\* weight_decay < 1"):
        sign_drift_closed_form(theta0, s, 10.0, 0.5, 3)
    with pytest.raises(TypeError, match="theta0: expected a floating-point tensor"):
        sign_drift_closed_form(torch.ones(2, dtype=torch.long), s, lr, wd, 3)


def test_sign_drift_closed_form_is_differentiable():
    theta0 = torch.randn(4, dtype=F64, requires_grad=True)
    s = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda t: sign_drift_closed_form(t, s, 0.1, 0.2, 5),
                                    (theta0,))


def test_adam_ghost_drift_against_torch_adam():
    """torch.optim.Adam after many steps with gradients, then gradients of 0."""
    p = nn.Parameter(torch.zeros(8, dtype=F64))
    opt = torch.optim.Adam([p], lr=1e-3, eps=1e-300)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(8, dtype=F64, generator=g)
    for _ in range(6000):
        p.grad = bias + torch.randn(8, dtype=F64, generator=g)
        opt.step()
    st = opt.state[p]
    t = float(st["step"])
    m0 = st["exp_avg"] / (1 - 0.9 ** t)
    v0 = st["exp_avg_sq"] / (1 - 0.999 ** t)
    start = p.detach().clone()
    for _ in range(200):
        p.grad = torch.zeros(8, dtype=F64)
        opt.step()
    drift = p.detach() - start
    pred = adam_ghost_drift(m0, v0, 1e-3, steps=200)
    torch.testing.assert_close(drift, pred, rtol=1e-3, atol=0)
    bound = 1e-3 * (m0.abs() / v0.sqrt()) / (1 - 0.9 / math.sqrt(0.999))
    assert bool((drift.abs() <= bound).all())
    torch.testing.assert_close(adam_ghost_drift(m0, v0, 1e-3), pred, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="v0: expected a positive"):
        adam_ghost_drift(1.0, 0.0, 1e-3)
    with pytest.raises(ValueError, match="betas: expected beta1 < sqrt"):
        adam_ghost_drift(1.0, 1.0, 1e-3, betas=(0.99, 0.9))


def test_functions_under_inference_mode_and_compile():
    theta0 = torch.randn(5)
    s = torch.sign(torch.randn(5))
    eager = sign_drift_closed_form(theta0, s, 1e-2, 0.1, torch.arange(4)[:, None])
    with torch.inference_mode():
        torch.testing.assert_close(
            sign_drift_closed_form(theta0, s, 1e-2, 0.1, torch.arange(4)[:, None]), eager)
        g = torch.zeros(4, 3)
        g[2, 0] = 1.0
        assert lazy_rows_mask(g).tolist() == [False, False, True, False]
    compiled = torch.compile(lazy_rows_mask, backend="eager", dynamic=True)
    for V in (4, 7):
        g = torch.zeros(V, 3)
        g[1, 1] = -1.0
        assert torch.equal(compiled(g), lazy_rows_mask(g))
