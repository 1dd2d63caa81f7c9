"""How a supervised learner reads the data it is given, in meta_backward and adapt alike: the one rule
that tells one task from a stacked batch, and the checks that refuse, naming it, data the model
cannot read. `rank` is the number of dimensions of one input point that the learner recorded from
the first data it saw (-1 before: the model's first layer is asked instead)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ..functional_net import FunctionalNet
from ..introspect import point_ranks
from ..tasks import Task, as_batch, expect_tensor


def reads_one_task(net: FunctionalNet, rank: int, x: Any, caller: str) -> bool:
    """The one rule by which meta_backward (`caller` "tasks") and adapt ("support") read a Task
    from its x_support: one unstacked task when it has one dimension fewer than the learner's
    batches, a stacked batch when it has as many; the rank of a point is the one the learner
    recorded, or, before it has seen data, what the model's first layer reads (`_point_rank`)."""
    what = f"{caller}.x_support" if caller == "tasks" else f"{caller}: x_support"
    net.check_input(what, x)
    if rank < 0:  # not recorded: a later call may still show the points differently
        rank = _point_rank(net, x, caller)
    if x.dim() not in (rank + 1, rank + 2):
        raise ValueError(f"{caller}: x_support has shape {tuple(x.shape)}, but this learner's inputs have "
                         f"{rank} dimension(s) per point: expected [N, ...] for one task or [T, N, ...] for "
                         "a batch")
    return x.dim() == rank + 1


def meta_batch(net: FunctionalNet, rank: int, tasks: Task | list[Task], learner: str, device: torch.device
               ) -> Task:
    """A meta-batch for meta_backward of learner `learner`, checked and on `device`: one unstacked
    Task made a batch of one (the rule of `reads_one_task`), sizes and values (as_batch), inputs the
    model can read, and query points (the meta-loss is measured on them)."""
    if isinstance(tasks, Task) and reads_one_task(net, rank, tasks.x_support, "tasks"):
        tasks = Task(*(expect_tensor(f"tasks.{f.name}", getattr(tasks, f.name)).unsqueeze(0)
                       for f in fields(Task)))
    batch = as_batch(tasks)
    for name in ("x_support", "x_query"):
        net.check_input(f"tasks.{name}", getattr(batch, name))
    if rank >= 0 and batch.x_support.dim() != rank + 2:  # a list of tasks stacked into a batch
        raise ValueError(f"tasks: x_support stacks to shape {tuple(batch.x_support.shape)}, but this learner's "
                         f"inputs have {rank} dimension(s) per point: expected [T, N, ...]")
    if batch.x_query.shape[1] == 0:
        raise ValueError(f"tasks: the query set is empty (x_query has shape {tuple(batch.x_query.shape)}); "
                         f"{learner}'s meta-gradient is measured on the query points")
    batch = batch.to(device)
    for name in ("x_support", "x_query"):
        net.check_forward(f"tasks.{name}", getattr(batch, name), tasks=True)
    return batch


def support_batch(net: FunctionalNet, rank: int, support: Any, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Batch (x, y) of a support and whether predictions are squeezed back to one task.

    The rule: an (x, y) pair is ONE task; a Task is a stacked batch [T, N, ...], or one task
    when it has one dimension fewer than the learner's batches (`reads_one_task`, the rule of
    meta_backward too). Anything else is refused."""
    if isinstance(support, Task):
        if reads_one_task(net, rank, support.x_support, "support"):  # one unstacked task
            return support_batch(net, rank, (support.x_support, support.y_support), device)
        batch = as_batch(support)
        net.check_forward("support: x_support", batch.x_support.to(device), tasks=True)
        return batch.x_support, batch.y_support, False
    if not (isinstance(support, (tuple, list)) and len(support) == 2):
        raise TypeError("support must be an (x, y) pair of tensors or a gemext.tasks.Task")
    x, y = support
    net.check_input("support: x", x)
    expect_tensor("support: y", y)
    if rank >= 0 and x.dim() != rank + 1:
        hint = (" — a stacked batch of tasks: pass it as a gemext.tasks.Task, whose tensors carry the task "
                "dimension" if x.dim() == rank + 2 else "")
        raise ValueError(f"support: an (x, y) pair is one task, [N, ...] with {rank} dimension(s) per point, "
                         f"got x of shape {tuple(x.shape)}{hint}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"support: x holds {x.shape[0]} points but y holds {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("support: the support set is empty")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("support: x contains NaN or Inf")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("support: y contains NaN or Inf")
    net.check_forward("support: x", x.to(device), tasks=False)
    return x.unsqueeze(0), y.unsqueeze(0), True


def _point_rank(net: FunctionalNet, x: torch.Tensor, caller: str) -> int:
    """The rank of one point that a Task's x_support implies while the learner has not seen data:
    a stacked batch (x.dim() - 2) unless the model's first layer cannot read such points but can
    read one task's (x.dim() - 1). Refused when the model cannot tell and a batch would mean scalar
    points, the one reading of [A, B] that an unstacked task of A points [A, B] shares."""
    batch, single = x.dim() - 2, x.dim() - 1
    ranks = point_ranks(net.input_layer)
    if ranks is None:
        if batch == 0:
            how = ("Pass a list of Tasks, one per task ([task] for a single one)" if caller == "tasks" else
                   "Pass one task as an (x, y) pair")
            raise ValueError(
                f"{caller}: a Task whose x_support has shape {tuple(x.shape)} is ambiguous before this learner "
                f"has seen data: {x.shape[0]} tasks of scalar points, or one task of {x.shape[0]} points of "
                f"shape {tuple(x.shape[1:])}? {how}; a stacked Task is read as a batch once the learner "
                "knows its points (from meta_backward or an (x, y) pair)")
        return batch
    lo, hi = ranks
    for rank in (batch, single):
        if rank >= lo and (hi is None or rank <= hi):
            return rank
    raise ValueError(f"{caller}: x_support has shape {tuple(x.shape)}, but the model's first layer "
                     f"({type(net.input_layer).__name__}) reads points of "
                     f"{lo if hi == lo else f'at least {lo}'} dimension(s): expected [N, ...] for one task or "
                     "[T, N, ...] for a batch")
