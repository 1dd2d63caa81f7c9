"""Distributed meta-training on torch.distributed (started by ``torchrun``): the tasks of each
meta-batch are sharded across ranks, and one flat buffer per step is all-reduced.

Design:

- Every rank draws the *whole* meta-batch from the same task generator and keeps its contiguous
  slice ``shard(T)`` of it, so a task is defined by its index in the meta-batch, not by the rank.
- The learners' inner loops draw one seed per VI step from ``learner.generator`` (every rank runs
  the same number of steps, so the generators stay in lock-step) and index the Philox noise by the
  global element position; meta_backward gets ``task_range=(first, total)`` (gemext.train.meta_step)
  so that a shard's tasks draw exactly the noise they would draw in the full batch.
- Every learner's meta-gradient is a mean over its tasks (Θ.grad = −1/T_shard Σ ĝ): ``step``
  scales it by T_shard/T and sums over ranks, giving the single-process mean over the whole
  meta-batch up to floating-point summation order. The same buffer carries the per-task-mean
  statistics (same weighting), a "this rank's step was non-finite" count, a "stop requested"
  count and rank 0's "time budget spent" flag, so all ranks agree on skipping a step, on stopping
  after a signal and on stopping by the clock (rank 0's alone: the ranks' clocks differ).
- Collectives run under a timeout (``GEMEXT_DIST_TIMEOUT`` seconds, default 300); gloo raises at
  once when a peer's connection drops. Either way the surviving ranks raise :class:`PeerFailure`,
  naming their rank, the collective and the iteration.
- Rank 0 alone writes files (config, log, checkpoints, metrics); it reads the checkpoint on
  ``--resume`` and broadcasts it, so ranks never see different states.
- Shutdown (:meth:`DistContext.close`): a rank that finished meets the others at a barrier (under
  the same timeout) before the group is destroyed, so no rank closes its connections while a peer
  is still communicating or writing its files; a rank that failed destroys the group at once. The
  group must really be freed by then: its gloo threads, if still alive at interpreter exit, abort
  the process (SIGABRT) even though the run succeeded.

Backends: gloo for CPU tensors, NCCL for CUDA (each rank uses ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "PeerFailure", "setup", "shard_bounds", "is_main_process", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
R = TypeVar("R")


class PeerFailure(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout or lost its connection."""


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the contiguous slice of `total` tasks that `rank` owns: sizes differ by at most
    one, the first total % world_size ranks take one more."""
    if total < world_size:
        raise ValueError(f"the meta-batch ({total} tasks) must hold at least one task per rank "
                         f"({world_size} ranks): raise --meta-batch or use fewer processes")
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (valid before and after the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _timeout_s() -> float:
    raw = os.environ.get("GEMEXT_DIST_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"GEMEXT_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not t > 0:
        raise ValueError(f"GEMEXT_DIST_TIMEOUT must be > 0, got {raw!r}")
    return t


@dataclass
class DistContext:
    """This process's place in the job; a single-process context (world_size 1) makes every
    method a no-op, so the training loop has one code path."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context created the process group (and destroys it)
    timeout_s: float = DEFAULT_TIMEOUT_S
    bytes_per_step: int = 0  # size of the last all-reduced buffer
    _stat_keys: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> tuple[int, int]:
        return shard_bounds(total, self.rank, self.world_size)

    def _fail(self, what: str, exc: BaseException) -> PeerFailure:
        return PeerFailure(f"rank {self.rank}/{self.world_size}: {what} failed ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); a peer rank died, hung longer "
                           f"than {self.timeout_s:g} s (GEMEXT_DIST_TIMEOUT) or lost its connection. "
                           "Relaunch with --resume to continue from the last checkpoint")

    def from_main(self, fn: Callable[[], R], what: str) -> R:
        """fn() on rank 0, its result (or its error, re-raised as the same type) on every rank."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as exc:  # ship the error: the other ranks must not wait forever
                box[0] = (False, exc)
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as exc:
            raise self._fail(f"broadcast of the {what}", exc) from exc
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def step(self, params: Iterable[torch.Tensor], stats: dict[str, float], n_local: int, n_total: int,
             local_bad: bool, stop: bool, iteration: int,
             spent: bool = False) -> tuple[dict[str, float], int, bool, bool]:
        """All-reduce this step's meta-gradients (in .grad, a mean over the n_local tasks), the
        statistics (per-task means), a non-finite flag, a stop flag and the time-budget flag as ONE
        flat buffer; writes the whole-meta-batch mean back into .grad. Returns (statistics, number of
        ranks whose step was non-finite, whether any rank asked to stop, whether rank 0 found the
        time budget spent: the other ranks' `spent` is ignored)."""
        if not self.enabled:
            return stats, int(local_bad), stop, spent
        params = [p for p in params if p.requires_grad]
        keys = self._agree_on_keys(stats)
        w = n_local / n_total
        ref = params[0]
        grads = [p.grad if p.grad is not None and not local_bad else torch.zeros_like(p) for p in params]
        head = [w * float(stats.get(k, math.nan)) for k in keys]
        head += [float(p.grad is not None) for p in params] + [float(local_bad), float(stop),
                                                               float(spent and self.is_main)]
        flat = torch.cat([torch.cat([g.reshape(-1) for g in grads]) * w,
                          torch.tensor(head, dtype=ref.dtype, device=ref.device)])
        self.bytes_per_step = flat.numel() * flat.element_size()
        try:
            dist.all_reduce(flat)
        except Exception as exc:
            raise self._fail(f"all-reduce of meta-iteration {iteration}", exc) from exc
        pos = 0
        for p in params:
            n = p.numel()
            p.grad = flat[pos:pos + n].view_as(p).clone()
            pos += n
        tail = flat[pos:].tolist()
        reduced = dict(zip(keys, tail[:len(keys)]))
        has_grad = tail[len(keys):len(keys) + len(params)]
        for p, h in zip(params, has_grad):
            if h == 0:  # no rank produced a gradient for it: leave it to the optimizer as None
                p.grad = None
        bad, stop_count, spent_count = tail[-3:]
        return reduced, int(round(bad)) if math.isfinite(bad) else self.world_size, stop_count > 0, spent_count > 0

    def _agree_on_keys(self, stats: dict[str, float]) -> list[str]:
        """The statistics' names, fixed for the run by one all-gather at the first step (a rank
        whose first step failed may report fewer)."""
        if self._stat_keys is None:
            gathered: list[Any] = [None] * self.world_size
            try:
                dist.all_gather_object(gathered, list(stats))
            except Exception as exc:
                raise self._fail("agreeing on the statistics", exc) from exc
            self._stat_keys = list(dict.fromkeys(k for keys in gathered for k in keys))  # rank 0's order first
        return self._stat_keys

    def close(self, clean: bool = True) -> None:
        """Destroy the process group if this context created it. clean: this rank left the run
        in step with the others (finished, or stopped at the agreed iteration), so it first waits
        at a barrier until every rank is done with its collectives and its files; a barrier that
        fails raises PeerFailure after the group is destroyed. Not clean (an error): no barrier,
        since a peer may be dead or stuck in a collective."""
        if not (self.owns_group and dist.is_initialized()):
            return
        self.owns_group = False
        err: BaseException | None = None
        if clean:
            try:
                self._barrier()
            except BaseException as exc:  # a dead or hung peer, or Ctrl-C: still destroy the group
                err = exc
        try:
            group = weakref.ref(dist.group.WORLD)
        except TypeError:  # a build whose ProcessGroup takes no weak references: skip the check
            group = None
        try:
            dist.destroy_process_group()
        except Exception:
            if clean and err is None:
                raise
            # otherwise the error that got us here is the one to report
        # (after an error the traceback's frames may still hold the group: no verdict then)
        if clean and err is None and group is not None and group() is not None:
            warnings.warn("the process group outlived destroy_process_group (something still references "
                          "it): its threads will be torn down during interpreter shutdown, which can abort "
                          "the process", RuntimeWarning, stacklevel=2)
        if isinstance(err, Exception):
            raise self._fail("the barrier before shutdown", err) from err
        if err is not None:
            raise err

    def _barrier(self) -> None:
        timeout = timedelta(seconds=self.timeout_s)
        if dist.get_backend() == "gloo":  # names the ranks that did not arrive
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:  # NCCL: a CPU-blocking barrier on this rank's device, under the group's timeout
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup(device: str = "cpu") -> DistContext:
    """The job this process belongs to, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): initialises the process group (gloo on CPU, NCCL on CUDA) with the
    GEMEXT_DIST_TIMEOUT timeout unless one exists. Without torchrun: a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext()
    timeout = _timeout_s()
    cuda = device.startswith("cuda")
    owns = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torch.distributed.nn binds group.WORLD as a default argument when first imported; that
        # happens lazily (torch.optim → torch._dynamo), and after init it would pin the default
        # group, keeping it alive past destroy_process_group. Imported first, it binds None.
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        owns = True
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns, timeout)
