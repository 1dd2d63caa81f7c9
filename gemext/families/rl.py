"""Meta-RL runs (nav2d and the MuJoCo velocity/direction tasks): the run's settings besides its
learner's (the policy, rollouts, meta-batch and meta-test: `RLRunSettings`), the rollout sampler,
the learner (gemext.algorithms.rl, whose options are its keyword parameters), training task draws
and the meta-test (returns after 0..K policy updates on fixed-seed new tasks, with plots). Both kinds
of option come in the run's algo_options; --inner-steps and --meta-batch are shorthands for two."""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import algorithms
from ..algorithms import MetaLearner
from ..algorithms.rl import GEMRL, MAMLTRPO
from ..metrics import mean_ci95
from ..progress import Progress
from ..runs import best_effort
from ..tasks.rl.envs import Task, sample_tasks
from ..tasks.rl.rollouts import EpisodeBatch, RolloutCollector, Sampler, mean_returns
from .base import TaskFamily


def _is_int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# setting -> (what it must be, the test of its JSON value)
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{k: ("an integer >= 1", lambda v: _is_int(v, 1))
       for k in ("episodes", "meta_batch", "num_envs", "eval_tasks", "eval_episodes", "eval_draw_episodes")},
    **{k: ("an integer >= 0", lambda v: _is_int(v, 0)) for k in ("eval_steps", "eval_draws")},
    **{k: ("a number", _is_number) for k in ("init_log_std", "gamma", "gae_lambda")},
    "horizon": ("an integer >= 1 or null (the environment's)", lambda v: v is None or _is_int(v, 1)),
    "hidden": ("a list of layer widths >= 1", lambda v: isinstance(v, (list, tuple)) and all(_is_int(h, 1) for h in v)),
    "vector": ("'sync' or 'async'", lambda v: v in ("sync", "async")),
}


@dataclass
class RLRunSettings:
    """What an RL run reads besides its learner's options (defaults after pytorch-maml-rl where it
    has one)."""

    episodes: int = 20  # K: rollouts per task for the support and for the query (fast-batch-size)
    meta_batch: int = 20  # tasks per meta-iteration
    horizon: int | None = None  # None: the environment's (nav2d 100, MuJoCo 200)
    hidden: tuple[int, ...] = (100, 100)  # the policy's hidden layers
    init_log_std: float = 0.0
    gamma: float = 0.99
    gae_lambda: float = 1.0
    num_envs: int = 20  # environment copies stepped together
    vector: str = "sync"  # "async": a worker process per copy
    # the meta-test
    eval_tasks: int = 40
    eval_episodes: int = 40
    eval_steps: int = 3
    eval_draws: int = 8  # posterior draws per task whose returns give the predictive spread (0: none)
    eval_draw_episodes: int = 5  # rollouts of each draw

    def __post_init__(self) -> None:
        for f in fields(self):
            what, ok = _RULES[f.name]
            if not ok(getattr(self, f.name)):
                raise ValueError(f"RL option {f.name} must be {what}, got {getattr(self, f.name)!r}")
        self.hidden = tuple(self.hidden)


# learner options the family passes itself
_SET_BY_FAMILY = ("sampler", "seed")


def _learner_defaults(algo: str | None = None) -> dict[str, Any]:
    """The defaults of `algo`'s options (its keyword parameters), or of every RL learner's (an option
    two learners take has one default), less those the family sets."""
    names = algorithms.option_names(algo, "rl") if algo else None
    out: dict[str, Any] = {}
    for cls in (GEMRL, MAMLTRPO):
        for p in inspect.signature(cls).parameters.values():
            if p.name in (*_SET_BY_FAMILY, "variant") or p.default is p.empty or (names and p.name not in names):
                continue
            out.setdefault(p.name, p.default)
    return out


