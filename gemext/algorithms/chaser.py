"""Chaser learners: a posterior fitted on the support set (the chaser) is pulled toward one fitted on
support ∪ query (the leader, held fixed).

KL-chaser (`kl-chaser`, the Gradient-EM / L[2] cell the paper names and leaves unexplored)
------------------------------------------------------------------------------------------
λ_tr(Θ) = VI(Θ, D_tr) (the chaser); λ_all = VI(λ_tr, D_val) (the leader: the support posterior is the
prior and the start of the second fit, as in GEM-BML), held fixed. Meta-loss, averaged over tasks:

    L(Θ) = KL(q_all ‖ q_tr(Θ)).

Why it estimates L[2] = −log p(D_val | D_tr; Θ): with q_tr ≈ p(θ | D_tr; Θ),
p(D_val | D_tr; Θ) ≈ ∫ p(D_val | θ) q_tr(θ; λ_tr) dθ, a marginal likelihood whose *prior* is q_tr.
Theorem 1 with λ_tr in the prior's role gives
    ∇_λtr log p(D_val; λ_tr) = E_{p(θ | D_val; λ_tr)} ∇_λtr log q(θ; λ_tr)
                            ≈ E_{q_all} ∇_λtr log q(θ; λ_tr) = −∇_λtr KL(q_all ‖ q_tr),
using the leader q_all ≈ p(θ | D_val; λ_tr) = p(θ | D_all; Θ). In closed form per weight this is the
Gradient-EM statistic ĝ = gem_grad(μ₀ := μ_tr, ρ₀ := ρ_tr; λ_a := λ_all):
    ĝ_μ = (μ_all − μ_tr)/σ_tr²,   ĝ_ρ = ((μ_all − μ_tr)² + σ_all²)/σ_tr² − 1,
and ∂L/∂λ_tr = −ĝ. The chain to Θ is ∇_Θ L = (∂λ_tr/∂Θ)ᵀ(−ĝ):
- `first_order=False` (default): back-propagation of −ĝ through the unrolled support VI (the
  differentiable VI of `VILearner`); exact when both posteriors are exact (conjugate model), since
  then p(D_val | D_tr; Θ) = p(D_val; λ_tr*(Θ)) exactly.
- `first_order=True`: ∂λ_tr/∂Θ ≈ I, so Θ.grad = −mean_τ ĝ_τ; no back-propagation, memory flat in
  the inner steps (like GEM-BML+, whose μ₀ statistic (μ_all − μ_tr)/σ₀² differs by σ_tr² ↔ σ₀²).

BMAML (`bmaml`, Yoon et al. 2018)
---------------------------------
Meta-parameters: M initial particles Θ = {θ₀ᵐ}. Inner loop: K SVGD steps on log p(D_tr | θ)
(the summed NLL; no prior term), φᵐ ← φᵐ + lr·φ*(φᵐ) with
    φ*(x) = 1/M Σ_j [k(x_j, x) ∇_{x_j} log p(D | x_j) + ∇_{x_j} k(x_j, x)],
k(a, b) = exp(−‖a − b‖²/h), h = med / log(M + 1), med the median of the squared distances between
distinct particles (the median heuristic of Liu & Wang; h is not differentiated). Chaser loss: the
leader continues SVGD from the chaser for `leader_steps` on D_tr ∪ D_val and is held fixed;
L(Θ) = mean_τ Σ_m ‖φᵐ_K(Θ) − stopgrad(leaderᵐ)‖², back-propagated through the chaser's SVGD steps
(`first_order=True` drops the second-order terms). Predictions average over the particles.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import ops
from ..gaussian import Posterior, split_parameters
from ..tasks import Task
from .elbo import VILearner
from .functional import FunctionalLearner, Params
from .predictors import BayesianPredictor
from .registry import register_class


class KLChaserLearner(VILearner):
    """KL-chaser (see the module docstring). Options: those of VILearner, plus first_order
    (default False) and query_steps (VI steps of the leader on the query, default inner.steps)."""

    def __init__(self, model: nn.Module, first_order: bool = False, query_steps: int | None = None,
                 **options: Any) -> None:
        self.name = self.variant = "kl-chaser"
        super().__init__(model, **options)
        self.first_order = bool(first_order)
        if query_steps is not None and query_steps < 0:
            raise ValueError(f"kl-chaser: option query_steps must be >= 0, got {query_steps}")
        self.query_steps = self.inner.steps if query_steps is None else int(query_steps)

    def posteriors(self, b: Task, task_range: tuple[int, int] | None = None) -> tuple[Params, Params, Posterior]:
        """(μ_tr, ρ_tr, leader λ_all) for a stacked batch; λ_tr carries the graph to Θ unless
        first_order."""
        T = len(b)
        if self.first_order:
            prior = self.prior.expand(T)
            tr = self._fit(b.x_support, b.y_support, prior, prior, self.inner.steps, task_range=task_range).posterior
            mu_tr, rho_tr = tr.mu, tr.rho
        else:
            mu_tr, rho_tr, _ = self._vi(b.x_support, b.y_support, list(self.prior.mu0), list(self.prior.rho0),
                                        self.inner.steps, create_graph=True, task_range=task_range)
        tr = Posterior(self.prior.names, [m.detach() for m in mu_tr], [r.detach() for r in rho_tr])
        leader = self._fit(b.x_query, b.y_query, tr, tr, self.query_steps, task_range=task_range).posterior
        return mu_tr, rho_tr, leader

    def _meta_backward(self, b: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        T = len(b)
        mu_tr, rho_tr, lead = self.posteriors(b, task_range)
        mu_d, rho_d = [m.detach() for m in mu_tr], [r.detach() for r in rho_tr]
        g_mu, g_rho = ops.gem_grad(mu_d, rho_d, lead.mu, lead.rho)  # ĝ per task, λ_tr as the prior
        if self.first_order:
            self._accumulate(list(self.prior.mu0) + list(self.prior.rho0), [-g.sum(0) / T for g in g_mu + g_rho])
        else:
            torch.autograd.backward(mu_tr + rho_tr, [-g / T for g in g_mu + g_rho])
        kl = ops.gaussian_kl(lead.mu, lead.rho, mu_d, rho_d)
        return {"kl_chaser": float(kl) / T}


# ----------------------------------------------------------------------------------- SVGD
def svgd_direction(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """φ*(x_m) = 1/M Σ_j [k(x_j, x_m) score_j + ∇_{x_j} k(x_j, x_m)] for particles x [B, M, D]
    with scores ∇ log p at them [B, M, D]; RBF kernel k(a, b) = exp(−‖a−b‖²/h), h = med/log(M+1)
    per batch element, med the median (interpolated) of the squared distances between distinct
    particles (h detached, at least the dtype's eps)."""
    B, M, _ = x.shape
    d2 = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)  # [B, M, M], d2[b, j, m] = ‖x_j − x_m‖²
    if M > 1:
        off = ~torch.eye(M, dtype=torch.bool, device=x.device)
        h = d2.detach()[:, off].quantile(0.5, dim=1) / math.log(M + 1)
    else:  # one particle: the kernel terms vanish whatever h is
        h = torch.ones(B, dtype=x.dtype, device=x.device)
    h = h.clamp_min(torch.finfo(x.dtype).eps).view(B, 1, 1)
    k = torch.exp(-d2 / h)  # symmetric
    drive = k.transpose(1, 2) @ score  # Σ_j k(x_j, x_m) score_j
    # ∇_{x_j} k(x_j, x_m) = −2 (x_j − x_m)/h · k  →  Σ_j: 2/h (x_m Σ_j k_jm − Σ_j k_jm x_j)
    repulse = 2.0 / h * (x * k.sum(1).unsqueeze(-1) - k.transpose(1, 2) @ x)
    return (drive + repulse) / M


