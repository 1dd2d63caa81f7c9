"""Meta-training and meta-testing loops: run folders with config.json, log.csv, an atomic
checkpoint.pt (with every RNG state, so --resume continues bit-for-bit) and metrics.json."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, algorithms, distributed, runs
from .metrics import gaussian_nll, interval_coverage, mean_ci95
from .progress import Progress

EVAL_SEED = 20201206  # meta-test tasks are the same for every run and seed
REGRESSION_TASKS = ("sinusoid",)
VISION_TASKS = ("omniglot", "tinyimagenet", "miniimagenet")
RL_TASKS = ("nav2d", "halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir")
TASKS = REGRESSION_TASKS + VISION_TASKS + RL_TASKS


@dataclass
class RunConfig:
    task: str
    algo: str
    preset: str | None = None
    iterations: int = 1000
    inner_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/run"
    meta_lr: float = 1e-3
    meta_batch: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    eval_tasks: int = 600
    eval_steps: int | None = None
    ways: int | None = None
    shots: int | None = None
    data_root: str | None = None
    algo_options: dict[str, Any] = field(default_factory=dict)
    max_bad_steps: int = 10  # consecutive non-finite meta-steps before the run stops

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.algo not in algorithms.names():
            raise ValueError(f"unknown algorithm {self.algo!r}; available: {', '.join(algorithms.names())}")
        for name in ("iterations", "log_every", "checkpoint_every", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inner_steps is not None and self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        # a setting the task family does not read is an error, not silently ignored
        unused = {"sinusoid": ("ways", "shots", "data_root")}.get(self.task, ())
        if self.task in RL_TASKS:
            unused = ("preset", "ways", "shots", "data_root")
            if self.device != "cpu":
                raise ValueError(f"--device {self.device} does not apply to {self.task}: RL meta-training runs on the "
                                 "CPU (rollouts dominate)")
        given = [f"--{name.replace('_', '-')}" for name in unused if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {self.task}; "
                             "remove " + ("it" if len(given) == 1 else "them"))


# ------------------------------------------------------------------ per-task defaults
# Sinusoid hyper-parameters, chosen on `finn` with 1000-iteration sweeps (benchmarks/von_sweep.py;
# table in benchmarks/RESULTS.md, "GEM with the von inner VI").
# GEM: the variational online Newton VI ("von": Gauss-Newton mean step coupled through the data,
# σ² = 1/(β/σ₀² + GGN diagonal), backtracking), β = 1 (exact VI). σ₀ is only the prior precision
# now, not a step size, and with 10 points and ~1.7k weights it also sets how far the posterior
# mean can move: MSE after 10 steps at 1000 iterations, fixed σ₀ / likelihood noise s: 0.02/0.05
# 0.53, 0.03/0.05 0.58, 0.01/0.05 0.66, 0.02/0.1 0.69, 0.05/0.1 1.12 (MAML 0.39). The `finn` data
# are noise-free, so a sharp s = 0.05 helps. A freely learned σ₀ drifts upward under both GEM
# statistics (median 0.02 → 0.035–0.044 in 1000 iterations) and degrades (0.78–1.09), so σ₀ is
# learned within sigma0_range = "shrink", (σ₀/10, σ₀): it may only become more certain than its start
# (0.55 at 1000 iterations).
_VON = dict(optimizer="von")  # lr 1: a full (backtracked) Gauss-Newton step
SINUSOID_DEFAULTS: dict[str, dict[str, Any]] = {
    "gem-bml": dict(sigma0=0.02, beta=1.0, inner=_VON, inner_steps=5, sigma=0.05, sigma0_range="shrink"),
    "gem-bml+": dict(sigma0=0.02, beta=1.0, inner=_VON, inner_steps=5, sigma=0.05, sigma0_range="shrink"),
    # Reptile: plain SGD on the summed NLL, same effective step as above, C₀ = 1 (ĝ = μ − μ₀)
    "reptile": dict(sigma0=1.0, lr=5e-4, inner=dict(optimizer="sgd"), inner_steps=5, sigma=0.5),
    # Catalogue learners (benchmarks/sinusoid_study.py; one setting each, chosen by rule, not swept):
    # MAML family: 5 SGD steps of 5e-4 on the summed NLL (σ = 0.5), i.e. Finn et al.'s 0.01 on the
    # mean squared error of 10 points. iMAML: λ = 1/(K·lr) = 400 (the proximal problem whose
    # solution K steps of size lr approximate), 5 CG steps.
    "maml": dict(lr=5e-4, inner_steps=5, sigma=0.5),
    "fomaml": dict(lr=5e-4, inner_steps=5, sigma=0.5),
    "imaml": dict(lr=5e-4, inner_steps=5, reg=400.0, cg_steps=5, sigma=0.5),
    # VI-based learners that back-propagate through their VI (sgd, ngvi or von): natural-gradient VI,
    # lr 0.2, ρ step 0.01, β = 0.1, σ₀ = 0.05, 5 steps (von is offered, not yet measured for them).
    "abml": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                 inner_steps=5, sigma=0.5),
    "pmaml-elbo": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                       inner_steps=5, sigma=0.5),
    "kl-chaser": dict(sigma0=0.05, lr=0.2, beta=0.1, inner=dict(optimizer="ngvi", optimizer_kwargs={"rho_lr": 0.01}),
                      inner_steps=5, sigma=0.5),
    # BMAML: 5 particles, SVGD step 5e-4 (MAML's), leader 5 more steps on support ∪ query.
    "bmaml": dict(particles=5, lr=5e-4, inner_steps=5, sigma=0.5),
}


def build(config: RunConfig):
    """(task family, learner, meta-batch size) for a run configuration."""
    if config.task == "sinusoid":
        from .tasks.sinusoid import SinusoidTasks
        from .vi import GaussianLikelihood

        family = SinusoidTasks(config.preset or "finn")
        opts = dict(SINUSOID_DEFAULTS.get(config.algo, {}))
        opts.update(config.algo_options)
        if config.inner_steps is not None:
            opts["inner_steps"] = config.inner_steps
        sigma = opts.pop("sigma", None)
        if sigma is not None:
            opts.setdefault("likelihood", GaussianLikelihood(sigma))
        learner = algorithms.create(config.algo, family.make_model(), seed=config.seed, **opts)
        return family, learner.to(config.device), config.meta_batch or family.config.meta_batch
    if config.task in VISION_TASKS:
        from .tasks import vision_train
        return vision_train.build(config)
    raise ValueError(f"task {config.task!r} is trained by its own loop (gemext.tasks.rl)")


# ------------------------------------------------------------------ checkpoints
def load_checkpoint(path: Path, config: RunConfig | None = None) -> dict:
    """Load and check a checkpoint (SHA-256 verified, weights_only; see gemext.runs); refuse a
    corrupt or incompatible one with a clear message. When <name>.prev (the checkpoint before it)
    is good, the message says so and how to resume from it: a deliberate choice over a silent
    fallback, which would hide a failing disk and quietly redo up to two checkpoint intervals."""
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
        for key in ("task", "algo", "preset", "seed", "ways", "shots"):
            if saved.get(key) != getattr(config, key):
                raise ValueError(f"checkpoint {path} was written for {key}={saved.get(key)!r}, "
                                 f"but this run has {key}={getattr(config, key)!r}")
    return ckpt


def _effective(cfg: dict) -> dict:
    """A run's settings with the flags that are shorthands for algorithm options folded into
    algo_options (--inner-steps always, --meta-batch for RL), as the builders fold them: two
    spellings of one run compare equal."""
    cfg = dict(cfg)
    opts = dict(cfg.get("algo_options") or {})
    folded = ("inner_steps", "meta_batch") if cfg.get("task") in RL_TASKS else ("inner_steps",)
    for key in folded:
        if cfg.get(key) is not None:
            opts[key] = cfg[key]
        cfg[key] = None
    cfg["algo_options"] = opts
    return cfg


def check_resume(ckpt: dict, config: RunConfig, path: Path) -> None:
    """A resumed run must be the run in the checkpoint: only a longer --iterations (and settings
    that do not touch the trajectory, gemext.runs.RESUME_MAY_CHANGE) may differ."""
    changes = runs.config_changes(_effective(ckpt["config"]), _effective(asdict(config)))
    if changes:
        raise ValueError(f"cannot resume {path}: the run was trained with other settings ({'; '.join(changes)}). "
                         "Only --iterations may grow; start a new run (another --out) to change the others")
    if config.iterations < ckpt["iteration"]:
        raise ValueError(f"cannot resume {path}: its checkpoint is at iteration {ckpt['iteration']}, beyond "
                         f"--iterations {config.iterations}")


def _rng_state(task_gen: torch.Generator, learner) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # plain data: checkpoints load weights_only
    return {"task": task_gen.get_state(), "learner": learner.generator.get_state(),
            "torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "python": random.getstate()}


def _set_rng_state(state: dict, task_gen: torch.Generator, learner) -> None:
    task_gen.set_state(state["task"])
    learner.generator.set_state(state["learner"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# ------------------------------------------------------------------ training
class _StopFlag:
    """SIGTERM/SIGINT: finish the current iteration, write a checkpoint, then stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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


