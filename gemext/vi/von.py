"""Variational online Newton ("von"): its options (`VariationalOnlineNewton`), one fit with them
(`VonFit`, which `fit` runs for optimizer "von") and the products of the GGN rows."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.profiler import record_function

from .. import ops, reference
from ..gaussian import Posterior
from .noise import task_starts
from .terms import NLL, CurvatureTerm

if TYPE_CHECKING:
    from collections.abc import Callable

    from .loop import VIConfig


@dataclass(frozen=True)
class VariationalOnlineNewton:
    """The options of curvature-aware natural-gradient VI ("von") for a diagonal Gaussian
    q = N(μ, σ²), the variational online Newton family (VON/VOGN, Khan et al. 2018; IVON, Shen et
    al. 2024): per weight a running estimate h of the data term's curvature (its GGN diagonal), and

        h ← (1−τ)·h + τ·ĥ,       σ² = 1 / (β/σ₀² + h),
        μ ← μ − lr·P⁻¹·(∇E_q[nll] + β(μ−μ₀)/σ₀²),

    lr = 1 being a full Newton step. The posterior variance is derived, so it shrinks exactly where
    the data are informative, and σ₀ is only the prior precision, never a step size. Not a
    torch.optim optimizer: `fit` runs a `VonFit` with these options.

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

    lr: float = 1.0
    h_decay: float = 1.0
    damping: float = 0.0
    coupling: str = "full"
    curvature: str = "ggn"
    control_variate: bool = True
    backtrack: int = 4

    def __post_init__(self) -> None:
        for ok, problem in (
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                (0 < self.h_decay <= 1, f"h_decay must be in (0, 1], got {self.h_decay}"),
                (self.damping >= 0, f"damping must be >= 0, got {self.damping}"),
                (self.coupling in ("full", "diag"), f"coupling must be 'full' or 'diag', got {self.coupling!r}"),
                (self.curvature in ("ggn", "reparam"), f"curvature must be 'ggn' or 'reparam', got {self.curvature!r}"),
                (isinstance(self.backtrack, int) and self.backtrack >= 0,
                 f"backtrack must be an int >= 0, got {self.backtrack!r}"),
                (self.curvature == "ggn" or self.coupling == "diag",
                 "coupling='full' needs curvature='ggn' (the GGN factor); use coupling='diag'")):
            if not ok:
                raise ValueError(f"von: {problem}")


class Sampled(NamedTuple):
    """The data term of one step at its MC samples, each rescaled by scale/S (`VonFit.sample_terms`)."""

    value: float
    grad: list[torch.Tensor]
    curv: list[torch.Tensor] | None  # the GGN diagonal or g·ε/σ; None: the kernel forms g·ε/σ of sample 0
    rows: torch.Tensor | None  # the GGN factor of every sample, [T, S·M, D]
    offsets: torch.Tensor | None  # each row applied to its own sample's θ − μ (control variate), [T, S·M]
    lik_fisher: dict[int, torch.Tensor]  # the likelihood parameters' curvature, which have no rows


