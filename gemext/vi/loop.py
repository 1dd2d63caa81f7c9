"""The variational-inference inner loop (`fit`), its configuration and the optimizer table.

`fit` minimises −ELBO = E_q[−log p(D|θ)] + β·KL(q‖p) over a diagonal Gaussian λ = (μ, ρ) with
any torch.optim optimizer (for "von" it runs a `VonFit`). Each step draws θ = μ + σ·ε with the
fused `sample` op, back-propagates the data term to θ only, and lets the fused `elbo_backward_`
turn ∂/∂θ into ∂/∂μ, ∂/∂ρ of −ELBO (ε regenerated from the seed, KL gradient added) straight into
the optimizer's .grad buffers.
Posterior tensors may carry a leading task dimension: all tasks of a meta-batch then advance
together, which is exact for element-wise optimizers (SGD, Adam, RMSprop...)."""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from ..gaussian import Posterior
from .ngvi import NaturalGradientVI
from .noise import task_starts
from .terms import NLL
from .von import VariationalOnlineNewton, VonFit

# "von" names its options, not a torch.optim optimizer: `fit` runs a VonFit for it
_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
               "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "ngvi": NaturalGradientVI,
               "von": VariationalOnlineNewton}


@dataclass
class VIConfig:
    """How a posterior is fitted. `optimizer` is a torch.optim class or one of
    adam/sgd/rmsprop/adamw/adagrad/ngvi (natural-gradient VI)/von (variational online Newton, its
    options in optimizer_kwargs); `batch_size` None uses every point each step."""

    steps: int = 5
    optimizer: str | type = "adam"
    lr: float | None = None  # None: 1.0 (a full Newton step) for von, else 0.01
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    mc_samples: int = 1
    beta: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"VIConfig.steps must be >= 0, got {self.steps}")
        if self.mc_samples < 1:
            raise ValueError(f"VIConfig.mc_samples must be >= 1, got {self.mc_samples}")
        if self.lr is None:
            self.lr = 1.0 if self.optimizer_class() is VariationalOnlineNewton else 0.01
        if not self.lr > 0:
            raise ValueError(f"VIConfig.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ValueError(f"VIConfig.beta must be >= 0, got {self.beta}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"VIConfig.batch_size must be >= 1 or None, got {self.batch_size}")
        if self.optimizer_class() is VariationalOnlineNewton:  # fail early on bad options
            known = set(inspect.signature(VariationalOnlineNewton).parameters) - {"lr"}
            unknown = sorted(set(self.optimizer_kwargs) - known)
            if unknown:
                raise ValueError(f"von: unknown optimizer_kwargs {unknown}; its options are {sorted(known)}")
            VariationalOnlineNewton(lr=self.lr, **self.optimizer_kwargs)

    def optimizer_class(self) -> type:
        if isinstance(self.optimizer, str):
            try:
                return _OPTIMIZERS[self.optimizer.lower()]
            except KeyError:
                raise ValueError(f"unknown inner optimizer {self.optimizer!r}; "
                                 f"choose one of {sorted(_OPTIMIZERS)} or pass a torch.optim class") from None
        if isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer):
            return self.optimizer
        raise TypeError(f"VIConfig.optimizer must be a name or a torch.optim.Optimizer class, got {self.optimizer!r}")

    def minibatch(self, n_data: int, generator: torch.Generator | None,
                  device: torch.device) -> tuple[torch.Tensor | None, float]:
        """A random subset of `batch_size` data indices and the factor that rescales its sum to
        the full data, or (None, 1.0): every point."""
        if self.batch_size is not None and self.batch_size < n_data:
            return torch.randperm(n_data, generator=generator)[: self.batch_size].to(device), n_data / self.batch_size
        return None, 1.0


@dataclass
class FitResult:
    posterior: Posterior
    nll: float  # data term of the last step, summed over tasks, rescaled to the full data


