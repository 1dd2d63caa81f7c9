"""Likelihoods and the variational-inference inner loop, by concern:

- `likelihoods`: GaussianLikelihood, CategoricalLikelihood (observation models);
- `terms`: DataTerm, the data term of a fit (summed NLL, its gradient and GGN rows), and the
  protocols of its partners (NLL, CurvatureTerm, Forward);
- `ngvi`: NaturalGradientVI and its pure update rule `ngvi_update`;
- `von`: VariationalOnlineNewton (the von options) and VonFit (one von fit, phase by phase);
- `noise`: the distributed noise indices of a shard, `task_starts`;
- `loop`: VIConfig, FitResult and the VI loop `fit`.

Every public name is re-exported here. The von phases are `torch.profiler.record_function`
ranges (``von.sample_terms``, ``von.solve``, ``von.update``, ``von.line_search``)."""
from __future__ import annotations

from ..gaussian import RHO_MAX, RHO_MIN, clamp_rho_  # the ρ policy lives with the prior
from .likelihoods import CategoricalLikelihood, GaussianLikelihood
from .loop import FitResult, VIConfig, fit
from .ngvi import NaturalGradientVI, ngvi_update
from .noise import task_starts
from .terms import NLL, CurvatureTerm, DataTerm, Forward
from .von import VariationalOnlineNewton, VonFit

__all__ = ["CategoricalLikelihood", "CurvatureTerm", "DataTerm", "FitResult", "Forward", "GaussianLikelihood", "NLL",
           "NaturalGradientVI", "RHO_MAX", "RHO_MIN", "VIConfig", "VariationalOnlineNewton", "VonFit", "clamp_rho_",
           "fit", "ngvi_update", "task_starts"]
