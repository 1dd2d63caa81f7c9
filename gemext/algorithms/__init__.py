"""The algorithm catalogue: every cell of the paper's matrix behind one contract (base.py), for
supervised task families and for meta-RL (domain "rl")."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..functional_net import FunctionalNet
from . import (
    chaser,  # noqa: F401  (registers kl-chaser, bmaml)
    elbo,  # noqa: F401  (registers abml, pmaml-elbo)
    gem,  # noqa: F401  (registers gem-bml, gem-bml+, reptile)
    maml,  # noqa: F401  (registers maml, fomaml, imaml)
    registry,
)
from .base import MetaLearner, SupervisedLearner
from .predictors import BayesianPredictor, Prediction
from .registry import register_class, register_variants

__all__ = ["create", "names", "option_names", "check_options", "register_class", "register_variants", "MetaLearner",
           "SupervisedLearner", "BayesianPredictor", "Prediction", "FunctionalNet"]


def _load(domain: str) -> str:
    if domain == "rl":  # the RL learners need gymnasium: registered on first use
        from . import rl  # noqa: F401
    return domain


def names(domain: str = "supervised") -> list[str]:
    """Names accepted by `create` in a domain ("supervised" or "rl")."""
    return registry.names(_load(domain))


def create(name: str, model: nn.Module, domain: str = "supervised", **options: Any) -> MetaLearner:
    """A learner of algorithm `name` over `model` (which it takes ownership of); unknown or
    ill-typed options are refused with the list of valid ones."""
    return registry.create(name, model, _load(domain), **options)


def option_names(name: str, domain: str = "supervised") -> list[str]:
    """The options `create(name, model, **options)` accepts."""
    return registry.option_names(name, _load(domain))


def check_options(name: str, options: dict[str, Any], domain: str = "supervised") -> None:
    """Refuse unknown or ill-typed options of `name` with the list of valid ones."""
    registry.check_options(name, options, _load(domain))


def __getattr__(name: str):
    # the RL learners need gymnasium's rollout machinery: registered on first use
    if name == "rl":
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
