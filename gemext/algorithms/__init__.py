"""The algorithm catalogue: every cell of the paper's matrix behind one interface."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import gem  # noqa: F401  (registers gem-bml, gem-bml+, reptile)
from . import maml  # noqa: F401  (registers maml, fomaml, imaml)
from . import elbo  # noqa: F401  (registers abml, pmaml-elbo)
from . import chaser  # noqa: F401  (registers kl-chaser, bmaml)
from .base import _CLASSES, _REGISTRY, BayesianPredictor, FunctionalNet, MetaLearner, option_names, register

__all__ = ["create", "names", "option_names", "register", "MetaLearner", "BayesianPredictor", "FunctionalNet"]


def names() -> list[str]:
    """Names accepted by `create`."""
    return sorted(_REGISTRY)


def create(name: str, model: nn.Module, **options: Any) -> MetaLearner:
    """A learner of algorithm `name` over `model` (which it takes ownership of)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(names())}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if name in _CLASSES:
        unknown = sorted(set(options) - set(option_names(name)))
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(option_names(name))}")
    return _REGISTRY[name](model, **options)
