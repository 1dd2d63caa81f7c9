"""Policy-gradient losses and updates on functional parameter sets (dicts or lists of tensors).

- `pg_surrogate`: REINFORCE-with-baseline loss −mean_t log π(a_t|s_t)·A_t. Its gradient is the
  policy-gradient estimate; it also serves as the RL "negative log-likelihood" −log p(D|θ) of
  the paper's App. B.1 inside VI.
- `reinforce_step`: one SGD step on it (MAML's inner update; differentiable with create_graph).
- `trpo_step`: Schulman et al. 2015 as in MAML-RL: conjugate gradient on Fisher-vector products
  (Hessian of the mean KL, plus damping), step scaled to the KL radius δ, backtracking line
  search accepting the first step that lowers the loss with KL ≤ δ (else no step).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...linalg import conjugate_gradient
from .policy import GaussianMLPPolicy, Params, gaussian_kl
from .rollouts import EpisodeBatch

ParamSet = Mapping[str, Tensor] | Sequence[Tensor]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def _advantages(batch: EpisodeBatch, fn: str) -> Tensor:
    if batch.advantages is None:
        raise ValueError(f"{fn}: batch has no advantages; call gemext.tasks.rl.process(batch) first")
    return batch.advantages


def pg_surrogate(policy: GaussianMLPPolicy, params: Params | None, batch: EpisodeBatch) -> Tensor:
    """−Σ log π(a|s; params)·A·mask / Σ mask (advantages are constants)."""
    adv = _advantages(batch, "pg_surrogate").detach()
    logp = policy.log_prob(batch.observations, batch.actions, params)
    return -_masked_mean(logp * adv, batch.mask)


def trpo_surrogate(policy: GaussianMLPPolicy, params: Params | None, batch: EpisodeBatch,
                   old_log_probs: Tensor) -> Tensor:
    """Importance-weighted surrogate −mean exp(log π − log π_old)·A (equal to `pg_surrogate`'s
    value up to a constant and with the same gradient at π = π_old)."""
    adv = _advantages(batch, "trpo_surrogate").detach()
    ratio = torch.exp(policy.log_prob(batch.observations, batch.actions, params) - old_log_probs.detach())
    return -_masked_mean(ratio * adv, batch.mask)


def mean_kl(policy: GaussianMLPPolicy, params: Params | None, batch: EpisodeBatch,
            old_params: Params | None) -> Tensor:
    """Mean over valid steps of KL(π_old(·|s) ‖ π(·|s; params)); π_old is held constant."""
    with torch.no_grad():
        m_old, s_old = policy.mean_log_std(batch.observations, old_params)
    m, s = policy.mean_log_std(batch.observations, params)
    return _masked_mean(gaussian_kl(m_old, s_old, m, s), batch.mask)


def _split(params: ParamSet) -> tuple[list[str] | None, list[Tensor]]:
    if isinstance(params, Mapping):
        return list(params.keys()), list(params.values())
    if isinstance(params, Sequence) and all(isinstance(p, Tensor) for p in params):
        return None, list(params)
    raise TypeError(f"params must be a dict or list of tensors, got {type(params).__name__}")


def _join(names: list[str] | None, tensors: Sequence[Tensor]) -> ParamSet:
    return dict(zip(names, tensors)) if names is not None else list(tensors)


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def reinforce_step(policy: GaussianMLPPolicy, params: Params, batch: EpisodeBatch, lr: float,
                   create_graph: bool = False) -> dict[str, Tensor]:
    """θ' = θ − lr·∇θ pg_surrogate. With create_graph=True θ' stays differentiable in θ (MAML);
    otherwise θ' is detached."""
    if not isinstance(params, Mapping):
        raise TypeError(f"reinforce_step: params must be a dict name -> tensor, got {type(params).__name__}")
    names, ts = list(params.keys()), list(params.values())
    if not create_graph:
        ts = [t.detach().requires_grad_() for t in ts]
    grads = torch.autograd.grad(pg_surrogate(policy, dict(zip(names, ts)), batch), ts, create_graph=create_graph)
    return {n: (t - lr * g) if create_graph else (t - lr * g).detach() for n, t, g in zip(names, ts, grads)}