class ParticlePredictor(BayesianPredictor):
    """Predictions averaged over particles [T, M, ...] (the mixture of the particles' predictives)."""

    def __init__(self, net, likelihood, particles: Params, names: list[str], squeeze: bool) -> None:
        self.particles = [p.detach() for p in particles]
        super().__init__(net, likelihood, Posterior(names, [p[:, 0] for p in self.particles],
                                                    [torch.full_like(p[:, 0], float("-inf")) for p in self.particles]),
                         squeeze, samples=self.particles[0].shape[1])

    def _draws(self):
        return [[p[:, m] for p in self.particles] for m in range(self.samples)]


class BMAMLLearner(FunctionalLearner):
    """Bayesian MAML with the chaser loss. Options: particles (M, default 5), inner_steps (default 5),
    lr (SVGD step on the summed log-likelihood, default 5e-4 as MAML's), leader_steps (default
    inner_steps), first_order (default False), init_std (used only when the model cannot re-draw
    its initialisation: particles are then θ + init_std·N(0, 1)), likelihood, bayesian, vectorize, seed,
    forward_kwargs."""

    def __init__(self, model: nn.Module, particles: int = 5, inner_steps: int = 5, lr: float = 5e-4,
                 leader_steps: int | None = None, first_order: bool = False, init_std: float = 0.1,
                 likelihood: nn.Module | None = None, bayesian=None, vectorize: bool | str = "auto",
                 seed: int = 0, forward_kwargs: dict | None = None) -> None:
        super().__init__()
        if particles < 1 or inner_steps < 0 or not lr > 0:
            raise ValueError(f"bmaml: particles must be >= 1, inner_steps >= 0, lr > 0; got {particles}, "
                             f"{inner_steps}, {lr}")
        self.name = self.variant = "bmaml"
        self.M, self.first_order = int(particles), bool(first_order)
        self.inner_steps, self.lr = int(inner_steps), float(lr)
        self.leader_steps = inner_steps if leader_steps is None else int(leader_steps)
        self._take_over(model, likelihood, seed)
        names = split_parameters(self.net, bayesian)
        draws = self._initial_particles(names, init_std, seed)
        self.particles = nn.ParameterList([nn.Parameter(torch.stack([d[i] for d in draws])) for i in range(len(names))])
        self._finish_take_over(names, vectorize, forward_kwargs)

    def _initial_particles(self, names: list[str], init_std: float, seed: int) -> list[Params]:
        """Particle 0 is the model's own initialisation; the others are fresh draws of the model's
        initialiser (reset_parameters, seeded), or perturbations when it has none."""
        params = dict(self.net.named_parameters())
        draws = [[params[n].detach().clone() for n in names]]
        for m in range(1, self.M):
            clone = copy.deepcopy(self.net)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + m)
                resettable = [mod for mod in clone.modules() if hasattr(mod, "reset_parameters")]
                for mod in resettable:
                    mod.reset_parameters()
                cp = dict(clone.named_parameters())
                draw = [cp[n].detach().clone() for n in names]
                if not resettable:
                    draw = [d + init_std * torch.randn_like(d) for d in draw]
            draws.append(draw)
        return draws

    # -- SVGD on a stacked batch of particles [T, M, ...] -------------------------------------
    def _flat_call(self, phi: Params, x, y) -> torch.Tensor:
        """Summed NLL of every particle of every task ([T·M] 'tasks' for the functional net)."""
        T, M = x.shape[0], self.M
        th = [p.reshape(T * M, *p.shape[2:]) for p in phi]
        rep = lambda z: z.unsqueeze(1).expand(T, M, *z.shape[1:]).reshape(T * M, *z.shape[1:])  # noqa: E731
        return self._nll(th, rep(x), rep(y))

    def _svgd(self, phi: Params, x, y, steps: int, create_graph: bool,
              callback: Callable[[int, Params], None] | None = None) -> Params:
        T, M = x.shape[0], self.M
        if callback is not None:
            callback(0, phi)
        with torch.enable_grad():
            for k in range(steps):
                if not create_graph:
                    phi = [p.detach().requires_grad_(True) for p in phi]
                score = torch.autograd.grad(-self._flat_call(phi, x, y), phi, create_graph=create_graph)
                flat = torch.cat([p.reshape(T, M, -1) for p in phi], -1)
                sflat = torch.cat([s.reshape(T, M, -1) for s in score], -1)
                step = svgd_direction(flat, sflat) * self.lr
                new, pos = [], 0
                for p in phi:
                    n = p[0, 0].numel()
                    new.append(p + step[..., pos:pos + n].reshape(p.shape))
                    pos += n
                phi = new if create_graph else [p.detach() for p in new]
                if callback is not None:
                    callback(k + 1, phi)
        return phi

    def _start(self, T: int, graph: bool) -> Params:
        ps = [p if graph else p.detach() for p in self.particles]
        return [p.unsqueeze(0).expand(T, *p.shape) for p in ps]

    def _meta_backward(self, b: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        """(SVGD draws no noise: task_range changes nothing.)"""
        T = len(b)
        chaser = self._svgd(self._start(T, True), b.x_support, b.y_support, self.inner_steps,
                            create_graph=not self.first_order)
        if self.first_order:  # identity Jacobian: the chaser is a leaf hanging off Θ
            chaser = [p.detach() + (s - s.detach()) for p, s in zip(chaser, self._start(T, True))]
        x, y = b.joint()
        leader = self._svgd([p.detach() for p in chaser], x, y, self.leader_steps, create_graph=False)
        with torch.enable_grad():
            loss = sum(((c - l) ** 2).sum() for c, l in zip(chaser, leader)) / T
            loss.backward()
        with torch.no_grad():
            nll_q = float(self._flat_call(leader, b.x_query, b.y_query)) / (T * self.M * b.x_query.shape[1])
        return {"chaser_loss": float(loss.detach()), "nll_query_leader": nll_q}

    # -- meta-testing ---------------------------------------------------------------------------
    def _predictor(self, phi: Params, squeeze: bool) -> ParticlePredictor:
        return ParticlePredictor(self.forward_net, self.net.likelihood, phi, self.names, squeeze)

    def _inner_path(self, x, y, steps: int, on_step) -> Params:
        return self._svgd(self._start(x.shape[0], False), x, y, steps, False,
                          None if on_step is None else (lambda k, phi: on_step(phi)))


register_class(KLChaserLearner, "kl-chaser")
register_class(BMAMLLearner, "bmaml")
