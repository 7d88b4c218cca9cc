"""Diffusion models: the DDPM forward and reverse processes, exact Gaussian-mixture denoisers, and
the probability-flow ODE samplers (Euler, Heun, DPM-2, AMED).

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# === ddpm-demolish-rebuild / ddpm-bayes-denoise ===
# Su's notation throughout: alpha, beta, alpha_bar, beta_bar are the SQUARE ROOTS of the
# DDPM paper's 1 - beta_t, beta_t, alpha_bar_t, 1 - alpha_bar_t (diffusers'
# ``alphas_cumprod`` is ``alpha_bar ** 2`` here). Time t is an integer in 1..T; index 0 of
# every schedule tensor is the clean data (alpha_bar_0 = 1, beta_bar_0 = 0).
import math as _math
from dataclasses import dataclass as _dataclass

from ._validate import check_choice as _check_choice
from ._validate import check_floating as _check_floating
from ._validate import check_int as _check_int
from ._validate import check_range as _check_range
from ._validate import check_same_shape as _check_same_shape
from ._validate import check_tensor as _check_tensor
from ._validate import reduce as _reduce

__all__ += [
    "DiffusionSchedule", "linear_schedule", "q_sample", "q_posterior", "x0_from_eps",
    "ddpm_eps_loss", "ddpm_two_noise_loss", "ddpm_reverse_step", "ddpm_sample",
    "gmm_denoiser", "gmm_denoiser_vp", "empirical_denoiser", "sinusoidal_embedding",
    "TimeMLP",
]


@_dataclass(frozen=True)
class DiffusionSchedule:
    """A DDPM noise schedule in Su's notation: float64 tensors of shape ``[T + 1]``.

    ``x_t = alpha[t] x_{t-1} + beta[t] eps_t`` (one demolition step) and
    ``x_t = alpha_bar[t] x_0 + beta_bar[t] eps`` (all of them at once), with
    ``alpha**2 + beta**2 = 1`` and ``alpha_bar**2 + beta_bar**2 = 1``. Index 0 is clean:
    ``alpha[0] = alpha_bar[0] = 1`` and ``beta[0] = beta_bar[0] = 0``.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_bar: torch.Tensor
    beta_bar: torch.Tensor

    @property
    def T(self) -> int:
        return self.alpha.shape[0] - 1

    @classmethod
    def from_alpha(cls, alpha: torch.Tensor) -> "DiffusionSchedule":
        """Build the schedule from ``alpha[1..T]`` (a float tensor of shape ``[T]``)."""
        _check_floating("alpha", alpha)
        if alpha.dim() != 1 or alpha.numel() < 1:
            raise ValueError(f"alpha: expected a non-empty 1-D tensor, got {tuple(alpha.shape)}")
        alpha = alpha.detach().to(torch.float64)
        if not bool(((alpha > 0) & (alpha < 1)).all()):
            raise ValueError("alpha: every alpha_t must lie in (0, 1)")
        alpha = torch.cat([alpha.new_ones(1), alpha])
        beta = (1.0 - alpha**2).clamp_min(0.0).sqrt()
        # alpha_bar = prod alpha_s, through a sum of logs; beta_bar^2 = 1 - alpha_bar^2 via
        # -expm1(2 log alpha_bar), exact near t = 0 where 1 - alpha_bar^2 would cancel.
        log_ab = torch.cumsum(alpha.log(), 0)
        alpha_bar = log_ab.exp()
        beta_bar = (-torch.expm1(2.0 * log_ab)).clamp_min(0.0).sqrt()
        return cls(alpha, beta, alpha_bar, beta_bar)


def linear_schedule(T: int, beta_sq_max: float = 0.02, alpha_bar_T: float | None = None
                    ) -> DiffusionSchedule:
    """The article's schedule, linear in beta_t^2: ``alpha_t^2 = 1 - beta_sq_max * t / T``.

    With ``alpha_bar_T`` given, ``beta_sq_max`` is instead solved (bisection on the monotone
    ``log alpha_bar_T``) so that the last step reaches that ``alpha_bar_T``; this is how a
    short chain (T = 10) is made to demolish as completely as T = 1000.
    """
    _check_int("T", T, 1)
    if alpha_bar_T is None:
        _check_range("beta_sq_max", beta_sq_max, 0.0, 1.0, low_open=True)
    else:
        _check_range("alpha_bar_T", alpha_bar_T, 0.0, 1.0, low_open=True, high_open=True)
        s = torch.arange(1, T + 1, dtype=torch.float64) / T

        def log_ab(b: float) -> float:
            return 0.5 * torch.log1p(-b * s).sum().item()

        target = _math.log(alpha_bar_T)
        if log_ab(1.0 - 1e-15) > target:
            raise ValueError(f"alpha_bar_T: {alpha_bar_T!r} is below what T = {T} steps reach")
        lo, hi = 0.0, 1.0 - 1e-15
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if log_ab(mid) > target else (lo, mid)
        beta_sq_max = 0.5 * (lo + hi)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    alpha_sq = 1.0 - beta_sq_max * t / T
    if beta_sq_max >= 1.0:  # the last step demolishes completely: alpha_T = 0
        alpha_sq[-1] = 0.0
    alpha = torch.cat([torch.ones(1, dtype=torch.float64), alpha_sq.sqrt()])
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), (beta_sq_max * t / T).sqrt()])
    log_ab = torch.cumsum(torch.log(alpha), 0)
    alpha_bar = log_ab.exp()
    beta_bar = (-torch.expm1(2.0 * log_ab)).clamp_min(0.0).sqrt()
    return DiffusionSchedule(alpha, beta, alpha_bar, beta_bar)


