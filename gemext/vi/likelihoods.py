"""Observation models p(y | f(x; θ)): Gaussian regression and categorical classification
(summed negative log-likelihood, GGN cotangents, predictive summaries)."""
from __future__ import annotations

import math

import torch
from torch import nn


# ----------------------------------------------------------------------------- likelihoods
class GaussianLikelihood(nn.Module):
    """y ~ N(f(x), s²) per output. With learn=True, log s is a parameter of the model that the
    prior covers like any weight (so it is Bayesian and meta-learned by the same rule)."""

    kind = "regression"

    def __init__(self, sigma: float = 0.5, learn: bool = False) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"GaussianLikelihood: sigma must be > 0, got {sigma}")
        t = torch.tensor(math.log(sigma))
        if learn:
            self.log_sigma = nn.Parameter(t)
        else:
            self.register_buffer("log_sigma", t)

    def _log_sigma(self, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if params is not None and "likelihood.log_sigma" in params:
            return params["likelihood.log_sigma"]
        return self.log_sigma

    def nll(self, out: torch.Tensor, y: torch.Tensor,
            params: dict[str, torch.Tensor] | None = None, per_task: bool = False) -> torch.Tensor:
        """Summed −log p(y | out) over every point and output (all leading dims summed, or all but
        the task dimension 0 with per_task=True)."""
        if out.shape != y.shape:
            raise ValueError(f"GaussianLikelihood: prediction shape {tuple(out.shape)} "
                             f"!= target shape {tuple(y.shape)}")
        ls = self._log_sigma(params)
        terms = 0.5 * (y - out).pow(2) * torch.exp(-2 * ls) + ls + 0.5 * math.log(2 * math.pi)
        return terms.reshape(terms.shape[0], -1).sum(1) if per_task else terms.sum()

    fisher_per_output = 2.0  # Fisher information of log s per observed output

    def ggn_cotangents(self, out: torch.Tensor, params: dict[str, torch.Tensor] | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Per-point output cotangents [K, *out.shape] whose pullbacks through each point's own
        output are the exact GGN rows: K = outputs per point, row k of a point is 1/s at its
        output k (the Hessian of ½(y−f)²/s² in f is 1/s²)."""
        inv_s = torch.exp(-self._log_sigma(params)).to(out.dtype)
        T, N, rest = out.shape[0], out.shape[1], out.shape[2:]
        K = rest.numel()
        cot = torch.eye(K, dtype=out.dtype, device=out.device).reshape(K, 1, 1, *rest).expand(K, T, N, *rest)
        return cot * (inv_s if inv_s.dim() == 0 else inv_s.reshape(1, T, *([1] * (out.dim() - 1))))

    def predictive(self, outs: torch.Tensor, params: list[dict[str, torch.Tensor]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the predictive mixture from S sampled outputs (dim 0)."""
        mean = outs.mean(0)
        noise_var = torch.stack([torch.exp(2 * self._log_sigma(p)) for p in params]).mean(0) \
            if params else torch.exp(2 * self.log_sigma)
        var = outs.var(0, unbiased=False) + noise_var
        return mean, var.sqrt()


class CategoricalLikelihood(nn.Module):
    """y ~ Categorical(softmax(f(x)))."""

    kind = "classification"

    def nll(self, out: torch.Tensor, y: torch.Tensor, params: dict | None = None,
            per_task: bool = False) -> torch.Tensor:
        if y.dtype != torch.long:
            raise TypeError(f"CategoricalLikelihood: labels must be int64, got {y.dtype}")
        if per_task:
            ce = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            return ce.reshape(out.shape[0], -1).sum(1)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")

    fisher_per_output = 0.0

    def ggn_cotangents(self, out: torch.Tensor, params: dict | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Per-point output cotangents [1, *out.shape]: for point n, p_n − onehot(ỹ_n) with
        ỹ_n ~ softmax(f_n). E[(p − e_ỹ)(p − e_ỹ)ᵀ] = diag(p) − ppᵀ, the softmax cross-entropy's
        Hessian, so the rows' outer products are an unbiased (Monte-Carlo Fisher) estimate of the GGN."""
        T, N, C = out.shape[0], out.shape[1], out.shape[-1]
        p = out.reshape(T, N, -1, C).double().softmax(-1)
        u = torch.rand(p.shape[:-1] + (1,), generator=generator, dtype=p.dtype).to(p.device)
        label = (p.cumsum(-1) < u).sum(-1, keepdim=True).clamp_max(C - 1)
        return (p - torch.zeros_like(p).scatter_(-1, label, 1.0)).to(out.dtype).reshape(1, *out.shape)

    def predictive(self, outs: torch.Tensor, params: list | None = None) -> torch.Tensor:
        """Class probabilities averaged over the S sampled outputs (dim 0)."""
        return outs.softmax(-1).mean(0)
