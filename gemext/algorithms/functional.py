"""What the supervised learners share: the take-over of a user's model (model and likelihood as
one module whose parameters become buffers fed back through `functional_call`, with the rule of the
`vectorize` option) and the Gaussian-prior learners' common parts."""
from __future__ import annotations

import abc
import sys
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..functional_net import FunctionalNet
from ..gaussian import GaussianPrior, Posterior, detach_parameters
from ..introspect import input_layer, is_pointwise, mlp_plan, task_loop_reason
from ..vi import CategoricalLikelihood, GaussianLikelihood, VIConfig
from ..vi.von import VariationalOnlineNewton
from .base import SupervisedLearner
from .predictors import BayesianPredictor

Params = list[torch.Tensor]


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside gemext, for a warning raised from the frame that
    calls this: it names the user's line whatever the depth of the learner's constructors."""
    package = str(Path(__file__).resolve().parents[1])
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


class ModelAndLikelihood(nn.Module):
    """The model and its likelihood in one module, so likelihood parameters (a learned noise
    scale) are covered by the prior like any weight."""

    def __init__(self, model: nn.Module, likelihood: nn.Module) -> None:
        super().__init__()
        self.model, self.likelihood = model, likelihood

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(x, **kwargs)


# VIConfig field -> the learner option that sets it (vi_config's overrides)
_VI_OPTIONS = {"steps": "inner_steps", "lr": "lr", "beta": "beta", "mc_samples": "mc_samples"}


def vi_config(name: str, inner: VIConfig | dict[str, Any] | None, **overrides: Any) -> VIConfig:
    """A VIConfig from a config or dict (learner `name`'s option `inner`), with the given (non-None)
    fields replaced; errors name the user's option, not VIConfig's field."""
    if isinstance(inner, dict):
        valid = [f.name for f in fields(VIConfig)]
        unknown = sorted(set(inner) - set(valid))
        if unknown:
            raise ValueError(f"{name}: option inner has unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    elif not (inner is None or isinstance(inner, VIConfig)):
        raise TypeError(f"{name}: option inner must be a dict or a gemext.vi.VIConfig, got {type(inner).__name__}")
    try:
        base = inner if isinstance(inner, VIConfig) else VIConfig(**(inner or {}))
    except ValueError as exc:
        raise ValueError(f"{name}: option inner: {str(exc).replace('VIConfig.', '')}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return replace(base, **overrides)
    except ValueError as exc:
        msg = str(exc)
        for field_name in overrides:
            msg = msg.replace(f"VIConfig.{field_name}", f"option {_VI_OPTIONS.get(field_name, field_name)}")
        raise ValueError(f"{name}: {msg}") from None


def resolve_vectorize(name: str, model: nn.Module, vectorize: bool | str) -> bool:
    """The learners' one rule for `vectorize`: "auto" vmaps the tasks unless the model needs the
    loop over tasks; True on such a model is refused with the reason."""
    if not (vectorize is True or vectorize is False or vectorize == "auto"):
        raise ValueError(f"{name}: option vectorize must be True, False or 'auto', got {vectorize!r}")
    reason = task_loop_reason(model)
    if vectorize == "auto":
        return reason is None
    if vectorize and reason is not None:
        raise ValueError(f"{name}: vectorize=True is impossible here ({reason} inside torch.func transforms); "
                         "use vectorize='auto' or False (a loop over tasks)")
    return bool(vectorize)


class FunctionalLearner(SupervisedLearner):
    """The take-over of a model shared by every supervised learner: the model and its likelihood
    become one `ModelAndLikelihood` whose parameters turn into buffers (`detach_parameters`); the
    meta-parameters live in the learner and are fed back with `functional_call`. Parameters with
    requires_grad=False are left out of the meta-parameters and stay fixed. Subclasses create their
    meta-parameters from `self.net` between `_take_over` and `_finish_take_over`, and implement
    `_inner_path` and `_predictor`, from which `adapt` and `adapt_path` are built."""

    def _take_over(self, model: nn.Module, likelihood: nn.Module | None, seed: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (likelihood is None or isinstance(likelihood, (GaussianLikelihood, CategoricalLikelihood))):
            raise TypeError(f"{self.name}: option likelihood must be a gemext.vi.GaussianLikelihood (regression) or "
                            f"CategoricalLikelihood (classification), got {type(likelihood).__name__} {likelihood!r}")
        owner = getattr(model, "_gemext_learner", None)
        if owner is not None:  # its parameters are already another learner's meta-parameters
            raise ValueError(f"{self.name}: this model already belongs to a {owner} learner (a learner takes its "
                             "model over: its parameters become the learner's meta-parameters); give each learner "
                             "its own model, e.g. copy.deepcopy(model) before creating the first one")
        self.net = ModelAndLikelihood(model, likelihood if likelihood is not None else GaussianLikelihood(0.5))
        self.generator = torch.Generator().manual_seed(seed)

    def _finish_take_over(self, names: list[str], vectorize: bool | str, forward_kwargs: dict | None = None,
                          inner: VIConfig | None = None) -> None:
        self.names = list(names)
        detach_parameters(self.net, self.names)
        self.net.model._gemext_learner = self.name  # a second learner on this model is refused, naming this one
        vectorize = resolve_vectorize(self.name, self.net.model, vectorize)
        self.forward_net = FunctionalNet(self.net, self.names, vectorize, forward_kwargs, is_pointwise(self.net.model),
                                         mlp_plan(self.net.model, self.names, "model."), input_layer(self.net.model))
        self._lik_idx = [i for i, n in enumerate(self.names) if n.startswith("likelihood.")]
        if inner is not None:
            self._warn_costly_curvature(inner)

    def _warn_costly_curvature(self, inner: VIConfig) -> None:
        """Say, before anything runs, when `von`'s Gauss-Newton rows would take the general path on
        this model: one backward over a task's whole batch per data point and step, where the other
        paths take about one backward for all of them."""
        net = self.forward_net
        if inner.optimizer_class() is not VariationalOnlineNewton or \
                inner.optimizer_kwargs.get("curvature", "ggn") != "ggn" or net.mlp or net.pointwise:
            return
        warnings.warn(
            f"{self.name}: the inner VI 'von' forms its Gauss-Newton rows on this model with one backward over a "
            "task's whole batch per data point (the model is not pointwise: BatchNorm, Dropout or a custom module "
            "mixes or randomises its points), so each inner step costs about N backward passes for N points where "
            "natural-gradient VI costs one (a Conv4 with BatchNorm on Omniglot 5w1s: 9.4x NGVI's time and 4x its "
            "memory per meta-iteration). inner=dict(optimizer='ngvi', ...) is the affordable choice on such models "
            "(the vision presets use it); a custom module that maps each point on its own can say so with the class "
            "attribute gemext_pointwise = True", stacklevel=_caller_level())

    @property
    def vectorize(self) -> bool:
        return self.forward_net.vectorize

    # -- data terms (summed negative log-likelihood) ---------------------------------------------
    def _nll_one(self, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One task: θ without a task dimension."""
        out = self.forward_net.one_task(tuple(theta), x)
        return self.net.likelihood.nll(out, y, {self.names[i]: theta[i] for i in self._lik_idx})

    def _nll(self, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A stacked batch: θ, x, y with a leading task dimension; summed over tasks (the tasks are
        separable, so its gradient wrt θ holds every task's own gradient)."""
        out = self.forward_net(list(theta), x)
        lik = {self.names[i]: theta[i].reshape(theta[i].shape[0], *([1] * (y.dim() - 1))) for i in self._lik_idx}
        return self.net.likelihood.nll(out, y, lik)

    @staticmethod
    def _accumulate(params, grads) -> None:
        """Add into .grad (accumulating, as every learner's meta_backward does)."""
        for p, g in zip(params, grads):
            if not p.requires_grad:
                continue
            g = g.detach().to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    # -- meta-testing: one skeleton for every learner --------------------------------------------
    @abc.abstractmethod
    def _inner_path(self, x: torch.Tensor, y: torch.Tensor, steps: int,
                    on_step: Callable[[Any], None] | None) -> Any:
        """Adapt a stacked batch of supports for `steps` inner steps without a graph; call
        `on_step(state)` after 0..steps steps with a state `_predictor` accepts (a snapshot, safe to
        keep); return the final state."""

    @abc.abstractmethod
    def _predictor(self, state: Any, squeeze: bool) -> BayesianPredictor:
        """The predictor of a state that `_inner_path` produced."""

    def adapt(self, support, steps: int | None = None) -> BayesianPredictor:
        x, y, squeeze = self._support_batch(support)
        state = self._inner_path(x.to(self.device), y.to(self.device),
                                 self.inner_steps if steps is None else steps, None)
        return self._predictor(state, squeeze)

    def adapt_path(self, support, steps: int) -> list[BayesianPredictor]:
        x, y, squeeze = self._support_batch(support)
        path: list[BayesianPredictor] = []
        self._inner_path(x.to(self.device), y.to(self.device), steps,
                         lambda state: path.append(self._predictor(state, squeeze)))
        return path

    def _delta_predictor(self, theta: Params, squeeze: bool) -> BayesianPredictor:
        post = Posterior(self.names, [t.detach() for t in theta],
                         [torch.full_like(t, float("-inf")) for t in theta])
        return BayesianPredictor(self.forward_net, self.net.likelihood, post, squeeze, 1, self.generator)


class PriorLearner(FunctionalLearner):
    """A learner whose meta-parameters are a diagonal Gaussian prior Θ = (μ₀, ρ₀) over the
    model's parameters (GEM, ELBO-gradient and KL-chaser learners): Gaussian-posterior
    predictions over `predict_samples` draws, and the ρ₀ clamp after each meta-step."""

    def _make_prior(self, sigma0: float, bayesian, learn_sigma: bool = True,
                    sigma0_range: tuple[float, float] | str | None = None) -> None:
        if sigma0_range == "shrink":  # σ₀ may only become more certain than its start (down to 1/10)
            sigma0_range = (sigma0 / 10, sigma0)
        elif isinstance(sigma0_range, str):
            raise ValueError(f"{self.name}: sigma0_range must be None, 'shrink' or (lo, hi), got {sigma0_range!r}")
        self.prior = GaussianPrior(self.net, sigma0=sigma0, bayesian=bayesian, learn_sigma=learn_sigma,
                                   sigma0_range=sigma0_range)

    @property
    def predict_samples(self) -> int:
        """Posterior draws the predictive mixture averages over."""
        return self._predict_samples

    @predict_samples.setter
    def predict_samples(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.name}: option predict_samples must be an integer >= 1, got {n!r}")
        self._predict_samples = n

    def after_step(self) -> dict[str, float]:
        """Keep ρ₀ in its sigma0_range and in the safe range of gemext.vi."""
        self.prior.clamp_()
        return {}

    def _predictor(self, posterior: Posterior, squeeze: bool) -> BayesianPredictor:
        return BayesianPredictor(self.forward_net, self.net.likelihood, posterior, squeeze,
                                 self.predict_samples, self.generator)
