"""The measured settings `gemext train` uses, for Python users (re-exported as `gemext.presets`,
`gemext.preset_training`, `gemext.preset_names`). The options come from the family's
`learner_options_for`, the one place `gemext train` builds its learners' options from too."""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from ..config import RunConfig
from . import FAMILIES, TASKS, get
from .base import TaskFamily

__all__ = ["presets", "preset_training", "preset_names"]

# tasks whose learners are built from options alone (the meta-RL learners also need a rollout sampler)
PRESET_TASKS = tuple(t for t in TASKS if FAMILIES[t][0] != "rl")


def _family(task: str) -> type[TaskFamily]:
    if task in PRESET_TASKS:
        return get(task)
    if task in TASKS:
        raise ValueError(f"{task} is a meta-RL task: its learners need a rollout sampler besides options "
                         f"(their options: gemext.algorithms.option_names(ALGO, 'rl'); rollout settings: "
                         f"gemext.families.rl.RLRunSettings); train it with `gemext train {task}`. "
                         f"Presets exist for {', '.join(PRESET_TASKS)}")
    raise ValueError(f"unknown task {task!r}; presets exist for {', '.join(PRESET_TASKS)}")


def _run(task: str, algo: str, preset: str | None, **settings: Any) -> tuple[type[TaskFamily], RunConfig]:
    """The family and the settings of `gemext train TASK --algo ALGO [--preset P] ...`, checked."""
    family = _family(task)
    config = RunConfig(task=task, algo=algo, preset=preset, **settings)
    config.validate()
    family.check(config)  # the algorithm
    if preset is not None and preset not in family.preset_names:
        raise ValueError(f"unknown preset {preset!r} for {task}; choose one of {', '.join(family.preset_names)}")
    return family, config


def presets(task: str, algo: str, *, preset: str | None = None, inner_steps: int | None = None,
            device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments `gemext.algorithms.create(algo, model, **kwargs)` gets from
    `gemext train TASK --algo ALGO [--preset P] [--inner-steps K] [--device D] [--options JSON]`:
    the family's measured settings for the algorithm and preset, objects included (the likelihood:
    sinusoid GaussianLikelihood(s), vision CategoricalLikelihood()). The model is yours (sinusoid:
    `SinusoidTasks(preset).make_model()`; vision: `gemext.tasks.vision.make_backbone(task, ways)`);
    `seed` is left to you. `preset` None is the task's default (`preset_names(task)[0]`); `device`
    sets how the tasks of a meta-batch run (vision: looped on CPU, vmapped on CUDA); `options` are
    `--options`' (family options too: sinusoid `sigma`, `learn_noise`). Unknown tasks, algorithms
    and presets are refused with the valid ones; a fresh dict each call."""
    family, config = _run(task, algo, preset, inner_steps=inner_steps, device=device,
                          algo_options=dict(options or {}))
    return copy.deepcopy(family.learner_options_for(config))  # nested dicts too: the tables stay untouched


def preset_training(task: str, algo: str, *, preset: str | None = None) -> dict[str, Any]:
    """What `gemext train TASK --algo ALGO [--preset P]` trains with besides the learner's options:
    `meta_lr` (the meta-optimizer's learning rate: `learner.meta_optimizer(meta_lr)`) and
    `meta_batch` (tasks per meta-iteration)."""
    family, config = _run(task, algo, preset)
    return {"meta_lr": config.meta_lr, "meta_batch": family.with_defaults(asdict(config))["meta_batch"]}


def preset_names(task: str) -> list[str]:
    """The presets of `task` (its `--preset` values), the default first."""
    return list(_family(task).preset_names)
