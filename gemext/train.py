"""The one training loop of every task family (gemext.families): meta-steps with their guards,
run folders with config.json, log.csv, an atomic checkpoint.pt (with every RNG state, so --resume
continues bit-for-bit) and metrics.json, distributed sharding under torchrun. The run record, the
checkpoint checks and the meta-test `evaluate` are gemext.record's, re-exported here."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, distributed, families, record, runs
from .algorithms import MetaLearner
from .config import RunConfig
from .families import TASKS, TaskFamily
from .families.base import EVAL_SEED
from .progress import Progress
from .record import build, check_resume, evaluate, load_checkpoint, load_run, open_family

__all__ = ["RunConfig", "TASKS", "EVAL_SEED", "train", "evaluate", "load_run", "load_checkpoint", "meta_step",
           "Interrupted", "StepOutcome", "build", "open_family"]


# ------------------------------------------------------------------ one meta-step
def _clock() -> float:
    """The training loop's clock (seconds; the tests replace it to make time deterministic)."""
    return time.perf_counter()


@dataclass
class StepOutcome:
    stats: dict[str, float]  # the meta-batch's statistics (all-reduced under torchrun)
    stepped: bool  # False: a non-finite loss or gradient somewhere, the step was skipped
    error: str  # the inner loop's error message when it diverged
    stop: bool  # some rank asked to stop (agreed across ranks)
    spent: bool = False  # the time budget is spent: rank 0's clock, agreed across ranks