def trpo_step(params: ParamSet, loss_fn: Callable[[ParamSet], Tensor], kl_fn: Callable[[ParamSet], Tensor],
              max_kl: float = 1e-2, damping: float = 1e-2, cg_iters: int = 10, ls_max_steps: int = 15,
              ls_backtrack_ratio: float = 0.8, grad: Tensor | None = None,
              loss_before: float | None = None) -> tuple[ParamSet, dict[str, float]]:
    """One TRPO step minimising `loss_fn` subject to `kl_fn` ≤ max_kl.

    `kl_fn(p)` must be the divergence from the policy at `params` (held fixed) to the policy at
    `p`, so that it is 0 with zero gradient at `params` and its Hessian there is the Fisher
    matrix. Both functions receive the same structure as `params` (dict or list) with leaf
    tensors that require grad, so they may differentiate internally (e.g. a MAML inner step).
    `grad` (flat) and `loss_before`: the loss's gradient and value at `params` when the caller
    already has them (MAML-TRPO's meta_backward). Returns the new (detached) parameters and a
    dict with loss/kl before and after, the number of backtracking steps and whether a step was
    accepted.
    """
    if max_kl <= 0 or damping < 0 or cg_iters < 1 or ls_max_steps < 1 or not 0 < ls_backtrack_ratio < 1:
        raise ValueError(f"trpo_step: need max_kl > 0, damping >= 0, cg_iters >= 1, ls_max_steps >= 1, "
                         f"0 < ls_backtrack_ratio < 1; got {max_kl}, {damping}, {cg_iters}, {ls_max_steps}, "
                         f"{ls_backtrack_ratio}")
    names, ts = _split(params)
    x0 = [t.detach().requires_grad_() for t in ts]
    if grad is None or loss_before is None:
        loss0 = loss_fn(_join(names, x0))
        grad = _flat(torch.autograd.grad(loss0, x0, retain_graph=True))  # kl_fn may share loss_fn's graph
        loss_before = loss0.item()
    g = grad
    kl_grad = _flat(torch.autograd.grad(kl_fn(_join(names, x0)), x0, create_graph=True))

    def fvp(v: Tensor) -> Tensor:
        return _flat(torch.autograd.grad(kl_grad @ v, x0, retain_graph=True)) + damping * v

    direction = conjugate_gradient(lambda v: [fvp(v[0][0]).unsqueeze(0)], [(-g).unsqueeze(0)], cg_iters,
                                   residual_tol=1e-10)[0][0]
    shs = 0.5 * (direction @ fvp(direction))
    if not torch.isfinite(shs) or shs.item() <= 0:
        raise FloatingPointError(f"trpo_step: non-positive curvature sᵀFs = {shs.item()}; raise damping")
    step = direction * math.sqrt(max_kl / shs.item())  # ½ sᵀFs = δ at the full step
    info = {"loss_before": loss_before, "kl": 0.0, "loss_after": loss_before, "accepted": 0.0,
            "backtracks": float(ls_max_steps)}
    for k in range(ls_max_steps):
        frac = ls_backtrack_ratio**k
        cand = [(t + frac * s).detach().requires_grad_() for t, s in zip(x0, _unflat(step, x0))]
        loss, kl = loss_fn(_join(names, cand)).item(), kl_fn(_join(names, cand)).item()
        if loss < info["loss_before"] and kl <= max_kl:
            info.update(loss_after=loss, kl=kl, accepted=1.0, backtracks=float(k))
            return _join(names, [c.detach() for c in cand]), info
    return _join(names, [t.detach() for t in x0]), info
