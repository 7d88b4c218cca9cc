"""companion.diffusion, the probability-flow ODE section (notebooks/amed-ode-sampler).

The Euler, Heun and DPM-2 steps are checked against diffusers' schedulers where their
definitions coincide:

* ``EDMEulerScheduler``: the EDM grid and one Euler step. We hand it our denoiser's output as
  ``pred_original_sample``; diffusers keeps its sigmas and the update in float32, so the
  comparison is in float32.
* ``HeunDiscreteScheduler`` (``prediction_type="sample"``): our ``heun_step`` on diffusers' own
  sigmas, including its last step onto sigma = 0, which both make an Euler step.
* ``KDPM2DiscreteScheduler``: our ``dpm2_step`` (midpoint at the geometric mean of the two
  times). It takes only eps-predictions, so we feed it ``(x - D) / sigma``; its step onto
  sigma = 0 interpolates towards log 0 and is left out (ours makes an Euler step there).

Where ours differs: the steps take any denoiser ``D(x, sigma)`` and any two times (the
schedulers keep a step counter over a fixed grid and derive sigmas from a DDPM beta schedule),
accept an optional precomputed ``v_cur`` (the analytical first step), and run in the input's
dtype instead of float32.
"""
import math

import pytest
import torch

from companion.diffusion import (AMEDScalars, amed_step, dpm2_step, edm_timesteps,
                                 empirical_denoiser, euler_step, fit_amed, gmm_denoiser,
                                 heun_step, ode_sample, ode_velocity, teacher_trajectory,
                                 trajectory_pca)

F64 = torch.float64
# diffusers' schedulers trip NumPy 2 deprecation warnings inside their own code
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*",
                                        "ignore::DeprecationWarning:numpy.*")


def gmm(dim=2, dtype=F64):
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, dim, generator=g, dtype=dtype)
    return dict(means=means, stds=torch.tensor([0.1, 0.2, 0.3, 0.15], dtype=dtype),
                weights=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=dtype))


def denoiser(dim=2, dtype=F64):
    p = gmm(dim, dtype)
    return lambda x, t: gmm_denoiser(x, t, **p)


