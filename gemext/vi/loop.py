"""The variational-inference inner loop (`fit`), its configuration and the optimizer table.

`fit` minimises −ELBO = E_q[−log p(D|θ)] + β·KL(q‖p) over a diagonal Gaussian λ = (μ, ρ) with
any torch.optim optimizer. Each step draws θ = μ + σ·ε with the fused `sample` op, back-propagates
the data term to θ only, and lets the fused `elbo_backward_` turn ∂/∂θ into ∂/∂μ, ∂/∂ρ of −ELBO
(ε regenerated from the seed, KL gradient added) straight into the optimizer's .grad buffers.
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
from .von import FlatPrior, VariationalOnlineNewton, _backtrack_, _flat, _merit, _unflatten, rows_times

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
               "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}


_OPTIMIZERS["ngvi"] = NaturalGradientVI
_OPTIMIZERS["von"] = VariationalOnlineNewton


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


# nll(theta, index) -> summed negative log-likelihood over tasks and the selected points
# (index: a LongTensor of data indices, or None for all of them).
NLL = Callable[[list[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


@dataclass
class FitResult:
    posterior: Posterior
    nll: float  # data term of the last step, summed over tasks, rescaled to the full data


def fit(nll: NLL, n_data: int, prior: Posterior, init: Posterior, config: VIConfig,
        generator: torch.Generator | None = None, delta: bool = False,
        callback: Callable[[int, Posterior], None] | None = None,
        task_range: tuple[int, int] | None = None) -> FitResult:
    """Fit q(θ; λ) to the data behind `nll`, starting from `init`, with KL to `prior`.

    delta=True fits a point estimate instead (σ = 0, θ = μ; the data gradient plus β times the
    Gaussian prior's, i.e. MAP, or plain loss minimisation when β = 0). `callback(step, λ)` sees
    the posterior after 0, 1, …, steps updates (used for per-step meta-test curves).
    `task_range=(k, T_total)` (default None: the whole batch): the posterior's leading dimension
    holds tasks k.. of a meta-batch of T_total (a distributed shard); the noise is then that of
    the full batch (`task_starts`)."""
    if n_data < 1:
        raise ValueError("fit: the task has no data points")
    opt_class = config.optimizer_class()
    if delta and opt_class in (NaturalGradientVI, VariationalOnlineNewton):
        raise ValueError(f"fit: {config.optimizer} VI needs a Gaussian posterior; a point estimate (delta=True) "
                         "has σ = 0 and would never move: use sgd or adam")
    if opt_class is VariationalOnlineNewton:
        return _fit_von(nll, n_data, prior, init, config, generator, callback, task_range)
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
        index, scale = _minibatch(n_data, config, generator, mu[0].device)
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


def _minibatch(n_data: int, config: VIConfig, generator: torch.Generator | None,
               device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A random subset of the data (and the factor that rescales its sum to the full data)."""
    if config.batch_size is not None and config.batch_size < n_data:
        return torch.randperm(n_data, generator=generator)[: config.batch_size].to(device), n_data / config.batch_size
    return None, 1.0


def _fit_von(nll: NLL, n_data: int, prior: Posterior, init: Posterior, config: VIConfig,
             generator: torch.Generator | None, callback: Callable[[int, Posterior], None] | None,
             task_range: tuple[int, int] | None, create_graph: bool = False) -> FitResult:
    """`fit` with the variational online Newton step (see VariationalOnlineNewton).

    create_graph=True is the same update as a differentiable composite (for the learners that
    back-propagate through their inner loop): `prior` and `init` may carry a graph to the
    meta-parameters, the data gradient is taken with create_graph, the step is
    `step_differentiable`, and the returned posterior carries the graph. The curvature rows, the
    backtracking decision (each task's accepted step fraction) and the merit values are data."""
    von = VariationalOnlineNewton(lr=config.lr, **config.optimizer_kwargs)
    if von.uses_ggn() and not hasattr(nll, "value_grad_rows"):
        raise TypeError("fit: von with curvature='ggn' needs a gemext.vi.DataTerm (the model's outputs and "
                        "likelihood) instead of a plain nll callable; pass optimizer_kwargs="
                        "{'curvature': 'reparam', 'coupling': 'diag'} for any callable")
    if create_graph:
        mu, rho = list(init.mu), list(init.rho)
        data_prior = Posterior(prior.names, [m.detach() for m in prior.mu], [r.detach() for r in prior.rho])
    else:
        mu = [m.detach().clone() for m in init.mu]
        rho = [r.detach().clone() for r in init.rho]
        data_prior = prior
    h = [torch.zeros_like(m).detach() for m in mu]
    S, beta = config.mc_samples, config.beta
    starts = task_starts(mu, task_range)
    last = float("nan")
    merit: torch.Tensor | None = None
    spare_rows: list[torch.Tensor | None] = [None] * S  # each sample's rows of the last step
    flat_prior: FlatPrior | None = None  # for the backtracking, computed once (the prior is fixed in a fit)
    if callback is not None:
        callback(0, Posterior(init.names, mu, rho))
    for step in range(config.steps):
        index, scale = _minibatch(n_data, config, generator, mu[0].device)
        seed = ops.new_seed(generator)
        grad: list[torch.Tensor] | None = None  # summed over the MC samples
        rows: list[torch.Tensor] = []  # the flat GGN factor of each MC sample, [T, M, D]
        offsets: list[torch.Tensor] = []
        curv = None
        ggn_diag: torch.Tensor | None = None  # Σ over samples of the rows' squares, [T, D]
        extra: dict[int, torch.Tensor] = {}
        total = 0.0
        need_eps = create_graph or (not von.uses_ggn() and S > 1)  # else the kernels regenerate ε themselves
        for s in range(S):
            if need_eps:
                with torch.no_grad():
                    eps = ops.sample([torch.zeros_like(m) for m in mu], [torch.zeros_like(r) for r in rho], seed, s,
                                     starts)
            with torch.enable_grad():
                if create_graph:  # θ = μ + σε as a graph (the fused sample is first-order only)
                    theta = [m + r.exp() * e for m, r, e in zip(mu, rho, eps)]
                else:
                    with torch.no_grad():
                        theta = ops.sample(mu, rho, seed, s, starts)
                if von.uses_ggn():
                    # the rows of this sample at the last step are dead by now: their block takes this
                    # step's (a fresh one each step costs page faults); not in graph mode, whose last
                    # step's graph holds them
                    value, g, R_s, diag_s = nll.value_grad_rows([t.detach() for t in theta], index, generator,
                                                                None if create_graph else spare_rows[s])
                    spare_rows[s] = R_s
                    if create_graph:
                        g = list(torch.autograd.grad(nll(theta, index), theta, create_graph=True))
                    total += value * (scale / S)
                    if scale / S != 1.0:  # a minibatch or one of S samples: its terms rescaled
                        diag_s = diag_s * (scale / S)
                        g = [gi * (scale / S) for gi in g]
                        R_s.mul_(math.sqrt(scale / S))  # in place: a block of its own (see above)
                    ggn_diag = diag_s if ggn_diag is None else ggn_diag + diag_s
                    rows.append(R_s)
                    if von.control_variate:  # R(θ − μ); differentiable in σ in graph mode (the noise it cancels)
                        delta = _flat(theta) - _flat(mu)
                        # the step's own products of the rows come later: one buffer serves both
                        offsets.append(rows_times(R_s, delta, von.workspace("products", R_s)))
                    for i, c in nll.lik_curvature(theta, index).items():
                        extra[i] = extra.get(i, 0.0) + c * (scale / S)
                else:
                    if not create_graph:
                        theta = [t.requires_grad_(True) for t in theta]
                    loss = nll(theta, index) * (scale / S)
                    g = list(torch.autograd.grad(loss, theta, create_graph=create_graph))
                    total += float(loss.detach())
                    if S > 1:  # the kernel's own g·ε/σ uses sample 0 only: average the clamped estimates
                        c_s = [(gi * e * torch.exp(-r)).clamp_min(0) / S for gi, e, r in zip(g, eps, rho)]
                        curv = c_s if curv is None else [a + b for a, b in zip(curv, c_s)]
            if not create_graph:
                g = [gi.detach() for gi in g]
            grad = g if grad is None else [a + b for a, b in zip(grad, g)]
        last = total
        if not math.isfinite(last):
            raise FloatingPointError(f"VI step {step}: the negative log-likelihood is {last}")
        stacked = (rows[0] if len(rows) == 1 else torch.cat(rows, 1)) if rows else None
        if ggn_diag is not None:
            curv = _unflatten(ggn_diag, mu)
        row_offset = torch.cat(offsets, 1) if offsets else None
        search = von.backtrack > 0 and hasattr(nll, "task_nll")
        mu_old = _flat(mu).detach() if search else None  # a copy: the step updates μ in place
        if search and flat_prior is None:
            with torch.no_grad():  # the line search's objective is data; without a graph the step shares it
                flat_prior = von.flat_prior(data_prior)
        if search and (merit is None or index is not None):  # full-data steps reuse the last accepted value
            merit = _merit(nll, _unflatten(mu_old, mu), flat_prior, beta, index, scale)
        if create_graph:
            with torch.enable_grad():
                mu_new, rho, h = von.step_differentiable(mu, rho, h, grad, stacked, extra, prior, beta, seed, starts,
                                                         curv, row_offset)
        else:  # in place
            von.step(mu, rho, h, grad, stacked, extra, prior, beta, seed, starts, curv, row_offset)
            mu_new = mu
        if search:  # in place on μ, or on a detached copy whose accepted fractions then scale the graph's step
            trial = [m.detach().clone() for m in mu_new] if create_graph else mu_new
            merit, frac = _backtrack_(nll, trial, mu_old, merit, flat_prior, beta, index, scale, von.backtrack)
            if create_graph and bool((frac != 1).any()):
                mu_new = [m0 + frac.to(m.dtype).reshape(-1, *([1] * (m.dim() - 1))) * (m - m0)
                          for m, m0 in zip(mu_new, mu)]
        mu = mu_new
        if callback is not None:
            callback(step + 1, Posterior(init.names, mu, rho))
    return FitResult(Posterior(init.names, mu, rho), last)