def fit(nll: NLL, n_data: int, prior: Posterior, init: Posterior, config: VIConfig,
        generator: torch.Generator | None = None, delta: bool = False,
        callback: Callable[[int, Posterior], None] | None = None,
        task_range: tuple[int, int] | None = None, differentiable: bool = False) -> FitResult:
    """Fit q(θ; λ) to the data behind `nll`, starting from `init`, with KL to `prior`.

    delta=True fits a point estimate instead (σ = 0, θ = μ; the data gradient plus β times the
    Gaussian prior's, i.e. MAP, or plain loss minimisation when β = 0). `callback(step, λ)` sees
    the posterior after 0, 1, …, steps updates (used for per-step meta-test curves).
    `task_range=(k, T_total)` (default None: the whole batch): the posterior's leading dimension
    holds tasks k.. of a meta-batch of T_total (a distributed shard); the noise is then that of
    the full batch (`task_starts`). differentiable=True (von only) builds the update as a graph
    for learners that back-propagate through their inner loop: `prior` and `init` may carry one to
    the meta-parameters, and the returned posterior carries it (see `VonFit`)."""
    if n_data < 1:
        raise ValueError("fit: the task has no data points")
    opt_class = config.optimizer_class()
    if delta and opt_class in (NaturalGradientVI, VariationalOnlineNewton):
        raise ValueError(f"fit: {config.optimizer} VI needs a Gaussian posterior; a point estimate (delta=True) "
                         "has σ = 0 and would never move: use sgd or adam")
    if opt_class is VariationalOnlineNewton:
        return FitResult(*VonFit(nll, prior, init, config, generator, task_range, differentiable).run(n_data, callback))
    if differentiable:
        raise ValueError(f"fit: differentiable=True needs optimizer 'von'; {config.optimizer} steps a torch.optim "
                         "optimizer in place")
    mu = [m.detach().clone().requires_grad_(True) for m in init.mu]
    rho = [r.detach().clone().requires_grad_(not delta) for r in init.rho]
    variables = mu if delta else mu + rho  # μ list then ρ list (NaturalGradientVI relies on it)
    for v in variables:
        v.grad = torch.zeros_like(v)  # persistent buffers: the fused op writes into them
    opt = opt_class(variables, lr=config.lr, **config.optimizer_kwargs)
    S, beta = config.mc_samples, config.beta
    scratch = [torch.empty_like(v) for v in variables] if S > 1 and not delta else None
    starts = None if delta else task_starts(mu, task_range)
    last = float("nan")
    if callback is not None:
        callback(0, Posterior(init.names, mu, rho))
    for step in range(config.steps):
        index, scale = config.minibatch(n_data, generator, mu[0].device)
        if delta:
            with torch.enable_grad():  # the data gradient, also when the caller runs under torch.no_grad()
                theta = [m.detach().requires_grad_(True) for m in mu]
                loss = nll(theta, index) * scale
                grads = torch.autograd.grad(loss, theta)
            for m, g, m0, r0 in zip(mu, grads, prior.mu, prior.rho):
                m.grad.copy_(g)
                if beta > 0:
                    m.grad.add_((m.detach() - m0) * torch.exp(-2 * r0), alpha=beta)
            last = float(loss.detach())
        else:
            seed = ops.new_seed(generator)
            total = 0.0
            for s in range(S):
                with torch.no_grad():
                    theta = ops.sample(mu, rho, seed, s, starts)
                with torch.enable_grad():  # as in the delta case
                    theta = [t.requires_grad_(True) for t in theta]
                    loss = nll(theta, index) * (scale / S)
                    grads = [g.contiguous() for g in torch.autograd.grad(loss, theta)]
                out = [v.grad for v in variables] if s == 0 else scratch
                ops.elbo_backward_(out[: len(mu)], out[len(mu):], grads, mu, rho, prior.mu, prior.rho,
                                   seed, s, beta / S, starts)
                if s > 0:
                    torch._foreach_add_([v.grad for v in variables], scratch)
                total += float(loss.detach())
            last = total
        if not math.isfinite(last):
            raise FloatingPointError(f"VI step {step}: the negative log-likelihood is {last}")
        opt.step()
        if callback is not None:
            callback(step + 1, Posterior(init.names, mu, rho))
    return FitResult(Posterior(init.names, [m.detach() for m in mu], [r.detach() for r in rho]), last)
