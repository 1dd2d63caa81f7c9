"""Variational online Newton (`VariationalOnlineNewton`): its step, the flat/unflatten helpers of
the GGN rows, and the per-task backtracking on the deterministic merit."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from .. import ops, reference
from ..gaussian import Posterior

if TYPE_CHECKING:
    from .terms import DataTerm


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

    def workspace(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like `like`, kept across the steps of a fit (one instance serves one
        fit): a fresh [T, M, D] block per step costs page faults that took up to 10× the
        arithmetic written into it ([25, 20, 1761]: 1.3 ms against 0.13 ms). The storage only
        grows, so the uses of one name may differ in shape (the products of one sample's rows,
        then of all samples' rows)."""
        work = self.__dict__.setdefault("_work", {})
        buf, n = work.get(name), like.numel()
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = work[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(like.shape)

    def uses_ggn(self) -> bool:
        return self.curvature == "ggn"

    def flat_prior(self, prior: Posterior) -> FlatPrior:
        """`prior` flat (`FlatPrior`), computed once per fit for the step and the line search alike:
        a fit's prior does not change (the same object every step). Computed again when grad mode
        changes, so that a graph the prior carries is kept where the step builds one."""
        key = torch.is_grad_enabled()
        cached = self.__dict__.get("_flat_prior")
        if cached is None or cached[0] is not prior or cached[1] != key:
            cached = self._flat_prior = (prior, key, FlatPrior.of(prior))
        return cached[2]

    def _prior_terms(self, prior: Posterior, beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ₀, β/σ₀², Λ = β/σ₀² + damping, 1/Λ), flat [T, D], computed once per fit."""
        flat = self.flat_prior(prior)
        cached = self.__dict__.get("_prior")
        if cached is None or cached[0] is not flat or cached[1] != beta:
            prec0 = beta * flat.prec
            lam = prec0 + self.damping
            cached = self._prior = (flat, beta, flat.mu, prec0, lam, lam.reciprocal())
        return cached[2:]

    @torch.no_grad()
    def step(self, mu: list[torch.Tensor], rho: list[torch.Tensor], h: list[torch.Tensor],
             grad: list[torch.Tensor], rows: torch.Tensor | None, extra_curv: dict[int, torch.Tensor],
             prior: Posterior, beta: float, seed: int, starts: list[int] | None,
             curv: list[torch.Tensor] | None = None, row_offset: torch.Tensor | None = None) -> None:
        """One update in place of μ, ρ, h. `grad`: the sampled gradient of the data term (summed
        over MC samples of the loss already divided by their number); `rows`: the GGN factor R of
        that loss, [T, M, D] over the flattened weights (`DataTerm.ggn_rows`), or None for "reparam" (the
        kernel then forms g·ε/σ from the ε of (seed, 0) unless `curv` is given); `curv` with rows:
        their diagonal Σ_m R² when already known (else computed here); `row_offset`
        [T, M]: each row applied to its own sample's θ − μ, for the control variate (the rows of S
        samples are stacked)."""
        grad, curv, correction = self.terms(mu, grad, rows, extra_curv, prior, beta, curv, row_offset)
        grad = [g.contiguous() for g in grad]
        ops.von_step_(mu, rho, h, grad, [c.contiguous() for c in curv] if curv is not None else None,
                      prior.mu, prior.rho, seed, 0, self.lr, beta, self.h_decay, self.damping,
                      [c.contiguous() for c in correction] if correction is not None else None, starts)

    def step_differentiable(self, mu: list[torch.Tensor], rho: list[torch.Tensor], h: list[torch.Tensor],
                            grad: list[torch.Tensor], rows: torch.Tensor | None,
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

    def terms(self, mu: list[torch.Tensor], grad: list[torch.Tensor], rows: torch.Tensor | None,
              extra_curv: dict[int, torch.Tensor], prior: Posterior, beta: float,
              curv: list[torch.Tensor] | None, row_offset: torch.Tensor | None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """What the per-weight update needs from the GGN rows: (gradient, curvature ĥ, coupling
        correction Rᵀz of the Woodbury solve or None); autograd-transparent."""
        correction = None
        if rows is not None:
            R = rows  # [T, M, D]
            if curv is None:  # the GGN diagonal, unless the data term gave it (`DataTerm.value_grad_rows`)
                curv = _unflatten((R * R).sum(1), mu)
            else:
                curv = list(curv)
            for i, c in extra_curv.items():
                curv[i] = c
            if self.coupling == "full":
                mu0, prec0, lam, lam_inv = self._prior_terms(prior, beta)
                resid = _flat(grad) + prec0 * (_flat(mu) - mu0)  # [T, D]
                if extra_curv:  # likelihood parameters have no GGN rows: their own (diagonal) Fisher joins Λ
                    lam = lam + _flat([extra_curv.get(i, torch.zeros_like(m)) for i, m in enumerate(mu)])
                    lam_inv = lam.reciprocal()
                # Woodbury: (Λ + RᵀR)⁻¹r = (r − Rᵀz)/Λ with z = (I + RΛ⁻¹Rᵀ)⁻¹RΛ⁻¹r. With the control
                # variate r = r₀ − Rᵀw (w = the rows applied to θ − μ), which folds into z:
                # r − Rᵀz = r₀ − Rᵀ(I + RΛ⁻¹Rᵀ)⁻¹(RΛ⁻¹r₀ + w): one solve covers both.
                # The small M×M system is factorised in float64: the eigenvalues of I + RΛ⁻¹Rᵀ span 1
                # to ~‖R‖²/Λ (1e8 on small nets with a wide prior). Should float32 rounding of the
                # product still break positive-definiteness, the product is redone in float64.
                graph = _builds_graph(R, lam_inv)
                prod = None if graph else self.workspace("products", R)
                # RΛ⁻¹ is only needed for K (the right-hand side takes R(Λ⁻¹r)): it goes into the products'
                # buffer, one [T, M, D] block per fit fewer to fault in
                Y = R * lam_inv.unsqueeze(1) if graph else torch.mul(R, lam_inv.unsqueeze(1), out=prod)
                K = torch.bmm(Y, R.transpose(1, 2)).double()
                K.diagonal(dim1=1, dim2=2).add_(1.0)
                L, info = torch.linalg.cholesky_ex(K)
                failed = (info > 0).nonzero().flatten()
                if failed.numel():  # redo only those tasks, so a task's result never depends on its batch
                    Rd = R[failed].double()
                    Kd = torch.bmm(Rd * lam_inv[failed].double().unsqueeze(1), Rd.transpose(1, 2))
                    Kd.diagonal(dim1=1, dim2=2).add_(1.0)
                    Ld, info_d = torch.linalg.cholesky_ex(Kd)
                    if bool((info_d > 0).any()):  # only non-finite rows get here: a diverged inner loop
                        raise FloatingPointError("von step: the curvature of the data term is not finite "
                                                 f"(task {int(failed[(info_d > 0).nonzero()[0, 0]])})")
                    L = L.index_copy(0, failed, Ld)
                rhs = rows_times(R, lam_inv * resid, prod).unsqueeze(-1).double()
                if self.control_variate and row_offset is not None:
                    rhs = rhs + row_offset.double().unsqueeze(-1)
                z = torch.cholesky_solve(rhs, L).to(R.dtype)
                # the kernel divides by β/σ₀² + damping: a likelihood parameter's Fisher F enters the
                # correction as r·F/Λ
                correction = _unflatten(rows_t_times(R, z.squeeze(-1), prod), mu)  # Rᵀz
                if extra_curv:
                    resid_i, prec0_i = _unflatten(resid, mu), _unflatten(prec0, mu)
                    for i, f in extra_curv.items():
                        correction[i] = resid_i[i] * f / (prec0_i[i] + self.damping + f)
            elif self.control_variate and row_offset is not None:
                cv = rows_t_times(R, row_offset)
                grad = [g - c for g, c in zip(grad, _unflatten(cv, mu))]
        return grad, curv, correction


def rows_times(R: torch.Tensor, v: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """R v per task: R [T, M, D], v [T, D] -> [T, M], summed in a fixed order; `buf`, a free
    tensor shaped like R, takes the products when no graph is built (a fresh one per call costs
    page faults). Not bmm: with the vector as a row the BLAS rounds by the rows' memory alignment —
    a task's result moved by 3e-5 with its place in the batch, enough to break the agreement of a
    sharded run with one process (test_every_learner_two_ranks_match_one) — and as a [T, D, 1]
    column it depends on the batch size (a task alone against four) and is 5× slower."""
    return _summed_products(R, v.unsqueeze(1), -1, buf)


def rows_t_times(R: torch.Tensor, z: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rᵀz per task: R [T, M, D], z [T, M] -> [T, D], summed over the rows in order (as in
    `rows_times`)."""
    return _summed_products(R, z.unsqueeze(-1), 1, buf)