class RLFamily(TaskFamily):
    tasks = ("nav2d", "halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir")
    flags = ()
    family_options = tuple(f.name for f in fields(RLRunSettings))
    devices = ("cpu",)  # rollouts dominate; the policy is small
    distributed = False
    domain = "rl"
    headline = ("return_by_step",)
    folded = ("inner_steps", "meta_batch")
    eval_outputs = ("return_vs_steps.png", "trajectories.png")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings = s = RLRunSettings(**self._split(self._options(config))[0])
        self.learner_options_for(config)  # its refusals come before the environments open
        self.default_eval_tasks = s.eval_tasks
        collector = RolloutCollector(config.task, num_envs=min(s.num_envs, s.eval_episodes), mode=s.vector,
                                     horizon=s.horizon, seed=config.seed)
        # the policy's initial weights and the action noise: a stream each, from the run's seed
        policy = collector.make_policy(s.hidden, init_log_std=s.init_log_std,
                                       generator=torch.Generator().manual_seed(config.seed))
        self.sampler = Sampler(collector, policy, torch.Generator().manual_seed(config.seed + 1), s.episodes,
                               s.gamma, s.gae_lambda)
        self.task_rng = np.random.default_rng(config.seed)

    @staticmethod
    def _options(config) -> dict[str, Any]:
        """The run's options with the --inner-steps / --meta-batch shorthands folded in."""
        opts = dict(config.algo_options)
        if config.inner_steps is not None:
            opts["inner_steps"] = config.inner_steps
        if config.meta_batch is not None:
            opts["meta_batch"] = config.meta_batch
        return opts

    @classmethod
    def _split(cls, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the family's settings, the learner's options) of a run's options."""
        return ({k: v for k, v in options.items() if k in cls.family_options},
                {k: v for k, v in options.items() if k not in cls.family_options})

    @classmethod
    def learner_options_for(cls, config) -> dict[str, Any]:
        """Every option of the run's learner: its defaults, updated with the run's options and
        --inner-steps (the sampler and seed are the family's, given by `build_learner`). Options no
        RL learner takes, or another one does (named), are refused with the run's valid ones (the
        family's settings included); the registry checks the types."""
        given = cls._split(cls._options(config))[1]
        algo, valid = config.algo, algorithms.option_names(config.algo, "rl")
        listed = ", ".join(sorted({*valid, *cls.family_options} - set(_SET_BY_FAMILY)))
        for key in given:
            users = [a for a in algorithms.names("rl") if key in algorithms.option_names(a, "rl")]
            if key in _SET_BY_FAMILY:
                raise ValueError(f"{algo}: option {key} is set by the task family; valid: {listed}")
            if users and key not in valid:
                raise ValueError(f"{algo}: option {key} is used only by {', '.join(users)}, not by {algo}; "
                                 f"valid: {listed}")
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"{algo}: unknown option(s) {', '.join(unknown)}; valid: {listed}")
        algorithms.check_options(algo, given, "rl")
        return {**_learner_defaults(algo), **given}

    @classmethod
    def trajectory_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Every RL option resolved (one spelled out at its default is no change), less the
        meta-test's own (eval_tasks, eval_episodes, eval_steps: the meta-test may change on resume)."""
        family, learner = cls._split(options)
        settings = {k: v for k, v in asdict(RLRunSettings(**family)).items() if not k.startswith("eval_")}
        return {**settings, **_learner_defaults(), **learner}

    def build_learner(self) -> MetaLearner:
        return algorithms.create(self.config.algo, self.sampler.policy, domain="rl", sampler=self.sampler,
                                 seed=self.config.seed, **self.learner_options_for(self.config))

    @property
    def meta_batch(self) -> int:
        return self.settings.meta_batch

    def sample(self, n: int, generator: np.random.Generator | None = None) -> list[Task]:
        return sample_tasks(self.config.task, n, self.task_rng if generator is None else generator)

    def rng_state(self) -> dict:
        return {"tasks": self.task_rng.bit_generator.state, "sampler": self.sampler.rng_state()}

    def set_rng_state(self, state: dict) -> None:
        self.task_rng.bit_generator.state = state["tasks"]
        self.sampler.set_rng_state(state["sampler"])

    def log_stats(self) -> dict[str, float]:
        return {"env_steps": self.sampler.collector.total_steps}

    def evaluate(self, learner: MetaLearner, tasks: int | None, steps: int | None, run: Path, plots: bool,
                 progress: bool | None = None) -> dict[str, Any]:
        """Returns after 0..steps inner updates of `eval_episodes` (40) rollouts each, on fixed-seed
        new tasks (`tasks`: default the run's --eval-tasks, else the RL option eval_tasks, 40; `steps`:
        the run's --eval-steps, else the RL option eval_steps, 3); return_by_step is the mean over
        tasks of the mean episode return of the adapted policy (the posterior mean for GEM). For a
        learner with a posterior, eval_draws (8) weight draws per task are rolled out too
        (eval_draw_episodes, 5, each): return_draws_by_step is their mean return, return_spread_by_step
        the mean over tasks of the standard deviation over draws of a draw's mean return. Plots
        return_vs_steps.png and, for nav2d, trajectories.png."""
        config, settings, n = self.config, self.settings, self.eval_tasks(tasks)
        k = steps if steps is not None else (
            config.eval_steps if config.eval_steps is not None else settings.eval_steps)
        self.sampler.reseed(self.eval_seed)
        test_tasks = sample_tasks(config.task, n, self.eval_seed)
        bar = Progress(range(k + 1), k + 1, f"meta-test {config.algo} ({n} tasks, {k} updates)", every=1,
                       enabled=progress)
        try:
            path, drawn = learner.adapt_path_with_draws(test_tasks, k, settings.eval_episodes, settings.eval_draws,
                                                        settings.eval_draw_episodes, on_step=lambda _: bar.tick())
        finally:
            bar.close()
        by_step = [mean_ci95(mean_returns(b)) for b in path]
        result = {"return_by_step": [m for m, _ in by_step], "return_ci95_by_step": [c for _, c in by_step],
                  "eval_tasks": n, "eval_steps": k, "eval_episodes": settings.eval_episodes}
        if drawn is not None:  # the posterior's predictive: each draw's mean return, [task, draw] per step
            per_draw = [torch.stack([mean_returns(d) for d in tasks_]) for tasks_ in drawn]
            result.update(return_draws_by_step=[float(r.mean()) for r in per_draw],
                          return_spread_by_step=[float(r.std(1).mean()) for r in per_draw],
                          eval_draws=settings.eval_draws, eval_draw_episodes=settings.eval_draw_episodes)
        if plots:
            from ..plots import plot_curve

            with best_effort(f"the plots into {run}"):
                plot_curve(run / "return_vs_steps.png", list(range(k + 1)), result["return_by_step"],
                           result["return_ci95_by_step"], label=config.algo, xlabel="policy-gradient steps",
                           ylabel="meta-test return", title=f"{config.task}: {n} test tasks")
                if config.task == "nav2d":
                    plot_nav2d_trajectories(run / "trajectories.png", test_tasks, path, config.algo)
        return result

    def close(self) -> None:
        self.sampler.collector.close()


