"""A run as its files: the family and learner a run's settings open, its record (config.json),
the checkpoint (loaded, checked against the run that resumes it, with every RNG state) and a
trained run read back for its meta-test (`load_run`, `evaluate`). The loop that writes them is
gemext.train, which re-exports the public names."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, algorithms, families, runs
from .algorithms import MetaLearner
from .config import RECORD_KEYS, RunConfig
from .families import TaskFamily

__all__ = ["open_family", "build", "load_checkpoint", "check_resume", "rng_state", "set_rng_state", "run_record",
           "load_run", "evaluate"]


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


def rng_state(family: TaskFamily, learner: MetaLearner) -> dict:
    """Every random stream of a run (tasks, the learner's noise, torch, numpy, Python): what a
    resumed run needs to continue bit-for-bit."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # plain data: checkpoints load weights_only
    return {"family": family.rng_state(), "learner": learner.generator.get_state(),
            "torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "python": random.getstate()}


def set_rng_state(state: dict, family: TaskFamily, learner: MetaLearner) -> None:
    family.set_rng_state(state["family"])
    learner.generator.set_state(state["learner"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# ------------------------------------------------------------------ config.json
def run_record(config: RunConfig, family: TaskFamily, learner: MetaLearner) -> dict[str, Any]:
    """config.json: the run's settings as given (what --resume and `gemext eval` rebuild the run
    from), and, under RECORD_KEYS, what they resolved to (the preset used, the family's default
    when none was given; meta-batch; inner steps; the learner's options after the family's
    defaults and the preset's were merged in) and the gemext that ran it (its version, and its git
    commit when it runs from a checkout)."""
    cfg = asdict(config)
    family_cls = type(family)
    filled = family_cls.with_defaults(asdict(config))
    presets = tuple(getattr(family_cls, "preset_names", ()))  # the default first
    resolved: dict[str, Any] = {"preset": None}  # None: a family without presets (RL)
    if "preset" in family_cls.flags:
        resolved["preset"] = config.preset or (presets[0] if presets else filled.get("preset"))
    resolved.update({k: filled.get(k) for k in ("ways", "shots") if k in family_cls.flags})
    resolved.update(meta_batch=family.meta_batch, inner_steps=learner.inner_steps,
                    learner_options=_plain(family.learner_options_for(family.config)))
    record = dict(zip(RECORD_KEYS, (resolved, __version__, runs.source_commit())))
    return {**cfg, **record}


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


# ------------------------------------------------------------------ meta-test
def _read_config(run: Path) -> RunConfig:
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} is not a gemext run folder (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("algo_options"), dict):  # RL runs of gemext ≤ 0.1.0 kept a retired pseudo-option
        cfg["algo_options"] = {k: v for k, v in cfg["algo_options"].items() if k != "resolved"}
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
