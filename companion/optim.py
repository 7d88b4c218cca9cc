"""Optimizers: AdaFactor (the factored second moment, its beta2 schedule, update clipping) and
Tiger (one-buffer sign momentum; the drift of sign updates with weight decay, lazy rows).

Each section below belongs to one notebook of the book (notebooks/<slug>.ipynb).
"""
from __future__ import annotations

import math

import torch

from ._validate import check_choice, check_floating, check_range

__all__: list[str] = []


def _closure_loss(closure):
    """``step(closure)``'s convention: re-evaluate the loss, with gradients on, when given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_grad(params, name: str, hint: str = ""):
    """The parameters holding a gradient; a sparse one raises (both optimizers need dense)."""
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name}: sparse gradients are not supported{hint}")
        yield p


# === adafactor ===
__all__ += ["rank1_idiv_factor", "i_divergence", "adafactor_beta2", "adafactor_second_moment",
            "Adafactor"]


def rank1_idiv_factor(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 factors ``a b^T`` of a non-negative ``C [..., m, n]`` that minimise the
    I-divergence :func:`i_divergence`, in closed form with ``sum_j b_j = 1``::

        a_i = sum_j C_ij,    b_j = sum_i C_ij / sum_ij C_ij

    (the row sums, and the column sums over the total). Returns ``a [..., m]``, ``b [..., n]``.
    A zero matrix has no normalised ``b``: it gets ``b = 1/n`` (then ``a = 0`` and ``a b^T = C``)."""
    check_floating("C", C)
    if C.dim() < 2:
        raise ValueError(f"C: expected at least 2 dims [..., m, n], got shape {tuple(C.shape)}")
    if bool((C < 0).any()) or bool(torch.isnan(C).any()):
        raise ValueError("C: expected non-negative entries (a second moment), got a negative "
                         "or NaN entry")
    a = C.sum(-1)
    col = C.sum(-2)
    total = a.sum(-1, keepdim=True)
    b = torch.where(total > 0, col / total.clamp(min=torch.finfo(C.dtype).tiny),
                    torch.full_like(col, 1.0 / C.shape[-1]))
    return a, b


