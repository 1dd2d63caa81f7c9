"""Sinusoid regression runs: presets, learner defaults and the meta-test (MSE after each
adaptation step with 95% CI, predictive NLL and 90%-interval coverage, plots)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import algorithms
from ..algorithms import MetaLearner
from ..metrics import gaussian_nll, interval_coverage, mean_ci95
from ..progress import Progress
from ..runs import best_effort
from ..tasks import Task
from ..tasks.sinusoid import PRESETS as SINUSOID_PRESETS
from ..tasks.sinusoid import SinusoidTasks
from ..tasks.sinusoid import preset as sinusoid_preset
from ..vi import GaussianLikelihood
from .base import SupervisedFamily, merge_options

# Sinusoid settings, chosen on `finn` by 1000-iteration sweeps and checked over seeds at 3000
# (benchmarks/HISTORY.md, "GEM with the von inner VI" and "The second GEM fit ..."; current figures in
# benchmarks/RESULTS.md). GEM: `von` with β = 1 is exact VI; σ₀ = 0.02 and s = 0.05 (the data are
# noise-free) gave the lowest MSE; σ₀ is learned only downwards ("shrink"): learned freely it drifts up
# and adapts worse.
_VON = dict(optimizer="von")  # lr 1: a full (backtracked) Gauss-Newton step
# posterior draws of the meta-test predictive: 20 (the learners' default) bias its variance low and
# under-sample its tails; 100 cost little on a 1-input MLP
_PREDICT = 100
SINUSOID_DEFAULTS: dict[str, dict[str, Any]] = {
    "gem-bml": dict(sigma0=0.02, beta=1.0, inner=_VON, inner_steps=5, sigma=0.05, sigma0_range="shrink",
                    predict_samples=_PREDICT),
    "gem-bml+": dict(sigma0=0.02, beta=1.0, inner=_VON, inner_steps=5, sigma=0.05, sigma0_range="shrink",
                     predict_samples=_PREDICT),
    # Reptile: plain SGD on the summed NLL, same effective step as above, C₀ = 1 (ĝ = μ − μ₀)
    "reptile": dict(sigma0=1.0, lr=5e-4, inner=dict(optimizer="sgd"), inner_steps=5, sigma=0.5),
    # Catalogue learners (benchmarks/sinusoid_study.py; one setting each, chosen by rule, not swept):
    # MAML family: 5 SGD steps of 5e-4 on the summed NLL (σ = 0.5), i.e. Finn et al.'s 0.01 on the
    # mean squared error of 10 points. iMAML: λ = 1/(K·lr) = 400 (the proximal problem whose
    # solution K steps of size lr approximate), 5 CG steps.
    "maml": dict(lr=5e-4, inner_steps=5, sigma=0.5),
    "fomaml": dict(lr=5e-4, inner_steps=5, sigma=0.5),
    "imaml": dict(lr=5e-4, inner_steps=5, reg=400.0, cg_steps=5, sigma=0.5),
    # VI-based learners that back-propagate through their VI (sgd, ngvi or von): natural-gradient VI,
    # lr 0.2, ρ step 0.01, β = 0.1, σ₀ = 0.05, 5 steps (von is offered, not yet measured for them).
    "abml": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                 inner_steps=5, sigma=0.5, predict_samples=_PREDICT),
    "pmaml-elbo": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                       inner_steps=5, sigma=0.5, predict_samples=_PREDICT),
    "kl-chaser": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                      inner_steps=5, sigma=0.5, predict_samples=_PREDICT),
    # BMAML: 5 particles, SVGD step 5e-4 (MAML's), leader 5 more steps on support ∪ query.
    "bmaml": dict(particles=5, lr=5e-4, inner_steps=5, sigma=0.5),
}

# Per preset, on top of SINUSOID_DEFAULTS, measured on that preset: `bmaml`'s 1% noise makes `finn`'s
# sharp s = 0.05 over-fit the support; 0.15 did best (benchmarks/HISTORY.md, "`bmaml`: the likelihood noise").
PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "bmaml": {"gem-bml+": dict(sigma=0.15)},
}


class SinusoidFamily(SupervisedFamily):
    tasks = ("sinusoid",)
    flags = ("preset",)
    preset_names = tuple(SINUSOID_PRESETS)  # "finn" first: the default
    family_options = ("sigma", "learn_noise")
    headline = ("mse_by_step", "nll")
    eval_batch = 100  # meta-test tasks adapted together
    # a 1.7k-weight MLP gains little from a second thread and loses badly to any other load
    threads = 1

    def __init__(self, config) -> None:
        super().__init__(config)
        self.data = SinusoidTasks(config.preset or "finn")

    @classmethod
    def with_defaults(cls, settings: dict[str, Any]) -> dict[str, Any]:
        settings = dict(settings)
        settings["preset"] = settings.get("preset") or "finn"
        if settings.get("meta_batch") is None:
            settings["meta_batch"] = sinusoid_preset(settings["preset"]).meta_batch
        return settings

    @classmethod
    def learner_options_for(cls, config) -> dict[str, Any]:
        """SINUSOID_DEFAULTS of the algorithm, updated with its PRESET_DEFAULTS, the run's options and
        --inner-steps.
        Family options (not the learner's): `sigma`, the likelihood noise s (its start when learned),
        and `learn_noise`, which makes log s a weight of the model (under the prior for the
        Bayesian learners, meta-learned like any other)."""
        opts = merge_options(SINUSOID_DEFAULTS.get(config.algo, {}),
                             PRESET_DEFAULTS.get(config.preset or "finn", {}).get(config.algo, {}))
        opts = merge_options(opts, config.algo_options)
        if config.inner_steps is not None:
            opts["inner_steps"] = config.inner_steps
        sigma = opts.pop("sigma", None)
        learn = opts.pop("learn_noise", False)
        if not isinstance(learn, bool):
            raise ValueError(f"option learn_noise must be true or false, got {learn!r}")
        if sigma is not None or learn:
            opts.setdefault("likelihood", GaussianLikelihood(0.5 if sigma is None else sigma, learn=learn))
        return opts

    def learner_options(self) -> dict[str, Any]:
        """The options this run's learner is built with (`learner_options_for` of its settings)."""
        return self.learner_options_for(self.config)

    def build_learner(self) -> MetaLearner:
        learner = algorithms.create(self.config.algo, self.data.make_model(), seed=self.config.seed,
                                    **self.learner_options())
        return learner.to(self.config.device)

    @property
    def meta_batch(self) -> int:
        return self.config.meta_batch or self.data.config.meta_batch

    def sample(self, n: int, generator: torch.Generator | None = None) -> Task:
        return self.data.sample(n, self.generator if generator is None else generator, "train")

    def evaluate(self, learner: MetaLearner, tasks: int | None, steps: int | None, run: Path, plots: bool,
                 progress: bool | None = None) -> dict[str, Any]:
        config, n = self.config, self.eval_tasks(tasks)
        K = steps if steps is not None else (config.eval_steps or max(learner.inner_steps, 10))
        gen = torch.Generator().manual_seed(self.eval_seed)
        mse: list[list[torch.Tensor]] = [[] for _ in range(K + 1)]
        nll, cover = [], []
        first = None
        starts = range(0, n, self.eval_batch)
        for start in Progress(starts, len(starts), f"meta-test {config.algo} ({n} tasks)", every=1, enabled=progress):
            b = self.data.sample(min(self.eval_batch, n - start), gen, "test").to(learner.device)
            path = learner.adapt_path(b, K)
            for k, pred in enumerate(path):
                out = pred.predict(b.x_query)
                mse[k].append(((out.mean - b.y_query) ** 2).mean(dim=(1, 2)).cpu())
            nll.append(gaussian_nll(out.mean, out.std, b.y_query).mean(dim=(1, 2)).cpu())
            cover.append(float(interval_coverage(out.mean, out.std, b.y_query)) * out.mean.shape[0])
            if first is None:
                first = (b, path[-1], path[0])
        by_step = [mean_ci95(torch.cat(m)) for m in mse]
        result = {"mse_by_step": [m for m, _ in by_step], "mse_ci95_by_step": [c for _, c in by_step],
                  "eval_tasks": n, "eval_steps": K}
        result["nll"], result["nll_ci95"] = mean_ci95(torch.cat(nll))
        result["coverage90"] = sum(cover) / n
        if plots:
            from ..plots import plot_regression
            with best_effort(f"the plots into {run}"):
                plot_regression(run, config, self.data.config.x_range, result, first)
        return result
