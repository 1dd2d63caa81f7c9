"""Natural-gradient VI for Gaussian policies under a KL trust region: GEM's TRPO-style inner step.

The data term of T tasks' rollouts is s·L(θ), L the importance-weighted policy-gradient surrogate
−Σ_t w_t·r_t·Â_t / Σ_t w_t (r_t = π(a_t|s_t; θ)/π_b(a_t|s_t), π_b the policy that collected the
rollouts; its gradient at π_b is REINFORCE's) and s the likelihood scale. The surrogate is not a
likelihood and its Hessian is indefinite, so its curvature is taken to be the policy's Fisher
information, a Gauss-Newton matrix: with z(s; θ) = (mean(s; θ)/σ_now(s), √2·log σ(s; θ)), σ_now
held at the step's start, the Fisher of π(·|s) is J_zᵀJ_z. Per step from μ, with the prior (μ_p, σ_p):

    P = β/σ_p² + (s/N)·Σ_t J_zᵀJ_z               (N visited states; the scale of s·L's sum)
    d = P⁻¹(s·∇L(μ) + β(μ − μ_p)/σ_p²)            (Jacobi-preconditioned conjugate gradient)
    σ² = 1 / diag P
    μ ← μ − α·d,  α = min(lr, √(2δ / dᵀF̄d))      (F̄ = (1/N)Σ_t J_zᵀJ_z: the policy's mean KL is
                                                   ≈ ½α²·dᵀF̄d ≤ δ, TRPO's trust region)

then α is shrunk by `ls_backtrack_ratio` until the objective s·L + β‖μ − μ_p‖²/(2σ_p²) decreases
with a mean KL ≤ δ (TRPO's line search); if none does, the mean stays (the variances stand). The
gradient is taken at the mean (no sampled weights): the step is deterministic given the rollouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from ...gaussian import Posterior
from ...linalg import conjugate_gradient
from .optim import mean_kl, trpo_surrogate
from .policy import GaussianMLPPolicy
from .rollouts import EpisodeBatch, stack

Theta = tuple[Tensor, ...]


@dataclass(frozen=True)
class TrustRegionVI:
    """Options of `natural_fit` (defaults: MAML-RL's TRPO values for max_kl; 5 CG steps, which on
    nav2d leave the direction within 2e-4 of 40 steps' (benchmarks/RESULTS.md, RL)). `lr`: the
    fraction of the natural-gradient (Newton) step taken before the trust region clips it;
    `damping` is added to P for the mean step only; `diag_chunk`: states per batched Jacobian
    when forming diag P (memory ∝ chunk × action dims × weights)."""

    max_kl: float = 1e-2
    lr: float = 1.0
    cg_iters: int = 5
    damping: float = 0.0
    ls_max_steps: int = 10
    ls_backtrack_ratio: float = 0.5
    diag_chunk: int = 256

    def __post_init__(self) -> None:
        for ok, problem in (
                (self.max_kl > 0, f"max_kl must be > 0, got {self.max_kl}"),
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                (isinstance(self.cg_iters, int) and self.cg_iters >= 1,
                 f"cg_iters must be an int >= 1, got {self.cg_iters!r}"),
                (self.damping >= 0, f"damping must be >= 0, got {self.damping}"),
                (isinstance(self.ls_max_steps, int) and self.ls_max_steps >= 1,
                 f"ls_max_steps must be an int >= 1, got {self.ls_max_steps!r}"),
                (0 < self.ls_backtrack_ratio < 1,
                 f"ls_backtrack_ratio must be in (0, 1), got {self.ls_backtrack_ratio}"),
                (isinstance(self.diag_chunk, int) and self.diag_chunk >= 1,
                 f"diag_chunk must be an int >= 1, got {self.diag_chunk!r}")):
            if not ok:
                raise ValueError(f"natural (RL inner VI): {problem}")


class PolicyFisher:
    """The Fisher products of one set of rollouts per task (time and episodes flattened to
    states, [T, N, ...]) for the policy at `theta` (tuples of [T, ...] tensors in `names` order),
    each state weighted by `weight` [T, N] (0 for padding)."""

    def __init__(self, policy: GaussianMLPPolicy, names: list[str], obs: Tensor, weight: Tensor, theta: Theta,
                 chunk: int = 256) -> None:
        self.policy, self.names, self.obs, self.weight, self.chunk = policy, names, obs, weight, chunk
        with torch.no_grad():
            self.inv_std = vmap(lambda th, x: torch.exp(-self._dist(th, x)[1]))(theta, obs)  # σ_now, [T, N, A]
        self.theta = theta

    def _dist(self, theta: Theta, x: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(self.policy, dict(zip(self.names, theta)), (x,))

    def _z(self, theta: Theta, x: Tensor, inv_std: Tensor) -> Tensor:
        mean, log_std = self._dist(theta, x)
        return torch.cat([mean * inv_std, math.sqrt(2.0) * log_std], -1)

    def fvp(self, v: Theta) -> list[Tensor]:
        """Σ_t w_t J_zᵀJ_z v per task."""
        def one(theta: Theta, x: Tensor, inv_std: Tensor, w: Tensor, vt: Theta) -> Theta:
            z, pull = vjp(lambda *p: self._z(p, x, inv_std), *theta)
            _, jv = jvp(lambda *p: self._z(p, x, inv_std), tuple(theta), tuple(vt))
            return pull(jv * w.unsqueeze(-1))
        return list(vmap(one)(self.theta, self.obs, self.inv_std, self.weight, tuple(v)))

    def diagonal(self) -> list[Tensor]:
        """Σ_t w_t diag(J_zᵀJ_z) per task: by layers for a `GaussianMLPPolicy` (`_mlp_diagonal`), else
        from each state's Jacobian, `chunk` states at a time."""
        if _is_mlp_policy(self.policy):
            return self._mlp_diagonal()
        return self._jacobian_diagonal()

    def _mlp_diagonal(self) -> list[Tensor]:
        """A linear layer's row of state n and output z is δ_nz ⊗ h_n (δ the output's cotangent at
        the layer, h its input), so Σ_n w_n Σ_z (δ_nz ⊗ h_n)² = Σ_n (w_n Σ_z δ_nz²) ⊗ h_n²: one
        product per layer, no per-state Jacobian. The state-independent log σ has Fisher 2 per state."""
        params = dict(zip(self.names, self.theta))
        h, inputs, slopes = self.obs, [], []
        layers = list(self.policy.mean)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                inputs.append(h)
                w, b = params[f"mean.{i}.weight"], params[f"mean.{i}.bias"]
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:  # ReLU
                slopes.append((h > 0).to(h.dtype))
                h = torch.relu(h)
        T, N, A = self.inv_std.shape
        # δ at the output: output a's cotangent is e_a/σ_a, [T, N, A (z), A]
        delta = torch.diag_embed(self.inv_std)
        out = {n: None for n in self.names}
        linear = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        for k in range(len(linear) - 1, -1, -1):
            i = linear[k]
            d2 = (delta.square().sum(2) * self.weight.unsqueeze(-1))  # [T, N, O]
            out[f"mean.{i}.weight"] = torch.bmm(d2.transpose(1, 2), inputs[k].square())
            out[f"mean.{i}.bias"] = d2.sum(1)
            if k > 0:
                w = params[f"mean.{i}.weight"]
                delta = torch.bmm(delta.reshape(T, N * A, -1), w).view(T, N, A, -1) * slopes[k - 1].unsqueeze(2)
        out["log_std"] = 2 * self.weight.sum(1, keepdim=True).expand(T, A).clone()
        return [out[n] for n in self.names]

    def _jacobian_diagonal(self) -> list[Tensor]:
        def one_state(theta: Theta, x: Tensor, inv_std: Tensor) -> Tensor:
            return self._z(theta, x.unsqueeze(0), inv_std.unsqueeze(0))[0]

        jac = vmap(jacrev(one_state, argnums=0), in_dims=(None, 0, 0))
        out = [torch.zeros_like(t) for t in self.theta]
        for i in range(self.obs.shape[0]):
            theta = tuple(t[i] for t in self.theta)
            for s in range(0, self.obs.shape[1], self.chunk):
                w = self.weight[i, s:s + self.chunk]
                if not bool((w != 0).any()):
                    continue
                for o, j in zip(out, jac(theta, self.obs[i, s:s + self.chunk], self.inv_std[i, s:s + self.chunk])):
                    o[i] += torch.einsum("n,nz...->...", w, j.square())
        return out


def _solve(fisher: PolicyFisher, prec_p: Theta, prec: list[Tensor], r: Theta, options: TrustRegionVI
           ) -> list[Tensor]:
    """(β/σ_p² + damping + F)⁻¹r by conjugate gradient, Jacobi-preconditioned with diag P = `prec`:
    CG on D^-½(P + damping)D^-½ y = D^-½ r, then d = D^-½ y."""
    dh = [(p + options.damping).rsqrt() for p in prec]

    def matvec(y: list[Tensor]) -> list[Tensor]:
        v = [h * yi for h, yi in zip(dh, y)]
        return [h * ((p + options.damping) * vi + f) for h, p, vi, f in zip(dh, prec_p, v, fisher.fvp(v))]

    y = conjugate_gradient(matvec, [h * ri for h, ri in zip(dh, r)], options.cg_iters)
    return [h * yi for h, yi in zip(dh, y)]


def _is_mlp_policy(policy: nn.Module) -> bool:
    """A `GaussianMLPPolicy` as it is built: Linear and ReLU layers, a state-independent log σ."""
    return (isinstance(policy, GaussianMLPPolicy) and type(policy).forward is GaussianMLPPolicy.forward
            and all(type(m) in (nn.Linear, nn.ReLU) for m in policy.mean)
            and isinstance(policy.log_std, Tensor) and policy.log_std.dim() == 1)


def natural_fit(policy: GaussianMLPPolicy, names: list[str], batches: list[EpisodeBatch], scale: float,
                prior: Posterior, init: Posterior, steps: int, beta: float = 1.0,
                options: TrustRegionVI = TrustRegionVI()) -> tuple[Posterior, dict[str, float]]:
    """`steps` trust-region natural-gradient VI steps of each task's posterior (leading task
    dimension) on its rollouts `batches` (processed: advantages set), from `init`, which must be
    the policy that collected them (its mean), with KL to `prior`. Returns the posterior and
    {"kl": mean policy KL of the steps (0 where rejected), "accepted": fraction of tasks × steps
    whose mean step was accepted}."""
    b = stack(batches)
    T = b.observations.shape[0]
    obs = b.observations.reshape(T, -1, b.observations.shape[-1])
    act = b.actions.reshape(T, -1, b.actions.shape[-1])
    adv = b.advantages.detach().reshape(T, -1)
    mask = b.mask.reshape(T, -1)
    weight = mask * (scale / mask.sum(1).clamp_min(1.0)).unsqueeze(1)  # the Fisher's per-state weight s/N
    mu_p = tuple(m.detach() for m in prior.mu)
    prec_p = tuple(beta * torch.exp(-2 * r.detach()) for r in prior.rho)
    mu = tuple(m.detach().clone() for m in init.mu)

    def params(theta: Theta) -> dict[str, Tensor]:
        return dict(zip(names, theta))

    def states(x: Tensor, a: Tensor, ad: Tensor, m: Tensor) -> EpisodeBatch:  # one task's, flattened
        return EpisodeBatch(x, a, ad, m, advantages=ad)

    with torch.no_grad():
        logp_b = vmap(lambda th, x, a: policy.log_prob(x, a, params(th)))(mu, obs, act)

    def objective(theta: Theta, x, a, ad, m, lb, m_p, p_p) -> Tensor:
        data = scale * trpo_surrogate(policy, params(theta), states(x, a, ad, m), lb)  # s·L
        return data + 0.5 * sum((p * (t - mp).square()).sum() for t, mp, p in zip(theta, m_p, p_p))

    batched_objective = vmap(objective)
    grad_objective = vmap(grad(objective))

    def policy_kl(old: Theta, new: Theta) -> Tensor:
        return vmap(lambda o, nw, x, a, ad, m: mean_kl(policy, params(nw), states(x, a, ad, m), params(o)))(
            old, new, obs, act, adv, mask)

    def bc(x: Tensor, like: Tensor) -> Tensor:
        return x.view(-1, *([1] * (like.dim() - 1)))

    rho = [r.detach().clone() for r in init.rho]
    kls, accepted = [], 0
    with torch.no_grad():
        for _ in range(steps):
            fisher = PolicyFisher(policy, names, obs, weight, mu, options.diag_chunk)
            diag = fisher.diagonal()
            prec = [p + d for p, d in zip(prec_p, diag)]
            rho = [-0.5 * torch.log(p) for p in prec]
            r = grad_objective(mu, obs, act, adv, mask, logp_b, mu_p, prec_p)
            d = _solve(fisher, prec_p, prec, r, options)
            quad = sum((di * f).flatten(1).sum(1) for di, f in zip(d, fisher.fvp(d))) / scale  # dᵀF̄d, [T]
            alpha = torch.clamp(torch.sqrt(2 * options.max_kl / quad.clamp_min(1e-30)), max=options.lr)
            now = batched_objective(mu, obs, act, adv, mask, logp_b, mu_p, prec_p)
            pending = torch.isfinite(alpha) & torch.isfinite(now)
            new = [m.clone() for m in mu]
            step_kl = torch.zeros(T, dtype=obs.dtype)
            for k in range(options.ls_max_steps):
                frac = alpha * options.ls_backtrack_ratio ** k
                cand = tuple(m - bc(frac, m) * di for m, di in zip(mu, d))
                kl = policy_kl(mu, cand)
                ok = pending & (batched_objective(cand, obs, act, adv, mask, logp_b, mu_p, prec_p) < now) \
                    & (kl <= options.max_kl)
                for nw, c in zip(new, cand):
                    nw[ok] = c[ok]
                step_kl[ok] = kl[ok]
                accepted += int(ok.sum())
                pending &= ~ok
                if not bool(pending.any()):
                    break
            mu = tuple(new)
            kls.append(step_kl)
    post = Posterior(init.names, list(mu), rho)
    info = {"kl": float(torch.stack(kls).mean()) if kls else 0.0,
            "accepted": accepted / max(1, T * steps)}
    return post, info
