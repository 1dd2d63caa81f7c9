"""Time per meta-iteration and peak memory against the number of inner steps.

Every (algorithm, inner steps) point runs in a fresh Python process, so the allocator state and
peak counters of one point cannot leak into the next. Inside that process the baseline is taken
after imports, model, learner and the (synthetic, 5-way 1-shot by default) meta-batch exist; the
figure reported is what the meta-iterations add on top:
- CPU: peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS at the baseline;
- CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` at the baseline.

Peers: `higher-maml` is second-order MAML written with the `higher` package (one task at a time,
as its examples do); it is skipped with a printed reason when `higher` does not import.
`plain-maml` is the same algorithm as a plain per-task PyTorch loop (functional_call and
autograd.grad with create_graph), what a user without a meta-learning library writes.
`"presets": true` in a point's spec (what `run` and `gemext bench memory` set unless told
`presets=False` / `--no-presets`) builds gemext learners with the options `gemext train` gives them
on the task (`preset_options`), as they are trained; without it, with the bare class defaults.

Command line (what `gemext bench memory` calls): `run(task, algos, inner_steps, out_dir, device)`.
The pieces of one point, for scripts that measure their own variants (benchmarks/): `make_point`
(learner and meta-batch of a spec), `time_and_memory` (the timed loop and peak above the baseline),
`run_point` (a spec in a fresh process), `peer_unavailable`, `current_rss_bytes`, `peak_rss_bytes`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("sinusoid", "omniglot", "miniimagenet", "tinyimagenet")
PEERS = ("higher-maml", "plain-maml")
COLUMNS = ("algo", "inner_steps", "peak_mem_mb", "time_per_iter_s")
_MAML_LR = 0.01  # inner SGD step of the higher peer (Finn et al.: sinusoid and miniImageNet)


# ----------------------------------------------------------------------------- in the worker
def current_rss_bytes() -> int:
    """Resident set size now (not the peak): /proc on Linux, else the peak so far as a bound."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _make_problem(spec: dict):
    """(model, meta-batch Task, likelihood or None) for the task's 5-way 1-shot shapes."""
    import torch

    from .tasks import Task

    g = torch.Generator().manual_seed(0)
    T = spec["meta_batch"]
    if spec["task"] == "sinusoid":
        from .tasks.sinusoid import SinusoidTasks

        family = SinusoidTasks("finn")
        return family.make_model(), family.sample(T, g), None
    from .tasks.vision import VISION_TASKS, make_backbone
    from .vi import CategoricalLikelihood

    cfg = VISION_TASKS[spec["task"]]
    n, k, q = spec["ways"], spec["shots"], spec["query"]
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    labels = lambda per: torch.arange(n).repeat_interleave(per).expand(T, -1).clone()  # noqa: E731
    batch = Task(torch.rand(T, n * k, *shape, generator=g), labels(k), torch.rand(T, n * q, *shape, generator=g),
                 labels(q))
    return make_backbone(spec["task"], n), batch, CategoricalLikelihood()


class _HigherMAML:
    """Second-order MAML with `higher`: k SGD steps per task, the query loss back-propagated
    through them into the initial weights (accumulated task by task)."""

    def __init__(self, model, inner_steps: int, classification: bool):
        import higher  # noqa: F401  (fail here, not mid-run)
        import torch

        self.model, self.steps = model, inner_steps
        self.loss = torch.nn.functional.cross_entropy if classification else torch.nn.functional.mse_loss
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=_MAML_LR)

    def parameters(self):
        return self.model.parameters()

    def meta_backward(self, tasks) -> dict[str, float]:
        import higher

        T, total = len(tasks), 0.0
        for t in range(T):
            with higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(self.loss(fmodel(tasks.x_support[t]), tasks.y_support[t]))
                query_loss = self.loss(fmodel(tasks.x_query[t]), tasks.y_query[t]) / T
                query_loss.backward()
                total += float(query_loss.detach())
        return {"loss_query": total}


class _PlainMAML(_HigherMAML):
    """Second-order MAML as a plain per-task loop: functional_call and autograd.grad(create_graph)."""

    def __init__(self, model, inner_steps: int, classification: bool):
        import torch

        self.model, self.steps = model, inner_steps
        self.loss = torch.nn.functional.cross_entropy if classification else torch.nn.functional.mse_loss

    def meta_backward(self, tasks) -> dict[str, float]:
        import torch
        from torch.func import functional_call

        names = [n for n, _ in self.model.named_parameters()]
        params = list(self.model.parameters())
        T, total = len(tasks), 0.0
        for t in range(T):
            fast = params
            for _ in range(self.steps):
                out = functional_call(self.model, dict(zip(names, fast)), (tasks.x_support[t],))
                grads = torch.autograd.grad(self.loss(out, tasks.y_support[t]), fast, create_graph=True)
                fast = [w - _MAML_LR * g for w, g in zip(fast, grads)]
            out = functional_call(self.model, dict(zip(names, fast)), (tasks.x_query[t],))
            query_loss = self.loss(out, tasks.y_query[t]) / T
            query_loss.backward()
            total += float(query_loss.detach())
        return {"loss_query": total}


