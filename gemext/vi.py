"""Likelihoods and the variational-inference inner loop.

`fit` minimises −ELBO = E_q[−log p(D|θ)] + β·KL(q‖p) over a diagonal Gaussian λ = (μ, ρ) with
any torch.optim optimizer. Each step draws θ = μ + σ·ε with the fused `sample` op, back-propagates
the data term to θ only, and lets the fused `elbo_backward_` turn ∂/∂θ into ∂/∂μ, ∂/∂ρ of −ELBO
(ε regenerated from the seed, KL gradient added) straight into the optimizer's .grad buffers.
Posterior tensors may carry a leading task dimension: all tasks of a meta-batch then advance
together, which is exact for element-wise optimizers (SGD, Adam, RMSprop...)."""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import ops
from .gaussian import Posterior

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
               "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}


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
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed −log p(y | out) over every point and output (all leading dims summed)."""
        if out.shape != y.shape:
            raise ValueError(f"GaussianLikelihood: prediction shape {tuple(out.shape)} != target shape {tuple(y.shape)}")
        ls = self._log_sigma(params)
        return (0.5 * (y - out).pow(2) * torch.exp(-2 * ls) + ls + 0.5 * math.log(2 * math.pi)).sum()

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

    def nll(self, out: torch.Tensor, y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if y.dtype != torch.long:
            raise TypeError(f"CategoricalLikelihood: labels must be int64, got {y.dtype}")
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")

    def predictive(self, outs: torch.Tensor, params: list | None = None) -> torch.Tensor:
        """Class probabilities averaged over the S sampled outputs (dim 0)."""
        return outs.softmax(-1).mean(0)


# ----------------------------------------------------------------------------- VI loop
_SQRT_HALF = math.sqrt(0.5)


class NaturalGradientVI(torch.optim.Optimizer):
    """Natural-gradient descent for a diagonal Gaussian q(μ, ρ = log σ): the Fisher information is
    1/σ² for μ and 2 for ρ, so μ ← μ − lr·σ²·∂/∂μ and ρ ← ρ − lr/2·∂/∂ρ. The posterior variance
    (initially the prior's σ₀², which GEM meta-learns) acts as a per-weight step size, and on a
    linear-Gaussian model one step with lr = 1 at the exact σ lands on the exact posterior mean.
    Parameters are passed as the μ list followed by the ρ list of the same length. ρ steps
    default to lr/20: its one-sample gradient g·ε·σ is far noisier than μ's, and a full natural
    step on it diverges within a few steps on small networks. Each μ step is capped at
    `max_step` posterior standard deviations, and each ρ step at `max_step`/√2 (its own
    Fisher-metric unit) (a trust region: the quadratic model behind the
    natural step only holds near q; without it, rare tasks with large gradients overshoot and
    diverge when adapted for more steps than at meta-training); None disables the cap."""

    def __init__(self, params, lr: float = 0.5, rho_lr: float | None = None, max_step: float | None = 1.0) -> None:
        params = list(params)
        if len(params) % 2:
            raise ValueError("NaturalGradientVI expects the μ tensors followed by as many ρ tensors")
        if max_step is not None and not max_step > 0:
            raise ValueError(f"NaturalGradientVI: max_step must be > 0 or None, got {max_step}")
        super().__init__(params, dict(lr=lr, rho_lr=lr / 20 if rho_lr is None else rho_lr, max_step=max_step))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps = group["params"]
            mus, rhos = ps[: len(ps) // 2], ps[len(ps) // 2:]
            for m, r in zip(mus, rhos):
                if m.grad is not None:
                    var = torch.exp(2 * r)
                    step = var * m.grad * group["lr"]
                    if group["max_step"] is not None:
                        bound = var.sqrt() * group["max_step"]
                        step = torch.minimum(torch.maximum(step, -bound), bound)
                    m.sub_(step)
                if r.requires_grad and r.grad is not None:
                    step = 0.5 * group["rho_lr"] * r.grad
                    if group["max_step"] is not None:  # ρ's natural unit: Fisher 2 → one std = 1/√2
                        step = step.clamp(-group["max_step"] * _SQRT_HALF, group["max_step"] * _SQRT_HALF)
                    r.sub_(step)
        return None


_OPTIMIZERS["ngvi"] = NaturalGradientVI


@dataclass
class VIConfig:
    """How a posterior is fitted. `optimizer` is a torch.optim class or one of
    adam/sgd/rmsprop/adamw/adagrad/ngvi (natural-gradient VI); `batch_size` None uses every point each step."""

    steps: int = 5
    optimizer: str | type = "adam"
    lr: float = 0.01
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    mc_samples: int = 1
    beta: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"VIConfig.steps must be >= 0, got {self.steps}")
        if self.mc_samples < 1:
            raise ValueError(f"VIConfig.mc_samples must be >= 1, got {self.mc_samples}")
        if not self.lr > 0:
            raise ValueError(f"VIConfig.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ValueError(f"VIConfig.beta must be >= 0, got {self.beta}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"VIConfig.batch_size must be >= 1 or None, got {self.batch_size}")
        self.optimizer_class()  # fail early on an unknown name

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


# Safe range of the prior's log standard deviation ρ₀: σ₀ ∈ [2e-9, 2.2e4]. Inside it exp(±2ρ₀) and
# the GEM/KL terms stay finite in float32 (1/σ₀² ≤ 2.4e17; the kernels are exact for |ρ₀| < 43).
# gemext.train applies `clamp_rho_` to Θ after every meta-step: the one place. Posterior ρ is not
# clamped on purpose: a diverging inner loop must still show up as non-finite, so that the
# training loop's guards skip the step (clamping it made such runs continue on losses of 1e30).
RHO_MIN, RHO_MAX = -20.0, 10.0


@torch.no_grad()
def clamp_rho_(rho: list[torch.Tensor]) -> None:
    """Clamp log standard deviations into [RHO_MIN, RHO_MAX] in place (NaN stays NaN, so the
    non-finite guards still see it)."""
    for r in rho:
        r.clamp_(RHO_MIN, RHO_MAX)


_TASK_RANGE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("task_range", default=None)


@contextlib.contextmanager
def task_shard(first: int, total: int):
    """Inside the block, per-task tensors of the inner loops hold tasks first.. of a meta-batch of
    `total` (gemext.distributed wraps meta_backward in it): `fit` and the learners' own samplers
    then draw the noise of the full batch. Keeps `meta_backward(tasks)` free of extra arguments."""
    token = _TASK_RANGE.set((int(first), int(total)))
    try:
        yield
    finally:
        _TASK_RANGE.reset(token)


def current_task_range() -> tuple[int, int] | None:
    """(first task, meta-batch size) set by `task_shard`, or None outside it."""
    return _TASK_RANGE.get()


def task_starts(tensors: list[torch.Tensor], task_range: tuple[int, int] | None) -> list[int] | None:
    """Global noise indices (the ``starts`` of :func:`gemext.ops.sample`) of per-task tensors
    [T_shard, ...] holding tasks k .. k+T_shard−1 of a meta-batch of T_total tasks, so that the
    shard draws exactly the ε those tasks draw in the full batch: layer l of the full batch
    occupies Σ_{l'<l} T_total·n_l' onwards and task k of it starts k·n_l further (n_l = per-task
    numel). None (no range) keeps the default cumulative indexing."""
    if task_range is None:
        return None
    k, total = task_range
    starts, base = [], 0
    for t in tensors:
        if t.dim() == 0 or not 0 <= k <= k + t.shape[0] <= total:
            raise ValueError(f"task_range {task_range}: tensors of shape {tuple(t.shape)} do not hold "
                             f"tasks {k}..{k + (t.shape[0] if t.dim() else 0) - 1} of {total}")
        n = t[0].numel()
        starts.append(base + k * n)
        base += total * n
    return starts


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
    `task_range=(k, T_total)` (default: `current_task_range()`): the posterior's leading dimension
    holds tasks k.. of a meta-batch of T_total (a distributed shard); the noise is then that of
    the full batch (`task_starts`)."""
    if n_data < 1:
        raise ValueError("fit: the task has no data points")
    if delta and config.optimizer_class() is NaturalGradientVI:
        raise ValueError("fit: natural-gradient VI needs a Gaussian posterior; a point estimate (delta=True) "
                         "has σ = 0 and would never move: use sgd or adam")
    mu = [m.detach().clone().requires_grad_(True) for m in init.mu]
    rho = [r.detach().clone().requires_grad_(not delta) for r in init.rho]
    variables = mu if delta else mu + rho  # μ list then ρ list (NaturalGradientVI relies on it)
    for v in variables:
        v.grad = torch.zeros_like(v)  # persistent buffers: the fused op writes into them
    opt = config.optimizer_class()(variables, lr=config.lr, **config.optimizer_kwargs)
    S, beta = config.mc_samples, config.beta
    scratch = [torch.empty_like(v) for v in variables] if S > 1 and not delta else None
    starts = None if delta else task_starts(mu, task_range or current_task_range())
    last = float("nan")
    if callback is not None:
        callback(0, Posterior(init.names, mu, rho))
    for step in range(config.steps):
        index, scale = None, 1.0
        if config.batch_size is not None and config.batch_size < n_data:
            index = torch.randperm(n_data, generator=generator)[: config.batch_size].to(mu[0].device)
            scale = n_data / config.batch_size
        if delta:
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
