"""Natural-gradient VI for a diagonal Gaussian: the optimizer `NaturalGradientVI` and its pure update
rule `ngvi_update`."""
from __future__ import annotations

import math

import torch

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
                g_rho = r.grad if r.requires_grad else None
                new_m, new_r = ngvi_update(m, r, m.grad, g_rho, group["lr"], group["rho_lr"], group["max_step"])
                m.copy_(new_m)
                r.copy_(new_r)
        return None


def ngvi_update(mu: torch.Tensor, rho: torch.Tensor, g_mu: torch.Tensor | None, g_rho: torch.Tensor | None,
                lr: float, rho_lr: float, max_step: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One NaturalGradientVI step of one tensor as a function, (μ', ρ'): what the optimizer applies in
    place and what the back-propagating learners unroll (so both follow one rule, trust region
    included). A None gradient leaves its half unchanged."""
    if g_mu is not None:
        var = torch.exp(2 * rho)
        step = var * g_mu * lr
        if max_step is not None:
            bound = var.sqrt() * max_step
            step = torch.minimum(torch.maximum(step, -bound), bound)
        mu = mu - step
    if g_rho is not None:
        step = 0.5 * rho_lr * g_rho
        if max_step is not None:  # ρ's natural unit: Fisher 2 → one std = 1/√2
            step = step.clamp(-max_step * _SQRT_HALF, max_step * _SQRT_HALF)
        rho = rho - step
    return mu, rho
