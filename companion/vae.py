"""Variational autoencoders: BatchNorm on the posterior against KL vanishing, and the entropic autoencoder.

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# === vae-batchnorm ===
import math as _math
from typing import Callable as _Callable

import torch.nn as _nn

from ._validate import (check_choice as _check_choice, check_floating as _check_floating,
                        check_int as _check_int, check_range as _check_range,
                        check_same_shape as _check_same_shape)

__all__ += ["gaussian_kl", "BNMeanPosterior", "BNPosterior", "kl_lower_bound", "active_units",
            "TextVAE"]


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per row, eq. ``vae-kl`` of vae-batchnorm.

    ``mu``, ``sigma``: ``[..., d]`` floating tensors of the same shape; returns ``[...]``,
    ``0.5 * sum_j (mu_j^2 + sigma_j^2 - log(sigma_j^2 + eps) - 1)``. ``sigma`` may be negative
    (only sigma^2 enters), as after BatchNorm in :class:`BNPosterior`. The ``eps`` keeps
    ``log 0`` away; it shifts each dimension by about ``eps / (2 sigma^2)`` (2e-6 at sigma = 0.05
    for eps = 1e-8), so the result equals the exact KL to 1e-6 only for |sigma| >= about 0.1.
    """
    _check_floating("mu", mu)
    _check_floating("sigma", sigma)
    _check_same_shape("mu", mu, "sigma", sigma)
    if mu.dim() < 1:
        raise ValueError("mu: expected at least one dimension [..., d], got a scalar")
    _check_range("eps", eps, 0.0)
    var = sigma * sigma
    return 0.5 * (mu * mu + var - torch.log(var + eps) - 1.0).sum(-1)