def randn(*shape, seed=0, dtype=F64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- edm_timesteps -------------------------------------------------------------------------
def test_edm_timesteps_formula_and_diffusers():
    from diffusers import EDMEulerScheduler

    ts = edm_timesteps(6)
    assert ts.dtype == F64 and ts.shape == (6,)
    assert ts[0] == 80.0 and ts[-1] == 0.002 and bool((ts[1:] < ts[:-1]).all())
    i = torch.arange(6, dtype=F64)
    naive = (80 ** (1 / 7) + i / 5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(ts, naive, rtol=1e-12, atol=0)
    sched = EDMEulerScheduler()
    sched.set_timesteps(6)
    torch.testing.assert_close(ts.float(), sched.sigmas[:-1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(n=1), r"n: expected a value in \[2"),
    (dict(n=5, sigma_min=80.0, sigma_max=1.0), "sigma_min: expected sigma_min < sigma_max"),
    (dict(n=5, rho=0.0), r"rho: expected a value in \(0.0"),
    (dict(n=5, sigma_min=0.0), r"sigma_min: expected a value in \(0.0"),
])
def test_edm_timesteps_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        edm_timesteps(**kw)


def test_edm_timesteps_bad_type():
    with pytest.raises(TypeError, match="n: expected an int"):
        edm_timesteps(5.0)


# ---- the steps against diffusers ------------------------------------------------------------
def test_euler_step_matches_edm_euler_scheduler():
    from diffusers import EDMEulerScheduler

    D = denoiser(dtype=torch.float32)
    sched = EDMEulerScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(8)
    x = randn(16, 2, dtype=torch.float32, scale=80.0)
    ours = x.clone()
    sigmas = sched.sigmas
    for i, t in enumerate(sched.timesteps):
        sched.is_scale_input_called = True
        x = sched.step(torch.zeros_like(x), t, x, pred_original_sample=D(x, sigmas[i].item()),
                       return_dict=False)[0]
        if i + 1 < len(sigmas):
            ours = euler_step(D, ours, sigmas[i].item(), sigmas[i + 1].item())
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_heun_step_matches_heun_discrete_scheduler():
    from diffusers import HeunDiscreteScheduler

    D = denoiser()
    sched = HeunDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(6)
    x = randn(16, 2, seed=1, dtype=torch.float32) * sched.sigmas[0]
    ours = x.to(F64)
    for t in sched.timesteps:
        i = sched.step_index or 0
        x = sched.step(D(x.to(F64), sched.sigmas[i].item()).float(), t, x,
                       return_dict=False)[0]
    grid = [sched.sigmas[0].item()] + sched.sigmas[1::2].tolist()    # de-duplicated
    for t_cur, t_next in zip(grid, grid[1:]):
        ours = heun_step(D, ours, t_cur, t_next)
    assert grid[-1] == 0.0
    torch.testing.assert_close(ours.float(), x, rtol=1e-4, atol=1e-4)


def test_dpm2_step_matches_kdpm2_scheduler():
    from diffusers import KDPM2DiscreteScheduler

    D = denoiser()
    sched = KDPM2DiscreteScheduler()
    sched.set_timesteps(6)
    x = randn(16, 2, seed=2, dtype=torch.float32) * sched.sigmas[0]
    ours = x.to(F64)
    n_calls = 2 * (len(sched.timesteps) // 2)            # every step with sigma_next > 0
    for t in sched.timesteps[:n_calls]:
        i = sched.step_index or 0
        first = sched.state_in_first_order
        sig = (sched.sigmas[i] if first else sched.sigmas_interpol[i]).item()
        eps = (x.to(F64) - D(x.to(F64), sig)) / sig
        x = sched.step(eps.float(), t, x, return_dict=False)[0]
    grid = [sched.sigmas[0].item()] + sched.sigmas[1::2].tolist()
    for t_cur, t_next in zip(grid[: n_calls // 2], grid[1: n_calls // 2 + 1]):
        ours = dpm2_step(D, ours, t_cur, t_next)
    torch.testing.assert_close(ours.float(), x, rtol=1e-4, atol=1e-4)


# ---- naive references -------------------------------------------------------------------------
def test_steps_against_formulas_written_out():
    D = denoiser()
    x = randn(8, 2, scale=3.0)
    a, b = 3.0, 1.2
    v = lambda y, t: (y - D(y, t)) / t
    torch.testing.assert_close(euler_step(D, x, a, b), x + (b - a) * v(x, a))
    pred = x + (b - a) * v(x, a)
    torch.testing.assert_close(heun_step(D, x, a, b),
                               x + (b - a) * (v(x, a) + v(pred, b)) / 2)
    s = math.sqrt(a * b)
    torch.testing.assert_close(dpm2_step(D, x, a, b), x + (b - a) * v(x + (s - a) * v(x, a), s))
    r, c = 0.3, 0.9
    s = b**r * a ** (1 - r)
    torch.testing.assert_close(amed_step(D, x, a, b, r, c),
                               x + c * (b - a) * v(x + (s - a) * v(x, a), s))
    torch.testing.assert_close(ode_velocity(D, x, a), v(x, a))


def test_amed_special_cases_and_per_row_parameters():
    D = denoiser()
    x = randn(6, 2, scale=4.0)
    torch.testing.assert_close(amed_step(D, x, 5.0, 2.0, 0.5, 1.0), dpm2_step(D, x, 5.0, 2.0),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(amed_step(D, x, 5.0, 2.0, 0.0, 1.0), euler_step(D, x, 5.0, 2.0),
                               rtol=0, atol=1e-10)
    r = torch.linspace(0.1, 0.9, 6, dtype=F64)
    c = torch.linspace(0.8, 1.2, 6, dtype=F64)
    t_cur = torch.linspace(2.0, 7.0, 6, dtype=F64)
    batch = amed_step(D, x, t_cur, 1.0, r, c)
    rows = torch.cat([amed_step(D, x[i:i + 1], t_cur[i].item(), 1.0, r[i].item(),
                                c[i].item()) for i in range(6)])
    torch.testing.assert_close(batch, rows)


def test_heun_and_dpm2_are_euler_onto_zero():
    D = denoiser()
    x = randn(5, 2)
    torch.testing.assert_close(heun_step(D, x, 0.5, 0.0), euler_step(D, x, 0.5, 0.0))
    torch.testing.assert_close(dpm2_step(D, x, 0.5, 0.0), euler_step(D, x, 0.5, 0.0))
    assert ode_sample(D, x, torch.tensor([1.0, 0.5, 0.0], dtype=F64), "heun")[1] == 3


def test_solver_orders_on_gaussian_data():
    s = 0.5
    def D(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        t = t.reshape(-1, 1) if t.dim() else t
        return s**2 / (s**2 + t**2) * x
    x_T = randn(32, 4, scale=80.0)
    exact = x_T * math.sqrt((s**2 + 0.002**2) / (s**2 + 80.0**2))
    for name, order in [("euler", 1), ("heun", 2), ("dpm2", 2), ("amed", 2)]:
        errs = []
        for n in (16, 64):
            ts = edm_timesteps(n + 1)
            amed = AMEDScalars(n) if name == "amed" else None
            with torch.no_grad():
                x, _ = ode_sample(D, x_T, ts, name, amed=amed)
            errs.append(((x - exact).norm() / exact.norm()).item())
        slope = math.log(errs[0] / errs[1]) / math.log(4)
        assert abs(slope - order) < 0.2, (name, slope)


# ---- ode_sample ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, n_steps, afs, nfe", [
    ("euler", 4, False, 4), ("euler", 4, True, 3), ("heun", 3, False, 6), ("heun", 3, True, 5),
    ("dpm2", 2, False, 4), ("amed", 2, True, 3)])
def test_ode_sample_counts_evaluations(solver, n_steps, afs, nfe):
    calls = []
    p = gmm()
    D = lambda x, t: calls.append(1) or gmm_denoiser(x, t, **p)
    amed = AMEDScalars(n_steps) if solver == "amed" else None
    x, counted, traj = ode_sample(D, randn(3, 2, scale=80.0), edm_timesteps(n_steps + 1),
                                  solver, afs=afs, amed=amed, return_traj=True)
    assert counted == nfe == len(calls)
    assert traj.shape == (n_steps + 1, 3, 2) and torch.equal(traj[-1], x)


def test_afs_first_velocity_is_x_over_t():
    D = denoiser()
    x_T = randn(4, 2, scale=80.0)
    ts = edm_timesteps(3)
    ours, _ = ode_sample(D, x_T, ts, "euler", afs=True)
    x1 = x_T + (ts[1] - ts[0]).item() * x_T / 80.0
    torch.testing.assert_close(ours, euler_step(D, x1, ts[1].item(), ts[2].item()))


def test_amed_at_init_is_dpm2():
    D = denoiser()
    x_T, ts = randn(4, 2, scale=80.0), edm_timesteps(5)
    a, _ = ode_sample(D, x_T, ts, "amed", amed=AMEDScalars(4))
    b, _ = ode_sample(D, x_T, ts, "dpm2")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_teacher_trajectory_is_a_refined_solve():
    D = denoiser()
    x_T, ts = randn(4, 2, scale=80.0), edm_timesteps(4)
    _, _, traj = ode_sample(D, x_T, ts, "heun", return_traj=True)
    torch.testing.assert_close(teacher_trajectory(D, x_T, ts, 0), traj)
    fine = teacher_trajectory(D, x_T, ts, 3)
    assert fine.shape == traj.shape and torch.equal(fine[0], x_T)
    log_t = torch.linspace(math.log(80.0), math.log(0.002), 10, dtype=F64)
    _, _, dense = ode_sample(D, x_T, torch.cat([log_t.exp()[:1], log_t.exp()[1:]]), "heun",
                             return_traj=True)
    ts_log = log_t.exp()[[0, 3, 6, 9]]
    torch.testing.assert_close(teacher_trajectory(D, x_T, ts_log, 2), dense[[0, 3, 6, 9]])


def test_fit_amed_beats_dpm2_on_its_own_grid():
    # 4 steps (NFE 8); with 2 steps on this 2-D mixture the first step's error cannot be
    # undone by the second and AMED does not beat DPM-2 (the benchmark shows it)
    D = denoiser()
    ts = edm_timesteps(5)
    x_T = randn(32, 2, seed=3, scale=80.0)
    model = fit_amed(D, ts, 32, 4, 40, 0.05, x_T=x_T)
    assert isinstance(model, AMEDScalars) and model.n_steps == 4
    teacher = teacher_trajectory(D, x_T, ts, 4)[-1]
    with torch.no_grad():
        err_amed = (ode_sample(D, x_T, ts, "amed", amed=model)[0] - teacher).norm()
    err_dpm2 = (ode_sample(D, x_T, ts, "dpm2")[0] - teacher).norm()
    assert err_amed < 0.5 * err_dpm2
    g = torch.Generator().manual_seed(0)
    m2 = fit_amed(D, ts, 8, 2, 2, 0.05, dim=2, generator=g)
    assert bool(((m2.r > 0) & (m2.r < 1)).all() and (m2.c > 0).all())


# ---- trajectory_pca -------------------------------------------------------------------------
def test_trajectory_pca_against_sklearn_and_shapes():
    from sklearn.decomposition import PCA

    traj = randn(12, 3, 5).cumsum(0)
    ratios = trajectory_pca(traj)
    assert ratios.shape == (3, 5) and ratios.dtype == F64
    for b in range(3):
        ref = PCA().fit(traj[:, b].numpy()).explained_variance_ratio_
        torch.testing.assert_close(ratios[b], torch.from_numpy(ref), rtol=1e-8, atol=1e-12)
    t = torch.linspace(0, 1, 20, dtype=F64)[:, None, None]
    line = t * randn(1, 2, 6)                                     # straight paths
    plane = t * randn(1, 2, 6) + (t**2) * randn(1, 2, 6, seed=1)  # planar paths
    assert bool((trajectory_pca(line)[:, 0] > 1 - 1e-12).all())
    assert bool((trajectory_pca(plane)[:, :2].sum(1) > 1 - 1e-12).all())


# ---- gradients, extremes, modes -------------------------------------------------------------
def test_amed_step_gradcheck():
    D = denoiser()
    x = randn(3, 2, scale=2.0).requires_grad_()
    r = torch.tensor(0.3, dtype=F64, requires_grad=True)
    c = torch.tensor([0.9, 1.0, 1.1], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, c: amed_step(D, x, 2.0, 0.7, r, c), (x, r, c))
    assert torch.autograd.gradcheck(lambda x: heun_step(D, x, 2.0, 0.7), (x,))


def test_extreme_inputs_stay_finite():
    data = randn(50, 4, scale=3.0)
    D = lambda x, t: empirical_denoiser(x, t, data)
    x_T = randn(8, 4, scale=1e4)
    ts = edm_timesteps(5, sigma_min=1e-5, sigma_max=1e4)
    for name in ("euler", "heun", "dpm2", "amed"):
        amed = AMEDScalars(4) if name == "amed" else None
        x, _ = ode_sample(D, x_T, ts, name, amed=amed)
        assert torch.isfinite(x).all(), name
    p = trajectory_pca(torch.zeros(5, 2, 3, dtype=F64))         # a path that never moves
    assert torch.isfinite(p).all()


def test_inference_mode_and_compile():
    D = denoiser(dtype=torch.float32)
    x_T = randn(6, 2, dtype=torch.float32, scale=80.0)
    ts = edm_timesteps(4)
    eager, _ = ode_sample(D, x_T, ts, "heun")
    with torch.inference_mode():
        inf, _ = ode_sample(D, x_T, ts, "heun")
    torch.testing.assert_close(inf, eager)
    step = torch.compile(lambda x, a, b: amed_step(D, x, a, b, 0.4, 1.1), backend="eager",
                         dynamic=True)
    for n in (6, 9):
        x = randn(n, 2, dtype=torch.float32, scale=3.0)
        torch.testing.assert_close(step(x, 3.0, 1.0), amed_step(D, x, 3.0, 1.0, 0.4, 1.1))


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs():
    D = denoiser()
    x = randn(4, 2)
    with pytest.raises(ValueError, match=r"r: expected a value in \[0.0, 1.0\]"):
        amed_step(D, x, 2.0, 1.0, 1.5, 1.0)
    with pytest.raises(ValueError, match="r: expected every value in"):
        amed_step(D, x, 2.0, 1.0, torch.tensor([0.2, 0.3, -0.1, 0.5], dtype=F64), 1.0)
    with pytest.raises(ValueError, match="t_next: expected a time > 0 for the AMED step"):
        amed_step(D, x, 2.0, 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="t_cur: expected a time > 0"):
        euler_step(D, x, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"t_cur: expected shape \[\] or \[4\]"):
        euler_step(D, x, torch.ones(3, dtype=F64), 0.5)
    with pytest.raises(TypeError, match="denoiser: expected a callable"):
        heun_step(None, x, 2.0, 1.0)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        heun_step(D, torch.ones(4, 2, dtype=torch.long), 2.0, 1.0)
    with pytest.raises(ValueError, match="denoiser: expected an output of shape"):
        ode_velocity(lambda x, t: x[:, :1], x, 1.0)
    ts = edm_timesteps(3)
    with pytest.raises(ValueError, match="solver: expected one of 'euler' | 'heun'"):
        ode_sample(D, x, ts, "rk4")
    with pytest.raises(TypeError, match="amed: solver='amed' needs an AMEDScalars"):
        ode_sample(D, x, ts, "amed")
    with pytest.raises(ValueError, match="amed: expected 2 steps"):
        ode_sample(D, x, ts, "amed", amed=AMEDScalars(3))
    with pytest.raises(ValueError, match="amed: only used with solver='amed'"):
        ode_sample(D, x, ts, "heun", amed=AMEDScalars(2))
    with pytest.raises(ValueError, match="ts: expected strictly decreasing times"):
        ode_sample(D, x, ts.flip(0), "heun")
    with pytest.raises(ValueError, match="dim: expected the data dimension"):
        fit_amed(D, ts, 4, 1, 1, 0.1)
    with pytest.raises(ValueError, match="x_T: expected 4 rows"):
        fit_amed(D, ts, 4, 1, 1, 0.1, x_T=randn(3, 2))
    with pytest.raises(ValueError, match="traj: expected shape"):
        trajectory_pca(randn(4, 2))
    with pytest.raises(ValueError, match="n_steps: expected a value in"):
        AMEDScalars(0)
