"""Meta-RL runs (nav2d and the MuJoCo velocity/direction tasks): the rollout sampler, the learner
(gemext.algorithms.rl), training task draws and the meta-test (returns after 0..K policy updates
on fixed-seed new tasks, with plots). RL options (RLSettings) come in the run's algo_options;
--inner-steps and --meta-batch are shorthands for two of them."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import algorithms
from ..algorithms import MetaLearner
from ..algorithms.rl import RLSettings, Sampler
from ..metrics import mean_ci95
from ..progress import Progress
from ..runs import best_effort
from ..tasks.rl.envs import Task, sample_tasks
from ..tasks.rl.rollouts import EpisodeBatch, mean_returns
from .base import TaskFamily


class RLFamily(TaskFamily):
    tasks = ("nav2d", "halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir")
    flags = ()
    devices = ("cpu",)  # rollouts dominate; the policy is small
    distributed = False
    domain = "rl"
    headline = ("return_by_step",)
    folded = ("inner_steps", "meta_batch")
    eval_outputs = ("return_vs_steps.png", "trajectories.png")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings = RLSettings.from_options(self.options(), config.algo)
        self.default_eval_tasks = self.settings.eval_tasks
        self.sampler = Sampler(config.task, self.settings, config.seed)
        self.task_rng = np.random.default_rng(config.seed)

    @classmethod
    def trajectory_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Every RL setting resolved (an option spelled out at its default is no change), less the
        meta-test's own (eval_tasks, eval_episodes, eval_steps: the meta-test may change on resume)."""
        settings = asdict(RLSettings.from_options(options))
        return {k: v for k, v in settings.items() if not k.startswith("eval_")}

    def options(self) -> dict[str, Any]:
        """The run's RL options with the --inner-steps / --meta-batch shorthands folded in."""
        opts = {k: v for k, v in self.config.algo_options.items() if k != "resolved"}
        if self.config.inner_steps is not None:
            opts["inner_steps"] = self.config.inner_steps
        if self.config.meta_batch is not None:
            opts["meta_batch"] = self.config.meta_batch
        return opts

    def resolved_options(self) -> dict[str, Any]:
        return {**self.options(), "resolved": asdict(self.settings)}

    def build_learner(self) -> MetaLearner:
        return algorithms.create(self.config.algo, self.sampler.policy, domain="rl", sampler=self.sampler,
                                 settings=self.settings, seed=self.config.seed)

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
        tasks of the mean episode return. Plots return_vs_steps.png and, for nav2d, trajectories.png."""
        config, settings, n = self.config, self.settings, self.eval_tasks(tasks)
        k = steps if steps is not None else (
            config.eval_steps if config.eval_steps is not None else settings.eval_steps)
        self.sampler.generator.manual_seed(self.eval_seed)
        self.sampler.collector._rng = np.random.default_rng(self.eval_seed)
        test_tasks = sample_tasks(config.task, n, self.eval_seed)
        bar = Progress(range(k + 1), k + 1, f"meta-test {config.algo} ({n} tasks, {k} updates)", every=1,
                       enabled=progress)
        try:
            path = learner.adapt_path(test_tasks, k, settings.eval_episodes, on_step=lambda _: bar.tick())
        finally:
            bar.close()
        by_step = [mean_ci95(mean_returns(b)) for b in path]
        result = {"return_by_step": [m for m, _ in by_step], "return_ci95_by_step": [c for _, c in by_step],
                  "eval_tasks": n, "eval_steps": k, "eval_episodes": settings.eval_episodes}
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