def _clamp_prior_rho(learner) -> None:
    """Keep the prior's ρ₀ in its sigma0_range and the safe range of gemext.vi (RHO_MIN, RHO_MAX)."""
    prior = getattr(learner, "prior", None)
    if prior is not None:
        prior.clamp_()


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


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def train(config: RunConfig, resume: bool = False, progress: bool | None = None,
          on_iteration: Callable[[int], None] | None = None, overwrite: bool = False) -> Path:
    """Meta-train according to `config`; returns the run folder. The folder must not hold another
    run unless `resume` (continue it: same settings, a longer `iterations` allowed) or `overwrite`
    (replace it); it is locked while training (gemext.runs). A relative `config.data_root` is
    resolved here, so the run can be evaluated from any directory. Under torchrun the meta-batch
    is sharded across ranks (gemext.distributed); rank 0 writes every file."""
    config.validate()
    if config.data_root is not None:
        config.data_root = str(Path(config.data_root).resolve())
    if config.task in RL_TASKS:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"{config.task}: RL meta-training runs in a single process; start it without torchrun")
        from .tasks.rl.meta import train_rl
        return train_rl(config, resume=resume, progress=progress, overwrite=overwrite, on_iteration=on_iteration)
    dctx = distributed.setup(config.device)
    clean = False  # whether every rank is expected at the closing barrier
    locks: list[runs.RunLock] = []
    try:
        # rank 0 owns the folder; its refusal reaches every rank
        dctx.from_main(lambda: locks.append(runs.open_folder(Path(config.out), resume, overwrite)), "run folder")
        run = _train(config, dctx, resume, progress, on_iteration)
        clean = True
        return run
    except Interrupted:
        clean = True  # every rank stopped after the same agreed iteration
        raise
    finally:
        for lock in locks:
            lock.release()
        dctx.close(clean)