def preset_options(task: str, algo: str, inner_steps: int,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options `gemext train` gives `algo` on `task` at its default preset (objects included, e.g.
    the likelihood), with `options` merged in as `--options` would be: `gemext.presets`."""
    from .families.presets import presets

    return presets(task, algo, inner_steps=inner_steps, options=options)


def _make_learner(spec: dict, model, likelihood):
    algo, k = spec["algo"], spec["inner_steps"]
    if algo in ("higher-maml", "plain-maml"):
        return (_HigherMAML if algo == "higher-maml" else _PlainMAML)(model, k, likelihood is not None)
    from . import algorithms

    if spec.get("presets"):
        options = preset_options(spec["task"], algo, k, spec.get("options"))
    else:
        options = {"inner_steps": k, **(spec.get("options") or {})}
        if likelihood is not None:
            options.setdefault("likelihood", likelihood)
    return algorithms.create(algo, model, **options)


def make_point(spec: dict):
    """(learner, meta-batch) of one point, on spec["device"]: the task's model and synthetic
    meta-batch (spec: task, algo, inner_steps, device, meta_batch, ways, shots, query), the learner
    with `gemext train`'s options when spec["presets"], updated with spec["options"]."""
    import torch

    device = torch.device(spec["device"])
    model, batch, likelihood = _make_problem(spec)
    learner = _make_learner(spec, model.to(device), likelihood)
    if hasattr(learner, "to"):
        learner = learner.to(device)
    return learner, batch.to(device)


def time_and_memory(learner, batch, device: str, repeats: int) -> dict[str, float]:
    """Median seconds per meta-iteration (Adam on the learner's parameters) over `repeats` after a
    warm-up, and the peak memory the iterations add above what exists now (the warm-up's included):
    peak RSS on CPU, `max_memory_allocated` on CUDA."""
    import torch

    device = torch.device(device)
    opt = torch.optim.Adam(list(learner.parameters()), lr=1e-3)
    cuda = device.type == "cuda"

    def iteration() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = current_rss_bytes()
    iteration()  # warm-up (allocator pools, lazy init): its memory counts, its time does not
    times = sorted(iteration() for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    return {"peak_mem_mb": max(peak - base, 0) / 2**20, "time_per_iter_s": times[len(times) // 2]}


def measure(spec: dict) -> dict[str, float]:
    """Run one point in this process (call it in a fresh one): spec holds task, algo, inner_steps,
    device, repeats, meta_batch, ways, shots, query, optional learner options and
    keep_freed_memory (glibc keeps freed memory, as `gemext train` does; default False) and
    threads (intra-op threads; default torch's)."""
    if spec.get("keep_freed_memory"):
        from .allocator import keep_freed_memory
        keep_freed_memory()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    learner, batch = make_point(spec)
    return time_and_memory(learner, batch, spec["device"], spec["repeats"])


# ----------------------------------------------------------------------------- in the parent
def peer_unavailable(algo: str) -> str | None:
    """Why a peer cannot run (None when it can)."""
    if algo not in PEERS:
        return f"unknown peer {algo!r} (available: {', '.join(PEERS)})"
    if algo != "higher-maml":
        return None
    try:
        import higher  # noqa: F401
    except Exception as exc:  # any import failure (missing, or broken against this torch)
        return f"the `higher` package does not import ({type(exc).__name__}: {exc})"
    return None


def run_point(spec: dict, timeout_s: float = 1800.0) -> dict[str, float]:
    """`measure(spec)` in a fresh process; NaN figures when it runs out of memory or time (a real
    outcome at large step counts), an error for any other failure."""
    cmd = [sys.executable, "-m", "gemext.bench_memory", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"bench memory: {spec['algo']} with {spec['inner_steps']} inner steps exceeded {timeout_s:.0f} s",
              file=sys.stderr)
        return {"peak_mem_mb": math.nan, "time_per_iter_s": math.nan}
    oom = proc.returncode == -9 or "out of memory" in proc.stderr.lower()
    if proc.returncode != 0 and oom:  # a real result at large step counts: record it as missing
        print(f"bench memory: {spec['algo']} with {spec['inner_steps']} inner steps ran out of memory",
              file=sys.stderr)
        return {"peak_mem_mb": math.nan, "time_per_iter_s": math.nan}
    if proc.returncode != 0:
        raise RuntimeError(f"bench memory: {spec['algo']} with {spec['inner_steps']} inner steps failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Peak memory and time per meta-iteration against inner steps, one line per algorithm."""
    from .plots import new_figure

    fig = new_figure((9, 3.6))
    axes = fig.subplots(1, 2)
    for algo in dict.fromkeys(r["algo"] for r in rows):
        pts = [r for r in rows if r["algo"] == algo]
        steps = [r["inner_steps"] for r in pts]
        axes[0].plot(steps, [r["peak_mem_mb"] for r in pts], "o-", label=algo)
        axes[1].plot(steps, [r["time_per_iter_s"] for r in pts], "o-", label=algo)
    axes[0].set(xlabel="inner steps", ylabel="peak memory above baseline (MB)")
    axes[1].set(xlabel="inner steps", ylabel="time per meta-iteration (s)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(task: str, algos: Sequence[str], inner_steps: Sequence[int], out_dir: str | Path,
        device: str = "cpu", repeats: int = 3, meta_batch: int | None = None, ways: int = 5, shots: int = 1,
        query: int = 15, options: dict[str, Any] | None = None, timeout_s: float = 1800.0,
        presets: bool = True, threads: int | None = None) -> Path:
    """Measure every (algorithm, inner steps) point in a fresh process; write DIR/memory.csv
    (columns algo,inner_steps,peak_mem_mb,time_per_iter_s) and DIR/memory.png; return the csv path.

    Shapes: sinusoid = the finn MLP with meta-batch 25; omniglot = 28×28×1, Conv4(hidden=64);
    miniimagenet / tinyimagenet = 84×84×3, Conv4(hidden=32), meta-batch 4 (synthetic images).
    `options` (not the peers') update every learner's start, as `gemext train --options` does: with
    `presets` (the default) the start is the options `gemext train` gives it, so that the figures are
    those of the learners as trained (e.g. NGVI for GEM on vision, where the class default `von`
    takes a minute per Conv4 meta-iteration on a CPU); `presets=False` the class defaults.
    `threads`: intra-op threads of every measuring process (None: torch's default)."""
    from . import algorithms

    if task not in TASKS:
        raise ValueError(f"bench memory: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not algos:
        raise ValueError("bench memory: no algorithms given")
    if not inner_steps or any(int(k) < 1 for k in inner_steps):
        raise ValueError(f"bench memory: inner steps must be >= 1, got {list(inner_steps)}")
    if repeats < 1:
        raise ValueError(f"bench memory: repeats must be >= 1, got {repeats}")
    unknown = [a for a in algos if a not in algorithms.names() and a not in PEERS and not a.startswith("higher-")]
    if unknown:
        raise ValueError(f"bench memory: unknown algorithm(s) {', '.join(unknown)}; available: "
                         f"{', '.join(algorithms.names() + list(PEERS))}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("bench memory: device 'cuda' requested but torch sees no CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {"task": task, "device": device, "repeats": repeats, "ways": ways, "shots": shots, "query": query,
            "meta_batch": meta_batch or (25 if task == "sinusoid" else 4), "options": options or {},
            "presets": presets, "threads": threads}
    rows: list[dict] = []
    for algo in algos:
        reason = peer_unavailable(algo) if algo in PEERS or algo.startswith("higher-") else None
        if reason:
            print(f"bench memory: skipping {algo}: {reason}")
            continue
        for k in inner_steps:
            res = run_point({**base, "algo": algo, "inner_steps": int(k)}, timeout_s)
            rows.append({"algo": algo, "inner_steps": int(k), **res})
            print(f"{algo:>12} {int(k):>3} steps: {res['peak_mem_mb']:9.1f} MB  {res['time_per_iter_s']:.4f} s/iter")
    if not rows:
        raise ValueError("bench memory: nothing was measured (every algorithm was skipped)")
    csv_path = out / "memory.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r[c] for c in COLUMNS} for r in rows)
    os.replace(tmp, csv_path)
    plot(rows, out / "memory.png", f"{task}, {ways}-way {shots}-shot, meta-batch {base['meta_batch']}, {device}")
    return csv_path


if __name__ == "__main__":  # worker entry point: one point, its result as the last stdout line
    print(json.dumps(measure(json.loads(sys.argv[1]))))
