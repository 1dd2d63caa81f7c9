"""Diagonal Gaussians over a module's parameters: the prior p(θ; Θ) whose (μ₀, ρ₀) are the
meta-parameters, and posteriors q(θ; λ) as plain containers of tensors (σ = exp(ρ))."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

ParamFilter = Callable[[str, nn.Parameter], bool]


# Safe range of the prior's log standard deviation ρ₀: σ₀ ∈ [2e-9, 2.2e4]. Inside it exp(±2ρ₀) and
# the GEM/KL terms stay finite in float32 (1/σ₀² ≤ 2.4e17; the kernels are exact for |ρ₀| < 43).
# GaussianPrior.clamp_ (the learners' after_step, after every meta-step) is the one place it is applied.
# Posterior ρ is not
# clamped on purpose: a diverging inner loop must still show up as non-finite, so that the
# training loop's guards skip the step (clamping it made such runs continue on losses of 1e30).
RHO_MIN, RHO_MAX = -20.0, 10.0


@torch.no_grad()
def clamp_rho_(rho: list[torch.Tensor]) -> None:
    """Clamp log standard deviations into [RHO_MIN, RHO_MAX] in place (NaN stays NaN, so the
    non-finite guards still see it)."""
    for r in rho:
        r.clamp_(RHO_MIN, RHO_MAX)


@dataclass
class Posterior:
    """λ = (μ, ρ) for the prior's parameters, in the prior's order. Tensors may carry a leading
    task dimension (one posterior per task of a meta-batch). Delta posteriors have ρ = −inf."""

    names: list[str]
    mu: list[torch.Tensor]
    rho: list[torch.Tensor]

    def detach(self) -> Posterior:
        return Posterior(self.names, [m.detach() for m in self.mu], [r.detach() for r in self.rho])

    def clone(self) -> Posterior:
        return Posterior(self.names, [m.detach().clone() for m in self.mu], [r.detach().clone() for r in self.rho])

    def task(self, i: int | slice) -> Posterior:
        """The posterior of task i (views, no copy)."""
        return Posterior(self.names, [m[i] for m in self.mu], [r[i] for r in self.rho])

    @property
    def sigma(self) -> list[torch.Tensor]:
        return [r.exp() for r in self.rho]

    def numel(self) -> int:
        return sum(m.numel() for m in self.mu)


def split_parameters(module: nn.Module, bayesian: ParamFilter | Iterable[str] | None) -> list[str]:
    """Names of the module's parameters that the prior covers.

    Default: every parameter with requires_grad=True (frozen ones stay fixed). `bayesian` may be a
    predicate (name, parameter) -> bool or an explicit collection of names."""
    params = dict(module.named_parameters())
    if bayesian is None:
        names = [n for n, p in params.items() if p.requires_grad]
    elif callable(bayesian):
        names = [n for n, p in params.items() if bayesian(n, p)]
    else:
        wanted = list(bayesian)
        unknown = [n for n in wanted if n not in params]
        if unknown:
            raise ValueError(f"bayesian names {unknown} are not parameters of the model; it has {list(params)}")
        names = [n for n in params if n in set(wanted)]
    if not names:
        raise ValueError("the prior covers no parameter: the model has no trainable parameter selected")
    return names


def detach_parameters(module: nn.Module, prior_names: Iterable[str]) -> None:
    """Turn every parameter of the module into a buffer of its module(s).

    Those in `prior_names` become non-persistent placeholders: their values live in the prior (the
    meta-parameters) and `torch.func.functional_call` supplies them. The others (frozen or not
    covered by the prior) stay fixed and persistent, so a state_dict holds everything that
    determines predictions. A tensor shared by several modules (tied weights) becomes ONE buffer
    registered under each of its names, so functional_call keeps the tie; a module used at several
    places of the model (its names alias one owner) is converted once."""
    prior = set(prior_names)
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    for key, names in aliases.items():
        value = tensors[key].detach().clone()
        persistent = not any(n in prior for n in names)
        done: set[tuple[int, str]] = set()
        for i, name in enumerate(names):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if (id(owner), leaf) in done:  # the same module reached under another name
                continue
            done.add((id(owner), leaf))
            del owner._parameters[leaf]
            owner.register_buffer(leaf, value, persistent=persistent and i == 0)


class GaussianPrior(nn.Module):
    """p(θ; Θ) = Π N(θᵢ; μ₀ᵢ, σ₀ᵢ²) over selected parameters of `module`, with μ₀ initialised to
    the module's current values and σ₀ = `sigma0` everywhere. μ₀ and ρ₀ = log σ₀ are nn.Parameters;
    `learn_sigma=False` keeps ρ₀ fixed (e.g. Reptile's fixed prior variance); `sigma0_range=(lo, hi)`
    bounds a learned σ₀ (enforced by `clamp_`, which gemext.train calls after every meta-step)."""

    def __init__(self, module: nn.Module, sigma0: float = 0.05,
                 bayesian: ParamFilter | Iterable[str] | None = None, learn_sigma: bool = True,
                 sigma0_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if not (sigma0 > 0 and math.isfinite(sigma0)):
            raise ValueError(f"sigma0 must be a positive finite number, got {sigma0}")
        if sigma0_range is not None and not (isinstance(sigma0_range, (tuple, list)) and len(sigma0_range) == 2):
            raise ValueError(f"sigma0_range must be None or a pair (lo, hi), got {sigma0_range!r}")
        lo, hi = sigma0_range if sigma0_range is not None else (0.0, math.inf)
        if not (0 <= lo <= sigma0 <= hi):
            raise ValueError(f"sigma0_range must be (lo, hi) with 0 <= lo <= sigma0 <= hi, got {sigma0_range} "
                             f"for sigma0 {sigma0}")
        # bounds of the learned σ₀ that `clamp_` enforces (within the numerically safe range)
        self.register_buffer("rho0_range", torch.tensor([math.log(lo) if lo > 0 else -math.inf,
                                                         math.log(hi) if math.isfinite(hi) else math.inf]),
                             persistent=False)
        self.names = split_parameters(module, bayesian)
        params = dict(module.named_parameters())
        self.mu0 = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.names])
        self.rho0 = nn.ParameterList([
            nn.Parameter(torch.full_like(params[n], math.log(sigma0)), requires_grad=learn_sigma)
            for n in self.names])

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ρ₀ into sigma0_range and the numerically safe range (RHO_MIN, RHO_MAX),
        in place (NaN stays NaN, for the non-finite guards); call it after each meta-step."""
        lo = max(RHO_MIN, float(self.rho0_range[0]))
        hi = min(RHO_MAX, float(self.rho0_range[1]))
        for r in self.rho0:
            r.clamp_(lo, hi)

    def expand(self, tasks: int) -> Posterior:
        """The prior repeated for `tasks` tasks, as detached contiguous tensors (no gradient)."""
        return Posterior(self.names,
                         [m.detach().unsqueeze(0).expand(tasks, *m.shape).contiguous() for m in self.mu0],
                         [r.detach().unsqueeze(0).expand(tasks, *r.shape).contiguous() for r in self.rho0])

    def numel(self) -> int:
        return sum(m.numel() for m in self.mu0)