class VonFit:
    """One von fit of q(θ; μ, ρ) to the data behind `nll` from `init`, with KL to `prior`: its
    state (posterior, curvature average h, flat prior, the rows' workspace, the line search's last
    accepted objective) and its phases, each a `torch.profiler.record_function` range
    ``von.<phase>`` while a profiler runs: `sample_terms`, `solve`, `update`, `line_search`.

    differentiable=True is the same update as a differentiable composite (for the learners that
    back-propagate through their inner loop): `prior` and `init` may carry a graph to the
    meta-parameters, the data gradient is taken with create_graph, the update is
    `reference.von_step`, and the posterior carries the graph. The curvature rows, the line
    search's decision and its objective are data."""

    def __init__(self, nll: NLL, prior: Posterior, init: Posterior, config: VIConfig,
                 generator: torch.Generator | None = None, task_range: tuple[int, int] | None = None,
                 differentiable: bool = False) -> None:
        self.options = VariationalOnlineNewton(lr=config.lr, **config.optimizer_kwargs)
        self.term = nll if isinstance(nll, CurvatureTerm) else None
        if self.options.curvature == "ggn" and self.term is None:
            raise TypeError("fit: von with curvature='ggn' needs a gemext.vi.DataTerm (the model's outputs and "
                            "likelihood) instead of a plain nll callable; pass optimizer_kwargs="
                            "{'curvature': 'reparam', 'coupling': 'diag'} for any callable")
        self.nll, self.config, self.generator, self.differentiable = nll, config, generator, differentiable
        self.names, self.prior, self.beta = init.names, prior, config.beta
        if differentiable:
            self.mu, self.rho = list(init.mu), list(init.rho)
        else:
            self.mu, self.rho = [m.detach().clone() for m in init.mu], [r.detach().clone() for r in init.rho]
        self.h = [torch.zeros_like(m).detach() for m in self.mu]
        self.starts = task_starts(self.mu, task_range)
        with torch.set_grad_enabled(differentiable):  # a graph the prior carries reaches the update
            self.mu0, self.prior_prec = _flat(prior.mu), torch.exp(-2 * _flat(prior.rho))  # [T, D]
            self.prec0 = self.beta * self.prior_prec
            self.lam = self.prec0 + self.options.damping
            self.lam_inv = self.lam.reciprocal()
        self.search = self.options.backtrack > 0 and self.term is not None
        self.merit: torch.Tensor | None = None  # the objective at the accepted means, [T]
        self.spare_rows: list[torch.Tensor | None] = [None] * config.mc_samples  # each sample's last rows
        self._products: torch.Tensor | None = None

    def run(self, n_data: int, callback: Callable[[int, Posterior], None] | None = None
            ) -> tuple[Posterior, float]:
        """`config.steps` steps; returns the posterior and the data term of the last step."""
        if callback is not None:
            callback(0, Posterior(self.names, self.mu, self.rho))
        last = float("nan")
        for step in range(self.config.steps):
            index, scale = self.config.minibatch(n_data, self.generator, self.mu[0].device)
            seed = ops.new_seed(self.generator)
            with _phase("von.sample_terms"):
                sampled = self.sample_terms(index, scale, seed)
            last = sampled.value
            if not math.isfinite(last):
                raise FloatingPointError(f"VI step {step}: the negative log-likelihood is {last}")
            # without a graph the update overwrites μ: the line search needs the step's start
            before = [m.clone() for m in self.mu] if self.search and not self.differentiable else self.mu
            with torch.set_grad_enabled(self.differentiable):
                with _phase("von.solve"):
                    terms = self.solve(sampled)
                with _phase("von.update"):
                    self.update(*terms, seed)
            if self.search:
                with _phase("von.line_search"):
                    self.line_search(before, index, scale)
            if callback is not None:
                callback(step + 1, Posterior(self.names, self.mu, self.rho))
        return Posterior(self.names, self.mu, self.rho), last

    def sample_terms(self, index: torch.Tensor | None, scale: float, seed: int) -> Sampled:
        """The data term (the points `index`, its sum rescaled by `scale`) at the S samples
        θ = μ + σε of `seed`, each weighted 1/S."""
        S, w, graph = self.config.mc_samples, scale / self.config.mc_samples, self.differentiable
        ggn = self.options.curvature == "ggn"
        value, grad, curv, diag, rows, offsets, fisher = 0.0, None, None, None, [], [], {}
        for s in range(S):
            if graph or (not ggn and S > 1):  # else the kernels regenerate ε themselves
                with torch.no_grad():
                    eps = ops.sample([torch.zeros_like(m) for m in self.mu], [torch.zeros_like(r) for r in self.rho],
                                     seed, s, self.starts)
            with torch.enable_grad():
                if graph:  # θ = μ + σε as a graph (the fused sample is first-order only)
                    theta = [m + r.exp() * e for m, r, e in zip(self.mu, self.rho, eps)]
                else:
                    with torch.no_grad():
                        theta = ops.sample(self.mu, self.rho, seed, s, self.starts)
                if ggn:
                    # the rows of this sample at the last step are dead by now: their block takes this
                    # step's (a fresh one each step costs page faults); not with a graph, which holds them
                    v, g, R, d = self.term.value_grad_rows([t.detach() for t in theta], index, self.generator,
                                                           None if graph else self.spare_rows[s])
                    self.spare_rows[s] = R
                    if graph:
                        g = list(torch.autograd.grad(self.term(theta, index), theta, create_graph=True))
                    value += v * w
                    if w != 1.0:  # a minibatch or one of S samples: its terms rescaled
                        d, g = d * w, [gi * w for gi in g]
                        R.mul_(math.sqrt(w))  # in place: a block of its own (see above)
                    diag = d if diag is None else diag + d
                    rows.append(R)
                    if self.options.control_variate:  # R(θ − μ); with a graph differentiable in σ (its noise)
                        delta, buf = _flat(theta) - _flat(self.mu), None if graph else self.products(R)
                        offsets.append(rows_times(R, delta, buf))
                    for i, c in self.term.lik_curvature(theta, index).items():
                        fisher[i] = fisher.get(i, 0.0) + c * w
                else:
                    if not graph:
                        theta = [t.requires_grad_(True) for t in theta]
                    loss = self.nll(theta, index) * w
                    g = list(torch.autograd.grad(loss, theta, create_graph=graph))
                    value += float(loss.detach())
                    if S > 1:  # the kernel's own g·ε/σ uses sample 0 only: average the clamped estimates
                        c_s = [(gi * e * torch.exp(-r)).clamp_min(0) / S for gi, e, r in zip(g, eps, self.rho)]
                        curv = c_s if curv is None else [a + b for a, b in zip(curv, c_s)]
            if not graph:
                g = [gi.detach() for gi in g]
            grad = g if grad is None else [a + b for a, b in zip(grad, g)]
        if not rows:
            return Sampled(value, grad, curv, None, None, fisher)
        return Sampled(value, grad, _unflatten(diag, self.mu), rows[0] if S == 1 else torch.cat(rows, 1),
                       torch.cat(offsets, 1) if offsets else None, fisher)

    def solve(self, sampled: Sampled
              ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """What the per-weight update needs from the GGN rows: (gradient, curvature ĥ, the
        coupling correction Rᵀz of the Woodbury solve or None)."""
        grad, curv, R, offsets, fisher = sampled.grad, sampled.curv, sampled.rows, sampled.offsets, sampled.lik_fisher
        if R is None:
            return grad, curv, None
        for i, c in fisher.items():
            curv[i] = c
        if self.options.coupling == "diag":
            if offsets is not None:
                grad = [g - c for g, c in zip(grad, _unflatten(rows_t_times(R, offsets), self.mu))]
            return grad, curv, None
        resid = _flat(grad) + self.prec0 * (_flat(self.mu) - self.mu0)  # [T, D]
        lam_inv = self.lam_inv
        if fisher:  # likelihood parameters have no GGN rows: their own (diagonal) Fisher joins Λ
            lam = self.lam + _flat([fisher.get(i, torch.zeros_like(m)) for i, m in enumerate(self.mu)])
            lam_inv = lam.reciprocal()
        # Woodbury: (Λ + RᵀR)⁻¹r = (r − Rᵀz)/Λ with z = (I + RΛ⁻¹Rᵀ)⁻¹RΛ⁻¹r. With the control
        # variate r = r₀ − Rᵀw (w = the rows applied to θ − μ), which folds into z:
        # r − Rᵀz = r₀ − Rᵀ(I + RΛ⁻¹Rᵀ)⁻¹(RΛ⁻¹r₀ + w): one solve covers both.
        # The small M×M system is factorised in float64: the eigenvalues of I + RΛ⁻¹Rᵀ span 1
        # to ~‖R‖²/Λ (1e8 on small nets with a wide prior). Should float32 rounding of the
        # product still break positive-definiteness, the product is redone in float64.
        prod = None if self.differentiable else self.products(R)  # out= does not differentiate
        L, info = _gram_cholesky(R, lam_inv, prod)
        failed = (info > 0).nonzero().flatten()
        if failed.numel():  # redo only those tasks, so a task's result never depends on its batch
            Ld, info_d = _gram_cholesky(R[failed].double(), lam_inv[failed].double())
            if bool((info_d > 0).any()):  # only non-finite rows get here: a diverged inner loop
                raise FloatingPointError("von step: the curvature of the data term is not finite "
                                         f"(task {int(failed[(info_d > 0).nonzero()[0, 0]])})")
            L = L.index_copy(0, failed, Ld)
        rhs = rows_times(R, lam_inv * resid, prod).unsqueeze(-1).double()
        if offsets is not None:
            rhs = rhs + offsets.double().unsqueeze(-1)
        z = torch.cholesky_solve(rhs, L).to(R.dtype)
        correction = _unflatten(rows_t_times(R, z.squeeze(-1), prod), self.mu)  # Rᵀz
        if fisher:  # the kernel divides by β/σ₀² + damping: a likelihood parameter's Fisher F enters the
            # correction as r·F/Λ
            resid_i, prec0_i = _unflatten(resid, self.mu), _unflatten(self.prec0, self.mu)
            for i, f in fisher.items():
                correction[i] = resid_i[i] * f / (prec0_i[i] + self.options.damping + f)
        return grad, curv, correction

    def update(self, grad: list[torch.Tensor], curv: list[torch.Tensor] | None,
               correction: list[torch.Tensor] | None, seed: int) -> None:
        """The per-weight update: the fused `von_step_` in place, or its differentiable composite
        (`curv` None: the g·ε/σ of sample 0 of `seed`)."""
        o, p = self.options, self.prior
        if self.differentiable:
            self.mu, self.rho, self.h = reference.von_step(self.mu, self.rho, self.h, grad, curv, p.mu, p.rho, seed,
                                                           0, o.lr, self.beta, o.h_decay, o.damping, correction,
                                                           self.starts)
        else:
            grad, curv, correction = ([t.contiguous() for t in ts] if ts is not None else None
                                      for ts in (grad, curv, correction))
            ops.von_step_(self.mu, self.rho, self.h, grad, curv, p.mu, p.rho, seed, 0, o.lr, self.beta, o.h_decay,
                          o.damping, correction, self.starts)

    def line_search(self, before: list[torch.Tensor], index: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Keep, per task, the largest fraction 1, 1/2, …, 2^-backtrack of its mean step (`before`
        → μ) whose objective at the mean, nll(μ) + β‖μ − μ₀‖²/(2σ₀²), does not rise above the last
        accepted one (NaN counts as a rise), or undo the step. Returns the fractions, [T]. Every
        fraction of every task is tried in ONE forward: most full Gauss-Newton steps on a network
        overshoot (3 tasks in 4 on sinusoid), and a halving loop would cost a second forward and a
        host sync for nearly every step. The arithmetic runs on the flattened weights."""
        with torch.no_grad():
            old, new = _flat(before), _flat(self.mu)
            mu0, prec = self.mu0.detach(), self.prior_prec.detach()
            d = old - mu0
            if self.merit is None or index is not None:  # full-data steps reuse the last accepted value
                self.merit = self.term.task_nll(_unflatten(old, self.mu), index) * scale \
                    + 0.5 * self.beta * (d * d * prec).sum(-1)
            T, step = old.shape[0], new - old
            f = 0.5 ** torch.arange(self.options.backtrack + 1, dtype=new.dtype, device=new.device)  # [F]
            F = f.numel()
            cand = (f.reshape(F, 1, 1) * step.unsqueeze(0)).add_(old)  # [F, T, D]: μ_old + fΔ
            rep = torch.arange(T, device=old.device).repeat(F)  # candidate i·T + t: task t at fraction f[i]
            data = self.term.tasks(rep).task_nll(_unflatten(cand.view(F * T, -1), self.mu), index).reshape(F, T)
            # the prior term along the step is a quadratic in f: ‖d + fΔ‖²/σ₀² = a + 2fb + f²c per task,
            # three reductions over [T, D] instead of one over all F candidates
            pd = prec * d
            a, b, c = (pd * d).sum(-1), (pd * step).sum(-1), (prec * step * step).sum(-1)
            trial = data * scale + 0.5 * self.beta * (a + f.unsqueeze(1) * (2 * b + f.unsqueeze(1) * c))
            # a rise within rounding (a converged step) is no rise: an exact comparison would let float
            # summation order (e.g. the task sharding of a distributed run) flip the decision
            merit_old = self.merit.unsqueeze(0)
            ok = trial <= merit_old + 1e-5 * merit_old.abs()
            any_ok = ok.any(0)
            first = ok.to(torch.int8).argmax(0)  # the largest fraction that does not rise
            frac = torch.where(any_ok, f[first], torch.zeros_like(f[first]))
            self.merit = torch.where(any_ok, trial.gather(0, first.unsqueeze(0)).squeeze(0), self.merit)
            if not self.differentiable:
                torch._foreach_copy_(self.mu, _unflatten(torch.lerp(old, new, frac.unsqueeze(1)), self.mu))
        if self.differentiable and bool((frac != 1).any()):  # the accepted fractions scale the graph's step
            self.mu = [m0 + frac.to(m.dtype).reshape(-1, *([1] * (m.dim() - 1))) * (m - m0)
                       for m, m0 in zip(self.mu, before)]
        return frac

    def products(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like `like` for the rows' products, kept across the fit's steps: a fresh
        [T, M, D] block per step costs page faults, up to 10× the arithmetic written into it
        ([25, 20, 1761]: 1.3 ms against 0.13 ms). Its storage only grows, for uses of any shape."""
        buf, n = self._products, like.numel()
        if buf is None or buf.numel() < n:
            buf = self._products = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(like.shape)


def _phase(name: str) -> AbstractContextManager:
    # only while a profiler runs: without one a range still cost 45 µs (5% of a sinusoid fit's time)
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def _gram_cholesky(R: torch.Tensor, lam_inv: torch.Tensor, prod: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cholesky factor of I + RΛ⁻¹Rᵀ per task, in float64, and cholesky_ex's info. RΛ⁻¹ goes into
    `prod` when given (the right-hand side takes R(Λ⁻¹r)): one [T, M, D] block per fit fewer."""
    K = torch.bmm(torch.mul(R, lam_inv.unsqueeze(1), out=prod), R.transpose(1, 2)).double()
    K.diagonal(dim1=1, dim2=2).add_(1.0)
    return torch.linalg.cholesky_ex(K)


def rows_times(R: torch.Tensor, v: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """R v per task: R [T, M, D], v [T, D] -> [T, M], summed in a fixed order; `buf`, a free
    tensor shaped like R, takes the products (a fresh one per call costs page faults; not with a
    graph: out= does not differentiate). Not bmm: with the vector as a row the BLAS rounds by the
    rows' memory alignment — a task's result moved by 3e-5 with its place in the batch, enough to
    break the agreement of a sharded run with one process (test_every_learner_two_ranks_match_one)
    — and as a [T, D, 1] column it depends on the batch size (a task alone against four) and is 5×
    slower."""
    return torch.mul(R, v.unsqueeze(1), out=buf).sum(-1)


def rows_t_times(R: torch.Tensor, z: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rᵀz per task: R [T, M, D], z [T, M] -> [T, D], summed over the rows in order (as in
    `rows_times`)."""
    return torch.mul(R, z.unsqueeze(-1), out=buf).sum(1)


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
