"""Likelihoods and the variational-inference inner loop.

`fit` minimises −ELBO = E_q[−log p(D|θ)] + β·KL(q‖p) over a diagonal Gaussian λ = (μ, ρ) with
any torch.optim optimizer. Each step draws θ = μ + σ·ε with the fused `sample` op, back-propagates
the data term to θ only, and lets the fused `elbo_backward_` turn ∂/∂θ into ∂/∂μ, ∂/∂ρ of −ELBO
(ε regenerated from the seed, KL gradient added) straight into the optimizer's .grad buffers.
Posterior tensors may carry a leading task dimension: all tasks of a meta-batch then advance
together, which is exact for element-wise optimizers (SGD, Adam, RMSprop...)."""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import ops, reference
from .gaussian import Posterior

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
               "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}


# ----------------------------------------------------------------------------- likelihoods
class GaussianLikelihood(nn.Module):
    """y ~ N(f(x), s²) per output. With learn=True, log s is a parameter of the model that the
    prior covers like any weight (so it is Bayesian and meta-learned by the same rule)."""

    kind = "regression"

    def __init__(self, sigma: float = 0.5, learn: bool = False) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"GaussianLikelihood: sigma must be > 0, got {sigma}")
        t = torch.tensor(math.log(sigma))
        if learn:
            self.log_sigma = nn.Parameter(t)
        else:
            self.register_buffer("log_sigma", t)

    def _log_sigma(self, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if params is not None and "likelihood.log_sigma" in params:
            return params["likelihood.log_sigma"]
        return self.log_sigma

    def nll(self, out: torch.Tensor, y: torch.Tensor,
            params: dict[str, torch.Tensor] | None = None, per_task: bool = False) -> torch.Tensor:
        """Summed −log p(y | out) over every point and output (all leading dims summed, or all but
        the task dimension 0 with per_task=True)."""
        if out.shape != y.shape:
            raise ValueError(f"GaussianLikelihood: prediction shape {tuple(out.shape)} != target shape {tuple(y.shape)}")
        ls = self._log_sigma(params)
        terms = 0.5 * (y - out).pow(2) * torch.exp(-2 * ls) + ls + 0.5 * math.log(2 * math.pi)
        return terms.reshape(terms.shape[0], -1).sum(1) if per_task else terms.sum()

    fisher_per_output = 2.0  # Fisher information of log s per observed output

    def ggn_cotangents(self, out: torch.Tensor, params: dict[str, torch.Tensor] | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Output-space cotangents [M, *out.shape] whose pullbacks are the exact GGN rows: one per
        point and output, 1/s at its position (the Hessian of ½(y−f)²/s² in f is 1/s²)."""
        inv_s = torch.exp(-self._log_sigma(params)).to(out.dtype)
        T, rest = out.shape[0], out.shape[1:]
        eye = torch.eye(rest.numel(), dtype=out.dtype, device=out.device).reshape(-1, 1, *rest)
        cot = eye.expand(-1, T, *rest)
        return cot * (inv_s if inv_s.dim() == 0 else inv_s.reshape(1, T, *([1] * len(rest))))

    def predictive(self, outs: torch.Tensor, params: list[dict[str, torch.Tensor]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the predictive mixture from S sampled outputs (dim 0)."""
        mean = outs.mean(0)
        noise_var = torch.stack([torch.exp(2 * self._log_sigma(p)) for p in params]).mean(0) \
            if params else torch.exp(2 * self.log_sigma)
        var = outs.var(0, unbiased=False) + noise_var
        return mean, var.sqrt()


class CategoricalLikelihood(nn.Module):
    """y ~ Categorical(softmax(f(x)))."""

    kind = "classification"

    def nll(self, out: torch.Tensor, y: torch.Tensor, params: dict | None = None,
            per_task: bool = False) -> torch.Tensor:
        if y.dtype != torch.long:
            raise TypeError(f"CategoricalLikelihood: labels must be int64, got {y.dtype}")
        if per_task:
            ce = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            return ce.reshape(out.shape[0], -1).sum(1)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")

    fisher_per_output = 0.0

    def ggn_cotangents(self, out: torch.Tensor, params: dict | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Cotangents [N, *out.shape]: for point n, p_n − onehot(ỹ_n) with ỹ_n ~ softmax(f_n) at
        its position. E[(p − e_ỹ)(p − e_ỹ)ᵀ] = diag(p) − ppᵀ, the softmax cross-entropy's Hessian,
        so the rows' outer products are an unbiased (Monte-Carlo Fisher) estimate of the GGN."""
        T, N, C = out.shape[0], out.shape[1], out.shape[-1]
        p = out.reshape(T, N, -1, C).double().softmax(-1)
        u = torch.rand(p.shape[:-1] + (1,), generator=generator, dtype=p.dtype).to(p.device)
        label = (p.cumsum(-1) < u).sum(-1, keepdim=True).clamp_max(C - 1)
        resid = (p - torch.zeros_like(p).scatter_(-1, label, 1.0)).to(out.dtype).reshape(out.shape)
        eye = torch.eye(N, dtype=out.dtype, device=out.device).reshape(N, 1, N, *([1] * (out.dim() - 2)))
        return eye * resid.unsqueeze(0)

    def predictive(self, outs: torch.Tensor, params: list | None = None) -> torch.Tensor:
        """Class probabilities averaged over the S sampled outputs (dim 0)."""
        return outs.softmax(-1).mean(0)


# ----------------------------------------------------------------------------- data terms
class DataTerm:
    """The summed negative log-likelihood of a batch of tasks, −Σ log p(y | f(x; θ)), as the
    callable ``nll(theta, index)`` that `fit` takes, plus what curvature-aware VI needs: the rows
    of a square-root factor R of the generalised Gauss-Newton matrix, G = RᵀR = Σ_n J_nᵀ H_n J_n
    (J_n the Jacobian of point n's outputs, H_n the likelihood's Hessian in output space).

    forward(theta, x) -> outputs [T, N, ...] (θ with a leading task dimension); θ entries named
    ``likelihood.*`` (a learned noise scale) are passed to the likelihood instead of the model."""

    def __init__(self, forward: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                 likelihood: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> None:
        self.forward, self.likelihood, self.x, self.y, self.names = forward, likelihood, x, y, names
        self.lik_idx = [i for i, n in enumerate(names) if n.startswith("likelihood.")]

    def _data(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x, self.y) if index is None else (self.x[:, index], self.y[:, index])

    def _lik_params(self, theta: list[torch.Tensor], ys: torch.Tensor) -> dict[str, torch.Tensor]:
        # per-task likelihood parameters [T] broadcast over the data dims
        return {self.names[i]: theta[i].reshape(theta[i].shape[0], *([1] * (ys.dim() - 1))) for i in self.lik_idx}

    def __call__(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
        xs, ys = self._data(index)
        return self.likelihood.nll(self.forward(theta, xs), ys, self._lik_params(theta, ys))

    @torch.no_grad()
    def task_nll(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
        """The data term of each task, [T]."""
        xs, ys = self._data(index)
        return self.likelihood.nll(self.forward(theta, xs), ys, self._lik_params(theta, ys), per_task=True)

    def ggn_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None,
                 generator: torch.Generator | None) -> list[torch.Tensor]:
        """Rows of R per task: a list over θ of [T, M, *shape] tensors (zero for ``likelihood.*``
        entries, whose curvature `lik_curvature` gives). Gaussian likelihoods give the exact GGN
        (M = points × outputs); the categorical one a Monte-Carlo Fisher with one label sampled
        from the model per point (M = points; unbiased for the GGN)."""
        return self.value_grad_rows(theta, index, generator)[2]

    def value_grad_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None,
                        generator: torch.Generator | None) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """(nll, ∂nll/∂θ, GGN rows) from ONE forward pass: the data gradient is the pullback of
        ∂nll/∂outputs, batched with the rows' cotangents into a single vmapped backward."""
        xs, ys = self._data(index)
        model_idx = [i for i in range(len(theta)) if i not in self.lik_idx]
        with torch.enable_grad():
            if getattr(self.forward, "vectorize", True):
                out, vjp = torch.func.vjp(lambda *th: self.forward(self._fill(theta, model_idx, th), xs),
                                          *[theta[i].detach() for i in model_idx])
                pullback = torch.func.vmap(vjp)
            else:
                # a forward that updates buffers (BatchNorm's running statistics, looped tasks) cannot
                # run under torch.func.vjp: plain autograd, the backward batched over the cotangents
                # (several times slower on small nets)
                model_theta = [theta[i].detach().requires_grad_(True) for i in model_idx]
                out = self.forward(self._fill(theta, model_idx, model_theta), xs)

                def pullback(cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    return torch.autograd.grad(out, model_theta, cot, is_grads_batched=True)
            o = out.detach().requires_grad_(True)
            full = [t.detach() for t in theta]
            lik_theta = [full[i].requires_grad_(True) for i in self.lik_idx]
            loss = self.likelihood.nll(o, ys, self._lik_params(full, ys))
            d_out, *d_lik = torch.autograd.grad(loss, [o] + lik_theta)
            cot = self.likelihood.ggn_cotangents(out.detach(), self._lik_params([t.detach() for t in full], ys),
                                                 generator)
            pulled = pullback(torch.cat([d_out.unsqueeze(0), cot]))  # [1 + M, T, ...]
        grads: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        it, it_lik = iter(pulled), iter(d_lik)
        for i, t in enumerate(theta):
            if i in self.lik_idx:
                grads.append(next(it_lik))
                rows.append(t.new_zeros(t.shape[0], cot.shape[0], *t.shape[1:]))
            else:
                p = next(it).detach()
                grads.append(p[0])
                rows.append(p[1:].transpose(0, 1))
        return float(loss.detach()), grads, rows

    @staticmethod
    def _fill(theta: list[torch.Tensor], model_idx: list[int], model_theta) -> list[torch.Tensor]:
        full = [t.detach() for t in theta]
        for i, t in zip(model_idx, model_theta):
            full[i] = t
        return full

    def lik_curvature(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Fisher information of the likelihood's own parameters (diagonal): {θ index: [T, ...]}."""
        if not self.lik_idx:
            return {}
        _, ys = self._data(index)
        n = ys[0].numel()  # points × outputs per task
        return {i: torch.full_like(theta[i], self.likelihood.fisher_per_output * n) for i in self.lik_idx}


# ----------------------------------------------------------------------------- VI loop
_SQRT_HALF = math.sqrt(0.5)


class NaturalGradientVI(torch.optim.Optimizer):
    """Natural-gradient descent for a diagonal Gaussian q(μ, ρ = log σ): the Fisher information is
    1/σ² for μ and 2 for ρ, so μ ← μ − lr·σ²·∂/∂μ and ρ ← ρ − lr/2·∂/∂ρ. The posterior variance
    (initially the prior's σ₀², which GEM meta-learns) acts as a per-weight step size, and on a
    linear-Gaussian model one step with lr = 1 at the exact σ lands on the exact posterior mean.
    Parameters are passed as the μ list followed by the ρ list of the same length. ρ steps
    default to lr/20: its one-sample gradient g·ε·σ is far noisier than μ's, and a full natural
    step on it diverges within a few steps on small networks. Each μ step is capped at
    `max_step` posterior standard deviations, and each ρ step at `max_step`/√2 (its own
    Fisher-metric unit) (a trust region: the quadratic model behind the
    natural step only holds near q; without it, rare tasks with large gradients overshoot and
    diverge when adapted for more steps than at meta-training); None disables the cap."""

    def __init__(self, params, lr: float = 0.5, rho_lr: float | None = None, max_step: float | None = 1.0) -> None:
        params = list(params)
        if len(params) % 2:
            raise ValueError("NaturalGradientVI expects the μ tensors followed by as many ρ tensors")
        if max_step is not None and not max_step > 0:
            raise ValueError(f"NaturalGradientVI: max_step must be > 0 or None, got {max_step}")
        super().__init__(params, dict(lr=lr, rho_lr=lr / 20 if rho_lr is None else rho_lr, max_step=max_step))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps = group["params"]
            mus, rhos = ps[: len(ps) // 2], ps[len(ps) // 2:]
            for m, r in zip(mus, rhos):
                g_rho = r.grad if r.requires_grad else None
                new_m, new_r = ngvi_update(m, r, m.grad, g_rho, group["lr"], group["rho_lr"], group["max_step"])
                m.copy_(new_m)
                r.copy_(new_r)
        return None


def ngvi_update(mu: torch.Tensor, rho: torch.Tensor, g_mu: torch.Tensor | None, g_rho: torch.Tensor | None,
                lr: float, rho_lr: float, max_step: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One NaturalGradientVI step of one tensor as a function, (μ', ρ'): what the optimizer applies in
    place and what the back-propagating learners unroll (so both follow one rule, trust region
    included). A None gradient leaves its half unchanged."""
    if g_mu is not None:
        var = torch.exp(2 * rho)
        step = var * g_mu * lr
        if max_step is not None:
            bound = var.sqrt() * max_step
            step = torch.minimum(torch.maximum(step, -bound), bound)
        mu = mu - step
    if g_rho is not None:
        step = 0.5 * rho_lr * g_rho
        if max_step is not None:  # ρ's natural unit: Fisher 2 → one std = 1/√2
            step = step.clamp(-max_step * _SQRT_HALF, max_step * _SQRT_HALF)
        rho = rho - step
    return mu, rho


class VariationalOnlineNewton:
    """Curvature-aware natural-gradient VI ("von") for a diagonal Gaussian q = N(μ, σ²), the
    variational online Newton family (VON/VOGN, Khan et al. 2018; IVON, Shen et al. 2024): per
    weight a running estimate h of the data term's curvature (its GGN diagonal), and

        h ← (1−τ)·h + τ·ĥ,       σ² = 1 / (β/σ₀² + h),
        μ ← μ − lr·P⁻¹·(∇E_q[nll] + β(μ−μ₀)/σ₀²),

    lr = 1 being a full Newton step. The posterior variance is derived, so it shrinks exactly where
    the data are informative, and σ₀ is only the prior precision, never a step size.

    ``coupling="full"`` (default) uses P = β/σ₀² + RᵀR with the GGN factor R of `DataTerm`
    (M rows per task: points × outputs, or points for a classifier) and solves with Woodbury in
    the M-dimensional data space (an M×M Cholesky per task). Few-shot tasks have few points, so
    this is cheap, and it matters: weights that move the same output are coupled, and a diagonal
    Newton step (``coupling="diag"``, P = β/σ₀² + h) adds their steps up and overshoots.
    ``curvature="reparam"`` is IVON's single-sample estimate ĥ = g·ε/σ (for any `nll` callable;
    noisy for few steps). ``control_variate`` subtracts Rᵀ R(θ−μ) from the sampled gradient: zero
    mean for a linear model, it removes the reparameterisation noise of the mean step.
    `damping` is added to the precision the mean step divides by (Levenberg-Marquardt).
    `backtrack` (needs a `DataTerm`): the Gauss-Newton model is only local, and on a network a full
    step can overshoot badly; each task's mean step is halved up to `backtrack` times until the
    deterministic objective at the mean, nll(μ) + β‖μ − μ₀‖²/(2σ₀²), no longer increases, and is
    dropped if it still does (the variance update stands). 0 disables it."""

    def __init__(self, lr: float = 1.0, h_decay: float = 1.0, damping: float = 0.0, coupling: str = "full",
                 curvature: str = "ggn", control_variate: bool = True, backtrack: int = 4) -> None:
        if not lr > 0:
            raise ValueError(f"von: lr must be > 0, got {lr}")
        if not 0 < h_decay <= 1:
            raise ValueError(f"von: h_decay must be in (0, 1], got {h_decay}")
        if not damping >= 0:
            raise ValueError(f"von: damping must be >= 0, got {damping}")
        if coupling not in ("full", "diag"):
            raise ValueError(f"von: coupling must be 'full' or 'diag', got {coupling!r}")
        if curvature not in ("ggn", "reparam"):
            raise ValueError(f"von: curvature must be 'ggn' or 'reparam', got {curvature!r}")
        if not (isinstance(backtrack, int) and backtrack >= 0):
            raise ValueError(f"von: backtrack must be an int >= 0, got {backtrack!r}")
        if curvature == "reparam" and coupling == "full":
            raise ValueError("von: coupling='full' needs curvature='ggn' (the GGN factor); use coupling='diag'")
        self.lr, self.h_decay, self.damping = lr, h_decay, damping
        self.coupling, self.curvature, self.control_variate = coupling, curvature, control_variate
        self.backtrack = backtrack

    def uses_ggn(self) -> bool:
        return self.curvature == "ggn"

    @torch.no_grad()
    def step(self, mu: list[torch.Tensor], rho: list[torch.Tensor], h: list[torch.Tensor],
             grad: list[torch.Tensor], rows: list[torch.Tensor] | None, extra_curv: dict[int, torch.Tensor],
             prior: Posterior, beta: float, seed: int, starts: list[int] | None,
             curv: list[torch.Tensor] | None = None, row_offset: torch.Tensor | None = None) -> None:
        """One update in place of μ, ρ, h. `grad`: the sampled gradient of the data term (summed
        over MC samples of the loss already divided by their number); `rows`: GGN factor rows
        [T, M, *shape] of that loss (None for "reparam": the kernel then forms g·ε/σ from the ε of
        (seed, 0) unless `curv` is given); `row_offset` [T, M]: each row applied to its own
        sample's θ − μ, for the control variate (the rows of S samples are stacked)."""
        grad, curv, correction = self.terms(mu, grad, rows, extra_curv, prior, beta, curv, row_offset)
        grad = [g.contiguous() for g in grad]
        ops.von_step_(mu, rho, h, grad, [c.contiguous() for c in curv] if curv is not None else None,
                      prior.mu, prior.rho, seed, 0, self.lr, beta, self.h_decay, self.damping,
                      [c.contiguous() for c in correction] if correction is not None else None, starts)

    def step_differentiable(self, mu: list[torch.Tensor], rho: list[torch.Tensor], h: list[torch.Tensor],
                            grad: list[torch.Tensor], rows: list[torch.Tensor] | None,
                            extra_curv: dict[int, torch.Tensor], prior: Posterior, beta: float, seed: int,
                            starts: list[int] | None, curv: list[torch.Tensor] | None = None,
                            row_offset: torch.Tensor | None = None
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """`step` as a differentiable torch composite, returning (μ', ρ', h'): the unrolled inner
        loops of the ELBO-gradient and KL-chaser learners back-propagate through it. μ, ρ, `grad`
        (created with create_graph), the prior and `row_offset` may carry a graph; the curvature
        rows are data (their dependence on θ is not differentiated: exact for a linear model,
        the usual Gauss-Newton treatment of a preconditioner otherwise)."""
        grad, curv, correction = self.terms(mu, grad, rows, extra_curv, prior, beta, curv, row_offset)
        return reference.von_step(mu, rho, h, grad, curv, prior.mu, prior.rho, seed, 0, self.lr, beta,
                                  self.h_decay, self.damping, correction, starts)

    def terms(self, mu: list[torch.Tensor], grad: list[torch.Tensor], rows: list[torch.Tensor] | None,
              extra_curv: dict[int, torch.Tensor], prior: Posterior, beta: float,
              curv: list[torch.Tensor] | None, row_offset: torch.Tensor | None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """What the per-weight update needs from the GGN rows: (gradient, curvature ĥ, coupling
        correction Rᵀz of the Woodbury solve or None); autograd-transparent."""
        correction = None
        if rows is not None:
            R = _flat_rows(rows)  # [T, M, D]
            curv = _unflatten((R * R).sum(1), mu)
            for i, c in extra_curv.items():
                curv[i] = c
            if self.coupling == "full":
                prec0 = [beta * torch.exp(-2 * r0) for r0 in prior.rho]
                resid = [g + p0 * (m - m0) for g, p0, m, m0 in zip(grad, prec0, mu, prior.mu)]
                # likelihood parameters have no GGN rows: their own (diagonal) Fisher joins Λ
                lam = _flat([p0 + self.damping + extra_curv.get(i, 0.0) for i, p0 in enumerate(prec0)])
                # Woodbury: (Λ + RᵀR)⁻¹r = (r − Rᵀz)/Λ with z = (I + RΛ⁻¹Rᵀ)⁻¹RΛ⁻¹r. With the control
                # variate r = r₀ − Rᵀw (w = the rows applied to θ − μ), which folds into z:
                # r − Rᵀz = r₀ − Rᵀ(I + RΛ⁻¹Rᵀ)⁻¹(RΛ⁻¹r₀ + w): one solve covers both.
                # The small M×M system is factorised in float64: the eigenvalues of I + RΛ⁻¹Rᵀ span 1
                # to ~‖R‖²/Λ (1e8 on small nets with a wide prior). Should float32 rounding of the
                # product still break positive-definiteness, the product is redone in float64.
                isq = lam.rsqrt()
                Rs = R * isq.unsqueeze(1)
                K = (Rs @ Rs.transpose(1, 2)).double()
                K.diagonal(dim1=1, dim2=2).add_(1.0)
                L, info = torch.linalg.cholesky_ex(K)
                failed = (info > 0).nonzero().flatten()
                if failed.numel():  # redo only those tasks, so a task's result never depends on its batch
                    Rd = Rs[failed].double()
                    Kd = Rd @ Rd.transpose(1, 2)
                    Kd.diagonal(dim1=1, dim2=2).add_(1.0)
                    Ld, info_d = torch.linalg.cholesky_ex(Kd)
                    if bool((info_d > 0).any()):  # only non-finite rows get here: a diverged inner loop
                        raise FloatingPointError("von step: the curvature of the data term is not finite "
                                                 f"(task {int(failed[(info_d > 0).nonzero()[0, 0]])})")
                    L = L.index_copy(0, failed, Ld)
                rhs = (Rs @ (_flat(resid) * isq).unsqueeze(-1)).double()
                if self.control_variate and row_offset is not None:
                    rhs = rhs + row_offset.double().unsqueeze(-1)
                z = torch.cholesky_solve(rhs, L).to(R.dtype)
                # the kernel divides by β/σ₀² + damping: a likelihood parameter's Fisher F enters the
                # correction as r·F/Λ
                correction = _unflatten(torch.einsum("tmd,tm->td", R, z.squeeze(-1)), mu)
                for i, f in extra_curv.items():
                    correction[i] = resid[i] * f / (prec0[i] + self.damping + f)
            elif self.control_variate and row_offset is not None:
                cv = torch.einsum("tmd,tm->td", R, row_offset)
                grad = [g - c for g, c in zip(grad, _unflatten(cv, mu))]
        return grad, curv, correction


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in ts], -1)


def _flat_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-parameter rows [T, M, *shape] as one [T, M, D] matrix per task."""
    return torch.cat([r.reshape(r.shape[0], r.shape[1], -1) for r in rows], -1)


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, pos = [], 0
    for t in like:
        n = t[0].numel()
        out.append(flat[:, pos:pos + n].reshape(t.shape))
        pos += n
    return out



_OPTIMIZERS["ngvi"] = NaturalGradientVI
_OPTIMIZERS["von"] = VariationalOnlineNewton


@dataclass
class VIConfig:
    """How a posterior is fitted. `optimizer` is a torch.optim class or one of
    adam/sgd/rmsprop/adamw/adagrad/ngvi (natural-gradient VI)/von (variational online Newton, its
    options in optimizer_kwargs); `batch_size` None uses every point each step."""

    steps: int = 5
    optimizer: str | type = "adam"
    lr: float | None = None  # None: 1.0 (a full Newton step) for von, else 0.01
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    mc_samples: int = 1
    beta: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"VIConfig.steps must be >= 0, got {self.steps}")
        if self.mc_samples < 1:
            raise ValueError(f"VIConfig.mc_samples must be >= 1, got {self.mc_samples}")
        if self.lr is None:
            self.lr = 1.0 if self.optimizer_class() is VariationalOnlineNewton else 0.01
        if not self.lr > 0:
            raise ValueError(f"VIConfig.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ValueError(f"VIConfig.beta must be >= 0, got {self.beta}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"VIConfig.batch_size must be >= 1 or None, got {self.batch_size}")
        if self.optimizer_class() is VariationalOnlineNewton:  # fail early on bad options
            known = set(inspect.signature(VariationalOnlineNewton).parameters) - {"lr"}
            unknown = sorted(set(self.optimizer_kwargs) - known)
            if unknown:
                raise ValueError(f"von: unknown optimizer_kwargs {unknown}; its options are {sorted(known)}")
            VariationalOnlineNewton(lr=self.lr, **self.optimizer_kwargs)

    def optimizer_class(self) -> type:
        if isinstance(self.optimizer, str):
            try:
                return _OPTIMIZERS[self.optimizer.lower()]
            except KeyError:
                raise ValueError(f"unknown inner optimizer {self.optimizer!r}; "
                                 f"choose one of {sorted(_OPTIMIZERS)} or pass a torch.optim class") from None
        if isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer):
            return self.optimizer
        raise TypeError(f"VIConfig.optimizer must be a name or a torch.optim.Optimizer class, got {self.optimizer!r}")


# Safe range of the prior's log standard deviation ρ₀: σ₀ ∈ [2e-9, 2.2e4]. Inside it exp(±2ρ₀) and
# the GEM/KL terms stay finite in float32 (1/σ₀² ≤ 2.4e17; the kernels are exact for |ρ₀| < 43).
# gemext.train applies `clamp_rho_` to Θ after every meta-step: the one place. Posterior ρ is not
# clamped on purpose: a diverging inner loop must still show up as non-finite, so that the
# training loop's guards skip the step (clamping it made such runs continue on losses of 1e30).
RHO_MIN, RHO_MAX = -20.0, 10.0


@torch.no_grad()
def clamp_rho_(rho: list[torch.Tensor]) -> None:
    """Clamp log standard deviations into [RHO_MIN, RHO_MAX] in place (NaN stays NaN, so the
    non-finite guards still see it)."""
    for r in rho:
        r.clamp_(RHO_MIN, RHO_MAX)


_TASK_RANGE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("task_range", default=None)


@contextlib.contextmanager
def task_shard(first: int, total: int):
    """Inside the block, per-task tensors of the inner loops hold tasks first.. of a meta-batch of
    `total` (gemext.distributed wraps meta_backward in it): `fit` and the learners' own samplers
    then draw the noise of the full batch. Keeps `meta_backward(tasks)` free of extra arguments."""
    token = _TASK_RANGE.set((int(first), int(total)))
    try:
        yield
    finally:
        _TASK_RANGE.reset(token)


def current_task_range() -> tuple[int, int] | None:
    """(first task, meta-batch size) set by `task_shard`, or None outside it."""
    return _TASK_RANGE.get()


def task_starts(tensors: list[torch.Tensor], task_range: tuple[int, int] | None) -> list[int] | None:
    """Global noise indices (the ``starts`` of :func:`gemext.ops.sample`) of per-task tensors
    [T_shard, ...] holding tasks k .. k+T_shard−1 of a meta-batch of T_total tasks, so that the
    shard draws exactly the ε those tasks draw in the full batch: layer l of the full batch
    occupies Σ_{l'<l} T_total·n_l' onwards and task k of it starts k·n_l further (n_l = per-task
    numel). None (no range) keeps the default cumulative indexing."""
    if task_range is None:
        return None
    k, total = task_range
    starts, base = [], 0
    for t in tensors:
        if t.dim() == 0 or not 0 <= k <= k + t.shape[0] <= total:
            raise ValueError(f"task_range {task_range}: tensors of shape {tuple(t.shape)} do not hold "
                             f"tasks {k}..{k + (t.shape[0] if t.dim() else 0) - 1} of {total}")
        n = t[0].numel()
        starts.append(base + k * n)
        base += total * n
    return starts


# nll(theta, index) -> summed negative log-likelihood over tasks and the selected points
# (index: a LongTensor of data indices, or None for all of them).
NLL = Callable[[list[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


@dataclass
class FitResult:
    posterior: Posterior
    nll: float  # data term of the last step, summed over tasks, rescaled to the full data


def fit(nll: NLL, n_data: int, prior: Posterior, init: Posterior, config: VIConfig,
        generator: torch.Generator | None = None, delta: bool = False,
        callback: Callable[[int, Posterior], None] | None = None,
        task_range: tuple[int, int] | None = None) -> FitResult:
    """Fit q(θ; λ) to the data behind `nll`, starting from `init`, with KL to `prior`.

    delta=True fits a point estimate instead (σ = 0, θ = μ; the data gradient plus β times the
    Gaussian prior's, i.e. MAP, or plain loss minimisation when β = 0). `callback(step, λ)` sees
    the posterior after 0, 1, …, steps updates (used for per-step meta-test curves).
    `task_range=(k, T_total)` (default: `current_task_range()`): the posterior's leading dimension
    holds tasks k.. of a meta-batch of T_total (a distributed shard); the noise is then that of
    the full batch (`task_starts`)."""
    if n_data < 1:
        raise ValueError("fit: the task has no data points")
    opt_class = config.optimizer_class()
    if delta and opt_class in (NaturalGradientVI, VariationalOnlineNewton):
        raise ValueError(f"fit: {config.optimizer} VI needs a Gaussian posterior; a point estimate (delta=True) "
                         "has σ = 0 and would never move: use sgd or adam")
    if opt_class is VariationalOnlineNewton:
        return _fit_von(nll, n_data, prior, init, config, generator, callback, task_range)
    mu = [m.detach().clone().requires_grad_(True) for m in init.mu]
    rho = [r.detach().clone().requires_grad_(not delta) for r in init.rho]
    variables = mu if delta else mu + rho  # μ list then ρ list (NaturalGradientVI relies on it)
    for v in variables:
        v.grad = torch.zeros_like(v)  # persistent buffers: the fused op writes into them
    opt = opt_class(variables, lr=config.lr, **config.optimizer_kwargs)
    S, beta = config.mc_samples, config.beta
    scratch = [torch.empty_like(v) for v in variables] if S > 1 and not delta else None
    starts = None if delta else task_starts(mu, task_range or current_task_range())
    last = float("nan")
    if callback is not None:
        callback(0, Posterior(init.names, mu, rho))
    for step in range(config.steps):
        index, scale = _minibatch(n_data, config, generator, mu[0].device)
        if delta:
            theta = [m.detach().requires_grad_(True) for m in mu]
            loss = nll(theta, index) * scale
            grads = torch.autograd.grad(loss, theta)
            for m, g, m0, r0 in zip(mu, grads, prior.mu, prior.rho):
                m.grad.copy_(g)
                if beta > 0:
                    m.grad.add_((m.detach() - m0) * torch.exp(-2 * r0), alpha=beta)
            last = float(loss.detach())
        else:
            seed = ops.new_seed(generator)
            total = 0.0
            for s in range(S):
                with torch.no_grad():
                    theta = ops.sample(mu, rho, seed, s, starts)
                theta = [t.requires_grad_(True) for t in theta]
                loss = nll(theta, index) * (scale / S)
                grads = [g.contiguous() for g in torch.autograd.grad(loss, theta)]
                out = [v.grad for v in variables] if s == 0 else scratch
                ops.elbo_backward_(out[: len(mu)], out[len(mu):], grads, mu, rho, prior.mu, prior.rho,
                                   seed, s, beta / S, starts)
                if s > 0:
                    torch._foreach_add_([v.grad for v in variables], scratch)
                total += float(loss.detach())
            last = total
        if not math.isfinite(last):
            raise FloatingPointError(f"VI step {step}: the negative log-likelihood is {last}")
        opt.step()
        if callback is not None:
            callback(step + 1, Posterior(init.names, mu, rho))
    return FitResult(Posterior(init.names, [m.detach() for m in mu], [r.detach() for r in rho]), last)


def _minibatch(n_data: int, config: VIConfig, generator: torch.Generator | None,
               device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A random subset of the data (and the factor that rescales its sum to the full data)."""
    if config.batch_size is not None and config.batch_size < n_data:
        return torch.randperm(n_data, generator=generator)[: config.batch_size].to(device), n_data / config.batch_size
    return None, 1.0


def _fit_von(nll: NLL, n_data: int, prior: Posterior, init: Posterior, config: VIConfig,
             generator: torch.Generator | None, callback: Callable[[int, Posterior], None] | None,
             task_range: tuple[int, int] | None, create_graph: bool = False) -> FitResult:
    """`fit` with the variational online Newton step (see VariationalOnlineNewton).

    create_graph=True is the same update as a differentiable composite (for the learners that
    back-propagate through their inner loop): `prior` and `init` may carry a graph to the
    meta-parameters, the data gradient is taken with create_graph, the step is
    `step_differentiable`, and the returned posterior carries the graph. The curvature rows, the
    backtracking decision (each task's accepted step fraction) and the merit values are data."""
    von = VariationalOnlineNewton(lr=config.lr, **config.optimizer_kwargs)
    if von.uses_ggn() and not hasattr(nll, "value_grad_rows"):
        raise TypeError("fit: von with curvature='ggn' needs a gemext.vi.DataTerm (the model's outputs and "
                        "likelihood) instead of a plain nll callable; pass optimizer_kwargs="
                        "{'curvature': 'reparam', 'coupling': 'diag'} for any callable")
    if create_graph:
        mu, rho = list(init.mu), list(init.rho)
        data_prior = Posterior(prior.names, [m.detach() for m in prior.mu], [r.detach() for r in prior.rho])
    else:
        mu = [m.detach().clone() for m in init.mu]
        rho = [r.detach().clone() for r in init.rho]
        data_prior = prior
    h = [torch.zeros_like(m).detach() for m in mu]
    S, beta = config.mc_samples, config.beta
    starts = task_starts(mu, task_range or current_task_range())
    last = float("nan")
    merit: torch.Tensor | None = None
    if callback is not None:
        callback(0, Posterior(init.names, mu, rho))
    for step in range(config.steps):
        index, scale = _minibatch(n_data, config, generator, mu[0].device)
        seed = ops.new_seed(generator)
        grad: list[torch.Tensor] | None = None  # summed over the MC samples
        rows: list[list[torch.Tensor]] = []
        offsets: list[torch.Tensor] = []
        curv = None
        extra: dict[int, torch.Tensor] = {}
        total = 0.0
        need_eps = create_graph or (not von.uses_ggn() and S > 1)  # else the kernels regenerate ε themselves
        for s in range(S):
            if need_eps:
                with torch.no_grad():
                    eps = ops.sample([torch.zeros_like(m) for m in mu], [torch.zeros_like(r) for r in rho], seed, s,
                                     starts)
            with torch.enable_grad():
                if create_graph:  # θ = μ + σε as a graph (the fused sample is first-order only)
                    theta = [m + r.exp() * e for m, r, e in zip(mu, rho, eps)]
                else:
                    with torch.no_grad():
                        theta = ops.sample(mu, rho, seed, s, starts)
                if von.uses_ggn():
                    value, g, r_s = nll.value_grad_rows([t.detach() for t in theta], index, generator)
                    if create_graph:
                        g = list(torch.autograd.grad(nll(theta, index), theta, create_graph=True))
                    total += value * (scale / S)
                    g = [gi * (scale / S) for gi in g]
                    r_s = [r * math.sqrt(scale / S) for r in r_s]
                    rows.append(r_s)
                    if von.control_variate:  # R(θ − μ); differentiable in σ in graph mode (the noise it cancels)
                        delta = _flat([t - m for t, m in zip(theta, mu)])
                        offsets.append(torch.einsum("tmd,td->tm", _flat_rows(r_s), delta))
                    for i, c in nll.lik_curvature(theta, index).items():
                        extra[i] = extra.get(i, 0.0) + c * (scale / S)
                else:
                    if not create_graph:
                        theta = [t.requires_grad_(True) for t in theta]
                    loss = nll(theta, index) * (scale / S)
                    g = list(torch.autograd.grad(loss, theta, create_graph=create_graph))
                    total += float(loss.detach())
                    if S > 1:  # the kernel's own g·ε/σ uses sample 0 only: average the clamped estimates
                        c_s = [(gi * e * torch.exp(-r)).clamp_min(0) / S for gi, e, r in zip(g, eps, rho)]
                        curv = c_s if curv is None else [a + b for a, b in zip(curv, c_s)]
            if not create_graph:
                g = [gi.detach() for gi in g]
            grad = g if grad is None else [a + b for a, b in zip(grad, g)]
        last = total
        if not math.isfinite(last):
            raise FloatingPointError(f"VI step {step}: the negative log-likelihood is {last}")
        stacked = [torch.cat(parts, 1) for parts in zip(*rows)] if rows else None
        row_offset = torch.cat(offsets, 1) if offsets else None
        search = von.backtrack > 0 and hasattr(nll, "task_nll")
        mu_old = [m.detach().clone() for m in mu] if search else None
        if search and (merit is None or index is not None):  # full-data steps reuse the last accepted value
            merit = _merit(nll, mu_old, data_prior, beta, index, scale)
        if create_graph:
            with torch.enable_grad():
                mu_new, rho, h = von.step_differentiable(mu, rho, h, grad, stacked, extra, prior, beta, seed, starts,
                                                         curv, row_offset)
            if search:
                trial = [m.detach().clone() for m in mu_new]
                merit, frac = _backtrack_(nll, trial, mu_old, merit, data_prior, beta, index, scale, von.backtrack)
                if bool((frac != 1).any()):
                    mu_new = [m0 + frac.to(m.dtype).reshape(-1, *([1] * (m.dim() - 1))) * (m - m0)
                              for m, m0 in zip(mu_new, mu)]
            mu = mu_new
        else:
            von.step(mu, rho, h, grad, stacked, extra, prior, beta, seed, starts, curv, row_offset)
            if search:
                merit, _ = _backtrack_(nll, mu, mu_old, merit, prior, beta, index, scale, von.backtrack)
        if callback is not None:
            callback(step + 1, Posterior(init.names, mu, rho))
    return FitResult(Posterior(init.names, mu, rho), last)


def _merit(nll: "DataTerm", mu: list[torch.Tensor], prior: Posterior, beta: float,
           index: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Per-task deterministic objective at the mean: nll(μ) + β‖μ − μ₀‖²/(2σ₀²), [T]."""
    prior_term = sum(((m - m0).pow(2) * torch.exp(-2 * r0)).reshape(m.shape[0], -1).sum(1)
                     for m, m0, r0 in zip(mu, prior.mu, prior.rho))
    return nll.task_nll(mu, index) * scale + 0.5 * beta * prior_term


@torch.no_grad()
def _backtrack_(nll: "DataTerm", mu: list[torch.Tensor], mu_old: list[torch.Tensor], merit_old: torch.Tensor,
                prior: Posterior, beta: float, index: torch.Tensor | None, scale: float,
                halvings: int) -> torch.Tensor:
    """Halve the mean step of every task whose objective rose (NaN counts as a rise); undo it after
    `halvings` tries. Returns the objective at the accepted means and each task's accepted
    fraction of the step, [T] each."""
    frac = torch.ones_like(merit_old)
    for k in range(halvings + 1):
        merit = _merit(nll, mu, prior, beta, index, scale)
        # a rise within rounding (a converged step) is no rise: an exact comparison would let float
        # summation order (e.g. the task sharding of a distributed run) flip the decision
        bad = ~(merit <= merit_old + 1e-5 * merit_old.abs())
        if not bool(bad.any()):
            return merit, frac
        factor = 0.5 if k < halvings else 0.0
        frac = torch.where(bad, frac * factor, frac)
        for m, m_old in zip(mu, mu_old):
            b = bad.reshape(-1, *([1] * (m.dim() - 1)))
            m.copy_(torch.where(b, m_old + factor * (m - m_old), m))
    return torch.where(bad, merit_old, merit), frac