def i_divergence(C: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Generalised KL (I-)divergence ``sum_ij C_ij log(C_ij / A_ij) - C_ij + A_ij >= 0`` over the
    last two dims (``0 log 0 = 0``); zero iff ``A = C``. ``A`` must be positive."""
    check_floating("C", C)
    check_floating("A", A)
    if C.shape != A.shape:
        raise ValueError(f"A: expected the shape of C {tuple(C.shape)}, got {tuple(A.shape)}")
    if C.dim() < 2:
        raise ValueError(f"C: expected at least 2 dims [..., m, n], got shape {tuple(C.shape)}")
    if not bool((A > 0).all()):
        raise ValueError("A: expected positive entries (log C/A must be finite)")
    if bool((C < 0).any()):
        raise ValueError("C: expected non-negative entries")
    return (torch.xlogy(C, C) - C * torch.log(A) - C + A).sum((-2, -1))


def adafactor_beta2(step, beta2_decay: float = -0.8):
    """The increasing decay ``beta2_t = 1 - t^(-c)`` with ``c = -beta2_decay`` (torch's sign):
    0 at ``t = 1`` (the state is just ``G_1^2``), the running mean of all ``G_s^2`` for ``c = 1``,
    and tending to 1 so that late steps change the second moment less and less."""
    check_range("beta2_decay", beta2_decay, -1.0, 0.0, high_open=True)
    if isinstance(step, torch.Tensor):
        if bool((step < 1).any()):
            raise ValueError("step: expected steps >= 1")
        return 1.0 - step.to(torch.promote_types(step.dtype, torch.float32)) ** beta2_decay
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 1:
        raise ValueError(f"step: expected a step >= 1, got {step!r}")
    return 1.0 - float(step) ** beta2_decay


def adafactor_second_moment(R: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The factored estimate ``V_hat = R C^T / (1^T R)`` ``[..., m, n]`` from the row statistic
    ``R [..., m]`` (sums over columns of ``G^2``) and the column statistic ``C [..., n]`` (sums over
    rows). With row and column *means* the same ``V_hat`` is ``R_bar C_bar^T / mean(R_bar)``:
    dividing by the sum of the means instead would be off by a factor m."""
    check_floating("R", R)
    check_floating("C", C)
    if R.dim() < 1 or C.dim() < 1 or R.shape[:-1] != C.shape[:-1]:
        raise ValueError(f"R, C: expected [..., m] and [..., n] with equal leading dims, got "
                         f"{tuple(R.shape)} and {tuple(C.shape)}")
    return R.unsqueeze(-1) * C.unsqueeze(-2) / R.sum(-1, keepdim=True).unsqueeze(-1)


class Adafactor(torch.optim.Optimizer):
    r"""AdaFactor (Shazeer & Stern 2018) without momentum, written as a readable reference.

    For each parameter with gradient ``G`` at step ``t`` (``beta2_t = 1 - t^beta2_decay``)::

        R_t = beta2_t R_{t-1} + (1 - beta2_t) mean_j(G^2 (+ eps1))    row statistic  [..., m, 1]
        C_t = beta2_t C_{t-1} + (1 - beta2_t) mean_i(G^2 (+ eps1))    column statistic [..., 1, n]
        U   = G / sqrt(R_t C_t / mean(R_t))        (1-D parameters keep a full v_t instead)
        U   = U / max(1, RMS(U) / d)                                   update clipping
        theta -= rho_t * max(eps2, RMS(theta)) * U                     relative step size

    with ``rho_t = min(lr, 1/sqrt(t))`` (``lr=None``: 1e-2) when ``relative_step``, else ``lr``;
    without ``scale_parameter`` the factor ``max(eps2, RMS(theta))`` is 1. ``weight_decay``
    multiplies ``theta`` by ``1 - lr * weight_decay`` first (decoupled; ``rho_t`` when lr is None).
    The last two dims are factored for ``ndim >= 2``. State (as in ``torch.optim.Adafactor``):
    ``step`` and ``row_var``/``col_var`` or ``variance``, float32 for low-precision parameters.

    ``eps_mode``: ``"add"`` (the paper) adds ``eps1`` to ``G^2`` and forms ``1/sqrt(V_hat)`` from
    the two factors, so that a row and a column that are both ~0 never underflow to 0/0;
    ``"clamp"`` is ``torch.optim.Adafactor``'s: ``mean(R)`` clamped below by ``eps1`` and
    ``V_hat`` by ``eps1^2`` (with ``eps1=None`` the dtype's machine epsilon). With
    ``eps_mode="clamp"``, ``relative_step=True``, ``scale_parameter=True`` and the same ``lr``,
    ``eps``, ``d`` and ``weight_decay``, the steps equal torch's, at the same speed on a CPU
    (``benchmarks/results/adafactor-cpu.md``; on CUDA torch's foreach path is faster).
    """

    def __init__(self, params, lr: float | None = None, beta2_decay: float = -0.8,
                 eps: tuple = (1e-30, 1e-3), d: float = 1.0, weight_decay: float = 0.0,
                 relative_step: bool = True, scale_parameter: bool = True,
                 eps_mode: str = "add"):
        if lr is not None:
            check_range("lr", lr, 0.0)
        elif not relative_step:
            raise ValueError("lr: a learning rate is required when relative_step=False")
        check_range("beta2_decay", beta2_decay, -1.0, 0.0, high_open=True)
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"eps: expected a pair (eps1, eps2), got {eps!r}")
        if eps[0] is not None:
            check_range("eps[0]", eps[0], 0.0)
        check_range("eps[1]", eps[1], 0.0)
        check_range("d", d, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_choice("eps_mode", eps_mode, ("add", "clamp"))
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                        weight_decay=weight_decay, relative_step=relative_step,
                        scale_parameter=scale_parameter, eps_mode=eps_mode)
        super().__init__(params, defaults)

    @staticmethod
    def _rms(x: torch.Tensor) -> float:
        return x.norm(2).item() / math.sqrt(max(x.numel(), 1))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, c, (eps1, eps2) = group["lr"], group["beta2_decay"], group["eps"]
            for p in _params_with_grad(group["params"], "Adafactor"):
                self._update(p, group, lr, c, eps1, eps2)
        return loss

    def _update(self, p, group, lr, c, eps1, eps2):
        work = torch.promote_types(p.dtype, torch.float32)
        inplace = p.dtype == work                       # float32/float64: update p itself
        g = p.grad.to(work)
        theta = p if inplace else p.to(work)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if g.dim() > 1:
                state["row_var"] = g.new_zeros(g.shape[:-1]).unsqueeze(-1)
                state["col_var"] = g.new_zeros(g.shape[:-2] + g.shape[-1:]).unsqueeze(-2)
            else:
                state["variance"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"].item()
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        w = t ** c                                     # 1 - beta2_t
        rho = (min(lr if lr is not None else 1e-2, t ** -0.5) if group["relative_step"]
               else lr)
        alpha = rho * (max(eps2, self._rms(theta)) if group["scale_parameter"] else 1.0)
        if group["weight_decay"]:
            decay = 1 - (lr if lr is not None else rho) * group["weight_decay"]
            theta = theta.mul_(decay) if inplace else theta * decay
        add = group["eps_mode"] == "add"
        if g.dim() > 1:
            # mean(G^2) over a row / a column without materialising G^2 (as torch does)
            R, Cv = state["row_var"], state["col_var"]
            row = g.norm(dim=-1, keepdim=True).square_().div_(g.shape[-1])
            col = g.norm(dim=-2, keepdim=True).square_().div_(g.shape[-2])
            if add:                                     # mean(G^2 + eps1)
                row.add_(eps1)
                col.add_(eps1)
            R.lerp_(row, w)
            Cv.lerp_(col, w)
            if add:                                     # G * rsqrt(R / mean R) * rsqrt(C)
                u = (R / R.mean(-2, keepdim=True)).rsqrt_() * Cv.rsqrt()
            else:
                u = (R @ Cv).div_(R.mean(-2, keepdim=True).clamp(min=eps1))
                u = u.clamp_(min=eps1 * eps1).rsqrt_()
        else:
            v = state["variance"]
            v.lerp_(g * g + (eps1 if add else 0.0), w)
            u = v.rsqrt() if add else v.clamp(min=eps1 * eps1).rsqrt_()
        u.mul_(g)
        denom = max(1.0, u.norm(2).item() / (math.sqrt(u.numel()) * group["d"]))
        if inplace:
            p.add_(u, alpha=-alpha / denom)
        else:
            p.copy_(theta.add_(u, alpha=-alpha / denom))


# === tiger-lion-embedding ===
__all__ += ["Tiger", "sign_update_fixed_point", "sign_drift_closed_form", "adam_ghost_drift",
            "lazy_rows_mask"]

from ._validate import check_int, check_tensor  # noqa: E402


def sign_update_fixed_point(weight_decay: float) -> float:
    """The magnitude ``1/lambda`` at which a sign update with decoupled weight decay stops::

        theta <- theta - eta (s + lambda theta),   s = sign(m) fixed   =>   theta* = -s / lambda

    (eq. ``tiger-fixed-point``). It does not depend on the step size ``eta`` (nor on any positive
    per-row multiplier of it, such as Tiger's RMS scaling): those set only the speed."""
    check_range("weight_decay", weight_decay, 0.0, low_open=True)
    return 1.0 / weight_decay


def sign_drift_closed_form(theta0: torch.Tensor, sign: torch.Tensor, lr: float,
                           weight_decay: float, steps) -> torch.Tensor:
    """``theta_t`` after ``steps`` sign updates with a frozen sign (eq. ``tiger-drift``)::

        theta_t = theta* + (1 - eta lambda)^t (theta0 - theta*),   theta* = -s / lambda

    and ``theta0 - eta s t`` when ``lambda = 0``. ``theta0`` and ``sign`` broadcast; ``steps`` is an
    int >= 0 or an integer tensor (broadcast too, e.g. ``arange(T)[:, None]`` for a trajectory).
    Returns a tensor of ``theta0``'s floating dtype."""
    check_floating("theta0", theta0)
    check_tensor("sign", sign)
    check_range("lr", lr, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if lr * weight_decay >= 1.0:
        raise ValueError(f"lr: expected lr * weight_decay < 1 (a contraction), got "
                         f"{lr} * {weight_decay}")
    if isinstance(steps, torch.Tensor):
        if steps.is_floating_point() or steps.is_complex() or bool((steps < 0).any()):
            raise ValueError("steps: expected non-negative integer steps")
        t = steps.to(theta0.dtype)
    else:
        t = torch.tensor(float(check_int("steps", steps, 0)), dtype=theta0.dtype,
                         device=theta0.device)
    s = sign.to(theta0.dtype)
    if weight_decay == 0.0:
        return theta0 - lr * s * t
    star = -s / weight_decay
    return star + torch.pow(1.0 - lr * weight_decay, t) * (theta0 - star)


def adam_ghost_drift(m0, v0, lr: float, betas: tuple = (0.9, 0.999), steps=None) -> torch.Tensor:
    """Displacement Adam applies to a parameter whose gradient has become 0 (eq. ``adam-ghost``).

    With ``m_s = beta1^s m0`` and ``v_s = beta2^s v0`` (bias corrections taken as 1, ``eps`` as
    0), step ``s`` moves the parameter by ``-lr (m0/sqrt(v0)) r^s`` with ``r = beta1/sqrt(beta2)``,
    so after ``steps`` steps (``None``: infinitely many) the total is::

        -lr (m0 / sqrt(v0)) r (1 - r^steps) / (1 - r)

    bounded in size by ``lr |m0|/sqrt(v0) / (1 - r)``. ``m0``, ``v0``: tensors (or floats) of the
    moments at the last step with a gradient, ``v0 > 0``; ``r < 1`` is required."""
    m0 = torch.as_tensor(m0)
    v0 = torch.as_tensor(v0)
    if not m0.is_floating_point():
        m0 = m0.to(torch.get_default_dtype())
    v0 = v0.to(m0.dtype)
    check_range("lr", lr, 0.0)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, low_open=True, high_open=True)
    r = betas[0] / math.sqrt(betas[1])
    if r >= 1.0:
        raise ValueError(f"betas: expected beta1 < sqrt(beta2) so that the ghost steps shrink, "
                         f"got {tuple(betas)}")
    if not bool((v0 > 0).all()):
        raise ValueError("v0: expected a positive second moment")
    tail = 0.0 if steps is None else r ** check_int("steps", steps, 0)
    geom = r * (1.0 - tail) / (1.0 - r)
    return -lr * geom * m0 / v0.sqrt()


def lazy_rows_mask(grad: torch.Tensor) -> torch.Tensor:
    """Rows of an embedding gradient ``grad [V, ...]`` that hold any non-zero entry: ``Bool[V]``,
    True for the tokens of the batch (and any row a tied output layer touched). A lazy optimizer
    updates only these rows and leaves the others, and their state, untouched."""
    check_floating("grad", grad)
    if grad.dim() < 2:
        raise ValueError(f"grad: expected a gradient of rows [V, d], got shape {tuple(grad.shape)}")
    if grad.is_sparse:
        raise ValueError("grad: expected a dense gradient (nn.Embedding(sparse=False))")
    # the L1 norm of a row is 0 exactly when every entry is 0 (no squares to underflow, and a
    # NaN or inf row counts as touched); one reduction, no [V, d] boolean temporary
    return torch.linalg.vector_norm(grad.flatten(1), 1, dim=-1) != 0


class Tiger(torch.optim.Optimizer):
    """Tiger (Su, kexue.fm/archives/9512): sign momentum with one buffer per parameter
    (eq. ``tiger``)::

        m     <- beta m + (1 - beta) g
        theta <- theta - eta [sign(m) + lambda theta],    eta = lr * RMS(theta)  (rms_scale)

    ``rms_scale=True`` multiplies ``lr`` by the parameter's root-mean-square, over the whole tensor
    for ``ndim >= 2``, row by row for a group tagged ``{"embedding": True}`` (bojone/tiger's
    rule), and not at all for 1-D tensors (a zero-initialised bias would never move). A tensor
    whose RMS is 0 (a zero-initialised matrix or row) stays where it is under ``rms_scale``.
    bojone/tiger also halves the lr of biases/norms and drops their decay: give them a group.
    With ``rms_scale=False`` and ``beta1 = beta2 = beta`` this is Lion with decoupled decay.

    ``lazy_embeddings=True``: in groups tagged ``{"embedding": True}`` (2-D ``[V, d]``), rows whose
    gradient is all zero (:func:`lazy_rows_mask`) are left bit-for-bit unchanged, momentum and
    weight, so a token that stops appearing does not drift to ``-sign(m)/lambda``. It needs such a
    group; gradients must be dense. State: ``momentum`` only (``state_dict`` round-trips).
    The step runs through ``torch._foreach_*`` over each device/dtype bucket.
    """

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.965, weight_decay: float = 0.01,
                 rms_scale: bool = True, lazy_embeddings: bool = False):
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, rms_scale=rms_scale,
                        lazy_embeddings=lazy_embeddings, embedding=False)
        self._check_group(defaults)
        super().__init__(params, defaults)
        if lazy_embeddings and not any(g["embedding"] for g in self.param_groups):
            raise ValueError("lazy_embeddings: True needs a param group tagged "
                             "{'params': [embedding.weight], 'embedding': True}")

    @staticmethod
    def _check_group(group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        for name in ("rms_scale", "lazy_embeddings", "embedding"):
            if not isinstance(group[name], bool):
                raise TypeError(f"{name}: expected a bool, got {type(group[name]).__name__}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        if group["embedding"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"params: an embedding group holds [V, d] tensors, got "
                                     f"shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            buckets: dict[tuple, list] = {}
            hint = "; use nn.Embedding(sparse=False) and lazy_embeddings=True"
            for p in _params_with_grad(group["params"], "Tiger", hint):
                state = self.state[p]
                if len(state) == 0:
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["embedding"]:
                    self._row_step(p, state["momentum"], group)
                else:
                    scaled = group["rms_scale"] and p.dim() >= 2
                    buckets.setdefault((p.device, p.dtype, scaled), []).append(p)
            for (_, _, scaled), ps in buckets.items():
                grads = [p.grad for p in ps]
                ms = [self.state[p]["momentum"] for p in ps]
                torch._foreach_lerp_(ms, grads, 1.0 - beta)          # m <- beta m + (1-beta) g
                u = torch._foreach_sign(ms)
                if wd:
                    torch._foreach_add_(u, ps, alpha=wd)              # u = sign(m) + lambda theta
                if scaled:                                            # eta = lr * RMS(theta)
                    eta = torch._foreach_norm(ps)
                    torch._foreach_mul_(eta, [lr / math.sqrt(p.numel()) for p in ps])
                    torch._foreach_mul_(u, eta)
                    torch._foreach_sub_(ps, u)
                else:
                    torch._foreach_add_(ps, u, alpha=-lr)
        return loss

    @staticmethod
    def _row_step(p: torch.Tensor, m: torch.Tensor, group: dict) -> None:
        """One step of an embedding ``[V, d]``: row-wise RMS, and lazy rows when asked.

        Lazy rows get ``beta = 1`` and ``eta = 0`` (per-row ``[V, 1]`` factors: a lerp weight of
        0, a step of 0): with their gradient 0, ``m`` and ``theta`` come out bit-for-bit
        unchanged, with one ``[V, d]`` temporary in all."""
        g, beta, lr = p.grad, group["beta"], group["lr"]
        if group["rms_scale"]:                                    # eta_k = lr * RMS(e_k)
            eta = torch.linalg.vector_norm(p, dim=-1, keepdim=True).mul_(lr / p.shape[-1] ** 0.5)
        else:
            eta = torch.full((p.shape[0], 1), lr, dtype=p.dtype, device=p.device)
        if group["lazy_embeddings"]:
            keep = lazy_rows_mask(g).unsqueeze(-1).to(m.dtype)        # [V, 1] of 0 / 1
            m.lerp_(g, keep * (1.0 - beta))                           # weight 0: m unchanged
            eta.mul_(keep)
        else:
            m.lerp_(g, 1.0 - beta)
        u = torch.sign(m)
        if group["weight_decay"]:
            u.add_(p, alpha=group["weight_decay"])
        p.addcmul_(u, eta, value=-1.0)                                # theta -= eta u
