"""Meta-RL: GEM-BML, GEM-BML+, Reptile (on the core's VI loop and `gem_grad_`) and MAML-TRPO.

Per meta-iteration and task (paper §2.1; Finn et al. 2017 for MAML):
1. K support rollouts with the current policy: the prior mean μ₀ (GEM/Reptile) or θ (MAML);
2. inner update on the support surrogate: VI from λ = Θ with KL to the prior (GEM), a point
   estimate (Reptile), or one differentiable policy-gradient step (MAML);
3. K query rollouts with the adapted policy (posterior mean μ_tr / θ');
4. meta-gradient: GEM-BML ĝ(λ_all) with λ_all = VI(prior λ_tr, start λ_tr, D_query) (support ∪
   query by sequential updating, as the core's GEMLearner does), GEM-BML+ ĝ(λ_all) − ĝ(λ_tr),
   Reptile (μ_all − μ₀)/C₀²; Θ.grad = −mean ĝ and a torch.optim Adam step. MAML: one TRPO step
   on the query surrogate through the inner step (KL ≤ max_kl, natural gradient by CG).

The likelihood of the RL data (App. B.1) is −log p(D|θ) = s·L_PG(θ), with L_PG = −mean_t log π·Â
the REINFORCE surrogate and s = `likelihood_scale` (default K·horizon: the surrogate summed over
the support steps). The VI optimizer is SGD with lr = inner_lr/s, so one VI step moves μ exactly as
one MAML policy-gradient step of size inner_lr would (and the KL weighs 1/s against it). Tasks of
a meta-batch are fitted together: the posteriors carry a leading task dimension and the policy is
vmapped over it. Rollouts use the posterior *mean* weights (action noise from the policy's σ).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from .envs import ENV_IDS, Task, sample_tasks
from .optim import mean_kl, pg_surrogate, reinforce_step, trpo_step, trpo_surrogate
from .rollouts import EpisodeBatch, RolloutCollector, process, stack

RL_ALGOS = ("gem-bml", "gem-bml+", "reptile", "maml")


@dataclass
class RLSettings:
    """Hyper-parameters of a meta-RL run (defaults follow pytorch-maml-rl where it has one)."""

    episodes: int = 20  # K: rollouts per task for the support and for the query (fast-batch-size)
    meta_batch: int = 20  # tasks per meta-iteration
    horizon: int | None = None  # None: the environment's (nav2d 100, MuJoCo 200)
    hidden: tuple[int, ...] = (100, 100)
    init_log_std: float = 0.0
    gamma: float = 0.99
    gae_lambda: float = 1.0
    inner_lr: float = 0.1  # policy-gradient step on the mean surrogate (MAML-RL fast-lr)
    inner_steps: int = 1
    query_steps: int = 1
    # GEM-BML(+) and Reptile
    sigma0: float = 0.01  # prior std (Reptile: the fixed C₀)
    # the prior std is meta-learned by GEM-BML(+) within (σ₀/10, σ₀) ("shrink", as the sinusoid and
    # vision presets: measured in benchmarks/RESULTS.md, "RL: learned prior variance"); None: unbounded
    learn_sigma: bool = True
    sigma0_range: str | tuple[float, float] | None = "shrink"
    # the inner VI: "sgd" (a policy-gradient step of inner_lr on the surrogate), or "von" with
    # inner_options {"curvature": "reparam", "coupling": "diag"} (the surrogate is not a likelihood:
    # there is no Gauss-Newton factor for the coupled step); lr is then inner_lr unscaled
    inner_optimizer: str = "sgd"
    inner_options: dict[str, Any] = field(default_factory=dict)
    beta: float = 1.0
    mc_samples: int = 1
    likelihood_scale: float | None = None  # s; None: episodes × horizon
    # MAML-TRPO (MAML-RL values)
    first_order: bool = False
    max_kl: float = 1e-2
    cg_damping: float = 1e-5
    cg_iters: int = 10
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8
    # rollouts and meta-test
    num_envs: int = 20
    vector: str = "sync"
    eval_tasks: int = 40
    eval_episodes: int = 40
    eval_steps: int = 3

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        for name in ("episodes", "meta_batch", "num_envs", "eval_tasks", "eval_episodes", "mc_samples",
                     "cg_iters", "ls_max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"RL option {name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_steps", "query_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"RL option {name} must be >= 0, got {getattr(self, name)}")
        for name in ("inner_lr", "sigma0", "max_kl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RL option {name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.sigma0_range, list):  # from JSON
            self.sigma0_range = tuple(self.sigma0_range)
        if self.inner_optimizer not in ("sgd", "von"):
            raise ValueError(f"RL option inner_optimizer must be 'sgd' or 'von', got {self.inner_optimizer!r}")
        if self.vector not in ("sync", "async"):
            raise ValueError(f"RL option vector must be 'sync' or 'async', got {self.vector!r}")

    def scale(self, horizon: int) -> float:
        return float(self.likelihood_scale or self.episodes * horizon)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "RLSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown RL option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


class Sampler:
    """The rollout collector, the policy and the action-noise generator of a run."""

    def __init__(self, task: str, settings: RLSettings, seed: int) -> None:
        self.task, self.settings = task, settings
        self.collector = RolloutCollector(task, num_envs=min(settings.num_envs, settings.eval_episodes),
                                          mode=settings.vector, horizon=settings.horizon, seed=seed)
        self.horizon = self.collector.horizon
        torch.manual_seed(seed)  # the policy's initial weights
        self.policy = self.collector.make_policy(settings.hidden, init_log_std=settings.init_log_std)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def rollouts(self, params: dict[str, Tensor], task: Task, episodes: int | None = None) -> EpisodeBatch:
        batch = self.collector.collect(self.policy, params, task, episodes or self.settings.episodes, self.generator)
        return process(batch, self.settings.gamma, self.settings.gae_lambda)

    def rng_state(self) -> dict:
        return {"actions": self.generator.get_state(), "resets": self.collector._rng.bit_generator.state,
                "env_steps": self.collector.total_steps}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["actions"])
        self.collector._rng.bit_generator.state = state["resets"]
        self.collector.total_steps = state["env_steps"]


def _mean_return(batches: list[EpisodeBatch]) -> Tensor:
    """Mean undiscounted episode return of each task's batch: [T]."""
    return torch.stack([b.episode_returns().mean() for b in batches])


