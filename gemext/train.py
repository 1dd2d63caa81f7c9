"""The one training loop of every task family (gemext.families): meta-steps with their guards,
run folders with config.json, log.csv, an atomic checkpoint.pt (with every RNG state, so --resume
continues bit-for-bit) and metrics.json, distributed sharding under torchrun; and the meta-test
entry point `evaluate`."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
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

from . import __version__, algorithms, distributed, families, runs
from .algorithms import MetaLearner
from .config import RECORD_KEYS, RunConfig
from .families import TASKS, TaskFamily
from .families.base import EVAL_SEED
from .progress import Progress

__all__ = ["RunConfig", "TASKS", "EVAL_SEED", "train", "evaluate", "load_run", "load_checkpoint", "meta_step",
           "Interrupted", "StepOutcome", "build", "open_family"]


def open_family(config: RunConfig) -> TaskFamily:
    """The task family of a run, built from its settings (checked against what the family reads)."""
    config.validate()
    return families.get(config.task)(config)


def build(config: RunConfig) -> tuple[TaskFamily, MetaLearner, int]:
    """(family, learner, meta-batch size) of a run, for scripts and tests (close the family when
    it holds resources: RL environments)."""
    family = open_family(config)
    return family, family.build_learner(), family.meta_batch


# ------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | Path, config: RunConfig | None = None) -> dict:
    """Load and check a checkpoint (SHA-256 verified, weights_only; see gemext.runs); refuse a
    corrupt or incompatible one with a clear message. When <name>.prev (the checkpoint before it)
    is good, the message says so and how to resume from it: a deliberate choice over a silent
    fallback, which would hide a failing disk and quietly redo up to two checkpoint intervals."""
    path = Path(path)
    try:
        return _load_checkpoint(path, config)
    except ValueError as exc:
        prev = path.with_name(path.name + ".prev")
        try:
            it = _load_checkpoint(prev, config)["iteration"] if prev.exists() else None
        except ValueError:
            it = None
        if it is None:
            raise
        raise ValueError(f"{exc}. The previous checkpoint {prev} (iteration {it}) is good: to resume from it, "
                         f"run `mv {prev} {path}` and start again with --resume") from exc


def _load_checkpoint(path: Path, config: RunConfig | None) -> dict:
    ckpt = runs.read_checkpoint(path)
    if config is not None:
        saved = ckpt["config"]
        if saved.get("task") == config.task:  # defaults spelled out or left out are the same run
            saved, current = _with_defaults(saved), _with_defaults(asdict(config))
        else:
            current = asdict(config)
        for key in ("task", "algo", "preset", "seed", "ways", "shots"):
            if saved.get(key) != current[key]:
                raise ValueError(f"checkpoint {path} was written for {key}={saved.get(key)!r}, "
                                 f"but this run has {key}={current[key]!r}")
    return ckpt


def _with_defaults(cfg: dict) -> dict:
    return families.get(cfg["task"]).with_defaults(cfg)


def _effective(cfg: dict) -> dict:
    """A run's settings with the family's defaults filled in (`TaskFamily.with_defaults`) and the
    flags that are shorthands for options (the family's `folded`: --inner-steps always,
    --meta-batch for RL) folded into algo_options, as the families fold them: two spellings of one
    run compare equal."""
    cfg = _with_defaults(cfg)
    opts = {k: v for k, v in (cfg.get("algo_options") or {}).items() if k != "resolved"}
    for key in families.get(cfg["task"]).folded:
        if cfg.get(key) is not None:
            opts[key] = cfg[key]
        cfg[key] = None
    cfg["algo_options"] = families.get(cfg["task"]).trajectory_options(opts)
    return cfg


def check_resume(ckpt: dict, config: RunConfig, path: Path) -> None:
    """A resumed run must be the run in the checkpoint: only a longer --iterations, another
    --time-budget (and settings that do not touch the trajectory, gemext.runs.RESUME_MAY_CHANGE)
    may differ."""
    changes = runs.config_changes(_effective(ckpt["config"]), _effective(asdict(config)))
    if changes:
        raise ValueError(f"cannot resume {path}: the run was trained with other settings ({'; '.join(changes)}). "
                         "Only --iterations may grow (and --time-budget change); start a new run (another --out) "
                         "to change the others")
    if config.iterations < ckpt["iteration"]:
        raise ValueError(f"cannot resume {path}: its checkpoint is at iteration {ckpt['iteration']}, beyond "
                         f"--iterations {config.iterations}")


def _rng_state(family: TaskFamily, learner: MetaLearner) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # plain data: checkpoints load weights_only
    return {"family": family.rng_state(), "learner": learner.generator.get_state(),
            "torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "python": random.getstate()}


def _set_rng_state(state: dict, family: TaskFamily, learner: MetaLearner) -> None:
    family.set_rng_state(state["family"])
    learner.generator.set_state(state["learner"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


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
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


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


LOG_FIELDS = ["iteration", "wall_s", "skipped"]


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


def _run_record(config: RunConfig, family: TaskFamily, learner: MetaLearner) -> dict[str, Any]:
    """config.json: the run's settings as given (what --resume and `gemext eval` rebuild the run
    from), and, under RECORD_KEYS, what they resolved to (the preset used, the family's default
    when none was given; meta-batch; inner steps; the learner's options after the family's
    defaults and the preset's were merged in) and the gemext that ran it (its version, and its git
    commit when it runs from a checkout)."""
    cfg = asdict(config)
    options = family.resolved_options()
    if options is not None:
        cfg["algo_options"] = options
    family_cls = type(family)
    filled = family_cls.with_defaults(asdict(config))
    presets = tuple(getattr(family_cls, "preset_names", ()))  # the default first
    resolved: dict[str, Any] = {"preset": None}  # None: a family without presets (RL)
    if "preset" in family_cls.flags:
        resolved["preset"] = config.preset or (presets[0] if presets else filled.get("preset"))
    resolved.update({k: filled.get(k) for k in ("ways", "shots") if k in family_cls.flags})
    resolved.update(meta_batch=family.meta_batch, inner_steps=learner.inner_steps,
                    learner_options=_plain(_learner_options(family)))
    record = dict(zip(RECORD_KEYS, (resolved, __version__, runs.source_commit())))
    return {**cfg, **record}


def _learner_options(family: TaskFamily) -> dict[str, Any] | None:
    """The options the family builds its learner with (`learner_options_for`); an RL family's
    learner is built from its resolved settings (and a rollout sampler) instead."""
    try:
        return family.learner_options_for(family.config)
    except (AttributeError, ValueError):  # a family without options-only learners
        settings = getattr(family, "settings", None)
        return asdict(settings) if dataclasses.is_dataclass(settings) else None


def _plain(value: Any) -> Any:
    """An option as JSON data; an object such as the likelihood as its type and scalar settings
    (a log-scale one also as its value: GaussianLikelihood's sigma)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.nn.Module):
        out: dict[str, Any] = {"type": type(value).__name__}
        for name, t in itertools.chain(value.named_parameters(), value.named_buffers()):
            if t.numel() != 1:
                continue
            x = float(t.detach())
            if name.startswith("log_"):  # as given: its exp, to the tensor's precision
                out[name[len("log_"):]] = float(f"{math.exp(x):.{7 if t.dtype == torch.float32 else 15}g}")
            else:
                out[name] = x
        learned = [name for name, _ in value.named_parameters()]
        return {**out, "learned": learned} if learned else out
    if isinstance(value, type):
        return value.__name__
    if dataclasses.is_dataclass(value):
        return _plain(asdict(value))
    return repr(value)


def _remove_eval_outputs(out: Path, family: type[TaskFamily] | TaskFamily) -> None:
    """Remove the plots a meta-test of `family` wrote into `out` (its `eval_outputs`): they belong
    to a run that is replaced, or that now trains further (`gemext eval` writes them again)."""
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
        _set_rng_state(ckpt["rng"], family, learner)
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
        (out / "config.json").write_text(json.dumps(_run_record(config, family, learner), indent=2, default=str))
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
                          "rng": _rng_state(family, learner), "skipped": skipped, "wall_s": wall()}, ckpt_path)

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


