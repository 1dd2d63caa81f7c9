"""Gradient-EM learners: GEM-BML (loss L[1]), GEM-BML+ (loss L[2]) and Reptile (the delta-posterior
special case of GEM-BML with a fixed prior variance C₀, paper §4).

Per task: λ_tr = VI(Θ, D_support); λ_all = VI(λ_tr, D_query) (the support posterior is both the
prior and the start of the second fit, i.e. sequential Bayesian updating). The meta-gradient is the
closed form ĝ(λ_all) (GEM-BML) or ĝ(λ_all) − ĝ(λ_tr) (GEM-BML+) of the fused `gem_grad_` op:
no back-propagation through either inner loop, so memory does not grow with the inner steps."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import ops
from ..gaussian import GaussianPrior, Posterior, detach_parameters
from ..tasks import Task
from ..vi import (DataTerm, FitResult, GaussianLikelihood, NaturalGradientVI, VariationalOnlineNewton, VIConfig,
                  fit)
from .base import BayesianPredictor, FunctionalNet, MetaLearner, register_variants, resolve_vectorize


class _Net(nn.Module):
    """The model and its likelihood in one module, so likelihood parameters (a learned noise
    scale) are covered by the prior like any weight."""

    def __init__(self, model: nn.Module, likelihood: nn.Module) -> None:
        super().__init__()
        self.model, self.likelihood = model, likelihood

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(x, **kwargs)


def _vi_config(inner: VIConfig | dict[str, Any] | None, **overrides: Any) -> VIConfig:
    base = inner if isinstance(inner, VIConfig) else VIConfig(**(inner or {}))
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class GEMLearner(MetaLearner):
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
    call, e.g. a mask)."""

    def __init__(self, model: nn.Module, variant: str = "gem-bml+", likelihood: nn.Module | None = None,
                 sigma0: float = 0.05, inner: VIConfig | dict | None = None, inner_steps: int | None = None,
                 query_steps: int | None = None, beta: float | None = None, lr: float | None = None,
                 bayesian=None, vectorize: bool | str = "auto", predict_samples: int = 20,
                 seed: int = 0, learn_sigma: bool = True,
                 sigma0_range: tuple[float, float] | str | None = None,
                 forward_kwargs: dict | None = None) -> None:
        super().__init__()
        if variant not in ("gem-bml", "gem-bml+", "reptile"):
            raise ValueError(f"GEMLearner: unknown variant {variant!r}")
        self.name, self.variant = variant, variant
        self.delta = variant == "reptile"
        if not self.delta and (inner is None or (isinstance(inner, dict) and "optimizer" not in inner)):
            inner = {**(inner or {}), "optimizer": "von"}  # the curvature-aware VI; Reptile's points use Adam
        self.inner = _vi_config(inner, steps=inner_steps, lr=lr, beta=0.0 if self.delta else beta)
        if self.delta and self.inner.optimizer_class() in (NaturalGradientVI, VariationalOnlineNewton):
            # fail at construction, not in the middle of training
            raise ValueError(f"reptile fits point posteriors (σ = 0): inner optimizer {self.inner.optimizer!r} "
                             "needs a Gaussian posterior; use sgd or adam")
        self.query_steps = self.inner.steps if query_steps is None else query_steps
        self.net = _Net(model, likelihood if likelihood is not None else GaussianLikelihood(0.5))
        # Reptile: fixed prior variance C₀ = sigma0² (ĝ_μ₀ = (μ − μ₀)/C₀²), point posteriors.
        if sigma0_range == "shrink":  # σ₀ may only become more certain than its start (down to 1/10)
            sigma0_range = (sigma0 / 10, sigma0)
        elif isinstance(sigma0_range, str):
            raise ValueError(f"{variant}: sigma0_range must be None, 'shrink' or (lo, hi), got {sigma0_range!r}")
        self.prior = GaussianPrior(self.net, sigma0=sigma0, bayesian=bayesian,
                                   learn_sigma=learn_sigma and not self.delta, sigma0_range=sigma0_range)
        # every module parameter now lives in the prior or stays fixed: parameters() = Θ only
        detach_parameters(self.net, self.prior.names)
        vectorize = resolve_vectorize(variant, model, vectorize)
        self.forward_net = FunctionalNet(self.net, self.prior.names, vectorize, forward_kwargs)
        self.predict_samples = predict_samples
        self.generator = torch.Generator().manual_seed(seed)

    # -- data terms -------------------------------------------------------------------------
    def _nll(self, x: torch.Tensor, y: torch.Tensor) -> DataTerm:
        return DataTerm(self.forward_net, self.net.likelihood, x, y, self.prior.names)

    def start(self, prior: Posterior) -> Posterior:
        """Where each task's inner loop starts, given the expanded prior: the prior itself (fit
        copies its start, so no second expansion is needed), or σ = 0 for point posteriors."""
        if not self.delta:
            return prior
        return Posterior(prior.names, prior.mu, [torch.full_like(r, float("-inf")) for r in prior.rho])

    def fit_posterior(self, nll, n_data: int, prior: Posterior, init: Posterior, steps: int,
                      callback=None) -> FitResult:
        """The learner's inner loop (its VI settings, noise stream and delta mode) on any data
        term `nll(theta, index)`; RL and other task families plug their likelihood in here."""
        cfg = replace(self.inner, steps=steps)
        return fit(nll, n_data, prior, init, cfg, self.generator, self.delta, callback)

    def _fit(self, x, y, prior: Posterior, init: Posterior, steps: int, callback=None) -> FitResult:
        return self.fit_posterior(self._nll(x, y), x.shape[1], prior, init, steps, callback)

    def accumulate_meta_grad(self, tr: Posterior, all_: Posterior, prior: Posterior | None = None) -> None:
        """Θ.grad −= mean over tasks of ĝ(λ_all) [− ĝ(λ_tr) for GEM-BML+]: the descent direction
        any torch.optim optimizer steps. λ_tr, λ_all carry a leading task dimension; `prior` is
        `self.prior.expand(T)` when the caller already has it."""
        mu0, rho0 = list(self.prior.mu0), list(self.prior.rho0)
        T = all_.mu[0].shape[0]
        plus = self.variant == "gem-bml+"
        # one fused launch over every task: the prior broadcast to [T, ...], ĝ per task into
        # scratch buffers, then the task mean into Θ.grad (instead of T launches from Python)
        prior = prior if prior is not None else self.prior.expand(T)
        g_mu = [torch.zeros_like(m) for m in prior.mu]
        g_rho = [torch.zeros_like(r) for r in prior.rho]
        ops.gem_grad_(g_mu, g_rho, prior.mu, prior.rho, all_.mu, all_.rho,
                      tr.mu if plus else None, tr.rho if plus else None, weight=-1.0 / T)
        for p, g in zip(mu0 + rho0, g_mu + g_rho):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = g.sum(0)
            else:
                p.grad.add_(g.sum(0))

    # -- meta-training ----------------------------------------------------------------------
    def meta_backward(self, tasks: Task | list[Task]) -> dict[str, float]:
        b = self._batch(tasks)
        T = len(b)
        prior = self.prior.expand(T)
        tr = self._fit(b.x_support, b.y_support, prior, self.start(prior), self.inner.steps)
        all_ = self._fit(b.x_query, b.y_query, tr.posterior, tr.posterior, self.query_steps)
        self.accumulate_meta_grad(tr.posterior, all_.posterior, prior)
        stats = {"nll_support": tr.nll / (T * b.x_support.shape[1]),
                 "nll_query": all_.nll / (T * b.x_query.shape[1])}
        if not self.delta:
            stats["kl"] = float(ops.gaussian_kl(all_.posterior.mu, all_.posterior.rho, prior.mu, prior.rho)) / T
        return stats

    # -- meta-testing -----------------------------------------------------------------------
    def _predictor(self, posterior: Posterior, squeeze: bool) -> BayesianPredictor:
        return BayesianPredictor(self.forward_net, self.net.likelihood, posterior, squeeze,
                                 self.predict_samples, self.generator)

    def adapt(self, support, steps: int | None = None) -> BayesianPredictor:
        """Posterior (or point estimate) for a new task from its support set, as a predictor."""
        x, y, squeeze = self._support_batch(support)
        x, y = x.to(self.device), y.to(self.device)
        T = x.shape[0]
        prior = self.prior.expand(T)
        res = self._fit(x, y, prior, self.start(prior), self.inner.steps if steps is None else steps)
        return self._predictor(res.posterior, squeeze)

    def adapt_path(self, support, steps: int) -> list[BayesianPredictor]:
        x, y, squeeze = self._support_batch(support)
        x, y = x.to(self.device), y.to(self.device)
        T = x.shape[0]
        path: list[BayesianPredictor] = []
        prior = self.prior.expand(T)
        self._fit(x, y, prior, self.start(prior), steps,
                  callback=lambda k, post: path.append(self._predictor(post.clone(), squeeze)))
        return path


register_variants(GEMLearner, "gem-bml", "gem-bml+", "reptile")