class _GaussianPosterior(_nn.Module):
    """The plain VAE head: mu and log sigma^2 from two linear maps."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.d = d
        self.mu = _nn.Linear(d_in, d)
        self.log_var = _nn.Linear(d_in, d)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), torch.exp(0.5 * self.log_var(h))


class BNMeanPosterior(_nn.Module):
    """BN-VAE's posterior (Zhu et al. 2020), eq. ``vae-bn-mean`` of vae-batchnorm.

    ``forward(h [B, d_in]) -> (mu, sigma)``, both ``[B, d]``: ``mu = gamma * BN(W h) + beta``
    with a BatchNorm without affine parameters, a fixed ``gamma > 0`` and a learned shift
    ``beta`` (zeros at first); ``sigma = exp(log_var / 2)`` from a second linear head. In
    training mode (batch >= 2) every batch has ``(1/B) sum_i mu_ij^2 = beta_j^2 + gamma^2
    v/(v + bn_eps)`` for raw batch variance ``v``, so the batch KL is at least
    ``d gamma^2 / 2`` (:func:`kl_lower_bound`) unless a raw dimension is constant over the batch.
    ``bn_eps`` (keyword) is BatchNorm's epsilon, 1e-8 so that the bound is missed by at most
    ``bn_eps / v`` relative.
    """

    def __init__(self, d_in: int, d: int, gamma: float, *, bn_eps: float = 1e-8):
        super().__init__()
        _check_int("d_in", d_in, 1)
        _check_int("d", d, 1)
        _check_range("gamma", gamma, 0.0, low_open=True)
        _check_range("bn_eps", bn_eps, 0.0, low_open=True)
        self.d, self.gamma = d, float(gamma)
        self.mu = _nn.Linear(d_in, d)
        self.log_var = _nn.Linear(d_in, d)
        self.bn = _nn.BatchNorm1d(d, affine=False, eps=bn_eps)
        self.beta = _nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and h.shape[0] < 2:
            raise ValueError(f"h: BatchNorm in training mode needs a batch >= 2, got {h.shape[0]}")
        mu = self.gamma * self.bn(self.mu(h)) + self.beta
        return mu, torch.exp(0.5 * self.log_var(h))


class BNPosterior(_nn.Module):
    """Su's posterior: BatchNorm on both mu and sigma, eq. ``vae-bn-su`` of vae-batchnorm.

    ``forward(h [B, d_in]) -> (mu, sigma)``, both ``[B, d]``: ``mu = gamma_mu BN(W_mu h)``,
    ``sigma = gamma_sigma BN(W_sigma h)`` (BatchNorm without affine parameters, epsilon
    ``bn_eps``), with ``gamma_mu^2 = tau + (1 - tau) sigmoid(theta)`` and
    ``gamma_sigma^2 = (1 - tau) sigmoid(-theta)``, a learned ``theta`` per dimension (zeros at
    first). So each training batch has ``E[mu] = 0`` and ``E[mu^2] + E[sigma^2] = 1`` per
    dimension, the moments of the aggregate posterior that equal the N(0, I) prior, and a
    batch KL of at least ``d tau / 2``. ``sigma`` may be negative; only ``sigma^2`` is used.
    """

    def __init__(self, d_in: int, d: int, tau: float = 0.5, bn_eps: float = 1e-8):
        super().__init__()
        _check_int("d_in", d_in, 1)
        _check_int("d", d, 1)
        _check_range("tau", tau, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("bn_eps", bn_eps, 0.0, low_open=True)
        self.d, self.tau = d, float(tau)
        self.mu = _nn.Linear(d_in, d)
        self.sigma = _nn.Linear(d_in, d)
        self.bn_mu = _nn.BatchNorm1d(d, affine=False, eps=bn_eps)
        self.bn_sigma = _nn.BatchNorm1d(d, affine=False, eps=bn_eps)
        self.theta = _nn.Parameter(torch.zeros(d))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma_mu, gamma_sigma)``, each ``[d]``, with squares summing to 1."""
        s = torch.sigmoid(self.theta)
        return (torch.sqrt(self.tau + (1 - self.tau) * s),
                torch.sqrt((1 - self.tau) * torch.sigmoid(-self.theta)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and h.shape[0] < 2:
            raise ValueError(f"h: BatchNorm in training mode needs a batch >= 2, got {h.shape[0]}")
        g_mu, g_sigma = self.scales()
        return g_mu * self.bn_mu(self.mu(h)), g_sigma * self.bn_sigma(self.sigma(h))


def kl_lower_bound(module: _nn.Module) -> float:
    """The batch-KL floor a posterior guarantees in training mode, in nats.

    ``d gamma^2 / 2`` for :class:`BNMeanPosterior`, ``d tau / 2`` for :class:`BNPosterior`, 0 for
    the plain Gaussian head; a :class:`TextVAE` answers for its ``posterior``.
    """
    if isinstance(module, TextVAE):
        module = module.posterior
    if isinstance(module, BNMeanPosterior):
        return 0.5 * module.d * module.gamma ** 2
    if isinstance(module, BNPosterior):
        return 0.5 * module.d * module.tau
    if isinstance(module, _GaussianPosterior):
        return 0.0
    raise TypeError("module: expected a BNMeanPosterior, BNPosterior or TextVAE, got "
                    f"{type(module).__name__}")


@torch.no_grad()
def active_units(mu_fn: _Callable, data, threshold: float = 0.01) -> int:
    """Number of latent dimensions j with ``Cov_x(E[z_j | x]) > threshold`` (Burda et al. 2016).

    ``mu_fn(batch) -> [B, d]`` is the posterior mean (put BatchNorm layers in the mode you
    mean to measure); ``data`` is one tensor or an iterable of batches (a tuple is unpacked
    into ``mu_fn``). The variance is the population variance over all rows, in float64.
    """
    if not callable(mu_fn):
        raise TypeError(f"mu_fn: expected a callable, got {type(mu_fn).__name__}")
    _check_range("threshold", threshold, 0.0)
    batches = [data] if isinstance(data, torch.Tensor) else data
    mus = []
    for b in batches:
        m = mu_fn(*b) if isinstance(b, (tuple, list)) else mu_fn(b)
        if not isinstance(m, torch.Tensor) or m.dim() != 2:
            raise ValueError("mu_fn: expected it to return a [B, d] tensor")
        mus.append(m.double())
    if not mus:
        raise ValueError("data: expected at least one batch")
    mu = torch.cat(mus)
    if mu.shape[0] < 2:
        raise ValueError(f"data: expected at least 2 rows, got {mu.shape[0]}")
    return int((mu.var(0, unbiased=False) > threshold).sum())


class TextVAE(_nn.Module):
    """A small GRU sentence VAE (Bowman et al. 2016): the test bed of vae-batchnorm.

    ``x [B, T]`` token ids. The encoder GRU reads ``x``; its last state gives the posterior
    ``(mu, sigma)`` (``posterior``: ``"vanilla"`` Gaussian head, ``"bn_mean"``
    :class:`BNMeanPosterior` with ``gamma``, ``"bn_su"`` :class:`BNPosterior` with ``tau``);
    ``z = mu + sigma * eps``. The decoder GRU reads the previous token (a learned start
    embedding first) concatenated with ``z`` at every step, from the initial state
    ``tanh(W z)`` (teacher forcing), and returns logits ``[B, T, vocab_size]``.
    """

    def __init__(self, vocab_size: int, emb_dim: int, enc_hidden: int, dec_hidden: int, d: int,
                 posterior: str = "vanilla", *, gamma: float = 0.5, tau: float = 0.5,
                 bn_eps: float = 1e-8):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("emb_dim", emb_dim),
                        ("enc_hidden", enc_hidden), ("dec_hidden", dec_hidden), ("d", d)):
            _check_int(name, v, 1)
        _check_choice("posterior", posterior, ("vanilla", "bn_mean", "bn_su"))
        self.vocab_size, self.d, self.kind = vocab_size, d, posterior
        self.embed = _nn.Embedding(vocab_size, emb_dim)
        self.start = _nn.Parameter(torch.zeros(emb_dim))
        self.encoder = _nn.GRU(emb_dim, enc_hidden, batch_first=True)
        if posterior == "vanilla":
            self.posterior = _GaussianPosterior(enc_hidden, d)
        elif posterior == "bn_mean":
            self.posterior = BNMeanPosterior(enc_hidden, d, gamma, bn_eps=bn_eps)
        else:
            self.posterior = BNPosterior(enc_hidden, d, tau, bn_eps)
        self.init_state = _nn.Linear(d, dec_hidden)
        self.decoder = _nn.GRU(emb_dim + d, dec_hidden, batch_first=True)
        self.out = _nn.Linear(dec_hidden, vocab_size)

    def _check_ids(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2:
            raise ValueError("x: expected a [B, T] tensor of token ids (torch.long)")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)``, each ``[B, d]``."""
        self._check_ids(x)
        _, h = self.encoder(self.embed(x))
        return self.posterior(h[-1])

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, vocab_size]`` of ``x`` given ``z [B, d]``."""
        self._check_ids(x)
        emb = self.embed(x[:, :-1])
        start = self.start.expand(x.shape[0], 1, -1)
        inp = torch.cat([start, emb], 1)
        inp = torch.cat([inp, z.unsqueeze(1).expand(-1, x.shape[1], -1)], -1)
        h0 = torch.tanh(self.init_state(z)).unsqueeze(0)
        out, _ = self.decoder(inp, h0.contiguous())
        return self.out(out)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """``(logits [B, T, V], mu [B, d], sigma [B, d])`` with one sample ``z`` per row."""
        mu, sigma = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + sigma * noise, x), mu, sigma

    def loss(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """``(loss, recon, kl)``, batch means in nats per sentence: ``loss = recon + kl``."""
        logits, mu, sigma = self(x, generator=generator)
        recon = _nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none").sum(1)
        kl = gaussian_kl(mu, sigma)
        return (recon + kl).mean(), recon.mean(), kl.mean()


# === entropic-autoencoder ===
__all__ += ["knn_entropy", "EntropicAE", "eae_loss", "gaussianity_report"]

_EULER_GAMMA = 0.57721566490153286061


def _digamma_int(n: int) -> float:
    """psi(n) for an integer n >= 1: -gamma_E + sum_{j < n} 1/j (asymptotic series past 64)."""
    if n <= 64:
        return -_EULER_GAMMA + _math.fsum(1.0 / j for j in range(1, n))
    x = float(n)
    x2 = 1.0 / (x * x)
    return _math.log(x) - 0.5 / x - x2 * (1 / 12 - x2 * (1 / 120 - x2 / 252))


def _log_unit_ball_volume(d: int) -> float:
    """log of pi^(d/2) / Gamma(d/2 + 1), the volume of the unit ball in R^d."""
    return 0.5 * d * _math.log(_math.pi) - _math.lgamma(0.5 * d + 1)


def knn_entropy(z: torch.Tensor, k: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """Kozachenko-Leonenko estimate of the differential entropy (nats), eq. ``eae-knn``.

    ``z [n, d]`` floating; returns a 0-dim tensor,
    ``(d/n) sum_i log r_k(i) + log B_d + psi(n) - psi(k)``, where ``r_k(i)`` is the distance
    from ``z_i`` to its k-th nearest other row and ``B_d`` the unit ball's volume.
    Differentiable; ``log r = log(r^2 + eps) / 2`` keeps coinciding rows finite (and raises
    distances below about ``sqrt(eps)``). Squared distances come from the Gram matrix of the
    centred rows (memory ``[n, n]``; relative precision of a tiny ``r^2`` is limited by the
    rows' norms, as in ``torch.cdist``).
    """
    _check_floating("z", z)
    if z.dim() != 2:
        raise ValueError(f"z: expected a 2-D tensor [n, d], got shape {tuple(z.shape)}")
    n, d = z.shape
    _check_int("k", k, 1)
    if k >= n:
        raise ValueError(f"k: expected 1 <= k < n = {n}, got {k}")
    _check_range("eps", eps, 0.0, low_open=True)
    zc = z - z.mean(0, keepdim=True)
    sq = (zc * zc).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * zc @ zc.T).clamp_min(0)
    diag = torch.eye(n, dtype=torch.bool, device=z.device)
    d2 = d2.masked_fill(diag, float("inf"))
    r2 = d2.topk(k, dim=1, largest=False).values[:, -1]
    log_r = 0.5 * torch.log(r2 + eps)
    const = _log_unit_ball_volume(d) + _digamma_int(n) - _digamma_int(k)
    return d * log_r.mean() + const


class EntropicAE(_nn.Module):
    """Autoencoder with a BatchNorm (no affine parameters) on its code, eq. ``eae-loss``.

    ``forward(x) -> (x_hat, z)``: ``z = BN(encoder(x)) [B, d]``, ``x_hat = decoder(z)``; in
    training mode each batch's code has mean 0 and variance 1 per dimension.
    ``sample(n)`` decodes ``n`` draws of N(0, I), with the decoder in eval mode.
    """

    def __init__(self, encoder: _nn.Module, decoder: _nn.Module, d: int):
        super().__init__()
        _check_int("d", d, 1)
        self.encoder, self.decoder, self.d = encoder, decoder, d
        self.bn = _nn.BatchNorm1d(d, affine=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if h.dim() != 2 or h.shape[1] != self.d:
            raise ValueError(f"encoder: expected an output [B, {self.d}], got {tuple(h.shape)}")
        return self.bn(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decoder(z), z

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_int("n", n, 1)
        p = next(self.parameters())
        z = torch.randn(n, self.d, generator=generator, device=p.device, dtype=p.dtype)
        was = self.decoder.training
        self.decoder.eval()
        try:
            return self.decoder(z)
        finally:
            self.decoder.train(was)


def eae_loss(model: EntropicAE, x: torch.Tensor, lam: float, k: int = 1):
    """``(loss, recon, entropy)`` of eq. ``eae-loss``: ``recon - lam * entropy``.

    ``recon`` is the batch mean of the squared error summed over features;
    ``entropy`` is :func:`knn_entropy` of the batch's codes (keep the batch size fixed: the
    estimate's bias depends on it).
    """
    _check_floating("x", x)
    _check_range("lam", lam, 0.0)
    x_hat, z = model(x)
    _check_same_shape("x", x, "decoder output", x_hat)
    recon = (x_hat - x).pow(2).flatten(1).sum(1).mean()
    entropy = knn_entropy(z, k)
    return recon - lam * entropy, recon, entropy


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / _math.sqrt(2.0))


@torch.no_grad()
def gaussianity_report(z: torch.Tensor, *, k: int = 3, bandwidth: float | None = None) -> dict:
    """How close the rows of ``z [n, d]`` are to N(0, I); every figure is deterministic.

    ``mmd2``: the unbiased squared MMD with the RBF kernel ``exp(-|a-b|^2 / (2 h^2))``
    (``h = bandwidth``, default ``sqrt(d)``), with the N(0, I) expectations in closed form;
    ``ks_mean``, ``ks_max``: per-dimension Kolmogorov-Smirnov statistics against N(0, 1);
    ``entropy``: :func:`knn_entropy` with ``k``; ``entropy_max``: ``d/2 log(2 pi e)``;
    ``entropy_gap``: their difference. Floats, computed in float64.
    """
    _check_floating("z", z)
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z: expected a 2-D tensor [n >= 2, d], got shape {tuple(z.shape)}")
    n, d = z.shape
    h2 = float(d) if bandwidth is None else float(bandwidth) ** 2
    if bandwidth is not None:
        _check_range("bandwidth", bandwidth, 0.0, low_open=True)
    x = z.double()
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    kxx = torch.exp(-d2 / (2 * h2))
    kxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    kxy = (h2 / (h2 + 1)) ** (d / 2) * torch.exp(-sq / (2 * (h2 + 1))).mean()
    kyy = (h2 / (h2 + 2)) ** (d / 2)
    xs = x.sort(0).values
    cdf = _normal_cdf(xs)
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)[:, None]
    ks = torch.maximum((i / n - cdf).amax(0), (cdf - (i - 1) / n).amax(0))
    h = float(knn_entropy(x, k))
    h_max = 0.5 * d * _math.log(2 * _math.pi * _math.e)
    return {"mmd2": float(kxx + kyy - 2 * kxy), "ks_mean": float(ks.mean()),
            "ks_max": float(ks.max()), "entropy": h, "entropy_max": h_max,
            "entropy_gap": h_max - h}
