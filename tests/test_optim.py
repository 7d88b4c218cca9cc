"""Tests of companion.optim's AdaFactor part: the rank-1 I-divergence factors against numerical
optima, the beta2 schedule against Adam's bias correction, and the optimizer against
torch.optim.Adafactor step by step (state bytes, state_dict round trip)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.memory import optimizer_state_bytes
from companion.optim import (Adafactor, adafactor_beta2, adafactor_second_moment, i_divergence,
                             rank1_idiv_factor)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_i_divergence_nonnegative_and_zero_at_equality():
    C = torch.rand(5, 7, 9, dtype=F64, generator=gen()) + 1e-3
    A = torch.rand(5, 7, 9, dtype=F64, generator=gen(1)) + 1e-3
    assert (i_divergence(C, A) >= 0).all()
    u, v = torch.rand(7, dtype=F64) + 0.1, torch.rand(9, dtype=F64) + 0.1
    R1 = torch.outer(u, v)
    assert i_divergence(R1, R1).abs().item() < 1e-12
    # a hand evaluation on a 2 x 2 case, with a zero entry (0 log 0 = 0)
    C2 = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=F64)
    A2 = torch.tensor([[0.5, 1.0], [1.0, 4.0]], dtype=F64)
    want = (0 - 0 + 0.5) + 0 + (2 * torch.log(torch.tensor(2.0, dtype=F64)) - 2 + 1) \
        + (3 * torch.log(torch.tensor(0.75, dtype=F64)) - 3 + 4)
    torch.testing.assert_close(i_divergence(C2, A2), want)


def test_rank1_factors_are_the_optimum():
    C = torch.rand(6, 8, dtype=F64, generator=gen(2)) ** 2 + 1e-4
    a, b = rank1_idiv_factor(C)
    assert abs(b.sum().item() - 1) < 1e-12
    # stationarity: the gradient of the divergence w.r.t. (a, b) vanishes there
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    i_divergence(C, torch.outer(a_, b_)).backward()
    assert a_.grad.abs().max() < 1e-8 and b_.grad.abs().max() < 1e-8
    best = i_divergence(C, torch.outer(a, b)).item()
    # no random perturbation does better, and a numerical optimiser reaches the same value
    for s in range(100):
        pa = a * torch.exp(0.1 * torch.randn(6, dtype=F64, generator=gen(100 + s)))
        pb = b * torch.exp(0.1 * torch.randn(8, dtype=F64, generator=gen(200 + s)))
        assert i_divergence(C, torch.outer(pa, pb)).item() >= best
    la = torch.zeros(6, dtype=F64, requires_grad=True)
    lb = torch.zeros(8, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([la, lb], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        loss = i_divergence(C, torch.outer(la.exp(), lb.exp()))
        loss.backward()
        opt.step()
    assert best <= loss.item() * (1 + 1e-6) and loss.item() - best < 1e-6


def test_rank1_matrix_recovered_exactly_and_batched():
    u = torch.rand(3, 5, dtype=F64, generator=gen(3)) + 0.5
    v = torch.rand(3, 4, dtype=F64, generator=gen(4)) + 0.5
    C = u.unsqueeze(-1) * v.unsqueeze(-2)
    a, b = rank1_idiv_factor(C)
    torch.testing.assert_close(a.unsqueeze(-1) * b.unsqueeze(-2), C, rtol=1e-12, atol=0)
    a0, b0 = rank1_idiv_factor(torch.zeros(2, 3))
    assert (a0 == 0).all() and torch.allclose(b0, torch.full((3,), 1 / 3))


def test_second_moment_sum_and_mean_forms_agree():
    G2 = torch.rand(30, 20, generator=gen(5))
    R, C = G2.sum(-1), G2.sum(-2)
    v_sum = adafactor_second_moment(R, C)
    Rm, Cm = G2.mean(-1), G2.mean(-2)
    v_mean = torch.outer(Rm, Cm) / Rm.mean()
    torch.testing.assert_close(v_sum, v_mean, rtol=1e-6, atol=0)
    a, b = rank1_idiv_factor(G2)
    torch.testing.assert_close(v_sum, torch.outer(a, b), rtol=1e-6, atol=0)
    # dividing by the sum of the means is off by the factor m = 30
    torch.testing.assert_close(torch.outer(Rm, Cm) / Rm.sum() * 30, v_sum, rtol=1e-6, atol=0)


def test_beta2_schedule_reproduces_adam_and_the_running_mean():
    g2 = torch.rand(200, 3, dtype=F64, generator=gen(6))
    beta2 = 0.999
    v, vhat = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    run, mean = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    for t in range(1, 201):
        v = beta2 * v + (1 - beta2) * g2[t - 1]
        bt = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2 ** t)        # Adam's implied decay
        vhat = bt * vhat + (1 - bt) * g2[t - 1]
        b1 = adafactor_beta2(t, -1.0)                                  # c = 1
        run = b1 * run + (1 - b1) * g2[t - 1]
        mean = g2[:t].mean(0)
    torch.testing.assert_close(vhat, v / (1 - beta2 ** 200), rtol=1e-6, atol=0)
    torch.testing.assert_close(run, mean, rtol=1e-6, atol=0)
    assert adafactor_beta2(1) == 0.0
    torch.testing.assert_close(adafactor_beta2(torch.tensor([1.0, 32.0])),
                               torch.tensor([0.0, 1 - 32 ** -0.8]))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def batch(seed):
    g = gen(seed)
    return torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = batch(s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1, d=2.0),
                                dict(lr=1e-2, eps=(1e-6, 1e-3), beta2_decay=-0.5)])
def test_equals_torch_adafactor_in_clamp_mode(kw):
    a, b = mlp(), mlp()
    ours = Adafactor(a.parameters(), eps_mode="clamp", **{"eps": (None, 1e-3), **kw})
    theirs = torch.optim.Adafactor(b.parameters(), **{"eps": (None, 1e-3), **kw})
    train(a, ours, 50)
    train(b, theirs, 50)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert optimizer_state_bytes(ours) == optimizer_state_bytes(theirs)


def test_state_is_rows_plus_columns():
    m = mlp()
    opt = Adafactor(m.parameters())
    train(m, opt, 1)
    floats = (64 + 256) + 256 + (256 + 256) + 256 + (256 + 10) + 10
    assert optimizer_state_bytes(opt) == 4 * floats + 4 * 6   # + a float32 step per parameter


def test_state_dict_round_trip_continues_identically():
    a = mlp()
    opt = Adafactor(a.parameters(), lr=1e-2, weight_decay=0.01)
    train(a, opt, 10)
    b = copy.deepcopy(a)
    opt_b = Adafactor(b.parameters(), lr=1e-2, weight_decay=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(a, opt, 10, start=10)
    train(b, opt_b, 10, start=10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_add_mode_survives_dead_units_and_learns():
    """A dead ReLU unit and an always-zero input pixel make a row and a column of G^2 exactly 0:
    the factored form stays finite (no 0/0), and training reduces the loss."""
    m = mlp()
    with torch.no_grad():
        m[0].bias[:8] = -1e3               # 8 dead units
    opt = Adafactor(m.parameters(), lr=1e-2, scale_parameter=False)
    x, y = batch(0)
    x[:, :5] = 0                           # 5 dead inputs
    first = F.cross_entropy(m(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert F.cross_entropy(m(x), y).item() < 0.5 * first


def test_bf16_parameters_keep_float32_state():
    m = mlp().to(torch.bfloat16)
    opt = Adafactor(m.parameters())
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(m(x.bfloat16()).float(), y).backward()
    opt.step()
    states = [s for st in opt.state.values() for k, s in st.items() if k != "step"]
    assert all(s.dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in m.parameters())


def test_gradcheck():
    C = torch.rand(3, 4, dtype=F64, generator=gen(7)) + 0.1
    A = torch.rand(3, 4, dtype=F64, generator=gen(8)) + 0.1
    assert torch.autograd.gradcheck(i_divergence, (C.requires_grad_(), A.requires_grad_()))
    assert torch.autograd.gradcheck(lambda c: rank1_idiv_factor(c), (C,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="C: expected non-negative"):
        rank1_idiv_factor(-torch.ones(2, 2))
    with pytest.raises(ValueError, match="C: expected at least 2 dims"):
        rank1_idiv_factor(torch.ones(3))
    with pytest.raises(TypeError, match="C"):
        rank1_idiv_factor(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="A: expected positive"):
        i_divergence(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="A: expected the shape"):
        i_divergence(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="step"):
        adafactor_beta2(0)
    with pytest.raises(ValueError, match="beta2_decay"):
        adafactor_beta2(3, 0.5)
    params = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="lr"):
        Adafactor(params, lr=-1.0)
    with pytest.raises(ValueError, match="lr: a learning rate is required"):
        Adafactor(params, relative_step=False)
    with pytest.raises(ValueError, match="d"):
        Adafactor(params, d=0.5)
    with pytest.raises(ValueError, match="eps_mode"):
        Adafactor(params, eps_mode="max")
    with pytest.raises(ValueError, match="eps: expected a pair"):
        Adafactor(params, eps=1e-3)
