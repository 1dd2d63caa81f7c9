"""Gradient-EM learners: GEM-BML (loss L[1]), GEM-BML+ (loss L[2]) and Reptile (the delta-posterior
special case of GEM-BML with a fixed prior variance C₀, paper §4).

Per task: λ_tr = VI(prior Θ, D_support); λ_all = VI(prior Θ, D_support ∪ D_query) started from λ_tr
(all_fit="joint"; "sequential" fits the query alone with λ_tr as its prior, which is exact only for
a diagonal support posterior: docs/DESIGN.md §2). The meta-gradient is the
closed form ĝ(λ_all) (GEM-BML) or ĝ(λ_all) − ĝ(λ_tr) (GEM-BML+) of the fused `gem_grad_` op:
no back-propagation through either inner loop, so memory does not grow with the inner steps."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import ops
from ..gaussian import Posterior
from ..tasks import Task
from ..vi import DataTerm, FitResult, NaturalGradientVI, VariationalOnlineNewton, VIConfig, fit
from .functional import PriorLearner, vi_config
from .registry import register_variants


class GEMLearner(PriorLearner):
    """Gradient-EM meta-learner over any nn.Module.

    Options: likelihood (GaussianLikelihood(0.5) default; CategoricalLikelihood for
    classification), sigma0 (initial prior std), inner (VIConfig or dict: optimizer — "von", the
    variational online Newton VI, by default for gem-bml/gem-bml+ —, lr, steps, mc_samples, beta,
    batch_size), inner_steps / query_steps (VI steps on support / on query,
    default inner.steps), bayesian (which parameters the prior covers; the others stay fixed),
    vectorize (True/False/"auto": vmap the inner loops over the tasks of a meta-batch),
    predict_samples, seed, learn_sigma (False keeps σ₀ fixed and meta-learns μ₀ only), sigma0_range
    ((lo, hi) bounds of the learned σ₀, or "shrink" for (sigma0/10, sigma0); `learner.prior.clamp_()`
    after each meta-step enforces them), forward_kwargs (extra keyword arguments of every forward
    call, e.g. a mask), all_fit ("joint": the second posterior refits support ∪ query against the
    prior Θ, started from the support posterior; "sequential": it fits the query alone with the
    support posterior as prior; Reptile's default, SGD continued over the query points).
    Reptile has point posteriors and a fixed prior variance: beta, learn_sigma, sigma0_range and
    predict_samples are GEM-BML(+) options only."""

    variant_options = {k: ("gem-bml", "gem-bml+") for k in ("beta", "learn_sigma", "sigma0_range", "predict_samples")}

    def __init__(self, model: nn.Module, variant: str = "gem-bml+", likelihood: nn.Module | None = None,
                 sigma0: float = 0.05, inner: VIConfig | dict | None = None, inner_steps: int | None = None,
                 query_steps: int | None = None, beta: float | None = None, lr: float | None = None,
                 bayesian=None, vectorize: bool | str = "auto", predict_samples: int = 20,
                 seed: int = 0, learn_sigma: bool = True,
                 sigma0_range: tuple[float, float] | str | None = None,
                 forward_kwargs: dict | None = None, all_fit: str | None = None) -> None:
        super().__init__()
        if variant not in ("gem-bml", "gem-bml+", "reptile"):
            raise ValueError(f"GEMLearner: unknown variant {variant!r}")
        self.name, self.variant = variant, variant
        self.delta = variant == "reptile"
        if not self.delta and (inner is None or (isinstance(inner, dict) and "optimizer" not in inner)):
            inner = {**(inner or {}), "optimizer": "von"}  # the curvature-aware VI; Reptile's points use Adam
        self.inner = vi_config(variant, inner, steps=inner_steps, lr=lr, beta=0.0 if self.delta else beta)
        if self.delta and self.inner.optimizer_class() in (NaturalGradientVI, VariationalOnlineNewton):
            # fail at construction, not in the middle of training
            raise ValueError(f"reptile fits point posteriors (σ = 0): inner optimizer {self.inner.optimizer!r} "
                             "needs a Gaussian posterior; use sgd or adam")
        if query_steps is not None and query_steps < 0:
            raise ValueError(f"{variant}: option query_steps must be >= 0, got {query_steps}")
        self.query_steps = self.inner.steps if query_steps is None else query_steps
        if all_fit is None:  # Reptile is SGD continued over the query points, as its paper runs it
            all_fit = "sequential" if self.delta else "joint"
        if all_fit not in ("sequential", "joint"):
            raise ValueError(f"GEMLearner: all_fit must be 'sequential' or 'joint', got {all_fit!r}")
        self.all_fit = all_fit
        self._take_over(model, likelihood, seed)
        # Reptile: fixed prior variance C₀ = sigma0² (ĝ_μ₀ = (μ − μ₀)/C₀²), point posteriors.
        self._make_prior(sigma0, bayesian, learn_sigma and not self.delta, sigma0_range)
        # every module parameter now lives in the prior or stays fixed: parameters() = Θ only
        self._finish_take_over(self.prior.names, vectorize, forward_kwargs, None if self.delta else self.inner)
        self.predict_samples = predict_samples

    @property
    def inner_steps(self) -> int:
        return self.inner.steps

    # -- data terms -------------------------------------------------------------------------
    def _nll(self, x: torch.Tensor, y: torch.Tensor) -> DataTerm:
        return DataTerm(self.forward_net, self.net.likelihood, x, y, self.names)

    def start(self, prior: Posterior) -> Posterior:
        """Where each task's inner loop starts, given the expanded prior: the prior itself (fit
        copies its start, so no second expansion is needed), or σ = 0 for point posteriors."""
        if not self.delta:
            return prior
        return Posterior(prior.names, prior.mu, [torch.full_like(r, float("-inf")) for r in prior.rho])

    def fit_posterior(self, nll, n_data: int, prior: Posterior, init: Posterior, steps: int,
                      callback=None, task_range: tuple[int, int] | None = None) -> FitResult:
        """The learner's inner loop (its VI settings, noise stream and delta mode) on any data
        term `nll(theta, index)`; RL and other task families plug their likelihood in here.
        `task_range`: where these tasks sit in a sharded meta-batch (see gemext.vi.fit)."""
        cfg = replace(self.inner, steps=steps)
        return fit(nll, n_data, prior, init, cfg, self.generator, self.delta, callback, task_range)

    def _fit(self, x, y, prior: Posterior, init: Posterior, steps: int, callback=None,
             task_range: tuple[int, int] | None = None) -> FitResult:
        return self.fit_posterior(self._nll(x, y), x.shape[1], prior, init, steps, callback, task_range)

    def accumulate_meta_grad(self, tr: Posterior, all_: Posterior) -> None:
        """Θ.grad −= mean over tasks of ĝ(λ_all) [− ĝ(λ_tr) for GEM-BML+]: the descent direction
        any torch.optim optimizer steps. λ_tr, λ_all carry a leading task dimension [T, ...]; one
        fused launch sums the T tasks straight into Θ.grad (no [T, ...] copies of the prior)."""
        params = list(self.prior.mu0) + list(self.prior.rho0)
        T = all_.mu[0].shape[0]
        plus = self.variant == "gem-bml+"
        out = []
        for p in params:  # a fixed σ₀ (learn_sigma=False) gets a scratch buffer, not a .grad
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad if p.requires_grad else torch.zeros_like(p))
        n = len(self.prior.mu0)
        ops.gem_grad_(out[:n], out[n:], [p.detach() for p in params[:n]], [p.detach() for p in params[n:]],
                      all_.mu, all_.rho, tr.mu if plus else None, tr.rho if plus else None, weight=-1.0 / T)

    # -- meta-training ----------------------------------------------------------------------
    def _meta_backward(self, b: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        T = len(b)
        prior = self.prior.expand(T)
        tr = self._fit(b.x_support, b.y_support, prior, self.start(prior), self.inner.steps, task_range=task_range)
        if self.all_fit == "joint":  # support ∪ query against the prior Θ
            (x2, y2), prior2, key = b.joint(), prior, "nll_all"
        else:  # the query against the support posterior
            x2, y2, prior2, key = b.x_query, b.y_query, tr.posterior, "nll_query"
        all_ = self._fit(x2, y2, prior2, tr.posterior, self.query_steps, task_range=task_range)
        self.accumulate_meta_grad(tr.posterior, all_.posterior)
        stats = {"nll_support": tr.nll / (T * b.x_support.shape[1]), key: all_.nll / (T * x2.shape[1])}
        if not self.delta:
            stats["kl"] = float(ops.gaussian_kl(all_.posterior.mu, all_.posterior.rho, prior.mu, prior.rho)) / T
        return stats

    # -- meta-testing -----------------------------------------------------------------------
    def _inner_path(self, x, y, steps: int, on_step) -> Posterior:
        """Posteriors (or point estimates) of new tasks from their supports."""
        prior = self.prior.expand(x.shape[0])
        callback = None if on_step is None else (lambda k, post: on_step(post.clone()))
        return self._fit(x, y, prior, self.start(prior), steps, callback).posterior


register_variants(GEMLearner, "gem-bml", "gem-bml+", "reptile")