class GEMRL:
    """GEM-BML / GEM-BML+ / Reptile on RL tasks: a core `GEMLearner` holds the prior (μ₀, ρ₀ over
    every policy weight, log-std included); the VI fits are the core's `vi.fit`, the meta-gradient
    the core's `ops.gem_grad_`."""

    def __init__(self, algo: str, sampler: Sampler, settings: RLSettings, meta_lr: float, seed: int) -> None:
        from ... import algorithms
        from ...vi import VIConfig

        self.algo, self.sampler, self.settings = algo, sampler, settings
        self.scale = settings.scale(sampler.horizon)
        von = settings.inner_optimizer == "von"
        inner = VIConfig(steps=settings.inner_steps, optimizer=settings.inner_optimizer,
                         lr=settings.inner_lr if von else settings.inner_lr / self.scale,
                         optimizer_kwargs=dict(settings.inner_options), mc_samples=settings.mc_samples,
                         beta=settings.beta)
        bayes = {} if algo == "reptile" else dict(learn_sigma=settings.learn_sigma, sigma0_range=settings.sigma0_range)
        self.learner = algorithms.create(algo, sampler.policy, sigma0=settings.sigma0, inner=inner,
                                         query_steps=settings.query_steps, vectorize=True, seed=seed, **bayes)
        self.names = [n.removeprefix("model.") for n in self.learner.prior.names]
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=meta_lr)
        policy = sampler.policy

        def task_loss(theta: tuple[Tensor, ...], obs: Tensor, act: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
            b = EpisodeBatch(obs, act, adv, mask, advantages=adv)
            return pg_surrogate(policy, dict(zip(self.names, theta)), b)

        self._task_losses = vmap(task_loss)

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

    def _fit(self, batches: list[EpisodeBatch], prior, init, steps: int):
        return self.learner.fit_posterior(self._nll(batches), batches[0].num_episodes, prior, init, steps)

    def meta_step(self, tasks: list[Task]) -> dict[str, float]:
        T, prior = len(tasks), self.learner.prior
        mu0 = [m.detach() for m in prior.mu0]
        support = [self.sampler.rollouts(self._params(mu0), t) for t in tasks]
        expanded = prior.expand(T)
        tr = self._fit(support, expanded, self.learner.start(expanded), self.settings.inner_steps)
        query = [self.sampler.rollouts(self._params(tr.posterior.task(i).mu), t) for i, t in enumerate(tasks)]
        all_ = self._fit(query, tr.posterior, tr.posterior, self.settings.query_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.accumulate_meta_grad(tr.posterior, all_.posterior)
        stats = {"return_pre": _mean_return(support).mean().item(), "return_post": _mean_return(query).mean().item(),
                 "sigma0_mean": float(torch.cat([r.detach().exp().flatten() for r in prior.rho0]).mean())}
        if all(p.grad is None or torch.isfinite(p.grad).all() for p in self.learner.parameters()):
            self.optimizer.step()
            prior.clamp_()  # σ₀ within its range, as the supervised loop does after each meta-step
        else:
            stats["skipped"] = 1.0
        return stats

    def adaptation_path(self, tasks: list[Task], steps: int, episodes: int) -> list[list[EpisodeBatch]]:
        """Rollout batches of each task after 0..steps inner updates (each a VI fit of inner_steps
        steps on fresh rollouts of the current posterior mean, KL to the prior Θ)."""
        T = len(tasks)
        prior = self.learner.prior.expand(T)
        post = self.learner.start(prior)
        path = []
        for k in range(steps + 1):
            batches = [self.sampler.rollouts(self._params(post.task(i).mu), t, episodes) for i, t in enumerate(tasks)]
            path.append(batches)
            if k < steps:
                post = self._fit(batches, prior, post, self.settings.inner_steps).posterior
        return path

    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.learner.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.learner.generator.set_state(state["generator"])


class MAMLTRPO:
    """MAML for RL (Finn et al. 2017, as pytorch-maml-rl): one inner policy-gradient step of size
    inner_lr (differentiated through unless first_order), meta-update by one TRPO step."""

    def __init__(self, sampler: Sampler, settings: RLSettings) -> None:
        self.sampler, self.settings = sampler, settings
        self.params = {k: v.detach().clone() for k, v in sampler.policy.named_parameters()}

    def _adapt(self, params: dict[str, Tensor], batch: EpisodeBatch) -> dict[str, Tensor]:
        lr, policy = self.settings.inner_lr, self.sampler.policy
        if not self.settings.first_order:
            return reinforce_step(policy, params, batch, lr, create_graph=True)
        step = reinforce_step(policy, params, batch, lr)  # detached θ'; FOMAML: ∂θ'/∂θ = I
        return {k: params[k] + (step[k] - params[k]).detach() for k in params}

    def meta_step(self, tasks: list[Task]) -> dict[str, float]:
        s, policy = self.settings, self.sampler.policy
        support = [self.sampler.rollouts(self.params, t) for t in tasks]
        old = [reinforce_step(policy, self.params, b, s.inner_lr) for b in support]
        query = [self.sampler.rollouts(p, t) for p, t in zip(old, tasks)]
        old_logp = [policy.log_prob(q.observations, q.actions, p).detach() for q, p in zip(query, old)]
        cache: dict[str, Any] = {"key": None}

        def adapted(p: dict[str, Tensor]) -> list[dict[str, Tensor]]:
            key = tuple(p.values())  # loss and KL of one candidate share the inner steps
            if cache["key"] is None or len(key) != len(cache["key"]) or any(a is not b for a, b in zip(key, cache["key"])):
                cache.update(key=key, value=[self._adapt(p, b) for b in support])
            return cache["value"]

        def loss_fn(p):
            return torch.stack([trpo_surrogate(policy, a, q, lp)
                                for a, q, lp in zip(adapted(p), query, old_logp)]).mean()

        def kl_fn(p):
            return torch.stack([mean_kl(policy, a, q, o) for a, q, o in zip(adapted(p), query, old)]).mean()

        self.params, info = trpo_step(self.params, loss_fn, kl_fn, s.max_kl, s.cg_damping, s.cg_iters,
                                      s.ls_max_steps, s.ls_backtrack_ratio)
        return {"return_pre": _mean_return(support).mean().item(), "return_post": _mean_return(query).mean().item(),
                "kl": info["kl"], "accepted": info["accepted"]}

    def adaptation_path(self, tasks: list[Task], steps: int, episodes: int) -> list[list[EpisodeBatch]]:
        path, params = [], [self.params] * len(tasks)
        for k in range(steps + 1):
            batches = [self.sampler.rollouts(p, t, episodes) for p, t in zip(params, tasks)]
            path.append(batches)
            if k < steps:
                params = [reinforce_step(self.sampler.policy, p, b, self.settings.inner_lr)
                          for p, b in zip(params, batches)]
        return path

    def state_dict(self) -> dict:
        return {"params": self.params}

    def load_state_dict(self, state: dict) -> None:
        self.params = {k: v.clone() for k, v in state["params"].items()}


def build_rl(task: str, algo: str, options: dict[str, Any], seed: int, meta_lr: float):
    """(settings, sampler, meta-learner) for an RL run."""
    if task not in ENV_IDS:
        raise ValueError(f"unknown RL task {task!r}; choose one of {', '.join(ENV_IDS)}")
    if algo not in RL_ALGOS:
        raise ValueError(f"algorithm {algo!r} is not available for RL tasks; choose one of {', '.join(RL_ALGOS)}")
    settings = RLSettings.from_options(options)
    sampler = Sampler(task, settings, seed)
    learner = MAMLTRPO(sampler, settings) if algo == "maml" else GEMRL(algo, sampler, settings, meta_lr, seed)
    return settings, sampler, learner


# ------------------------------------------------------------------ train / eval entry points
def _options(config) -> dict[str, Any]:
    opts = dict(config.algo_options)
    if config.inner_steps is not None:
        opts["inner_steps"] = config.inner_steps
    if config.meta_batch is not None:
        opts["meta_batch"] = config.meta_batch
    return opts


def train_rl(config, resume: bool = False, progress: bool | None = None, overwrite: bool = False,
             on_iteration: Callable[[int], None] | None = None) -> Path:
    """Meta-train an RL run described by a `gemext.train.RunConfig` (task in nav2d, halfcheetah-vel,
    halfcheetah-dir, ant-vel, ant-dir; algo in gem-bml, gem-bml+, reptile, maml; RL options in
    `config.algo_options`, see RLSettings). Writes OUT/config.json, OUT/log.csv (one row per
    `log_every` iterations: returns before/after adaptation, env steps, wall time), an atomic
    OUT/checkpoint.pt every `checkpoint_every` iterations (with every RNG state: `resume=True`
    continues exactly) and OUT/metrics.json (task, algo, seed, iterations, wall_s, env_steps).
    Returns OUT. The run folder follows gemext.runs (refused if it holds another run unless
    `resume` or `overwrite`; locked while training)."""
    from ... import runs

    out = Path(config.out)
    with runs.open_folder(out, resume, overwrite):
        return _train_rl(config, out, resume, progress, on_iteration)


def _train_rl(config, out: Path, resume: bool, progress: bool | None,
              on_iteration: Callable[[int], None] | None) -> Path:
    from ... import runs
    from ... import train as core

    settings, sampler, learner = build_rl(config.task, config.algo, _options(config), config.seed, config.meta_lr)
    task_rng = np.random.default_rng(config.seed)
    ckpt_path, start, wall_before = out / "checkpoint.pt", 0, 0.0
    if resume:
        ckpt = core.load_checkpoint(ckpt_path, config)
        core.check_resume(ckpt, config, ckpt_path)
        learner.load_state_dict(ckpt["learner"])
        task_rng.bit_generator.state = ckpt["rng"]["tasks"]
        sampler.set_rng_state(ckpt["rng"]["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start, wall_before = ckpt["iteration"], ckpt["wall_s"]
    cfg = asdict(config)
    cfg["algo_options"] = {**_options(config), "resolved": asdict(settings)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    log = runs.RunLog(out / "log.csv", start if resume else None)
    t0 = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - t0

    def save(iteration: int) -> None:
        runs.atomic_save({"config": asdict(config), "iteration": iteration, "learner": learner.state_dict(), "wall_s": wall(),
                          "rng": {"tasks": task_rng.bit_generator.state, "sampler": sampler.rng_state(),
                                  "torch": torch.get_rng_state()}}, ckpt_path)

    from ...progress import Progress

    bar = Progress(range(start, config.iterations), config.iterations, f"{config.algo} {config.task}", start,
                   every=config.log_every, enabled=progress)
    with core._StopFlag() as stop:
        for it in bar:
            stats = learner.meta_step(sample_tasks(config.task, settings.meta_batch, task_rng))
            done = it + 1
            if done % config.log_every == 0 or done == config.iterations:
                log.add({"iteration": done, "wall_s": round(wall(), 3),
                         "env_steps": sampler.collector.total_steps, **{k: round(v, 5) for k, v in stats.items()}})
                bar.set_postfix(stats)
            if on_iteration is not None:
                on_iteration(done)
            if done % config.checkpoint_every == 0 or done == config.iterations or stop.signum is not None:
                save(done)
            if stop.signum is not None:
                sampler.collector.close()
                raise core.Interrupted(stop.signum, done)
    sampler.collector.close()
    (out / "metrics.json").unlink(missing_ok=True)  # an earlier meta-test belongs to fewer iterations
    _update_metrics(out, {"task": config.task, "algo": config.algo, "seed": config.seed,
                          "iterations": config.iterations, "wall_s": wall(),
                          "env_steps": sampler.collector.total_steps})
    return out


def _update_metrics(run: Path, values: dict) -> dict:
    from ...runs import best_effort

    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update(values)
    with best_effort(str(path)):
        path.write_text(json.dumps(metrics, indent=2))
    return metrics


def eval_rl(run_dir: str | Path, tasks: int | None = None, steps: int | None = None, plots: bool = True) -> dict:
    """Meta-test a trained RL run on fixed-seed new tasks: returns after 0..steps inner updates of
    `eval_episodes` (40) rollouts each. `tasks` defaults to the RL option eval_tasks (40; the
    RunConfig field eval_tasks is used only when set away from its default 600), `steps` to
    the run's --eval-steps, else the RL option eval_steps (3). Writes/updates RUN/metrics.json with task, algo, seed, iterations, wall_s,
    return_by_step (mean over tasks of the mean episode return), return_ci95_by_step,
    eval_tasks, eval_steps, eval_episodes; plots RUN/return_vs_steps.png and, for nav2d,
    RUN/trajectories.png. Returns the metrics dict."""
    from ... import train as core
    from ...metrics import mean_ci95

    run = Path(run_dir)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} is not a gemext run folder (no config.json)")
    raw = json.loads((run / "config.json").read_text())
    raw["algo_options"] = {k: v for k, v in raw["algo_options"].items() if k != "resolved"}
    config = core.RunConfig(**raw)
    ckpt = core.load_checkpoint(run / "checkpoint.pt", config)
    settings, sampler, learner = build_rl(config.task, config.algo, _options(config), config.seed, config.meta_lr)
    learner.load_state_dict(ckpt["learner"])
    default_tasks = core.RunConfig.__dataclass_fields__["eval_tasks"].default
    n = tasks or (config.eval_tasks if config.eval_tasks != default_tasks else settings.eval_tasks)
    k = steps if steps is not None else (config.eval_steps if config.eval_steps is not None else settings.eval_steps)
    if n < 1 or k < 0:
        raise ValueError(f"eval_rl: need tasks >= 1 and steps >= 0, got {n}, {k}")
    sampler.generator.manual_seed(core.EVAL_SEED)
    sampler.collector._rng = np.random.default_rng(core.EVAL_SEED)
    test_tasks = sample_tasks(config.task, n, core.EVAL_SEED)
    path = learner.adaptation_path(test_tasks, k, settings.eval_episodes)
    sampler.collector.close()
    by_step = [mean_ci95(_mean_return(b)) for b in path]
    result = {"task": config.task, "algo": config.algo, "seed": config.seed, "iterations": ckpt["iteration"],
              "wall_s": ckpt["wall_s"], "return_by_step": [m for m, _ in by_step],
              "return_ci95_by_step": [c for _, c in by_step], "eval_tasks": n, "eval_steps": k,
              "eval_episodes": settings.eval_episodes}
    if plots:
        from ...plots import plot_curve
        from ...runs import best_effort

        with best_effort(f"the plots into {run}"):
            plot_curve(run / "return_vs_steps.png", list(range(k + 1)), result["return_by_step"],
                       result["return_ci95_by_step"], label=config.algo, xlabel="policy-gradient steps",
                       ylabel="meta-test return", title=f"{config.task}: {n} test tasks")
            if config.task == "nav2d":
                plot_nav2d_trajectories(run / "trajectories.png", test_tasks, path, config.algo)
    return _update_metrics(run, result)


def plot_nav2d_trajectories(path: Path, tasks: list[Task], batches_by_step: list[list[EpisodeBatch]],
                            label: str = "", n_tasks: int = 4) -> None:
    """First episode of a few test tasks before adaptation and after each update, with the goal."""
    import matplotlib

    from ...plots import new_figure

    n = min(n_tasks, len(tasks))
    fig = new_figure((3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for k, batches in enumerate(batches_by_step):
            b = batches[i]
            steps = int(b.mask[:, 0].sum())
            xy = torch.cat([torch.zeros(1, 2), b.observations[1:steps, 0]])  # obs[t] is the position before step t
            ax.plot(xy[:, 0], xy[:, 1], lw=1.2, label=f"{k} steps", color=matplotlib.colormaps["viridis"](k / max(1, len(batches_by_step) - 1)))
        goal = tasks[i]["goal"]
        ax.plot(goal[0], goal[1], "r*", ms=12, label="goal")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"nav2d {label}: trajectories after 0..{len(batches_by_step) - 1} updates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_return_comparison(runs: list[str | Path], path: str | Path, title: str = "") -> None:
    """Meta-test return vs policy-gradient steps of several evaluated runs in one figure."""
    from ...plots import new_figure

    fig = new_figure((5, 3.5))
    ax = fig.subplots()
    for run in runs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        if "return_by_step" not in m:
            raise ValueError(f"{run}: metrics.json has no return_by_step; run eval_rl first")
        xs, ys, cs = range(len(m["return_by_step"])), m["return_by_step"], m["return_ci95_by_step"]
        ax.errorbar(list(xs), ys, yerr=cs, marker="o", capsize=3, label=m["algo"])
    ax.set_xlabel("policy-gradient steps")
    ax.set_ylabel("meta-test return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
