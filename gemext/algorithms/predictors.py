"""What `adapt` returns: a predictor whose `predict(x)` gives the one `Prediction` type, averaged over
draws of an adapted posterior. Each likelihood has its own rule (`_PREDICTIVE_RULES`) for turning the
draws' outputs into a `Prediction`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..functional_net import FunctionalNet
from ..gaussian import Posterior
from ..vi import CategoricalLikelihood, GaussianLikelihood


@dataclass
class Prediction:
    """What every predictor returns: the predictive mean and std of a regression likelihood, or
    the class probabilities of a categorical one (the other fields None). Stacked over tasks
    unless the predictor was adapted on a single (x, y) support."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    probs: torch.Tensor | None = None


def _regression(likelihood: GaussianLikelihood, outs: torch.Tensor, params: list[dict[str, torch.Tensor]]
                ) -> Prediction:
    """Mean and std of the predictive mixture, each draw with its own noise scale when the
    likelihood's is learned (a per-task parameter [T], broadcast over the data dimensions)."""
    ones = [1] * (outs.dim() - 2)
    noise = [{n: t.reshape(t.shape[0], *ones) for n, t in p.items() if n.startswith("likelihood.")} for p in params]
    mean, std = likelihood.predictive(outs, noise)
    return Prediction(mean=mean, std=std)


def _classification(likelihood: CategoricalLikelihood, outs: torch.Tensor, params: list[dict[str, torch.Tensor]]
                    ) -> Prediction:
    """Class probabilities averaged over the draws."""
    return Prediction(probs=likelihood.predictive(outs))


# likelihood class -> how the outputs of the draws [S, T, ...] and each draw's parameters by name become
# a Prediction (the first class that matches)
_PREDICTIVE_RULES: tuple[tuple[type[nn.Module], Callable[..., Prediction]], ...] = (
    (GaussianLikelihood, _regression), (CategoricalLikelihood, _classification))


class BayesianPredictor:
    """Predictions of a (stacked or single-task) posterior averaged over `samples` draws:
    regression → mean and std of the predictive mixture; classification → class probabilities."""

    def __init__(self, net: FunctionalNet, likelihood: nn.Module, posterior: Posterior,
                 squeeze: bool, samples: int = 20, generator: torch.Generator | None = None) -> None:
        self.net, self.likelihood, self.posterior = net, likelihood, posterior
        self.squeeze, self.samples, self.generator = squeeze, samples, generator
        self.delta = all(bool(torch.isneginf(r).all()) for r in posterior.rho)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:
        self.net.check_input("predict: x", x)
        self.net.check_forward("predict: x", x, tasks=not self.squeeze)
        xb = x.unsqueeze(0) if self.squeeze else x
        draws = self._draws()
        outs = torch.stack([self.net(list(theta), xb) for theta in draws])
        rule = next((r for kind, r in _PREDICTIVE_RULES if isinstance(self.likelihood, kind)), None)
        if rule is None:
            raise TypeError(f"no predictive rule for likelihood {type(self.likelihood).__name__}")
        out = rule(self.likelihood, outs, [dict(zip(self.posterior.names, theta)) for theta in draws])
        if self.squeeze:  # adapted on one (x, y) task: no task dimension
            out = Prediction(**{k: None if v is None else v[0] for k, v in vars(out).items()})
        return out

    def _draws(self):
        """The parameter sets the prediction averages over (stacked over tasks): the posterior
        mean for a delta posterior, else `samples` reparameterised draws. Subclasses (particle
        posteriors) override it."""
        seed = ops.new_seed(self.generator)  # drawn in both cases: the generator's stream is unchanged
        if self.delta:
            return [self.posterior.mu]
        return [ops.sample(self.posterior.mu, self.posterior.rho, seed, s) for s in range(self.samples)]
