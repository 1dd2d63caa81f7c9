"""Meta-RL learners: GEM-BML, GEM-BML+, Reptile (on the core's VI loop and `gem_grad_`) and
MAML-TRPO, behind the learner contract of base.py (domain "rl").

Per meta-iteration and task (paper §2.1; Finn et al. 2017 for MAML):
1. K support rollouts with the current policy: the prior mean μ₀ (GEM/Reptile) or θ (MAML);
2. inner update on the support surrogate: VI from λ = Θ with KL to the prior (GEM), a point
   estimate (Reptile), or one differentiable policy-gradient step (MAML);
3. K query rollouts with the adapted policy (posterior mean μ_tr / θ');
4. meta-gradient: GEM-BML ĝ(λ_all) with λ_all = VI(prior λ_tr, start λ_tr, D_query) (support ∪
   query by sequential updating; not yet the joint refit of the supervised learners, which here
   would sum the surrogates of two rollout sets), GEM-BML+ ĝ(λ_all) − ĝ(λ_tr), Reptile
   (μ_all − μ₀)/C₀²; Θ.grad = −mean ĝ and a torch.optim Adam step. MAML: one TRPO step
   on the query surrogate through the inner step (KL ≤ max_kl, natural gradient by CG).

The likelihood of the RL data (App. B.1) is −log p(D|θ) = s·L_PG(θ), with L_PG = −mean_t log π·Â
the REINFORCE surrogate and s = `likelihood_scale` (default K·horizon: the surrogate summed over
the support steps). The VI optimizer is SGD with lr = inner_lr/s, so one VI step moves μ exactly as
one MAML policy-gradient step of size inner_lr would (and the KL weighs 1/s against it). Tasks of
a meta-batch are fitted together: the posteriors carry a leading task dimension and the policy is
vmapped over it. Rollouts use the posterior *mean* weights (action noise from the policy's σ).
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..gaussian import Posterior
from ..tasks.rl.envs import Task
from ..tasks.rl.natural import TrustRegionVI, natural_fit
from ..tasks.rl.optim import mean_kl, pg_surrogate, reinforce_step, trpo_step, trpo_surrogate
from ..tasks.rl.rollouts import EpisodeBatch, Sampler, mean_returns, stack
from ..vi import VIConfig
from .base import MetaLearner
from .gem import GEMLearner
from .registry import register_class, register_variants


def _check_range(name: str, least: float, strict: bool = False, **values: float) -> None:
    """Refuse option values below `least` (at it too when `strict`), naming the learner and option."""
    for option, value in values.items():
        if value < least or (strict and value == least):
            raise ValueError(f"{name}: option {option} must be {'>' if strict else '>='} {least:g}, got {value}")


def _no_shard(name: str, task_range: tuple[int, int] | None, n: int) -> None:
    if task_range is not None and tuple(task_range) != (0, n):
        raise ValueError(f"{name}: RL meta-training runs in a single process (no sharded meta-batches)")


class RLLearner(MetaLearner):
    """A meta-RL learner: tasks are environment task dicts; `_path` adapts them, with rollouts."""

    sampler: Sampler

    @abc.abstractmethod
    def _start(self, T: int) -> Any:
        """The adaptation state of T new tasks before any update."""

    @abc.abstractmethod
    def _policies(self, state: Any) -> list[dict[str, Tensor]]:
        """The policy weights each task acts with in `state`."""

    @abc.abstractmethod
    def _update(self, state: Any, batches: list[EpisodeBatch]) -> Any:
        """One inner update of every task on its rollouts."""

    def draw_policies(self, state: Any, n: int, generator: torch.Generator) -> list[list[dict[str, Tensor]]] | None:
        """`n` weight draws per task from the posterior of `state`; None for point estimates."""
        return None

    def _path(self, tasks: list[Task], steps: int, episodes: int | None, on_step) -> list[dict[str, Tensor]]:
        """Adapt each task for `steps` inner updates, each on fresh rollouts of its current
        policy; on_step(rollouts, state) after 0..steps updates. Returns the adapted weights."""
        state = self._start(len(tasks))
        for k in range(steps + 1):
            params = self._policies(state)
            if on_step is None and k == steps:
                break
            batches = [self.sampler.rollouts(p, t, episodes) for p, t in zip(params, tasks)]
            if on_step is not None:
                on_step(batches, state)
            if k < steps:
                state = self._update(state, batches)
        return params

    def adapt(self, tasks: list[Task], steps: int | None = None) -> list[dict[str, Tensor]]:
        """Adapted policy weights of each task (posterior means for GEM)."""
        return self._path(tasks, self.inner_steps if steps is None else steps, None, None)

    def adapt_path(self, tasks: list[Task], steps: int, episodes: int | None = None,
                   on_step: Callable[[int], None] | None = None) -> list[list[EpisodeBatch]]:
        """Rollouts of each task after 0..steps inner updates (`episodes` each); `on_step(k)` is
        called once the rollouts after k updates are in (progress of a long meta-test)."""
        return self.adapt_path_with_draws(tasks, steps, episodes, on_step=on_step)[0]

    def adapt_path_with_draws(self, tasks: list[Task], steps: int, episodes: int | None = None, draws: int = 0,
                              draw_episodes: int = 5, on_step: Callable[[int], None] | None = None
                              ) -> tuple[list[list[EpisodeBatch]], list[list[list[EpisodeBatch]]] | None]:
        """`adapt_path`, and for a learner with a posterior the rollouts of `draws` weight draws from
        each task's posterior after 0..steps updates (`draw_episodes` each; [step][task][draw]),
        else None. The draws are rolled out after the whole path, so the path is the same with or
        without them; their noise comes from a stream of its own (seed 0)."""
        path: list[list[EpisodeBatch]] = []
        states: list[Any] = []

        def add(batches: list[EpisodeBatch], state: Any) -> None:
            path.append(batches)
            states.append(state)
            if on_step is not None:
                on_step(len(path) - 1)
        self._path(tasks, steps, episodes, add)
        if draws < 1:
            return path, None
        generator = torch.Generator().manual_seed(0)
        drawn = []
        for state in states:
            policies = self.draw_policies(state, draws, generator)
            if policies is None:
                return path, None
            drawn.append([[self.sampler.rollouts(p, t, draw_episodes) for p in ps] for ps, t in zip(policies, tasks)])
        return path, drawn


class GEMRL(RLLearner):
    """GEM-BML / GEM-BML+ / Reptile on RL tasks: a core `GEMLearner` (`self.core`) holds the prior
    (μ₀, ρ₀ over every policy weight, log-std included); the VI fits are the core's `vi.fit`, the
    meta-gradient the core's `ops.gem_grad_`. `model` is the sampler's policy.

    Options (defaults after pytorch-maml-rl where it has one): inner_lr (a policy-gradient step on the
    mean surrogate, MAML-RL's fast-lr), inner_steps / query_steps (VI steps on support / on query),
    sigma0 (the prior std; Reptile: the fixed C₀), learn_sigma and sigma0_range (GEM-BML(+) meta-learn
    the prior std within (σ₀/10, σ₀), "shrink", as the sinusoid and vision presets: measured in
    benchmarks/HISTORY.md, "nav2d: learned prior std and the von inner VI"; None: unbounded),
    inner_optimizer ("sgd": a policy-gradient step of inner_lr; "natural": the trust-region
    natural-gradient VI of gemext.tasks.rl.natural, the policy's Fisher as the curvature, lr
    inner_lr (1: the full step before the trust region clips it), inner_options the fields of
    `TrustRegionVI` (max_kl, cg_iters, ...), GEM-BML(+) only; on nav2d it meta-learns a prior that
    one update barely moves, where the SGD step's prior learns to move far, benchmarks/RESULTS.md
    RL; "von" with inner_options
    {"curvature": "reparam", "coupling": "diag"}, lr inner_lr unscaled: IVON's single-sample
    curvature of the surrogate), beta, mc_samples and
    likelihood_scale (s; None: the sampler's episodes × horizon). Reptile has point posteriors:
    learn_sigma, sigma0_range, beta and mc_samples are GEM-BML(+) options only."""

    variant_options = {k: ("gem-bml", "gem-bml+") for k in ("learn_sigma", "sigma0_range", "beta", "mc_samples")}

    def __init__(self, model: nn.Module, variant: str = "gem-bml+", sampler: Sampler | None = None, seed: int = 0,
                 inner_lr: float = 0.1, inner_steps: int = 1, query_steps: int = 1, sigma0: float = 0.01,
                 learn_sigma: bool = True, sigma0_range: tuple[float, float] | str | None = "shrink",
                 inner_optimizer: str = "sgd", inner_options: dict | None = None, beta: float = 1.0,
                 mc_samples: int = 1, likelihood_scale: float | None = None) -> None:
        super().__init__()
        if sampler is None or model is not sampler.policy:
            raise ValueError(f"{variant} (RL): pass the Sampler whose policy is the model (sampler=...)")
        self.name = self.variant = variant
        _check_range(variant, 0, strict=True, inner_lr=inner_lr, sigma0=sigma0)
        _check_range(variant, 0, inner_steps=inner_steps, query_steps=query_steps)
        _check_range(variant, 1, mc_samples=mc_samples)
        if inner_optimizer not in ("sgd", "von", "natural"):
            raise ValueError(f"{variant}: option inner_optimizer must be 'sgd', 'von' or 'natural', "
                             f"got {inner_optimizer!r}")
        self.natural, self._inner_info = None, {}
        if inner_optimizer == "natural":
            if variant == "reptile" or mc_samples != 1:
                raise ValueError(f"{variant}: inner_optimizer 'natural' fits GEM-BML(+) posteriors from the gradient "
                                 "at the mean (mc_samples 1); use 'sgd' for reptile")
            try:
                self.natural = TrustRegionVI(lr=inner_lr, **(inner_options or {}))
            except TypeError as err:
                raise ValueError(f"{variant}: inner_options of 'natural' are the fields of TrustRegionVI (max_kl, "
                                 f"cg_iters, damping, ls_max_steps, ls_backtrack_ratio, diag_chunk): {err}") from None
        self.sampler = sampler
        self.scale = float(likelihood_scale or sampler.episodes * sampler.horizon)
        von = inner_optimizer != "sgd"
        pull = inner_lr / self.scale * beta / sigma0 ** 2
        if not von and variant != "reptile" and pull >= 1:
            # the SGD step of the KL term moves μ − μ₀ by the factor 1 − pull: at 1 it undoes all
            # adaptation, above it overshoots the prior mean (oscillating), at 2 and above it diverges
            raise ValueError(
                f"{variant} (RL): the inner SGD step pulls the policy back to the prior by "
                f"inner_lr/(episodes·horizon)·beta/sigma0² = {inner_lr:g}/{self.scale:g}·{beta:g}/"
                f"{sigma0:g}² = {pull:.3g} per step, which must stay below 1 (it undoes or overshoots the "
                "adaptation); raise episodes, sigma0 or likelihood_scale, or lower beta or inner_lr")
        inner = VIConfig(steps=inner_steps, optimizer="sgd" if self.natural else inner_optimizer,
                         lr=inner_lr if von else inner_lr / self.scale,
                         optimizer_kwargs={} if self.natural else dict(inner_options or {}), mc_samples=mc_samples,
                         beta=beta)
        bayes = {} if variant == "reptile" else dict(learn_sigma=learn_sigma, sigma0_range=sigma0_range)
        self.core = GEMLearner(model, variant=variant, sigma0=sigma0, inner=inner, query_steps=query_steps,
                               vectorize=True, seed=seed, **bayes)
        self.generator = self.core.generator
        self.names = [n.removeprefix("model.") for n in self.core.prior.names]
        policy = sampler.policy

        def task_loss(theta: tuple[Tensor, ...], obs: Tensor, act: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
            b = EpisodeBatch(obs, act, adv, mask, advantages=adv)
            return pg_surrogate(policy, dict(zip(self.names, theta)), b)

        self._task_losses = vmap(task_loss)

    @property
    def inner_steps(self) -> int:
        return self.core.inner_steps

    def _params(self, mu: list[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.names, mu))

    def _nll(self, batches: list[EpisodeBatch]) -> Callable[[list[Tensor], Tensor | None], Tensor]:
        """−log p(D|θ) summed over tasks, for the core's VI loop (index: a minibatch of episodes)."""
        b = stack(batches)
        k = b.observations.shape[2]

        def nll(theta: list[Tensor], index: Tensor | None) -> Tensor:
            sel = (lambda x: x) if index is None else (lambda x: x[:, :, index])
            frac = 1.0 if index is None else len(index) / k  # VI rescales minibatches by k/len(index)
            losses = self._task_losses(tuple(theta), sel(b.observations), sel(b.actions), sel(b.advantages),
                                       sel(b.mask))
            return self.scale * frac * losses.sum()
        return nll

    def _fit(self, batches: list[EpisodeBatch], prior: Posterior, init: Posterior, steps: int) -> Posterior:
        if self.natural is not None:
            post, info = natural_fit(self.sampler.policy, self.names, batches, self.scale, prior, init, steps,
                                     self.core.inner.beta, self.natural)
            self._inner_info = info
            return post
        return self.core.fit_posterior(self._nll(batches), batches[0].num_episodes, prior, init, steps).posterior

    def meta_backward(self, tasks: list[Task], task_range: tuple[int, int] | None = None) -> dict[str, float]:
        _no_shard(self.name, task_range, len(tasks))
        T, prior = len(tasks), self.core.prior
        mu0 = [m.detach() for m in prior.mu0]
        support = [self.sampler.rollouts(self._params(mu0), t) for t in tasks]
        expanded = prior.expand(T)
        tr = self._fit(support, expanded, self.core.start(expanded), self.inner_steps)
        info = {f"inner_{k}": v for k, v in self._inner_info.items()}
        query = [self.sampler.rollouts(self._params(tr.task(i).mu), t) for i, t in enumerate(tasks)]
        all_ = self._fit(query, tr, tr, self.core.query_steps)
        self.core.accumulate_meta_grad(tr, all_)
        return {"return_pre": mean_returns(support).mean().item(), "return_post": mean_returns(query).mean().item(),
                "sigma0_mean": float(torch.cat([r.detach().exp().flatten() for r in prior.rho0]).mean()), **info}

    def after_step(self) -> dict[str, float]:
        return self.core.after_step()  # σ₀ within its range

    # adaptation: each update a VI fit of inner_steps steps on fresh rollouts of the current
    # posterior mean, with KL to the prior Θ
    def _start(self, T: int) -> tuple:
        prior = self.core.prior.expand(T)
        return prior, self.core.start(prior)

    def _policies(self, state: tuple) -> list[dict[str, Tensor]]:
        post = state[1]
        return [self._params(post.task(i).mu) for i in range(post.mu[0].shape[0])]

    def _update(self, state: tuple, batches: list[EpisodeBatch]) -> tuple:
        prior, post = state
        return prior, self._fit(batches, prior, post, self.inner_steps)

    def draw_policies(self, state: tuple, n: int, generator: torch.Generator) -> list[list[dict[str, Tensor]]] | None:
        if self.core.delta:
            return None
        post = state[1]
        return [[self._params([m + r.exp() * torch.randn(m.shape, generator=generator, dtype=m.dtype)
                               for m, r in zip(task.mu, task.rho)]) for _ in range(n)]
                for task in (post.task(i) for i in range(post.mu[0].shape[0]))]


class TRPO(torch.optim.Optimizer):
    """MAML-TRPO's meta-update as an optimizer: one trust-region step (KL ≤ max_kl, natural gradient
    by conjugate gradient, backtracking line search) on the loss that the learner's meta_backward
    set up; the gradient is taken from .grad."""

    def __init__(self, learner: MAMLTRPO) -> None:
        super().__init__(learner.parameters(), {})
        self.learner = learner

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        self.learner._trpo_step()


class MAMLTRPO(RLLearner):
    """MAML for RL (Finn et al. 2017, as pytorch-maml-rl): one inner policy-gradient step of size
    inner_lr (differentiated through unless first_order), meta-update by one TRPO step (`TRPO`,
    its meta_optimizer) with the trust region max_kl, conjugate gradient (cg_iters, cg_damping)
    and backtracking line search (ls_max_steps, ls_backtrack_ratio), MAML-RL's values by default.
    `model` is the sampler's policy."""

    def __init__(self, model: nn.Module, sampler: Sampler | None = None, seed: int = 0, inner_lr: float = 0.1,
                 inner_steps: int = 1, first_order: bool = False, max_kl: float = 1e-2, cg_damping: float = 1e-5,
                 cg_iters: int = 10, ls_max_steps: int = 15, ls_backtrack_ratio: float = 0.8) -> None:
        super().__init__()
        if sampler is None or model is not sampler.policy:
            raise ValueError("maml (RL): pass the Sampler whose policy is the model (sampler=...)")
        if inner_steps != 1:
            raise ValueError(f"maml (MAML-TRPO) adapts with one policy-gradient step; inner_steps {inner_steps} "
                             "is not available")
        _check_range("maml", 0, strict=True, inner_lr=inner_lr, max_kl=max_kl)
        _check_range("maml", 1, cg_iters=cg_iters, ls_max_steps=ls_max_steps)
        self.name = self.variant = "maml"
        self.sampler, self.inner_lr, self.first_order = sampler, inner_lr, first_order
        self.trpo = dict(max_kl=max_kl, damping=cg_damping, cg_iters=cg_iters, ls_max_steps=ls_max_steps,
                         ls_backtrack_ratio=ls_backtrack_ratio)
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.theta = nn.ParameterList([nn.Parameter(p.detach().clone()) for _, p in named])
        self.generator = torch.Generator().manual_seed(seed)  # the contract's stream (TRPO draws no noise)
        self._pending: dict[str, Any] | None = None
        self._info: dict[str, float] = {}

    @property
    def inner_steps(self) -> int:
        return 1

    @property
    def params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.theta)}

    def meta_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return TRPO(self)  # its step size is the KL radius max_kl, not lr

    def _adapt(self, params: dict[str, Tensor], batch: EpisodeBatch) -> dict[str, Tensor]:
        lr, policy = self.inner_lr, self.sampler.policy
        if not self.first_order:
            return reinforce_step(policy, params, batch, lr, create_graph=True)
        step = reinforce_step(policy, params, batch, lr)  # detached θ'; FOMAML: ∂θ'/∂θ = I
        return {k: params[k] + (step[k] - params[k]).detach() for k in params}

    def meta_backward(self, tasks: list[Task], task_range: tuple[int, int] | None = None) -> dict[str, float]:
        """Rollouts, the TRPO surrogate of the adapted policies and its gradient (into .grad); the
        trust-region step itself is the meta-optimizer's."""
        _no_shard(self.name, task_range, len(tasks))
        policy, params = self.sampler.policy, self.params
        support = [self.sampler.rollouts(params, t) for t in tasks]
        old = [reinforce_step(policy, params, b, self.inner_lr) for b in support]
        query = [self.sampler.rollouts(p, t) for p, t in zip(old, tasks)]
        old_logp = [policy.log_prob(q.observations, q.actions, p).detach() for q, p in zip(query, old)]
        cache: dict[str, Any] = {"key": None}

        def adapted(p: dict[str, Tensor]) -> list[dict[str, Tensor]]:
            key = tuple(p.values())  # loss and KL of one candidate share the inner steps
            if (cache["key"] is None or len(key) != len(cache["key"])
                    or any(a is not b for a, b in zip(key, cache["key"]))):
                cache.update(key=key, value=[self._adapt(p, b) for b in support])
            return cache["value"]

        def loss_fn(p):
            return torch.stack([trpo_surrogate(policy, a, q, lp)
                                for a, q, lp in zip(adapted(p), query, old_logp)]).mean()

        def kl_fn(p):
            return torch.stack([mean_kl(policy, a, q, o) for a, q, o in zip(adapted(p), query, old)]).mean()

        with torch.enable_grad():
            x0 = [t.detach().requires_grad_() for t in params.values()]
            loss0 = loss_fn(dict(zip(self.names, x0)))
            grads = torch.autograd.grad(loss0, x0)
        for p, g in zip(self.theta, grads):
            p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g)
        self._pending = {"loss_fn": loss_fn, "kl_fn": kl_fn, "loss_before": loss0.item()}
        return {"return_pre": mean_returns(support).mean().item(), "return_post": mean_returns(query).mean().item()}

    def _trpo_step(self) -> None:
        if self._pending is None:
            raise RuntimeError("maml (RL): the TRPO step needs a meta_backward first")
        pending, self._pending = self._pending, None
        grad = torch.cat([p.grad.reshape(-1) for p in self.theta])
        with torch.enable_grad():
            new, info = trpo_step(self.params, pending["loss_fn"], pending["kl_fn"], **self.trpo, grad=grad,
                                  loss_before=pending["loss_before"])
        for p, n in zip(self.theta, self.names):
            p.copy_(new[n])
        self._info = {"kl": info["kl"], "accepted": info["accepted"]}

    def after_step(self) -> dict[str, float]:
        info, self._info = self._info, {}
        return info

    # adaptation: one policy-gradient step of inner_lr per update
    def _start(self, T: int) -> list[dict[str, Tensor]]:
        return [self.params] * T

    def _policies(self, state: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return state

    def _update(self, state: list[dict[str, Tensor]], batches: list[EpisodeBatch]) -> list[dict[str, Tensor]]:
        return [reinforce_step(self.sampler.policy, p, b, self.inner_lr) for p, b in zip(state, batches)]


register_variants(GEMRL, "gem-bml", "gem-bml+", "reptile", domain="rl")
register_class(MAMLTRPO, "maml", domain="rl")
