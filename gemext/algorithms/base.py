"""What every learner of the catalogue shares: the registry, the functional forward over stacked
per-task parameters, and Bayesian prediction from a posterior."""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import ops
from ..gaussian import Posterior
from ..tasks import Task, as_batch
from ..vi import CategoricalLikelihood, GaussianLikelihood

_REGISTRY: dict[str, Callable[..., "MetaLearner"]] = {}


def register(*names: str) -> Callable:
    """Class decorator: make the learner available to `create(name, ...)`."""
    def wrap(factory: Callable) -> Callable:
        for n in names:
            _REGISTRY[n] = factory
        return factory
    return wrap


def register_variants(cls: type, *variants: str) -> None:
    """Register `cls(model, variant=name, **options)` under each variant name."""
    for v in variants:
        def make(model: nn.Module, _variant: str = v, **options) -> "MetaLearner":
            return cls(model, variant=_variant, **options)
        make.__doc__ = f"Create a {v} learner (see {cls.__name__} for the options)."
        register(v)(make)


def has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


class FunctionalNet:
    """Calls `module` with parameters that carry a leading task dimension: one vmapped call for
    all tasks (`vectorize=True`), or a loop over tasks (needed when the forward mutates buffers,
    e.g. BatchNorm running statistics, and sometimes faster for large conv nets on CPU)."""

    def __init__(self, module: nn.Module, names: list[str], vectorize: bool) -> None:
        self.module, self.names, self.vectorize = module, names, vectorize
        self._vmapped = vmap(self._one, in_dims=(0, 0))

    def _one(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, dict(zip(self.names, theta)), (x,))

    def __call__(self, theta: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.vectorize:
            return self._vmapped(tuple(theta), x)
        return torch.stack([self._one(tuple(t[i] for t in theta), x[i]) for i in range(x.shape[0])])


class MetaLearner(nn.Module, abc.ABC):
    """Interface of every algorithm: parameters() are the meta-parameters;
    `meta_backward(tasks)` accumulates the meta-gradient into .grad and returns float statistics;
    `adapt(support)` returns a predictor for a new task."""

    name: str = "?"

    @abc.abstractmethod
    def meta_backward(self, tasks: Task | list[Task]) -> dict[str, float]:
        """Accumulate the meta-gradient of a batch of tasks into the meta-parameters' .grad."""

    @abc.abstractmethod
    def adapt(self, support: tuple[torch.Tensor, torch.Tensor], steps: int | None = None):
        """A predictor for one task (or a stacked batch) adapted on its support set."""

    @abc.abstractmethod
    def adapt_path(self, support: tuple[torch.Tensor, torch.Tensor], steps: int) -> list:
        """Predictors after 0..steps inner updates on a stacked batch of supports (for meta-test)."""

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def _batch(self, tasks: Task | list[Task]) -> Task:
        batch = as_batch(tasks)
        return batch.to(self.device)

    @staticmethod
    def _support_batch(support) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y) of one task, or of a stacked batch; returns batch tensors and whether to squeeze."""
        if isinstance(support, Task):
            return support.x_support, support.y_support, False
        if not (isinstance(support, (tuple, list)) and len(support) == 2):
            raise TypeError("support must be an (x, y) pair of tensors or a gemext.tasks.Task")
        x, y = support
        if x.shape[0] == 0:
            raise ValueError("support: the support set is empty")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("support: x contains NaN or Inf")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("support: y contains NaN or Inf")
        return x.unsqueeze(0), y.unsqueeze(0), True


class BayesianPredictor:
    """Predictions of a (stacked or single-task) posterior averaged over `samples` draws:
    regression → (mean, std) of the predictive mixture; classification → class probabilities."""

    def __init__(self, net: FunctionalNet, likelihood: nn.Module, posterior: Posterior,
                 squeeze: bool, samples: int = 20, generator: torch.Generator | None = None) -> None:
        self.net, self.likelihood, self.posterior = net, likelihood, posterior
        self.squeeze, self.samples, self.generator = squeeze, samples, generator
        self.delta = all(bool(torch.isneginf(r).all()) for r in posterior.rho)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        xb = x.unsqueeze(0) if self.squeeze else x
        outs, lik_params = [], []
        for theta in self._draws():
            outs.append(self.net(list(theta), xb))
            lik_params.append(dict(zip(self.posterior.names, theta)))
        outs_t = torch.stack(outs)
        if isinstance(self.likelihood, GaussianLikelihood):
            lp = [{k: v for k, v in p.items() if k.startswith("likelihood.")} for p in lik_params]
            mean, std = self.likelihood.predictive(outs_t, [self._bcast(p, mean_shape=outs_t.shape[1:]) for p in lp])
            return (mean[0], std[0]) if self.squeeze else (mean, std)
        if isinstance(self.likelihood, CategoricalLikelihood):
            probs = self.likelihood.predictive(outs_t)
            return probs[0] if self.squeeze else probs
        raise TypeError(f"no predictive rule for likelihood {type(self.likelihood).__name__}")

    def _draws(self):
        """The parameter sets the prediction averages over (stacked over tasks): the posterior
        mean for a delta posterior, else `samples` reparameterised draws. Subclasses (particle
        posteriors) override it."""
        seed = ops.new_seed(self.generator)  # drawn in both cases: the generator's stream is unchanged
        if self.delta:
            return [self.posterior.mu]
        return [ops.sample(self.posterior.mu, self.posterior.rho, seed, s) for s in range(self.samples)]

    @staticmethod
    def _bcast(p: dict[str, torch.Tensor], mean_shape: torch.Size) -> dict[str, torch.Tensor]:
        # per-task likelihood parameters [T] broadcast over the data dims of the predictions
        return {k: v.reshape(v.shape[0], *([1] * (len(mean_shape) - 1))) for k, v in p.items()}