# ------------------------------------------------------------------ evaluation
def _read_config(run: Path) -> RunConfig:
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} is not a gemext run folder (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    return RunConfig(**{k: v for k, v in cfg.items() if k not in RECORD_KEYS})  # the settings alone


def load_run(run_dir: str | Path, data_root: str | None = None, eval_split: str | None = None
             ) -> tuple[RunConfig, TaskFamily, MetaLearner, dict]:
    """(config, family, learner, checkpoint) of a trained run, with the checkpoint's meta-parameters;
    `data_root` replaces the data folder recorded at training time, `eval_split` the split its
    meta-test draws from. Close the family when done."""
    run = Path(run_dir)
    config = _read_config(run)
    if data_root is not None:
        config.data_root = str(Path(data_root).resolve())
    if eval_split is not None:
        config.eval_split = eval_split
    ckpt = load_checkpoint(run / "checkpoint.pt", config)
    family = open_family(config)
    try:
        learner = family.build_learner()
        learner.load_state_dict(ckpt["learner"])
    except BaseException:
        family.close()
        raise
    return config, family, learner, ckpt


def evaluate(run_dir: str | Path, tasks: int | None = None, steps: int | None = None, plots: bool = True,
             data_root: str | None = None, progress: bool | None = None,
             predict_samples: int | None = None, split: str | None = None) -> dict:
    """Meta-test a trained run on fixed-seed fresh tasks; returns the metrics and adds them to
    metrics.json, with plots (a folder that cannot be written costs a warning, not the results).
    `predict_samples` replaces the learner's number of posterior samples of the predictive; `split`
    ("test" or "validation") the run's eval_split (metrics.json says which one its figures are)."""
    run = Path(run_dir)
    config, family, learner, ckpt = load_run(run, data_root, split)
    with family:
        if predict_samples is not None:
            if "predict_samples" not in algorithms.option_names(config.algo, family.domain):
                raise ValueError(f"predict_samples: {config.algo} does not sample its predictions")
            learner.predict_samples = predict_samples
        result = family.evaluate(learner, tasks, steps, run, plots, progress)
    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update({"task": config.task, "algo": config.algo, "seed": config.seed,
                    "iterations": ckpt["iteration"], "wall_s": ckpt["wall_s"], "eval_split": config.eval_split,
                    **result})
    if "predict_samples" in algorithms.option_names(config.algo, family.domain):
        metrics["predict_samples"] = learner.predict_samples
    with runs.best_effort(f"{path}"):
        path.write_text(json.dumps(metrics, indent=2))
    return metrics