def _finite_grads(params) -> bool:
    """Whether every meta-gradient is finite, with one host sync (not one per tensor: this runs
    every meta-iteration)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def meta_step(learner: MetaLearner, optimizer: torch.optim.Optimizer, batch: Any,
              dctx: distributed.DistContext | None = None, stop: bool = False, iteration: int = 0,
              budget_spent: Callable[[], bool] | None = None) -> StepOutcome:
    """One meta-iteration on a whole meta-batch: this rank's shard of it through meta_backward
    (with its place in the batch, so its noise is the full batch's), the all-reduce of gradients and
    statistics, then the optimizer step and the learner's after_step — or, if any rank saw a
    non-finite loss or gradient, no step at all on any rank (never NaN into the meta-parameters).
    `budget_spent` (the time budget's test) is asked on rank 0 once this rank's meta-gradient is
    computed, and its answer rides on the same all-reduce: every rank stops after the same step."""
    dctx = dctx or distributed.DistContext()
    n = len(batch)
    lo, hi = dctx.shard(n)
    optimizer.zero_grad(set_to_none=True)
    error, failed = "", False
    try:
        if dctx.world_size == 1:
            stats = learner.meta_backward(batch)
        else:
            stats = learner.meta_backward(batch[lo:hi], task_range=(lo, n))
    except FloatingPointError as exc:  # an inner loop diverged: a bad step, not a crash
        stats, error, failed = {"nll_support": float("nan")}, str(exc), True
    spent = budget_spent is not None and dctx.is_main and budget_spent()
    # all ranks decide on the same all-reduced values: skip or step, stop or go on together
    stats, bad_ranks, stop, spent = dctx.step(learner.parameters(), stats, hi - lo, n, failed, stop, iteration,
                                              spent)
    stepped = not bad_ranks and all(math.isfinite(v) for v in stats.values()) and _finite_grads(learner.parameters())
    if stepped:
        optimizer.step()
        stats = {**stats, **learner.after_step()}
    return StepOutcome(stats, stepped, error, stop, spent)


# ------------------------------------------------------------------ training
class _StopFlag:
    """SIGTERM/SIGINT: finish the current iteration, write a checkpoint, then stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(Exception):
    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(f"stopped by signal {signum} after iteration {iteration}; checkpoint written")
        self.signum, self.iteration = signum, iteration


def _check_memory(learner, meta_batch: int) -> None:
    """Refuse a meta-batch whose per-task copies of the weights (posterior means, std, gradients,
    curvature, samples: ~16 copies) cannot fit in this machine's memory, before allocating any."""
    weights = sum(p.numel() * p.element_size() for p in learner.parameters())
    need = 16 * meta_batch * weights
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return
    if need > total:
        raise ValueError(f"--meta-batch {meta_batch} needs about {need / 2**30:.3g} GiB for the per-task copies of "
                         f"the {weights / 2**20:.3g} MiB of meta-parameters, more than this machine's "
                         f"{total / 2**30:.3g} GiB; use a smaller meta-batch (or shard it with torchrun)")


def train(config: RunConfig, resume: bool = False, progress: bool | None = None,
          on_iteration: Callable[[int], None] | None = None, overwrite: bool = False) -> Path:
    """Meta-train according to `config`; returns the run folder. The folder must not hold another
    run unless `resume` (continue it: same settings, a longer `iterations` or another `time_budget`
    allowed) or `overwrite` (replace it); it is locked while training (gemext.runs). With a
    `time_budget` the run stops after the iteration during which its training wall-clock (counted
    across resumes) reaches the budget; metrics.json says how many iterations were done and
    `stopped_by` ("time_budget" or "iterations"). A relative `config.data_root` is
    resolved here, so the run can be evaluated from any directory. Under torchrun the meta-batch
    is sharded across ranks (gemext.distributed; families that allow it); rank 0 writes every file."""
    config.validate()
    family_cls = families.get(config.task)
    family_cls.check(config)
    if config.data_root is not None:
        config.data_root = str(Path(config.data_root).resolve())
    if not family_cls.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{config.task}: this task family trains in a single process; start it without torchrun")
    dctx = distributed.setup(config.device)
    clean = False  # whether every rank is expected at the closing barrier
    locks: list[runs.RunLock] = []
    created = runs.missing_folders(Path(config.out)) if dctx.is_main else []
    # the plots of the run an --overwrite replaces (its family's `eval_outputs`, known from its config)
    replaced = runs.run_task(config.out) if overwrite and dctx.is_main else None
    outputs = families.get(replaced).eval_outputs if replaced in TASKS else ()
    try:
        # rank 0 owns the folder; its refusal reaches every rank
        dctx.from_main(lambda: locks.append(runs.open_folder(Path(config.out), resume, overwrite, outputs)),
                       "run folder")
        run = _train(config, dctx, resume, progress, on_iteration)
        clean = True
        return run
    except Interrupted:
        clean = True  # every rank stopped after the same agreed iteration
        raise
    finally:
        if locks and not resume:  # a new run in a folder this process owns: keep what it replaced until it trained
            runs.settle_replaced(Path(config.out))
        for lock in locks:
            lock.release()
        if not clean:  # refused before writing anything: no empty run folder left behind
            runs.remove_unused(created)
        dctx.close(clean)


def _train(config: RunConfig, dctx: distributed.DistContext, resume: bool, progress: bool | None,
           on_iteration: Callable[[int], None] | None) -> Path:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    with open_family(config) as family:
        return _loop(config, family, dctx, resume, progress, on_iteration)


def _remove_eval_outputs(out: Path, family: TaskFamily) -> None:
    """Remove the plots an earlier meta-test wrote into `out` (the family's `eval_outputs`): they
    belong to fewer iterations than the resumed run will have (`gemext eval` writes them again)."""
    for name in family.eval_outputs:
        (out / name).unlink(missing_ok=True)


def _loop(config: RunConfig, family: TaskFamily, dctx: distributed.DistContext, resume: bool,
          progress: bool | None, on_iteration: Callable[[int], None] | None) -> Path:
    out = Path(config.out)
    learner = family.build_learner()
    meta_batch = family.meta_batch
    _check_memory(learner, -(-meta_batch // dctx.world_size))  # each rank holds its shard
    opt = learner.meta_optimizer(config.meta_lr)
    start, wall_before, skipped, bad_run, last_error = 0, 0.0, 0, 0, ""
    end, stopped_by = config.iterations, "iterations"  # a budget spent on resuming: nothing to train
    ckpt_path = out / "checkpoint.pt"
    if resume:
        ckpt = dctx.from_main(lambda: load_checkpoint(ckpt_path, config), "checkpoint")
        check_resume(ckpt, config, ckpt_path)
        try:
            learner.load_state_dict(ckpt["learner"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:  # e.g. a different model architecture
            raise ValueError(f"checkpoint {ckpt_path} does not fit this run's model or optimizer: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
        record.set_rng_state(ckpt["rng"], family, learner)
        start, wall_before, skipped = ckpt["iteration"], ckpt["wall_s"], ckpt.get("skipped", 0)
        budget = config.time_budget
        if start >= config.iterations:
            why = f"already at iteration {start} of --iterations {config.iterations}"
        elif budget is not None and wall_before >= budget:  # the budget that stopped it, or a smaller one
            why = f"time budget spent: {wall_before:.4g} s trained (iteration {start}) of --time-budget {budget:g}"
        else:
            why = ""
        if dctx.is_main and not why:
            _remove_eval_outputs(out, family)
        elif dctx.is_main:
            print(f"{out}: {why}; nothing to train", file=sys.stderr)
        if why and start < config.iterations:
            end, stopped_by = start, "time_budget"
    if dctx.is_main:
        (out / "config.json").write_text(json.dumps(record.run_record(config, family, learner), indent=2, default=str))
    log = runs.RunLog(out / "log.csv", start if resume else None, enabled=dctx.is_main)
    t0 = _clock()

    def wall() -> float:
        return wall_before + _clock() - t0

    def budget_spent() -> bool:
        return wall() >= config.time_budget

    def save(iteration: int) -> None:
        if not dctx.is_main:
            return
        runs.atomic_save({"gemext": __version__, "config": asdict(config), "iteration": iteration,
                          "learner": learner.state_dict(), "optimizer": opt.state_dict(),
                          "rng": record.rng_state(family, learner), "skipped": skipped, "wall_s": wall()}, ckpt_path)

    bar = Progress(range(start, end), config.iterations, f"{config.algo} {config.task}", start,
                   every=config.log_every, enabled=progress if dctx.is_main else False)
    done = start
    with _StopFlag() as stop:
        for it in bar:
            batch = family.sample(meta_batch)  # whole batch on every rank
            step = meta_step(learner, opt, batch, dctx, stop.signum is not None, it + 1,
                             budget_spent if config.time_budget is not None else None)
            stats = step.stats
            if step.stepped:
                bad_run = 0
            else:  # the step was skipped: never write NaN into the meta-parameters
                skipped += 1
                bad_run += 1
                last_error = step.error or last_error
                # a run shorter than max_bad_steps whose every iteration was skipped failed as well
                if bad_run >= min(config.max_bad_steps, config.iterations - start):
                    save(it)
                    raise FloatingPointError(
                        f"{bad_run} consecutive meta-iterations produced non-finite losses or gradients "
                        f"(last at iteration {it + 1}{'; ' + last_error if last_error else ''}); stopping. "
                        "Lower the inner/meta learning rate or "
                        f"raise sigma0. The last good checkpoint is {ckpt_path}")
            done = it + 1
            spent = step.spent and done < config.iterations  # (the last iteration is the last anyway)
            if done % config.log_every == 0 or done == config.iterations or spent:
                log.add({"iteration": done, "wall_s": round(wall(), 3), "skipped": skipped, **family.log_stats(),
                         **{k: round(v, 6) for k, v in stats.items()}})
                bar.set_postfix(stats)
            if on_iteration is not None:
                on_iteration(done)
            stop_now = step.stop if dctx.enabled else stop.signum is not None  # ranks act on the agreed flag
            if done % config.checkpoint_every == 0 or done == config.iterations or stop_now or spent:
                save(done)
            if stop_now:
                raise Interrupted(stop.signum or signal.SIGTERM, done)
            if spent:
                stopped_by = "time_budget"
                bar.end_early("time budget spent")
                break
    if not dctx.is_main:
        return out
    metrics = {"task": config.task, "algo": config.algo, "seed": config.seed, "iterations": done,
               "stopped_by": stopped_by, "wall_s": wall(), "skipped_steps": skipped, **family.log_stats()}
    path = out / "metrics.json"
    if done == start and path.exists():
        # a resume that trained nothing: the earlier meta-test still belongs to this checkpoint
        with contextlib.suppress(ValueError, OSError):
            metrics = {**json.loads(path.read_text()), **metrics}
    # otherwise replaced, not merged: an earlier meta-test belongs to fewer iterations
    path.write_text(json.dumps(metrics, indent=2))
    return out
