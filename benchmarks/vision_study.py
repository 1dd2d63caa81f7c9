"""Few-shot vision study: meta-train named algorithms on one vision task at an equal budget, then
meta-test each on the same fixed episodes (accuracy ± 95% CI, ECE, MCE, NLL, Brier).

The budget is either wall-clock minutes of meta-training per run (`--minutes`, measured around
`gemext.train.train`, i.e. including its ~1 s data load; the run stops after the iteration that
crosses it, through train's own SIGTERM path, so a checkpoint is written) or a fixed number of
meta-iterations (`--iterations`). Runs go one after another in this process, with
`--threads` intra-op threads (default 1), so on a shared machine they see similar conditions.

    python benchmarks/vision_study.py --task omniglot --preset 5w1s --algos gem-bml+,maml,fomaml \\
        --minutes 12 --eval-tasks 600 --data-root /work/shared/data --out benchmarks/out/vision-omniglot

Variants of one algorithm (tuning) are named runs: `--run LABEL=ALGO` or `--run 'LABEL=ALGO:{json options}'`
(the options are `gemext train --options`). Writes into --out: one run folder per label (config,
log.csv, checkpoint, metrics.json, reliability.png), results.csv, results.md and reliability.png
(every run's reliability diagram side by side).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from common import command_line, machine, parse_run, write_csv

COLUMNS = ["label", "algo", "options", "iterations", "train_min", "s_per_iter", "accuracy", "ci95", "ece", "mce",
           "nll", "brier", "eval_tasks", "eval_steps", "skipped_steps"]


def train_one(args, label: str, algo: str, options: dict) -> dict:
    from gemext.train import Interrupted, RunConfig, evaluate, train

    run = Path(args.out) / label
    if args.skip_done and (run / "metrics.json").exists():
        m = json.loads((run / "metrics.json").read_text())
        if "accuracy" in m and m.get("eval_tasks") == args.eval_tasks:
            print(f"[{label}] done before: reusing {run / 'metrics.json'}", flush=True)
            return m
    budget_s = args.minutes * 60 if args.minutes else None
    config = RunConfig(task=args.task, algo=algo, preset=args.preset, iterations=args.iterations or args.max_iterations,
                       seed=args.seed, device=args.device, out=str(run), meta_lr=args.meta_lr,
                       meta_batch=args.meta_batch, log_every=10, checkpoint_every=100, eval_tasks=args.eval_tasks,
                       data_root=args.data_root, algo_options=options)
    t0 = time.perf_counter()
    stop_sent = False

    def on_iteration(done: int) -> None:
        nonlocal stop_sent
        if budget_s is not None and not stop_sent and time.perf_counter() - t0 >= budget_s:
            stop_sent = True  # train() finishes this iteration, checkpoints and raises Interrupted
            signal.raise_signal(signal.SIGTERM)

    print(f"[{label}] {algo} {json.dumps(options)}: training "
          + (f"for {args.minutes} min" if budget_s else f"{args.iterations} iterations"), flush=True)
    try:
        train(config, progress=False, on_iteration=on_iteration, overwrite=True)
    except Interrupted as exc:
        if not stop_sent:
            raise
        print(f"[{label}] budget reached after {exc.iteration} iterations", flush=True)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    m = evaluate(run, tasks=args.eval_tasks)
    print(f"[{label}] {m['iterations']} iterations in {train_s / 60:.1f} min; accuracy {100 * m['accuracy']:.2f} "
          f"± {100 * m['ci95']:.2f}% ECE {m['ece']:.4f} MCE {m['mce']:.4f} NLL {m['nll']:.4f} "
          f"(eval {time.perf_counter() - t1:.0f} s)", flush=True)
    return m


def plot_all(out: Path, labels: list[str]) -> None:
    from gemext.plots import new_figure

    data = [(lb, json.loads((out / lb / "reliability.json").read_text())) for lb in labels
            if (out / lb / "reliability.json").exists()]
    if not data:
        return
    fig = new_figure((3.6 * len(data), 3.6))
    axes = fig.subplots(1, len(data), squeeze=False)
    for ax, (lb, d) in zip(axes[0], data):
        edges = d["edges"]
        width = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], d["accuracy"], width=width, align="edge", edgecolor="k", label="accuracy")
        gap = [c - a if n else 0.0 for c, a, n in zip(d["confidence"], d["accuracy"], d["count"])]
        ax.bar(edges[:-1], gap, bottom=d["accuracy"], width=width, align="edge", color="tab:red", alpha=0.3,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        m = json.loads((out / lb / "metrics.json").read_text())
        ax.set(title=f"{lb}\nacc {100 * m['accuracy']:.1f}%, ECE {m['ece']:.3f}", xlabel="confidence",
               xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)


def write_tables(args, out: Path, rows: list[dict], argv: list[str]) -> None:
    write_csv(out / "results.csv", rows, COLUMNS)
    import torch

    budget = f"{args.minutes} min of meta-training wall clock per run" if args.minutes else \
        f"{args.iterations} meta-iterations per run"
    lines = [f"{args.task} {args.preset}, equal budget: {budget}; device {args.device}, {args.threads} thread(s), "
             f"torch {torch.__version__}, {machine()}; meta-test on {args.eval_tasks} fixed episodes.",
             "", f"Command: `{command_line(__file__, argv)}`", "",
             "| run | algo | options | iterations | train min | s/iter | accuracy (%) | ECE | MCE | NLL | Brier |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['algo']} | `{r['options']}` | {r['iterations']} | {r['train_min']:.1f} | "
                     f"{r['s_per_iter']:.2f} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {r['ece']:.4f} | "
                     f"{r['mce']:.4f} | {r['nll']:.4f} | {r['brier']:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="omniglot", choices=["omniglot", "tinyimagenet", "miniimagenet"])
    p.add_argument("--preset", default="5w1s")
    p.add_argument("--algos", default="", help="comma-separated algorithm names (default options)")
    p.add_argument("--run", action="append", default=[], help="LABEL=ALGO[:JSON options]; repeatable")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="meta-training wall-clock budget per run")
    budget.add_argument("--iterations", type=int, help="meta-iterations per run")
    p.add_argument("--max-iterations", type=int, default=1_000_000, help="cap with --minutes")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--skip-done", action="store_true", help="reuse runs whose metrics.json has the same eval size")
    args = p.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0 or args.iterations is not None and args.iterations < 1:
        p.error("the budget must be positive")
    runs = [(a, a, {}) for a in args.algos.split(",") if a.strip()] + [parse_run(s) for s in args.run]
    if not runs:
        p.error("nothing to run: give --algos and/or --run")
    if len({lb for lb, _, _ in runs}) != len(runs):
        p.error("run labels must be distinct")

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, algo, options in runs:
        m = train_one(args, label, algo, options)
        rows.append({"label": label, "algo": algo, "options": json.dumps(options, sort_keys=True) if options else "",
                     "iterations": m["iterations"], "train_min": m["wall_s"] / 60,
                     "s_per_iter": m["wall_s"] / max(m["iterations"], 1),
                     **{k: m.get(k, "") for k in ("accuracy", "ci95", "ece", "mce", "nll", "brier", "eval_tasks",
                                                  "eval_steps", "skipped_steps")}})
        write_tables(args, out, rows, argv)  # after every run: partial results survive
        plot_all(out, [r["label"] for r in rows])
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