def _check_sched(sched) -> None:
    if not isinstance(sched, DiffusionSchedule):
        raise TypeError(f"sched: expected a DiffusionSchedule, got {type(sched).__name__}")


def _check_t(t, sched, batch: int, *, low: int = 1) -> torch.Tensor:
    """t as a LongTensor [B] in low..T (an int is broadcast over the batch)."""
    if isinstance(t, int) and not isinstance(t, bool):
        t = torch.full((batch,), t, dtype=torch.long)
    _check_tensor("t", t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t: expected an integer tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t: expected shape ({batch},) to match the batch, got {tuple(t.shape)}")
    if not torch.compiler.is_compiling() and t.numel() and (
        int(t.min()) < low or int(t.max()) > sched.T
    ):
        raise ValueError(f"t: expected every value in {low}..{sched.T}, "
                         f"got {int(t.min())}..{int(t.max())}")
    return t


def _coef(v: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against ``like``, in its dtype/device."""
    out = v.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.dim() - 1))


def q_sample(x0: torch.Tensor, t, sched: DiffusionSchedule, eps: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Demolish ``x0 [B, ...]`` to step ``t`` (LongTensor [B] in 1..T) in one go:
    ``x_t = alpha_bar_t x0 + beta_bar_t eps`` (eq. ``one-shot``). Returns ``(x_t, eps)``."""
    _check_floating("x0", x0)
    _check_sched(sched)
    t = _check_t(t, sched, x0.shape[0] if x0.dim() else 0)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    else:
        _check_floating("eps", eps)
        _check_same_shape("x0", x0, "eps", eps)
    return _coef(sched.alpha_bar, t, x0) * x0 + _coef(sched.beta_bar, t, x0) * eps, eps


def q_posterior(x_t: torch.Tensor, x0: torch.Tensor, t, sched: DiffusionSchedule
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``p(x_{t-1} | x_t, x0) = N(mean, var I)`` (eq. ``posterior``):
    ``mean = alpha_t beta_bar_{t-1}^2 / beta_bar_t^2 x_t + alpha_bar_{t-1} beta_t^2 /
    beta_bar_t^2 x0`` and ``var = beta_bar_{t-1}^2 beta_t^2 / beta_bar_t^2`` (0 at t = 1).
    ``var`` has shape ``[B, 1, ..., 1]``."""
    _check_floating("x_t", x_t)
    _check_floating("x0", x0)
    _check_same_shape("x_t", x_t, "x0", x0)
    _check_sched(sched)
    t = _check_t(t, sched, x_t.shape[0])
    bb2 = sched.beta_bar**2
    b2 = sched.beta**2
    c_xt = sched.alpha[1:] * bb2[:-1] / bb2[1:]
    c_x0 = sched.alpha_bar[:-1] * b2[1:] / bb2[1:]
    var = bb2[:-1] * b2[1:] / bb2[1:]
    pad = lambda v: torch.cat([v.new_zeros(1), v])  # noqa: E731  (index by t, t >= 1)
    mean = _coef(pad(c_xt), t, x_t) * x_t + _coef(pad(c_x0), t, x_t) * x0
    return mean, _coef(pad(var), t, x_t)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t, sched: DiffusionSchedule
                ) -> torch.Tensor:
    """Invert the one-shot demolition: ``x0 = (x_t - beta_bar_t eps) / alpha_bar_t``."""
    _check_floating("x_t", x_t)
    _check_floating("eps", eps)
    _check_same_shape("x_t", x_t, "eps", eps)
    _check_sched(sched)
    t = _check_t(t, sched, x_t.shape[0])
    return (x_t - _coef(sched.beta_bar, t, x_t) * eps) / _coef(sched.alpha_bar, t, x_t)


def _draw_t(t, x0, sched, generator):
    if t is None:
        return torch.randint(1, sched.T + 1, (x0.shape[0],), generator=generator,
                             device=generator.device if generator is not None else "cpu"
                             ).to(x0.device)
    return _check_t(t, sched, x0.shape[0])


def _per_sample(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return _reduce(loss.reshape(loss.shape[0], -1).sum(1), reduction)


def _check_loss_args(model, x0, sched, t, reduction, generator):
    """The checks both DDPM losses make; returns the timesteps ``t`` (drawn when None)."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x_t, t), got {type(model).__name__}")
    _check_floating("x0", x0)
    _check_sched(sched)
    _check_choice("reduction", reduction, ("none", "mean", "sum"))
    return _draw_t(t, x0, sched, generator)


def ddpm_eps_loss(model, x0: torch.Tensor, sched: DiffusionSchedule, t=None,
                  reduction: str = "mean", *, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """DDPM's simple loss (eq. ``eps-loss``): ``||eps - model(alpha_bar_t x0 + beta_bar_t eps,
    t)||^2`` summed over features, per sample; ``t`` uniform on 1..T unless given."""
    t = _check_loss_args(model, x0, sched, t, reduction, generator)
    x_t, eps = q_sample(x0, t, sched, generator=generator)
    return _per_sample((eps - model(x_t, t)) ** 2, reduction)


def ddpm_two_noise_loss(model, x0: torch.Tensor, sched: DiffusionSchedule, t=None,
                        reduction: str = "mean", *, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """The naive rebuilding loss with both noises (eq. ``two-noise``):
    ``x_t = alpha_bar_t x0 + alpha_t beta_bar_{t-1} eps_bar + beta_t eps_t`` and target
    ``(beta_bar_t / beta_t) eps_t``, in the paper's eps convention. Its expectation equals
    ``ddpm_eps_loss``'s scaled by ``beta_t^2 / beta_bar_t^2`` plus a constant; same minimiser,
    far higher variance."""
    t = _check_loss_args(model, x0, sched, t, reduction, generator)
    eps_bar = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    eps_t = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    ab, a = _coef(sched.alpha_bar, t, x0), _coef(sched.alpha, t, x0)
    bb_prev, b = _coef(sched.beta_bar, t - 1, x0), _coef(sched.beta, t, x0)
    x_t = ab * x0 + a * bb_prev * eps_bar + b * eps_t
    target = _coef(sched.beta_bar, t, x0) / b * eps_t
    return _per_sample((target - model(x_t, t)) ** 2, reduction)


SIGMAS = ("beta", "posterior", "zero")


def ddpm_reverse_step(x_t: torch.Tensor, t, x0_hat: torch.Tensor, sched: DiffusionSchedule,
                      sigma: str = "beta", generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """One rebuilding step (eq. ``reverse``): the posterior mean of ``q_posterior`` with the
    denoised ``x0_hat`` in place of x0, plus ``sigma_t z``, where ``sigma_t`` is
    ``beta_t`` ("beta", exact for N(0, I) data), ``beta_bar_{t-1} beta_t / beta_bar_t``
    ("posterior", exact for a point mass) or 0 ("zero"). ``t`` may be an int or a
    LongTensor [B]; going from t to t - 1 (see ``ddpm_sample`` for strided steps)."""
    _check_choice("sigma", sigma, SIGMAS)
    mean, var = q_posterior(x_t, x0_hat, t, sched)
    if sigma == "zero":
        return mean
    t = _check_t(t, sched, x_t.shape[0])
    std = _coef(sched.beta, t, x_t) if sigma == "beta" else var.sqrt()
    z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    return mean + std * z


def _strided_schedule(sched: DiffusionSchedule, timesteps: torch.Tensor) -> DiffusionSchedule:
    """The sub-chain on ``0 < t_1 < ... < t_n``: alpha_bar keeps its values and each step's
    alpha is the ratio ``alpha_bar[t_i] / alpha_bar[t_{i-1}]`` (DDPM's respacing)."""
    ab = torch.cat([sched.alpha_bar.new_ones(1), sched.alpha_bar[timesteps]])
    bb = torch.cat([sched.beta_bar.new_zeros(1), sched.beta_bar[timesteps]])
    alpha = torch.cat([ab.new_ones(1), ab[1:] / ab[:-1]])
    beta = (-torch.expm1(2.0 * torch.log(alpha))).clamp_min(0.0).sqrt()
    return DiffusionSchedule(alpha, beta, ab, bb)


@torch.no_grad()
def ddpm_sample(model, shape, sched: DiffusionSchedule, sigma: str = "beta", *,
                prediction: str = "eps", timesteps=None,
                generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild from ``x_T ~ N(0, I)`` of ``shape`` by looping ``ddpm_reverse_step`` from T to 1.

    ``prediction="eps"``: ``model(x_t, t)`` predicts the paper's eps (x0 is recovered with
    ``x0_from_eps``); ``"x0"``: it returns ``E[x0 | x_t]`` directly (an exact denoiser such
    as ``gmm_denoiser_vp``). ``timesteps`` (increasing ints in 1..T, last = T) runs the
    strided sub-chain; the model is still called with the original t.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x_t, t), got {type(model).__name__}")
    _check_sched(sched)
    _check_choice("sigma", sigma, SIGMAS)
    _check_choice("prediction", prediction, ("eps", "x0"))
    shape = tuple(shape)
    if timesteps is None:
        sub, orig = sched, torch.arange(sched.T + 1)
    else:
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if ts.numel() < 1 or int(ts.min()) < 1 or int(ts.max()) > sched.T or bool(
            (ts[1:] <= ts[:-1]).any()
        ):
            raise ValueError(f"timesteps: expected strictly increasing ints in 1..{sched.T}")
        sub, orig = _strided_schedule(sched, ts), torch.cat([ts.new_zeros(1), ts])
    if device is None and generator is not None:
        device = generator.device
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    for i in range(sub.T, 0, -1):
        t_model = torch.full((shape[0],), int(orig[i]), dtype=torch.long, device=x.device)
        out = model(x, t_model)
        t_sub = torch.full((shape[0],), i, dtype=torch.long)
        x0_hat = x0_from_eps(x, out, t_sub, sub) if prediction == "eps" else out
        x = ddpm_reverse_step(x, t_sub, x0_hat, sub, sigma, generator)
    return x


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor of shape ``x.shape[:-1] + (1,)`` in x's dtype/device."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"sigma: expected a number or a tensor, got {type(sigma).__name__}")
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.dim() == x.dim() and sigma.shape[-1] == 1:
        sigma = sigma[..., 0]
    try:
        sigma = sigma.expand(x.shape[:-1])
    except RuntimeError:
        raise ValueError(f"sigma: expected a scalar or shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(sigma.shape)}") from None
    if not torch.compiler.is_compiling() and bool((sigma < 0).any()):
        raise ValueError("sigma: expected every noise level >= 0")
    return sigma.unsqueeze(-1)


def gmm_denoiser(x: torch.Tensor, sigma, means: torch.Tensor, stds: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """Exact ``E[x0 | x]`` for ``x = x0 + sigma eps`` and the isotropic mixture
    ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` (eq. ``gmm-denoiser``).

    ``x [..., D]``; ``sigma`` a number or a tensor of shape ``x.shape[:-1]`` (one level per
    point); ``means [K, D]``, ``stds [K]`` (>= 0), ``weights [K]`` (> 0, summing to 1).
    With ``v_k = s_k^2 + sigma^2`` the responsibilities are
    ``gamma_k ∝ w_k N(x; mu_k, v_k I)`` (a softmax of log-densities, stable for any sigma),
    and the answer is ``sum_k gamma_k (mu_k + s_k^2 / v_k (x - mu_k))``.
    """
    _check_floating("x", x)
    _check_floating("means", means)
    _check_floating("stds", stds)
    _check_floating("weights", weights)
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., D], got a scalar")
    K, D = means.shape if means.dim() == 2 else (None, None)
    if means.dim() != 2 or D != x.shape[-1]:
        raise ValueError(f"means: expected shape [K, {x.shape[-1]}], got {tuple(means.shape)}")
    if stds.shape != (K,):
        raise ValueError(f"stds: expected shape ({K},), got {tuple(stds.shape)}")
    if weights.shape != (K,):
        raise ValueError(f"weights: expected shape ({K},), got {tuple(weights.shape)}")
    if not torch.compiler.is_compiling():
        if bool((stds < 0).any()):
            raise ValueError("stds: expected every std >= 0")
        if bool((weights <= 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-5:
            raise ValueError(f"weights: expected positive weights summing to 1, "
                             f"got sum {float(weights.sum()):.6g}")
    sig = _as_sigma(sigma, x)                                   # [..., 1]
    means, stds, weights = (v.to(x.dtype) for v in (means, stds, weights))
    var = stds**2 + sig**2                                      # [..., K]
    diff = x.unsqueeze(-2) - means                              # [..., K, D]
    d2 = (diff**2).sum(-1)                                      # [..., K]
    logits = weights.log() - 0.5 * D * var.log() - 0.5 * d2 / var
    gamma = torch.softmax(logits, dim=-1)                       # [..., K]
    shrink = (stds**2 / var).unsqueeze(-1)                      # [..., K, 1]
    comp = means + shrink * diff                                # E[x0 | x, k]
    return (gamma.unsqueeze(-1) * comp).sum(-2)


def gmm_denoiser_vp(x_t: torch.Tensor, t, sched: DiffusionSchedule, means: torch.Tensor,
                    stds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Exact ``E[x0 | x_t]`` in the DDPM (variance-preserving) form
    ``x_t = alpha_bar_t x0 + beta_bar_t eps``: ``gmm_denoiser(x_t / alpha_bar_t,
    beta_bar_t / alpha_bar_t, ...)``. ``x_t [B, D]``, ``t`` a LongTensor [B] or an int."""
    _check_floating("x_t", x_t)
    _check_sched(sched)
    t = _check_t(t, sched, x_t.shape[0], low=0)
    ab = _coef(sched.alpha_bar, t, x_t)
    bb = _coef(sched.beta_bar, t, x_t)
    return gmm_denoiser(x_t / ab, (bb / ab)[..., 0], means, stds, weights)


def empirical_denoiser(x: torch.Tensor, sigma, data: torch.Tensor, chunk: int = 4096
                       ) -> torch.Tensor:
    """Exact ``E[x0 | x]`` when x0 is uniform on the rows of ``data [N, D]`` and
    ``x = x0 + sigma eps``: ``sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i``.

    The data are visited ``chunk`` rows at a time with a running log-sum-exp (the
    online-softmax of flash attention), so memory is ``O(M * chunk)`` for ``M`` queries
    rather than ``O(M * N)``. ``x [..., D]``; ``sigma`` a number or a tensor of shape
    ``x.shape[:-1]`` (> 0). The squared distance is expanded as
    ``|x|^2 - 2 x.y + |y|^2``; the ``|x|^2`` term is constant per query and dropped, so use
    float64 when ``sigma`` is tiny compared with ``|y|``.
    """
    _check_floating("x", x)
    _check_floating("data", data)
    _check_int("chunk", chunk, 1)
    if x.dim() < 1 or data.dim() != 2 or data.shape[-1] != x.shape[-1] or data.shape[0] < 1:
        raise ValueError(f"data: expected shape [N, {x.shape[-1] if x.dim() else 'D'}], "
                         f"got {tuple(data.shape)}")
    sig = _as_sigma(sigma, x)
    if not torch.compiler.is_compiling() and bool((sig <= 0).any()):
        raise ValueError("sigma: expected every noise level > 0")
    batch_shape, D = x.shape[:-1], x.shape[-1]
    q = x.reshape(-1, D)
    inv = 1.0 / sig.reshape(-1, 1) ** 2                         # [M, 1]
    # One matmul gives the logits and one gives both sums: with q' = [q / sigma^2,
    # -1 / (2 sigma^2), 0] and y' = [y, |y|^2, 1], q' y'^T = (x.y - |y|^2 / 2) / sigma^2 and
    # p y' = [sum p y, sum p |y|^2, sum p]; the middle column is not used.
    q_aug = torch.cat([q * inv, -0.5 * inv, torch.zeros_like(inv)], dim=-1)
    data = data.to(x.dtype)
    m = q.new_full((q.shape[0], 1), -float("inf"))              # running max of the logits
    acc = q.new_zeros((q.shape[0], D + 2))                      # running [sum p y, ., sum p]
    for start in range(0, data.shape[0], chunk):
        y = data[start:start + chunk]
        y_aug = torch.cat([y, (y * y).sum(-1, keepdim=True), torch.ones_like(y[:, :1])], -1)
        logits = q_aug @ y_aug.T                                # [M, c]
        m_new = torch.maximum(m, logits.detach().amax(-1, keepdim=True))
        p = (logits - m_new).exp_()
        acc = acc * torch.exp(m - m_new) + p @ y_aug
        m = m_new
    acc, s = acc[:, :D], acc[:, D + 1:]
    return (acc / s).reshape(batch_shape + (x.shape[-1],))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of (integer or real) times ``t [B]`` -> ``[B, dim]``:
    ``[sin(t w_j), cos(t w_j)]`` with ``w_j = 10000^(-j / (dim/2))``, j = 0..dim/2-1."""
    _check_tensor("t", t)
    _check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim: expected an even number, got {dim}")
    if t.dim() != 1:
        raise ValueError(f"t: expected shape [B], got {tuple(t.shape)}")
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    half = dim // 2
    freqs = torch.exp(-_math.log(10000.0)
                      * torch.arange(half, dtype=dtype, device=t.device) / half)
    ang = t.to(dtype)[:, None] * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class TimeMLP(torch.nn.Module):
    """A small eps-network for vectors: ``model(x_t [B, dim], t [B]) -> [B, dim]``.

    Input layer, then ``depth - 1`` residual blocks ``h + W2 silu(W1 silu(h + E_t))`` where
    ``E_t`` is a learned projection of ``sinusoidal_embedding(t, t_dim)`` (one network
    shares the weights of all T denoisers; t enters every block), then a linear output.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, t_dim: int = 64):
        super().__init__()
        _check_int("dim", dim, 1)
        _check_int("hidden", hidden, 1)
        _check_int("depth", depth, 1)
        _check_int("t_dim", t_dim, 2)
        self.t_dim = t_dim
        self.inp = torch.nn.Linear(dim, hidden)
        self.t_proj = torch.nn.Sequential(torch.nn.Linear(t_dim, hidden), torch.nn.SiLU(),
                                          torch.nn.Linear(hidden, hidden))
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))
            for _ in range(depth - 1)
        )
        self.out = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.t_proj(sinusoidal_embedding(t, self.t_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)



# === amed-ode-sampler ===
# The probability-flow ODE in EDM (VE) form, x_t = x_0 + t eps with t = sigma, solved from
# t = sigma_max down to sigma_min: dx/dt = v(x, t) = (x - D(x, t)) / t (eq. pf-ode of
# notebooks/amed-ode-sampler). Time runs DOWN, so every step size t_next - t_cur is < 0.
# A time argument is a number or a tensor of shape [] or [B] (one time per batch row).
__all__ += [
    "edm_timesteps", "ode_velocity", "euler_step", "heun_step", "dpm2_step", "amed_step",
    "ode_sample", "AMEDScalars", "teacher_trajectory", "fit_amed", "trajectory_pca",
]

_ODE_SOLVERS = ("euler", "heun", "dpm2", "amed")
_ODE_NFE_PER_STEP = {"euler": 1, "heun": 2, "dpm2": 2, "amed": 2}


def edm_timesteps(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """The EDM time grid (eq. edm-grid), float64 ``[n]``, decreasing from ``sigma_max`` to
    ``sigma_min``: ``t_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``, i = 0..n-1. ``n`` counts times, so it gives ``n - 1`` steps.
    Equal to diffusers' ``EDMEulerScheduler`` sigmas without its appended final 0."""
    _check_int("n", n, 2)
    _check_range("sigma_min", sigma_min, 0.0, low_open=True)
    _check_range("sigma_max", sigma_max, 0.0, low_open=True)
    _check_range("rho", rho, 0.0, low_open=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min: expected sigma_min < sigma_max = {sigma_max!r}, "
                         f"got {sigma_min!r}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ts = (hi + ramp * (lo - hi)) ** rho
    ts[0], ts[-1] = sigma_max, sigma_min                        # exact ends
    return ts


def _ode_time(name: str, t, x: torch.Tensor, *, positive: bool = True):
    """Check a time: a number (returned as float) or a tensor of shape [] or [B], returned
    in x's dtype/device with shape [B, 1, ..., 1] ready to broadcast against x."""
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(t).__name__}")
    if not isinstance(t, torch.Tensor):
        t = float(t)
        if not (t > 0 if positive else t >= 0):
            raise ValueError(f"{name}: expected a time {'> 0' if positive else '>= 0'}, "
                             f"got {t!r}")
        return t
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() > 1 and t.dim() == x.dim() and all(n == 1 for n in t.shape[1:]):
        t = t.reshape(t.shape[0])                               # already broadcast: [B, 1..]
    if t.dim() > 1 or (t.dim() == 1 and (x.dim() == 0 or t.shape[0] != x.shape[0])):
        raise ValueError(f"{name}: expected shape [] or [{x.shape[0] if x.dim() else 'B'}], "
                         f"got {tuple(t.shape)}")
    if not torch.compiler.is_compiling():
        bad = (t <= 0) if positive else (t < 0)
        if bool(bad.any()):
            raise ValueError(f"{name}: expected every time {'> 0' if positive else '>= 0'}")
    t = t.to(dtype=x.dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim())) if t.dim() else t


def _ode_is_zero(t) -> bool:
    return isinstance(t, float) and t == 0.0


def _ode_sigma_arg(t):
    """A time as the denoiser receives it: a number, or a tensor [] / [B] (not broadcast)."""
    if isinstance(t, torch.Tensor) and t.dim() > 1:
        return t.reshape(t.shape[0])
    return t


def ode_velocity(denoiser, x: torch.Tensor, t) -> torch.Tensor:
    """``v(x, t) = (x - D(x, t)) / t`` (eq. pf-ode), the probability-flow velocity for the
    VE form ``x = x_0 + t eps``. ``denoiser(x, sigma) -> E[x_0 | x]`` with x's shape;
    ``x [B, ...]`` floating; ``t`` > 0, a number or a tensor [] / [B]."""
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable D(x, sigma), got "
                        f"{type(denoiser).__name__}")
    _check_floating("x", x)
    t = _ode_time("t", t, x)
    d = denoiser(x, _ode_sigma_arg(t))
    if not isinstance(d, torch.Tensor) or d.shape != x.shape:
        raise ValueError(f"denoiser: expected an output of shape {tuple(x.shape)}, got "
                         f"{tuple(d.shape) if isinstance(d, torch.Tensor) else type(d)}")
    return (x - d) / t


def _ode_step_args(denoiser, x, t_cur, t_next, v_cur):
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable D(x, sigma), got "
                        f"{type(denoiser).__name__}")
    _check_floating("x", x)
    t_cur = _ode_time("t_cur", t_cur, x)
    t_next = _ode_time("t_next", t_next, x, positive=False)
    if v_cur is None:
        v_cur = ode_velocity(denoiser, x, t_cur)
    else:
        _check_floating("v_cur", v_cur)
        if v_cur.shape != x.shape:
            raise ValueError(f"v_cur: expected the shape of x {tuple(x.shape)}, "
                             f"got {tuple(v_cur.shape)}")
    return t_cur, t_next, v_cur


def euler_step(denoiser, x: torch.Tensor, t_cur, t_next, *, v_cur=None) -> torch.Tensor:
    """One Euler (DDIM) step, eq. euler: ``x + (t_next - t_cur) v(x, t_cur)``; 1 NFE (0 when
    the velocity ``v_cur`` at ``(x, t_cur)`` is passed, as the analytical first step does).
    ``t_next`` may be 0 (a final step onto the data)."""
    t_cur, t_next, v_cur = _ode_step_args(denoiser, x, t_cur, t_next, v_cur)
    return x + (t_next - t_cur) * v_cur


def heun_step(denoiser, x: torch.Tensor, t_cur, t_next, *, v_cur=None) -> torch.Tensor:
    """One Heun step (EDM's second-order sampler), eq. heun: an Euler predictor
    ``x~ = x + h v(x, t_cur)``, then ``x + h (v(x, t_cur) + v(x~, t_next)) / 2`` with
    ``h = t_next - t_cur``; 2 NFE. When ``t_next`` is the number 0 the corrector would
    divide by 0, so the step is Euler (1 NFE), as in EDM and diffusers' HeunDiscreteScheduler."""
    t_cur, t_next, v_cur = _ode_step_args(denoiser, x, t_cur, t_next, v_cur)
    h = t_next - t_cur
    x_pred = x + h * v_cur
    if _ode_is_zero(t_next):
        return x_pred
    return x + h * 0.5 * (v_cur + ode_velocity(denoiser, x_pred, t_next))


def dpm2_step(denoiser, x: torch.Tensor, t_cur, t_next, *, v_cur=None) -> torch.Tensor:
    """One DPM-Solver-2 step in its midpoint form, eq. dpm2: Euler to the geometric mean
    ``s = sqrt(t_cur t_next)``, then the whole step with the velocity there:
    ``x + (t_next - t_cur) v(x + (s - t_cur) v(x, t_cur), s)``; 2 NFE. This is diffusers'
    ``KDPM2DiscreteScheduler`` (k-diffusion's ``sample_dpm_2``). At ``t_next = 0`` (the
    number) the step is Euler (1 NFE), as there."""
    t_cur, t_next, v_cur = _ode_step_args(denoiser, x, t_cur, t_next, v_cur)
    if _ode_is_zero(t_next):
        return x + (t_next - t_cur) * v_cur
    s = (t_cur * t_next) ** 0.5
    x_mid = x + (s - t_cur) * v_cur
    return x + (t_next - t_cur) * ode_velocity(denoiser, x_mid, s)


def _ode_scalar_param(name: str, value, x: torch.Tensor, low=None, high=None):
    """r or c: a number, or a tensor [] / [B] (kept differentiable), broadcast against x."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        _check_range(name, float(value), low, high)
        return float(value)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != x.shape[0]):
        raise ValueError(f"{name}: expected shape [] or [{x.shape[0]}], got "
                         f"{tuple(value.shape)}")
    if not torch.compiler.is_compiling():
        lo_bad = low is not None and bool((value < low).any())
        hi_bad = high is not None and bool((value > high).any())
        if lo_bad or hi_bad or bool(torch.isnan(value).any()):
            raise ValueError(f"{name}: expected every value in [{low}, {high}]")
    value = value.to(dtype=x.dtype, device=x.device)
    return value.reshape(value.shape + (1,) * (x.dim() - value.dim())) if value.dim() \
        else value


def amed_step(denoiser, x: torch.Tensor, t_cur, t_next, r, c, *,
              v_cur=None) -> torch.Tensor:
    """One AMED-Solver step, eq. amed: the intermediate time ``s = t_next^r t_cur^(1-r)``
    (geometric interpolation, ``r`` in [0, 1]), an Euler predictor
    ``x_s = x + (s - t_cur) v(x, t_cur)``, then ``x + c (t_next - t_cur) v(x_s, s)``; 2 NFE.
    ``r = 1/2, c = 1`` is :func:`dpm2_step`; ``r = 0, c = 1`` is Euler (evaluated twice).
    ``r``, ``c`` (> 0) are numbers or tensors [] / [B]; gradients flow through them.
    ``t_next`` must be > 0 (``s`` would be 0 at ``r > 0``)."""
    t_cur, t_next, v_cur = _ode_step_args(denoiser, x, t_cur, t_next, v_cur)
    if _ode_is_zero(t_next):
        raise ValueError("t_next: expected a time > 0 for the AMED step, got 0.0")
    r = _ode_scalar_param("r", r, x, 0.0, 1.0)
    c = _ode_scalar_param("c", c, x, 0.0, None)
    if isinstance(r, float) and isinstance(t_cur, float) and isinstance(t_next, float):
        s = t_next ** r * t_cur ** (1.0 - r)
    else:
        t_cur_ = torch.as_tensor(t_cur, dtype=x.dtype, device=x.device)
        t_next_ = torch.as_tensor(t_next, dtype=x.dtype, device=x.device)
        s = torch.exp(r * torch.log(t_next_) + (1 - r) * torch.log(t_cur_))
    x_s = x + (s - t_cur) * v_cur
    return x + c * (t_next - t_cur) * ode_velocity(denoiser, x_s, s)


class AMEDScalars(torch.nn.Module):
    """AMED's per-step parameters without a feature network: ``r_n = sigmoid(r_logit[n])`` in
    (0, 1) and ``c_n = exp(log_c[n])`` > 0 for ``n_steps`` solver steps (2 n_steps
    parameters, float64). They start at ``r = 1/2, c = 1``, i.e. at DPM-Solver-2. The paper's
    ``g_phi`` predicts (r, c) from U-Net features; with an exact denoiser there are no
    features, and per-step constants are the simplest distillable choice."""

    def __init__(self, n_steps: int):
        super().__init__()
        _check_int("n_steps", n_steps, 1)
        self.n_steps = n_steps
        self.r_logit = torch.nn.Parameter(torch.zeros(n_steps, dtype=torch.float64))
        self.log_c = torch.nn.Parameter(torch.zeros(n_steps, dtype=torch.float64))

    @property
    def r(self) -> torch.Tensor:
        return torch.sigmoid(self.r_logit)

    @property
    def c(self) -> torch.Tensor:
        return torch.exp(self.log_c)

    def forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_n, c_n)`` of step ``n`` (0-based, from the noise end)."""
        return self.r[n], self.c[n]

    def extra_repr(self) -> str:
        return f"n_steps={self.n_steps}"


def _ode_check_ts(ts) -> list[float]:
    _check_tensor("ts", ts)
    if ts.dim() != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts: expected a 1-D tensor of at least 2 times, got shape "
                         f"{tuple(ts.shape)}")
    if not ts.is_floating_point():
        raise TypeError(f"ts: expected a floating-point tensor, got dtype {ts.dtype}")
    times = [float(t) for t in ts.tolist()]
    if any(not b < a for a, b in zip(times, times[1:])) or times[-1] < 0:
        raise ValueError("ts: expected strictly decreasing times >= 0 (noise end first)")
    if times[0] <= 0:
        raise ValueError("ts: expected a first time > 0")
    return times


def ode_sample(denoiser, x_T: torch.Tensor, ts: torch.Tensor, solver: str = "heun",
               afs: bool = False, amed=None, return_traj: bool = False):
    """Solve the probability-flow ODE from ``x_T`` at ``ts[0]`` through the times ``ts``
    (decreasing, e.g. :func:`edm_timesteps`) with one ``solver`` step ("euler" | "heun" |
    "dpm2" | "amed") per interval. Returns ``(x, nfe[, traj])``: the sample at ``ts[-1]``,
    the number of denoiser calls, and with ``return_traj`` the states at every time,
    ``[len(ts), *x_T.shape]``.

    ``afs``: the analytical first step (GENIE): the first velocity is taken as
    ``x_T / ts[0]`` (the denoiser of data with mean 0 returns about 0 at large noise),
    saving one NFE. ``amed``: an :class:`AMEDScalars` with ``len(ts) - 1`` steps, required
    by (and only by) ``solver="amed"``. NFE per step: 1 for Euler, 2 otherwise (1 for a
    Heun/DPM-2 step onto the time 0)."""
    _check_choice("solver", solver, _ODE_SOLVERS)
    _check_floating("x_T", x_T)
    if not isinstance(afs, bool):
        raise TypeError(f"afs: expected a bool, got {type(afs).__name__}")
    times = _ode_check_ts(ts)
    n_steps = len(times) - 1
    if solver == "amed":
        if not isinstance(amed, AMEDScalars):
            raise TypeError("amed: solver='amed' needs an AMEDScalars, got "
                            f"{type(amed).__name__}")
        if amed.n_steps != n_steps:
            raise ValueError(f"amed: expected {n_steps} steps (len(ts) - 1), got "
                             f"{amed.n_steps}")
        r_all, c_all = amed.r, amed.c
    elif amed is not None:
        raise ValueError(f"amed: only used with solver='amed', got solver={solver!r}")
    x, nfe = x_T, 0
    traj = [x] if return_traj else None
    for n, (t_cur, t_next) in enumerate(zip(times, times[1:])):
        v_cur = x / t_cur if (afs and n == 0) else None
        if solver == "euler":
            x = euler_step(denoiser, x, t_cur, t_next, v_cur=v_cur)
            cost = 1
        elif solver == "heun":
            x = heun_step(denoiser, x, t_cur, t_next, v_cur=v_cur)
            cost = 1 if t_next == 0.0 else 2
        elif solver == "dpm2":
            x = dpm2_step(denoiser, x, t_cur, t_next, v_cur=v_cur)
            cost = 1 if t_next == 0.0 else 2
        else:
            x = amed_step(denoiser, x, t_cur, t_next, r_all[n], c_all[n], v_cur=v_cur)
            cost = 2
        nfe += cost - (1 if v_cur is not None else 0)
        if return_traj:
            traj.append(x)
    if return_traj:
        return x, nfe, torch.stack(traj)
    return x, nfe


def _ode_refine(times: list[float], M: int) -> list[float]:
    """Insert ``M`` times between consecutive ``times``, evenly in log t (a final 0 keeps one
    plain interval)."""
    fine = [times[0]]
    for a, b in zip(times, times[1:]):
        if b > 0:
            fine += [a * (b / a) ** (k / (M + 1)) for k in range(1, M + 2)]
        else:
            fine.append(b)
    return fine


def teacher_trajectory(denoiser, x_T: torch.Tensor, ts: torch.Tensor, M: int,
                       solver: str = "heun") -> torch.Tensor:
    """The teacher's states at the student times ``ts``: ``solver`` run on a grid with ``M``
    extra times inserted between consecutive ``ts`` (evenly in log t), returned as
    ``[len(ts), *x_T.shape]`` (row 0 is ``x_T``). Runs without gradients."""
    _check_int("M", M, 0)
    _check_choice("solver", solver, ("euler", "heun", "dpm2"))
    times = _ode_check_ts(ts)
    fine = torch.tensor(_ode_refine(times, M), dtype=torch.float64)
    with torch.no_grad():
        _, _, traj = ode_sample(denoiser, x_T, fine, solver=solver, return_traj=True)
    keep = [0] + [k * (M + 1) for k in range(1, len(times))]
    if times[-1] == 0:                                         # one plain last interval
        keep[-1] = len(fine) - 1
    return traj[keep]


def fit_amed(denoiser, ts: torch.Tensor, n_traj: int, M: int, steps: int, lr: float, *,
             dim: int | None = None, x_T: torch.Tensor | None = None, afs: bool = False,
             teacher: torch.Tensor | None = None, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float64, device=None) -> AMEDScalars:
    """Distil :class:`AMEDScalars` for the grid ``ts`` (eq. amed-loss): ``n_traj`` starting
    points ``x_T = ts[0] * N(0, I_dim)`` (or the given ``x_T [n_traj, ...]``), a Heun teacher
    with ``M`` inserted steps (computed once, or the given ``teacher`` from
    :func:`teacher_trajectory`), then ``steps`` Adam steps at learning rate ``lr`` on the
    logits. Each student step starts from the student's previous output, detached, and is
    pulled towards the teacher's state at its end time by a squared error; the per-step
    losses are summed (Adam's per-parameter scaling makes their different sizes harmless).
    ``afs`` must match the evaluation's. ``ts[-1]`` must be > 0."""
    _check_int("n_traj", n_traj, 1)
    _check_int("M", M, 0)
    _check_int("steps", steps, 0)
    _check_range("lr", lr, 0.0, low_open=True)
    times = _ode_check_ts(ts)
    if times[-1] <= 0:
        raise ValueError("ts: AMED needs a last time > 0 (its intermediate time is "
                         "t_next^r t_cur^(1-r))")
    if x_T is None:
        if dim is None:
            raise ValueError("dim: expected the data dimension when x_T is not given")
        _check_int("dim", dim, 1)
        x_T = times[0] * torch.randn(n_traj, dim, generator=generator, dtype=dtype,
                                     device=device)
    else:
        _check_floating("x_T", x_T)
        if x_T.dim() < 1 or x_T.shape[0] != n_traj:
            raise ValueError(f"x_T: expected {n_traj} rows (n_traj), got shape "
                             f"{tuple(x_T.shape)}")
    if teacher is None:
        teacher = teacher_trajectory(denoiser, x_T, ts, M)
    elif teacher.shape != (len(times),) + tuple(x_T.shape):
        raise ValueError(f"teacher: expected shape {(len(times),) + tuple(x_T.shape)}, "
                         f"got {tuple(teacher.shape)}")
    model = AMEDScalars(len(times) - 1).to(device=x_T.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x, total = x_T, 0.0
        for n, (t_cur, t_next) in enumerate(zip(times, times[1:])):
            r, c = model(n)
            v_cur = x / t_cur if (afs and n == 0) else None
            x = amed_step(denoiser, x, t_cur, t_next, r, c, v_cur=v_cur)
            total = total + (x - teacher[n + 1]).square().sum(-1).mean()
            x = x.detach()
        total.backward()
        opt.step()
    return model


def trajectory_pca(traj: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios of each trajectory's principal components: ``traj [S, B,
    ...]`` (S states of B trajectories) -> float64 ``[B, min(S, D)]``, D the flattened state
    size, sorted decreasing and summing to 1 per row (eq. pca-ratio). Each trajectory is
    centred over its S states, as in PCA; its cumulative sums are what the AMED paper
    plots."""
    _check_floating("traj", traj)
    if traj.dim() < 3:
        raise ValueError(f"traj: expected shape [S, B, D...], got {tuple(traj.shape)}")
    S, B = traj.shape[:2]
    if S < 2:
        raise ValueError(f"traj: expected at least 2 states, got {S}")
    z = traj.detach().to(torch.float64).reshape(S, B, -1).transpose(0, 1)   # [B, S, D]
    z = z - z.mean(1, keepdim=True)
    var = torch.linalg.svdvals(z).square()                      # [B, min(S, D)]
    return var / var.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
