"""Likelihoods and the variational-inference inner loop, by concern:

- `likelihoods`: GaussianLikelihood, CategoricalLikelihood (observation models);
- `terms`: DataTerm, the data term of a fit (summed NLL, its gradient and GGN rows);
- `ngvi`: NaturalGradientVI and its pure update rule `ngvi_update`;
- `von`: VariationalOnlineNewton, its flat/unflatten helpers and the backtracking merit;
- `noise`: the distributed noise indices of a shard, `task_starts`;
- `loop`: VIConfig, FitResult, the VI loop `fit` (and the von loop `_fit_von`), the optimizer table.

Every public name is re-exported here; patch a name in the submodule that looks it up."""
from __future__ import annotations

from ..gaussian import RHO_MAX, RHO_MIN, clamp_rho_  # the ρ policy lives with the prior
from .likelihoods import CategoricalLikelihood, GaussianLikelihood
from .loop import _OPTIMIZERS, NLL, FitResult, VIConfig, _fit_von, _minibatch, fit  # noqa: F401
from .ngvi import _SQRT_HALF, NaturalGradientVI, ngvi_update  # noqa: F401
from .noise import task_starts
from .terms import DataTerm
from .von import VariationalOnlineNewton, _backtrack_, _flat, _merit, _unflatten  # noqa: F401

__all__ = ["CategoricalLikelihood", "DataTerm", "FitResult", "GaussianLikelihood", "NLL", "NaturalGradientVI",
           "RHO_MAX", "RHO_MIN", "VIConfig", "VariationalOnlineNewton", "clamp_rho_", "fit",
           "ngvi_update", "task_starts"]
