"""The task-family interface: everything the one training loop (gemext.train) needs to know
about a kind of task, so that the loop never tests a task name."""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch

from .. import algorithms
from ..algorithms import MetaLearner
from ..config import FAMILY_FLAGS, RunConfig

EVAL_SEED = 20201206  # meta-test tasks are the same for every run and seed
VALIDATION_SEED = 20201207  # validation tasks (settings are chosen on these, never on the meta-test's)


def merge_options(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A family's learner defaults updated with a run's options. The inner-VI dict is merged key
    by key, so `{"inner": {"lr": 16}}` keeps the preset's optimizer and β; naming another
    optimizer drops the preset's lr and optimizer_kwargs, which belong to the preset's one."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for key, value in options.items():
        base = out.get(key)
        if key == "inner" and isinstance(base, dict) and isinstance(value, dict):
            if "optimizer" in value and value["optimizer"] != base.get("optimizer"):
                base = {k: v for k, v in base.items() if k not in ("lr", "optimizer_kwargs")}
            value = {**base, **value}
        out[key] = value
    return out


class TaskFamily(abc.ABC):
    """A kind of task (sinusoid regression, few-shot vision, meta-RL). Built from a run's
    settings, it builds the model, likelihood and learner, samples the training meta-batches from
    its own random stream (saved with checkpoints), runs the meta-test and writes its metrics and
    plots, and closes what it opened (environments)."""

    tasks: tuple[str, ...] = ()  # the task names it serves
    flags: tuple[str, ...] = ()  # the family flags of RunConfig (FAMILY_FLAGS) it reads
    preset_names: tuple[str, ...] = ()  # the --preset values it reads, the default first
    family_options: tuple[str, ...] = ()  # --options keys it reads itself, besides its learner's
    headline: tuple[str, ...] = ()  # the metrics.json figures the command's closing line names
    devices: tuple[str, ...] = ("cpu", "cuda")
    distributed: bool = True  # whether torchrun may shard its meta-batches
    # intra-op threads `gemext train` / `eval` use unless OMP_NUM_THREADS is set (None: torch's default)
    threads: int | None = None
    domain: str = "supervised"  # the learners' registry domain (gemext.algorithms)
    # run flags that are shorthands for learner/family options (folded into algo_options when
    # two runs are compared for --resume)
    folded: tuple[str, ...] = ("inner_steps",)
    default_eval_tasks: int = 600
    # the files `evaluate` writes into the run folder besides metrics.json (plots, plot data): a
    # resumed run that trains further removes them, as they describe the earlier meta-test
    eval_outputs: tuple[str, ...] = ()

    def __init__(self, config: RunConfig) -> None:
        self.check(config)
        self.config = config

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Refuse settings this family cannot honour: a flag it does not read, a device, an
        algorithm it has no learner for, torchrun when it cannot be sharded."""
        unused = [f"--{name.replace('_', '-')}" for name in FAMILY_FLAGS
                  if name not in cls.flags and getattr(config, name) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {config.task}; "
                             "remove " + ("it" if len(unused) == 1 else "them"))
        device = config.device.split(":")[0]
        if device not in cls.devices:
            raise ValueError(f"--device {config.device} does not apply to {config.task}: it runs on "
                             f"{' or '.join(cls.devices)}")
        if config.algo not in algorithms.names(cls.domain):
            raise ValueError(f"algorithm {config.algo!r} is not available for {config.task}; choose one of "
                             f"{', '.join(algorithms.names(cls.domain))}")

    @classmethod
    def trajectory_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A run's options as `--resume` compares them: what can change the training trajectory
        (the family may resolve defaults and drop meta-test-only settings)."""
        return options

    @classmethod
    def with_defaults(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """A run's settings (config.json's form) with the flags left out that the family fills in
        (preset, meta_batch, ...) set to the values it uses, so that --resume compares what a run
        does, not how it was spelled."""
        return dict(settings)

    @classmethod
    def learner_options_for(cls, config: RunConfig) -> dict[str, Any]:
        """The options `build_learner` gives `gemext.algorithms.create` for a run's settings (objects
        included, e.g. the likelihood), from the settings alone: no data is read. `gemext.presets`
        serves the same options to Python users."""
        raise ValueError(f"{config.task}: its learners are built from more than options (e.g. a rollout sampler); "
                         f"train them with `gemext train {config.task}`")

    # -- training -----------------------------------------------------------------------------
    @abc.abstractmethod
    def build_learner(self) -> MetaLearner:
        """The run's learner (model, likelihood and the family's defaults for the algorithm, updated
        with the run's options), on the run's device."""

    @property
    @abc.abstractmethod
    def meta_batch(self) -> int:
        """Tasks per meta-iteration."""

    @abc.abstractmethod
    def sample(self, n: int, generator: Any = None) -> Any:
        """A training meta-batch of n tasks, from the family's own random stream unless a
        `generator` is given; it supports len() and slicing (a shard of it)."""

    @abc.abstractmethod
    def rng_state(self) -> dict:
        """The state of every random stream the family owns (plain data or tensors)."""

    @abc.abstractmethod
    def set_rng_state(self, state: dict) -> None:
        ...

    def log_stats(self) -> dict[str, float]:
        """Extra columns for log.csv and metrics.json (e.g. environment steps)."""
        return {}

    # -- meta-test ----------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, learner: MetaLearner, tasks: int | None, steps: int | None, run: Path, plots: bool,
                 progress: bool | None = None) -> dict[str, Any]:
        """Meta-test on fixed-seed fresh tasks (`tasks` of them; None: the run's eval_tasks or the
        family's default) after 0..steps adaptation steps; write plots into `run` (best effort);
        return the metrics. The tasks are those of `config.eval_split`: the meta-test's, or
        validation tasks drawn apart from them (`eval_seed`)."""

    @property
    def eval_seed(self) -> int:
        """The seed of the tasks `evaluate` draws: EVAL_SEED for the test split, VALIDATION_SEED for
        validation."""
        return VALIDATION_SEED if self.config.eval_split == "validation" else EVAL_SEED

    def eval_tasks(self, tasks: int | None) -> int:
        n = tasks or self.config.eval_tasks or self.default_eval_tasks
        if n < 1:
            raise ValueError(f"--tasks must be >= 1, got {n}")
        return n

    def close(self) -> None:  # noqa: B027 optional no-op hook
        """Release what the family opened (environment workers)."""

    def __enter__(self) -> TaskFamily:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SupervisedFamily(TaskFamily):
    """A family of (x, y) tasks whose training meta-batches come from one torch.Generator seeded
    with the run's seed."""

    eval_outputs = ("mse_vs_steps.png", "predictions.png")  # plot_regression's

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(config.seed)

    def rng_state(self) -> dict:
        return {"task": self.generator.get_state()}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["task"])
