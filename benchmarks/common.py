"""What the benchmark scripts share (not shipped in the gemext wheel). The scripts run as
`python benchmarks/NAME.py ...`, which puts this folder on sys.path, and import it as `common`.

- `machine`, `commit`, `stamp`, `command_line`: what a table was measured on and how to rerun it;
- `interleaved`: time several callables in alternating order, so a machine whose speed drifts
  slows them alike and their ratios hold;
- `fresh_process`, `fresh_processes`, `run_worker`: one JSON spec per fresh Python process (its
  own peak RSS, allocator and thread state), the result the JSON of the worker's last stdout line;
- `family_learner`: a learner, its family and meta-batch as `gemext train` builds them;
- `STEPS`, `ci95`, `write_csv`, `plot_mse_vs_steps`, `parse_run`: tabulating and plotting runs.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = (0, 1, 2, 5, 10)  # the adaptation steps the sinusoid tables report MSE after
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95% Student-t quantiles by sample size


# ----------------------------------------------------------------------------- where and how
def machine(device: str = "cpu") -> str:
    """The GPU's name on CUDA, else 'CPU model (N logical CPUs)'."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    try:
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "")
    except OSError:  # not Linux
        name = ""
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def commit() -> str:
    """HEAD's short hash, with '+ uncommitted changes' when tracked files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def stamp(device: str = "cpu") -> str:
    """One line for a table's head: date, machine, torch and commit."""
    import torch

    return f"{datetime.date.today()}, {machine(device)}, torch {torch.__version__}, commit {commit()}"


def command_line(script: str, args: list[str]) -> str:
    """The command line that reruns `script` with `args`, from the repository root."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                before_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of every callable over `rounds` rounds of one call each, the order
    reversed every other round so that none always runs first or after the same neighbour; the
    `warmup` rounds before them are not counted. `before_round(i)` runs untimed ahead of round i (e.g. to draw its
    meta-batch; the warm-up rounds are i < warmup)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        if before_round is not None:
            before_round(i)
        for name in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- fresh processes
def fresh_process(script: str, spec: dict, env: dict[str, str] | None = None) -> dict:
    """The result of `python SCRIPT --worker SPEC` (`env` added to this process's environment), or
    {"error": its last stderr line} when it fails (its stderr's end is printed)."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        print(f"  FAILED {json.dumps(spec)}:\n{proc.stderr[-1500:]}", file=sys.stderr, flush=True)
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_processes(script: str, specs: list[dict], jobs: int = 1,
                    env: dict[str, str] | None = None) -> Iterator[tuple[dict, dict]]:
    """(spec, `fresh_process` result) for every spec, `jobs` processes at a time, in the specs'
    order, each as soon as it and those before it are done."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        yield from zip(specs, pool.map(lambda spec: fresh_process(script, spec, env), specs))


def run_worker(worker: Callable[[dict], dict]) -> bool:
    """In a process `fresh_processes` started: print worker(spec) as JSON and return True; else False."""
    if sys.argv[1:2] != ["--worker"]:
        return False
    print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    return True


# ----------------------------------------------------------------------------- learners
def family_learner(task: str, algo: str, **settings):
    """(family, learner, meta-batch) of `gemext train TASK --algo ALGO` with `settings` (RunConfig
    fields: preset, inner_steps, meta_batch, seed, algo_options for --options, ...): the family's
    own build_learner, so every option, the likelihood included, is what training uses."""
    from gemext.train import RunConfig, build

    return build(RunConfig(task=task, algo=algo, out="unused", **settings))


# ----------------------------------------------------------------------------- tables and plots
def ci95(values: list[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean (NaN for fewer than two values)."""
    n = len(values)
    return T95.get(n, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """rows as CSV; columns default to every key in the rows' order, missing cells empty."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot_mse_vs_steps(panels: dict[str, list[tuple[str, list[float], list[float]]]], path: Path,
                      xlabel: str = "gradient steps at meta-test", steps: list[int] | None = None) -> None:
    """Meta-test MSE ± 95% CI against the adaptation steps, one panel per title, one line per
    (label, mse, ci); `steps` are the x values (default 0, 1, ...)."""
    from gemext.plots import new_figure

    fig = new_figure((4.6 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, mse, ci in lines:
            ax.errorbar(steps or list(range(len(mse))), mse, yerr=[c if math.isfinite(c) else 0.0 for c in ci],
                        marker="o", ms=3, capsize=2, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel="meta-test MSE", yscale="log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_run(spec: str) -> tuple[str, str, dict]:
    """'LABEL=ALGO', 'LABEL=ALGO:{json options}' or plain 'ALGO' → (label, algo, options)."""
    label, _, rest = spec.partition("=")
    if not rest:
        label, rest = spec, spec
    algo, _, opts = rest.partition(":")
    try:
        options = json.loads(opts) if opts else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{spec!r}: options are not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"{spec!r}: options must be a JSON object")
    return label.strip(), algo.strip(), options
