"""Sinusoid study: every algorithm of the catalogue meta-trained on the `finn`, `bmaml` and `bmaml-100`
presets with the same number of meta-iterations (gemext.train.train / evaluate, so every run is a
real run folder), then meta-tested on the same fixed-seed fresh tasks.

Per (preset, algorithm) it reports meta-test MSE after 0, 1, 2, 5, 10 inner steps with 95% CI, NLL
and 90%-interval coverage of the predictive distribution, seconds per meta-iteration (training wall
time / iterations) and the peak-RSS increase of the training process (each run is a fresh
subprocess; `resource.getrusage` peak minus the RSS before training). A second part measures peak
memory and time per meta-iteration against the inner steps with `gemext.bench_memory` (fresh
process per point, each algorithm with its SINUSOID_DEFAULTS).

Outputs in --out: results.csv, results.md (tables), mse_vs_steps.png (paper Fig. 2a style: one panel
per preset, one line per algorithm), memory/memory.csv + memory.png, runs/<preset>/<algo>/ run folders.

    python benchmarks/sinusoid_study.py --out study            # full
    python benchmarks/sinusoid_study.py --quick --out /tmp/q   # minutes on 2 cores
    python benchmarks/sinusoid_study.py --merge a,b --out ab   # one table/plot from parallel studies
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ("finn", "bmaml", "bmaml-100")
REPORT_STEPS = (0, 1, 2, 5, 10)
BAYESIAN = ("gem-bml", "gem-bml+", "abml", "pmaml-elbo", "kl-chaser", "bmaml")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    """One run in this (fresh) process: train, evaluate, measure."""
    import resource

    import torch

    from gemext.train import RunConfig, evaluate, train

    torch.set_num_threads(spec["threads"])
    cfg = RunConfig(task="sinusoid", algo=spec["algo"], preset=spec["preset"], iterations=spec["iterations"],
                    seed=spec["seed"], out=spec["out"], log_every=max(1, spec["iterations"] // 20),
                    checkpoint_every=spec["iterations"], eval_tasks=spec["eval_tasks"], eval_steps=max(REPORT_STEPS))
    base = _rss_bytes()
    t0 = time.perf_counter()
    train(cfg, progress=False, overwrite=True)
    train_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = evaluate(cfg.out, tasks=spec["eval_tasks"], steps=max(REPORT_STEPS), plots=False)
    return {"train_s": train_s, "s_per_iter": metrics["wall_s"] / spec["iterations"],
            "peak_rss_mb": max(peak - base, 0) / 2**20, **metrics}


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  FAILED {spec['preset']}/{spec['algo']}: {proc.stderr[-1500:]}", file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(m: float, c: float | None = None) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}" if c is None else f"{m:.3f} ± {c:.3f}"


def write_tables(rows: list[dict], out: Path, header: str) -> None:
    cols = ["preset", "algo", "iterations"] + [f"mse_{k}" for k in REPORT_STEPS] + \
        [f"mse_ci95_{k}" for k in REPORT_STEPS] + ["nll", "coverage90", "s_per_iter", "peak_rss_mb", "error"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            rec = {"preset": r["preset"], "algo": r["algo"], "iterations": r.get("iterations"),
                   "nll": r.get("nll"), "coverage90": r.get("coverage90"), "s_per_iter": r.get("s_per_iter"),
                   "peak_rss_mb": r.get("peak_rss_mb"), "error": r.get("error", "")}
            for k in REPORT_STEPS:
                if "mse_by_step" in r:
                    rec[f"mse_{k}"] = r["mse_by_step"][k]
                    rec[f"mse_ci95_{k}"] = r["mse_ci95_by_step"][k]
            w.writerow(rec)
    lines = [header, ""]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines += [f"### `{preset}`", "",
                  "| algorithm | " + " | ".join(f"MSE@{k}" for k in REPORT_STEPS) +
                  " | NLL | cov90 | s/iter | peak RSS MB |",
                  "|---|" + "---|" * (len(REPORT_STEPS) + 4)]
        for r in (r for r in rows if r["preset"] == preset):
            if "mse_by_step" not in r:
                lines.append(f"| {r['algo']} | failed: {r.get('error', '?')} |")
                continue
            bayes = r["algo"] in BAYESIAN
            mses = " | ".join(_fmt(r["mse_by_step"][k], r["mse_ci95_by_step"][k]) for k in REPORT_STEPS)
            lines.append(f"| {r['algo']} | {mses} | {_fmt(r.get('nll')) if bayes else '(' + _fmt(r.get('nll')) + ')'}"
                         f" | {_fmt(r.get('coverage90')) if bayes else '(' + _fmt(r.get('coverage90')) + ')'}"
                         f" | {r['s_per_iter']:.3f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(4.6 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for r in rows:
            if r["preset"] != preset or "mse_by_step" not in r:
                continue
            ks = list(range(len(r["mse_by_step"])))
            ax.errorbar(ks, r["mse_by_step"], yerr=r["mse_ci95_by_step"], marker="o", ms=3, capsize=2, label=r["algo"])
        ax.set(title=f"sinusoid `{preset}`", xlabel="inner steps at meta-test", ylabel="meta-test MSE", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_part(algos: list[str], steps: list[int], out: Path, repeats: int) -> list[dict]:
    """Peak memory / time per meta-iteration vs inner steps, each algorithm with its sinusoid defaults."""
    from gemext import bench_memory
    from gemext.families.sinusoid import SINUSOID_DEFAULTS

    rows: list[dict] = []
    for algo in algos:  # the workers inherit the thread count (OMP_NUM_THREADS set by main)
        opts = {k: v for k, v in SINUSOID_DEFAULTS.get(algo, {}).items() if k not in ("sigma", "inner_steps")}
        csv_path = bench_memory.run("sinusoid", [algo], steps, out / algo, repeats=repeats, options=opts,
                                    timeout_s=900)
        with open(csv_path) as fh:
            rows += list(csv.DictReader(fh))
    with open(out / "memory.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(bench_memory.COLUMNS))
        w.writeheader()
        w.writerows(rows)
    bench_memory.plot([{**r, "inner_steps": int(r["inner_steps"]), "peak_mem_mb": float(r["peak_mem_mb"]),
                        "time_per_iter_s": float(r["time_per_iter_s"])} for r in rows], out / "memory.png",
                      "sinusoid finn MLP, meta-batch 25, cpu")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="sinusoid_study")
    ap.add_argument("--quick", action="store_true",
                    help="finn only, 10 iterations, 100 test tasks, memory at 1,5 steps")
    ap.add_argument("--iterations", type=int, default=None, help="meta-iterations per run (default 500; quick 10)")
    ap.add_argument("--algos", default=None, help="comma-separated (default: every registered algorithm)")
    ap.add_argument("--presets", default=None, help=f"comma-separated (default {','.join(PRESETS)})")
    ap.add_argument("--eval-tasks", type=int, default=None, help="meta-test tasks (default 600; quick 100)")
    ap.add_argument("--memory-steps", default=None, help="inner steps for the memory part (default 1,10,50; '' skips)")
    ap.add_argument("--memory-algos", default="gem-bml+,reptile,maml,fomaml,imaml,abml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", default=None, help="comma-separated study folders: one table and plot of their "
                    "results.json in --out (studies run in parallel as separate processes)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.merge:
        rows = [r for d in args.merge.split(",") for r in json.loads((Path(d) / "results.json").read_text())]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_tables(rows, out, f"Sinusoid study, merged from {args.merge}: {rows[0].get('iterations')} "
                     "meta-iterations per run. NLL/coverage in parentheses: delta-posterior learners.")
        plot(rows, out / "mse_vs_steps.png")
        return
    from gemext import algorithms

    algos = args.algos.split(",") if args.algos else algorithms.names()
    presets = args.presets.split(",") if args.presets else (["finn"] if args.quick else list(PRESETS))
    iterations = args.iterations or (10 if args.quick else 500)
    eval_tasks = args.eval_tasks or (100 if args.quick else 600)
    mem_steps = args.memory_steps if args.memory_steps is not None else ("1,5" if args.quick else "1,10,50")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # bench_memory workers: no oversubscription
    rows: list[dict] = []
    t_all = time.perf_counter()
    for preset in presets:
        for algo in algos:
            spec = {"algo": algo, "preset": preset, "iterations": iterations, "seed": args.seed,
                    "eval_tasks": eval_tasks, "threads": args.threads, "out": str(out / "runs" / preset / algo)}
            t0 = time.perf_counter()
            res = _run(spec)
            rows.append({"preset": preset, "algo": algo, **res})
            if "mse_by_step" in res:
                print(f"{preset:>9} {algo:>10}: MSE@0 {res['mse_by_step'][0]:.3f} @10 {res['mse_by_step'][10]:.3f} "
                      f"{res['s_per_iter']:.3f} s/iter  ({time.perf_counter() - t0:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    header = (f"Sinusoid study: {iterations} meta-iterations per run, meta-batch per preset, meta-Adam 1e-3, "
              f"seed {args.seed}, {eval_tasks} meta-test tasks (95% CI), torch threads {args.threads}. "
              "NLL/coverage in parentheses: delta-posterior learners (predictive std = likelihood noise only).")
    write_tables(rows, out, header)
    plot(rows, out / "mse_vs_steps.png")
    if mem_steps:
        memory_part(args.memory_algos.split(","), [int(k) for k in mem_steps.split(",")], out / "memory",
                    repeats=2 if args.quick else 3)
    print(f"done in {time.perf_counter() - t_all:.0f} s; tables in {out / 'results.md'}")


if __name__ == "__main__":
    main()
