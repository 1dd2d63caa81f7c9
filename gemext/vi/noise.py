"""Distributed noise ranges: the global noise indices of a shard's per-task tensors
(`task_starts`), so that a shard of a meta-batch (the tasks one rank owns, passed explicitly as
`task_range=(first, total)` to meta_backward and the VI loops) draws the full batch's noise."""
from __future__ import annotations

import torch


def task_starts(tensors: list[torch.Tensor], task_range: tuple[int, int] | None) -> list[int] | None:
    """Global noise indices (the ``starts`` of :func:`gemext.ops.sample`) of per-task tensors
    [T_shard, ...] holding tasks k .. k+T_shard−1 of a meta-batch of T_total tasks, so that the
    shard draws exactly the ε those tasks draw in the full batch: layer l of the full batch
    occupies Σ_{l'<l} T_total·n_l' onwards and task k of it starts k·n_l further (n_l = per-task
    numel). None (no range) keeps the default cumulative indexing."""
    if task_range is None:
        return None
    k, total = task_range
    starts, base = [], 0
    for t in tensors:
        if t.dim() == 0 or not 0 <= k <= k + t.shape[0] <= total:
            raise ValueError(f"task_range {task_range}: tensors of shape {tuple(t.shape)} do not hold "
                             f"tasks {k}..{k + (t.shape[0] if t.dim() else 0) - 1} of {total}")
        n = t[0].numel()
        starts.append(base + k * n)
        base += total * n
    return starts