def _summed_products(R: torch.Tensor, x: torch.Tensor, dim: int, buf: torch.Tensor | None) -> torch.Tensor:
    if buf is not None and not _builds_graph(R, x):
        return torch.mul(R, x, out=buf).sum(dim)
    return (R * x).sum(dim)


def _builds_graph(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in ts], -1)


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` [B, D] shaped like the tensors of `like` past their leading dimension."""
    out, pos = [], 0
    for t in like:
        n = math.prod(t.shape[1:])
        out.append(flat[:, pos:pos + n].reshape(flat.shape[0], *t.shape[1:]))
        pos += n
    return out


class FlatPrior(NamedTuple):
    """The prior's μ₀ and 1/σ₀² = exp(−2ρ₀), flat [T, D]: a fit computes them once (its prior is
    fixed) for the step and the per-task objective of the backtracking."""

    mu: torch.Tensor
    prec: torch.Tensor

    @classmethod
    def of(cls, prior: Posterior) -> FlatPrior:
        return cls(_flat(prior.mu), torch.exp(-2 * _flat(prior.rho)))


def _merit(nll: DataTerm, mu: list[torch.Tensor], prior: Posterior | FlatPrior, beta: float,
           index: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Per-task deterministic objective at the mean: nll(μ) + β‖μ − μ₀‖²/(2σ₀²), [T]."""
    mu0, prec0 = prior if isinstance(prior, FlatPrior) else FlatPrior.of(prior)
    d = _flat(mu) - mu0
    return nll.task_nll(mu, index) * scale + 0.5 * beta * (d * d * prec0).sum(-1)


@torch.no_grad()
def _backtrack_(nll: DataTerm, mu: list[torch.Tensor], mu_old: torch.Tensor, merit_old: torch.Tensor,
                prior: Posterior | FlatPrior, beta: float, index: torch.Tensor | None, scale: float,
                halvings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per task, the largest fraction 1, 1/2, …, 2^-halvings of its mean step (μ_old → μ,
    applied in place to `mu`; μ_old flat, [T, D]) whose objective does not rise (NaN counts as a
    rise), or undo the step. Returns the objective at the accepted means and each task's accepted
    fraction, [T] each.

    Every fraction of every task is tried in ONE forward over [(halvings + 1) × T] candidates: on
    a network most full Gauss-Newton steps overshoot (about 3 tasks in 4 on sinusoid), so trying
    the halvings only after the full step failed costs a second forward, index copies and a host
    sync for nearly every step. The decision is the one a halving loop makes; nothing syncs. The
    arithmetic runs on the flattened weights (a few ops over [T, D], not a few per weight tensor)."""
    T = merit_old.shape[0]
    mu0, prec0 = prior if isinstance(prior, FlatPrior) else FlatPrior.of(prior)
    new = _flat(mu)
    step = new - mu_old
    f = 0.5 ** torch.arange(halvings + 1, dtype=new.dtype, device=new.device)  # [F]
    F = f.numel()
    cand = (f.reshape(F, 1, 1) * step.unsqueeze(0)).add_(mu_old)  # [F, T, D]: μ_old + fΔ
    rep = torch.arange(T, device=merit_old.device).repeat(F)  # candidate i·T + t: task t at fraction f[i]
    data = nll.tasks(rep).task_nll(_unflatten(cand.view(F * T, -1), mu), index).reshape(F, T)
    # the prior term along the step is a quadratic in f: ‖d + fΔ‖²/σ₀² = a + 2fb + f²c per task,
    # three reductions over [T, D] instead of one over all F candidates
    d = mu_old - mu0
    pd = prec0 * d
    a, b, c = (pd * d).sum(-1), (pd * step).sum(-1), (prec0 * step * step).sum(-1)
    trial = data * scale + 0.5 * beta * (a + f.unsqueeze(1) * (2 * b + f.unsqueeze(1) * c))
    ok = _no_rise(trial, merit_old.unsqueeze(0))
    any_ok = ok.any(0)
    first = ok.to(torch.int8).argmax(0)  # the largest fraction that does not rise
    frac = torch.where(any_ok, f[first], torch.zeros_like(f[first]))
    merit = torch.where(any_ok, trial.gather(0, first.unsqueeze(0)).squeeze(0), merit_old)
    torch._foreach_copy_(mu, _unflatten(torch.lerp(mu_old, new, frac.unsqueeze(1)), mu))
    return merit, frac


def _no_rise(merit: torch.Tensor, merit_old: torch.Tensor) -> torch.Tensor:
    # a rise within rounding (a converged step) is no rise: an exact comparison would let float
    # summation order (e.g. the task sharding of a distributed run) flip the decision; NaN rises
    return merit <= merit_old + 1e-5 * merit_old.abs()
