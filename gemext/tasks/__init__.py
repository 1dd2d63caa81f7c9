"""Task families. A task is a support set and a query set; a meta-batch is the same container
with a leading task dimension on every tensor, so inner loops can run over all tasks at once."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class Task:
    """Support (x, y) and query (x, y) of one task, or of T tasks stacked along dim 0."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def to(self, device: torch.device | str) -> Task:
        return Task(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __len__(self) -> int:
        return self.x_support.shape[0]

    def __getitem__(self, i: int | slice) -> Task:
        """Task i of a stacked batch (a slice keeps the task dimension)."""
        return Task(*(getattr(self, f.name)[i] for f in fields(self)))

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_support, self.y_support

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_query, self.y_query

    def joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Support ∪ query of a stacked batch (concatenated along the data dimension, dim 1)."""
        return torch.cat([self.x_support, self.x_query], 1), torch.cat([self.y_support, self.y_query], 1)

    @staticmethod
    def stack(tasks: Sequence[Task]) -> Task:
        if len(tasks) == 0:
            raise ValueError("Task.stack: no tasks")
        return Task(*(torch.stack([getattr(t, f.name) for t in tasks]) for f in fields(Task)))


def expect_tensor(what: str, t: object) -> torch.Tensor:
    """`t` itself if it is a tensor; else a TypeError naming `what` and the type found."""
    if not isinstance(t, torch.Tensor):
        kind = type(t)
        got = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        raise TypeError(f"{what}: expected a torch.Tensor, got {got}")
    return t


def as_batch(tasks: Task | Sequence[Task]) -> Task:
    """Accept a stacked batch or a list of single tasks; validate sizes and finiteness."""
    batch = Task.stack(list(tasks)) if isinstance(tasks, (list, tuple)) else tasks
    if not isinstance(batch, Task):
        raise TypeError(f"tasks must be a gemext.tasks.Task or a list of them, got {type(tasks).__name__}")
    for f in fields(Task):
        t = expect_tensor(f"tasks.{f.name}", getattr(batch, f.name))
        if t.dim() < 2:
            raise ValueError(f"tasks.{f.name} must have a task and a data dimension, got shape {tuple(t.shape)}")
        if t.shape[0] != batch.x_support.shape[0]:
            raise ValueError(f"tasks.{f.name} holds {t.shape[0]} tasks but x_support holds {batch.x_support.shape[0]}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tasks.{f.name} contains NaN or Inf")
    for s_, q_ in (("x_support", "x_query"), ("y_support", "y_query")):
        if getattr(batch, s_).shape[2:] != getattr(batch, q_).shape[2:]:
            raise ValueError(f"tasks: {s_} points have shape {tuple(getattr(batch, s_).shape[2:])} but {q_} points "
                             f"{tuple(getattr(batch, q_).shape[2:])}")
    if batch.x_support.shape[1] == 0:
        raise ValueError("tasks: the support set is empty")
    if batch.x_support.shape[1] != batch.y_support.shape[1] or batch.x_query.shape[1] != batch.y_query.shape[1]:
        raise ValueError("tasks: x and y hold different numbers of points "
                         f"(support {batch.x_support.shape[1]} vs {batch.y_support.shape[1]}, "
                         f"query {batch.x_query.shape[1]} vs {batch.y_query.shape[1]})")
    return batch