def plot_nav2d_trajectories(path: Path, tasks: list[Task], batches_by_step: list[list[EpisodeBatch]],
                            label: str = "", n_tasks: int = 4) -> None:
    """First episode of a few test tasks before adaptation and after each update, with the goal."""
    import matplotlib

    from ..plots import new_figure

    n = min(n_tasks, len(tasks))
    fig = new_figure((3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for k, batches in enumerate(batches_by_step):
            b = batches[i]
            steps = int(b.mask[:, 0].sum())
            xy = torch.cat([torch.zeros(1, 2), b.observations[1:steps, 0]])  # obs[t] is the position before step t
            ax.plot(xy[:, 0], xy[:, 1], lw=1.2, label=f"{k} steps",
                    color=matplotlib.colormaps["viridis"](k / max(1, len(batches_by_step) - 1)))
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
    from ..plots import new_figure

    fig = new_figure((5, 3.5))
    ax = fig.subplots()
    for run in runs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        if "return_by_step" not in m:
            raise ValueError(f"{run}: metrics.json has no return_by_step; evaluate the run first (gemext eval)")
        xs, ys, cs = range(len(m["return_by_step"])), m["return_by_step"], m["return_ci95_by_step"]
        ax.errorbar(list(xs), ys, yerr=cs, marker="o", capsize=3, label=m["algo"])
    ax.set_xlabel("policy-gradient steps")
    ax.set_ylabel("meta-test return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