def _train(config: RunConfig, dctx: distributed.DistContext, resume: bool, progress: bool | None,
           on_iteration: Callable[[int], None] | None) -> Path:
    out = Path(config.out)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    family, learner, meta_batch = build(config)
    _check_memory(learner, -(-meta_batch // dctx.world_size))  # each rank holds its shard
    opt = torch.optim.Adam(learner.parameters(), lr=config.meta_lr)
    task_gen = torch.Generator().manual_seed(config.seed)
    start, wall_before, skipped, bad_run, last_error = 0, 0.0, 0, 0, ""
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
        _set_rng_state(ckpt["rng"], task_gen, learner)
        start, wall_before, skipped = ckpt["iteration"], ckpt["wall_s"], ckpt.get("skipped", 0)
    if dctx.is_main:
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    log = runs.RunLog(out / "log.csv", start if resume else None, enabled=dctx.is_main)
    t0 = time.perf_counter()

    def save(iteration: int) -> None:
        if not dctx.is_main:
            return
        runs.atomic_save({"gemext": __version__, "config": asdict(config), "iteration": iteration,
                     "learner": learner.state_dict(), "optimizer": opt.state_dict(),
                     "rng": _rng_state(task_gen, learner), "skipped": skipped,
                     "wall_s": wall_before + time.perf_counter() - t0}, ckpt_path)

    bar = Progress(range(start, config.iterations), config.iterations, f"{config.algo} {config.task}", start,
                   every=config.log_every, enabled=progress if dctx.is_main else False)
    with _StopFlag() as stop:
        for it in bar:
            batch = family.sample(meta_batch, task_gen, "train")  # whole batch on every rank
            lo, hi = dctx.shard(meta_batch)
            opt.zero_grad(set_to_none=True)
            failed = False
            try:
                with dctx.sharded(lo, meta_batch):
                    stats = learner.meta_backward(batch if dctx.world_size == 1 else batch[lo:hi])
            except FloatingPointError as exc:  # an inner loop diverged: a bad step, not a crash
                stats, last_error, failed = {"nll_support": float("nan")}, str(exc), True
            # all ranks decide on the same all-reduced values: skip or step, stop or go on together
            stats, bad_ranks, stop_now = dctx.step(learner.parameters(), stats, hi - lo, meta_batch, failed,
                                                   stop.signum is not None, it + 1)
            if not bad_ranks and all(math.isfinite(v) for v in stats.values()) and _finite_grads(learner.parameters()):
                opt.step()
                _clamp_prior_rho(learner)
                bad_run = 0
            else:  # skip the step: never write NaN into the meta-parameters
                skipped += 1
                bad_run += 1
                if bad_run >= config.max_bad_steps:
                    save(it)
                    raise FloatingPointError(
                        f"{bad_run} consecutive meta-iterations produced non-finite losses or gradients "
                        f"(last at iteration {it + 1}{'; ' + last_error if last_error else ''}); stopping. "
                        "Lower the inner/meta learning rate or "
                        f"raise sigma0. The last good checkpoint is {ckpt_path}")
            done = it + 1
            if done % config.log_every == 0 or done == config.iterations:
                row = {"iteration": done, "wall_s": round(wall_before + time.perf_counter() - t0, 3),
                       "skipped": skipped, **{k: round(v, 6) for k, v in stats.items()}}
                log.add(row)
                bar.set_postfix(stats)
            if on_iteration is not None:
                on_iteration(done)
            if not dctx.enabled:  # distributed ranks act on the agreed flag only, never on a local one
                stop_now = stop.signum is not None
            if done % config.checkpoint_every == 0 or done == config.iterations or stop_now:
                save(done)
            if stop_now:
                raise Interrupted(stop.signum or signal.SIGTERM, done)
    if not dctx.is_main:
        return out
    # replaced, not merged: an earlier meta-test belongs to fewer iterations
    (out / "metrics.json").write_text(json.dumps(
        {"task": config.task, "algo": config.algo, "seed": config.seed, "iterations": config.iterations,
         "wall_s": wall_before + time.perf_counter() - t0, "skipped_steps": skipped}, indent=2))
    return out


# ------------------------------------------------------------------ evaluation
def load_run(run_dir: str | Path, data_root: str | None = None):
    """(config, family, learner, checkpoint) of a trained run, with the checkpoint's meta-parameters;
    `data_root` replaces the data folder recorded at training time."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} is not a gemext run folder (no config.json)")
    config = RunConfig(**json.loads(cfg_path.read_text()))
    if data_root is not None:
        config.data_root = str(Path(data_root).resolve())
    ckpt = load_checkpoint(run / "checkpoint.pt", config)
    family, learner, _ = build(config)
    learner.load_state_dict(ckpt["learner"])
    return config, family, learner, ckpt


def evaluate(run_dir: str | Path, tasks: int | None = None, steps: int | None = None,
             batch: int = 100, plots: bool = True, data_root: str | None = None,
             progress: bool | None = None) -> dict:
    """Meta-test a trained run on fixed-seed fresh tasks; returns the metrics and adds them to
    metrics.json, with plots (a folder that cannot be written costs a warning, not the results)."""
    run = Path(run_dir)
    config = RunConfig(**json.loads((run / "config.json").read_text())) if (run / "config.json").exists() else None
    if config is not None and config.task in RL_TASKS:
        from .tasks.rl.meta import eval_rl
        return eval_rl(run, tasks=tasks, steps=steps)
    config, family, learner, ckpt = load_run(run, data_root)
    n = tasks or config.eval_tasks
    if n < 1:
        raise ValueError(f"--tasks must be >= 1, got {n}")
    if config.task in VISION_TASKS:
        from .tasks import vision_train
        result = vision_train.evaluate(config, family, learner, n, steps, run, plots, progress=progress)
    else:
        result = _evaluate_regression(config, family, learner, n, steps, batch, run, plots, progress)
    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update({"task": config.task, "algo": config.algo, "seed": config.seed,
                    "iterations": ckpt["iteration"], "wall_s": ckpt["wall_s"], **result})
    with runs.best_effort(f"{path}"):
        path.write_text(json.dumps(metrics, indent=2))
    return metrics


def _evaluate_regression(config, family, learner, n, steps, batch, run: Path, plots: bool,
                         progress: bool | None = None) -> dict:
    K = steps if steps is not None else (config.eval_steps or max(learner.inner.steps, 10))
    gen = torch.Generator().manual_seed(EVAL_SEED)
    mse = [[] for _ in range(K + 1)]
    nll, cover = [], []
    first = None
    starts = range(0, n, batch)
    for start in Progress(starts, len(starts), f"meta-test {config.algo} ({n} tasks)", every=1, enabled=progress):
        b = family.sample(min(batch, n - start), gen, "test").to(learner.device)
        path = learner.adapt_path(b, K)
        for k, pred in enumerate(path):
            out = pred.predict(b.x_query)
            mean, std = out if isinstance(out, tuple) else (out, None)
            mse[k].append(((mean - b.y_query) ** 2).mean(dim=(1, 2)).cpu())
        if std is not None:
            nll.append(gaussian_nll(mean, std, b.y_query).mean(dim=(1, 2)).cpu())
            cover.append(float(interval_coverage(mean, std, b.y_query)) * mean.shape[0])
        if first is None:
            first = (b, path[-1], path[0])
    by_step = [mean_ci95(torch.cat(m)) for m in mse]
    result = {"mse_by_step": [m for m, _ in by_step], "mse_ci95_by_step": [c for _, c in by_step],
              "eval_tasks": n, "eval_steps": K}
    if nll:
        result["nll"], result["nll_ci95"] = mean_ci95(torch.cat(nll))
        result["coverage90"] = sum(cover) / n
    if plots:
        from .plots import plot_regression
        with runs.best_effort(f"the plots into {run}"):
            plot_regression(run, config, family, result, first)
    return result
