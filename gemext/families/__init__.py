"""Task families: how a run of each task is built, fed and meta-tested (`TaskFamily`, base.py).
Sinusoid regression, few-shot vision and meta-RL are the three implementations, looked up by
task name; a family module is imported only when one of its tasks is used (RL needs gymnasium)."""
from __future__ import annotations

import importlib

from .base import TaskFamily

# task name -> (module of gemext.families, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "sinusoid": ("sinusoid", "SinusoidFamily"),
    "omniglot": ("vision", "VisionFamily"),
    "tinyimagenet": ("vision", "VisionFamily"),
    "miniimagenet": ("vision", "VisionFamily"),
    "nav2d": ("rl", "RLFamily"),
    "halfcheetah-vel": ("rl", "RLFamily"),
    "halfcheetah-dir": ("rl", "RLFamily"),
    "ant-vel": ("rl", "RLFamily"),
    "ant-dir": ("rl", "RLFamily"),
}
TASKS = tuple(FAMILIES)

__all__ = ["TASKS", "TaskFamily", "get"]


def get(task: str) -> type[TaskFamily]:
    """The family class that serves `task`."""
    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    module, cls = FAMILIES[task]
    return getattr(importlib.import_module(f".{module}", __name__), cls)
