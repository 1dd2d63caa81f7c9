"""Sinusoid studies. Every run is a real run folder (gemext.train.train), trained in a fresh
process and meta-tested there on the same fixed-seed fresh tasks; the tables give meta-test MSE
after 0, 1, 2, 5, 10 inner steps (± 95% CI), NLL, 90%-interval coverage, seconds per
meta-iteration and, where the prior std σ₀ is learned, its spread over the weights.

The catalogue (default): every algorithm meta-trained on the `finn`, `bmaml` and `bmaml-100`
presets with the same number of meta-iterations; per run also the peak-RSS increase of its training
process (`resource.getrusage` peak minus the RSS before training). A second part measures peak
memory and time per meta-iteration against the inner steps with `gemext.bench_memory` (fresh
process per point, each algorithm with `gemext train`'s options). Outputs in --out: results.csv,
results.md (tables), mse_vs_steps.png (paper Fig. 2a style: one panel per preset, one line per
algorithm), memory/memory.csv + memory.png, runs/<preset>/<algo>/ run folders.

    python benchmarks/sinusoid_study.py --out study            # full
    python benchmarks/sinusoid_study.py --quick --out /tmp/q   # minutes on 2 cores
    python benchmarks/sinusoid_study.py --merge a,b --out ab   # one table/plot from parallel studies

`sweep`: a grid of learner options on a preset (the measurements behind SINUSOID_DEFAULTS); every
grid point and seed a run from --base updated with the point; results.csv / results.md.

    python benchmarks/sinusoid_study.py sweep --out sweep --iterations 1000 \\
        --grid '{"sigma0": [0.05, 0.1], "sigma": [0.05, 0.1]}'

`long`: one long run, meta-tested at milestones: trained to the first, meta-tested, then resumed
(the one allowed change of a run is a longer --iterations) to the next, so every milestone sees
the same trajectory; the stability check of a learned σ₀ and the long-budget comparison on a
preset. One CSV per run (OUT/<preset>-<algo>[-mlr<lr>]-s<seed>.csv); --table prints earlier ones.

    python benchmarks/sinusoid_study.py long --out long --algo gem-bml+ --preset bmaml \\
        --milestones 1000,3000,10000,20000
    python benchmarks/sinusoid_study.py long --table long/bmaml-gem-bml+-s0.csv,long/bmaml-maml-s0.csv
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import time
from pathlib import Path

from common import STEPS, fresh_process, fresh_processes, plot_mse_vs_steps, run_worker, write_csv

PRESETS = ("finn", "bmaml", "bmaml-100")
BAYESIAN = ("gem-bml", "gem-bml+", "abml", "pmaml-elbo", "kl-chaser", "bmaml")


# ----------------------------------------------------------------------------- one run (worker)
def sigma0_stats(run: Path) -> dict:
    """Quantiles (5, 50, 95%), min and max of the learned prior std σ₀ over the weights ({} without a prior)."""
    import torch

    from gemext.train import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoint.pt")
    rho0 = [v.reshape(-1) for k, v in ckpt["learner"].items() if ".rho0." in k or k.endswith("rho0")]
    if not rho0:
        return {}
    s0 = torch.cat(rho0).double().exp()
    q = torch.quantile(s0, torch.tensor([0.05, 0.5, 0.95], dtype=s0.dtype))
    return {"sigma0_p05": float(q[0]), "sigma0_median": float(q[1]), "sigma0_p95": float(q[2]),
            "sigma0_min": float(s0.min()), "sigma0_max": float(s0.max())}


def worker(spec: dict) -> dict:
    """Train (or, with spec["resume"], continue) one run in this fresh process, meta-test it, measure it."""
    import torch

    from gemext.bench_memory import current_rss_bytes, peak_rss_bytes
    from gemext.train import RunConfig, evaluate, train

    torch.set_num_threads(spec.get("threads", 1))
    it, resume = spec["iterations"], spec.get("resume", False)
    cfg = RunConfig(task="sinusoid", algo=spec["algo"], preset=spec["preset"], iterations=it, seed=spec["seed"],
                    out=spec["out"], log_every=spec.get("log_every", max(1, it // 20)),
                    checkpoint_every=spec.get("checkpoint_every", it), eval_tasks=spec["eval_tasks"],
                    eval_steps=max(STEPS), algo_options=spec.get("options", {}), meta_lr=spec.get("meta_lr", 1e-3))
    base = current_rss_bytes()
    t0 = time.perf_counter()
    train(cfg, resume=resume, progress=False, overwrite=not resume)
    train_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    metrics = evaluate(cfg.out, tasks=spec["eval_tasks"], steps=max(STEPS), plots=False)
    return {"train_s": train_s, "s_per_iter": metrics["wall_s"] / it, "peak_rss_mb": max(peak - base, 0) / 2**20,
            **sigma0_stats(Path(cfg.out)), **metrics}


# ----------------------------------------------------------------------------- the catalogue
def _fmt(m: float, c: float | None = None) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}" if c is None else f"{m:.3f} ± {c:.3f}"


def write_tables(rows: list[dict], out: Path, header: str) -> None:
    cols = ["preset", "algo", "iterations"] + [f"mse_{k}" for k in STEPS] + \
        [f"mse_ci95_{k}" for k in STEPS] + ["nll", "coverage90", "s_per_iter", "peak_rss_mb", "error"]
    write_csv(out / "results.csv", [
        {**r, **({f"mse_{k}": r["mse_by_step"][k] for k in STEPS} if "mse_by_step" in r else {}),
         **({f"mse_ci95_{k}": r["mse_ci95_by_step"][k] for k in STEPS} if "mse_by_step" in r else {})}
        for r in rows], cols)
    lines = [header, ""]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines += [f"### `{preset}`", "",
                  "| algorithm | " + " | ".join(f"MSE@{k}" for k in STEPS) + " | NLL | cov90 | s/iter | peak RSS MB |",
                  "|---|" + "---|" * (len(STEPS) + 4)]
        for r in (r for r in rows if r["preset"] == preset):
            if "mse_by_step" not in r:
                lines.append(f"| {r['algo']} | failed: {r.get('error', '?')} |")
                continue
            bayes = r["algo"] in BAYESIAN
            mses = " | ".join(_fmt(r["mse_by_step"][k], r["mse_ci95_by_step"][k]) for k in STEPS)
            lines.append(f"| {r['algo']} | {mses} | {_fmt(r.get('nll')) if bayes else '(' + _fmt(r.get('nll')) + ')'}"
                         f" | {_fmt(r.get('coverage90')) if bayes else '(' + _fmt(r.get('coverage90')) + ')'}"
                         f" | {r['s_per_iter']:.3f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    plot_mse_vs_steps({f"sinusoid `{preset}`": [(r["algo"], r["mse_by_step"], r["mse_ci95_by_step"]) for r in rows
                                                if r["preset"] == preset and "mse_by_step" in r]
                       for preset in dict.fromkeys(r["preset"] for r in rows)}, path, "inner steps at meta-test")


def catalogue(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for d in args.merge.split(",") for r in json.loads((Path(d) / "results.json").read_text())]
        write_tables(rows, out, f"Sinusoid study, merged from {args.merge}: {rows[0].get('iterations')} "
                     "meta-iterations per run. NLL/coverage in parentheses: delta-posterior learners.")
        plot(rows, out / "mse_vs_steps.png")
        return
    from gemext import algorithms, bench_memory

    algos = args.algos.split(",") if args.algos else algorithms.names()
    presets = args.presets.split(",") if args.presets else (["finn"] if args.quick else list(PRESETS))
    iterations = args.iterations or (10 if args.quick else 500)
    eval_tasks = args.eval_tasks or (100 if args.quick else 600)
    mem_steps = args.memory_steps if args.memory_steps is not None else ("1,5" if args.quick else "1,10,50")
    specs = [{"algo": algo, "preset": preset, "iterations": iterations, "seed": args.seed, "eval_tasks": eval_tasks,
              "threads": args.threads, "out": str(out / "runs" / preset / algo)}
             for preset in presets for algo in algos]
    rows: list[dict] = []
    t_all = time.perf_counter()
    for spec, res in fresh_processes(__file__, specs, env={"OMP_NUM_THREADS": str(args.threads)}):
        rows.append({"preset": spec["preset"], "algo": spec["algo"], **res})
        if "mse_by_step" in res:
            print(f"{spec['preset']:>9} {spec['algo']:>10}: MSE@0 {res['mse_by_step'][0]:.3f} "
                  f"@10 {res['mse_by_step'][10]:.3f} {res['s_per_iter']:.3f} s/iter", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    header = (f"Sinusoid study: {iterations} meta-iterations per run, meta-batch per preset, meta-Adam 1e-3, "
              f"seed {args.seed}, {eval_tasks} meta-test tasks (95% CI), torch threads {args.threads}. "
              "NLL/coverage in parentheses: delta-posterior learners (predictive std = likelihood noise only).")
    write_tables(rows, out, header)
    plot(rows, out / "mse_vs_steps.png")
    if mem_steps:
        bench_memory.run("sinusoid", args.memory_algos.split(","), [int(k) for k in mem_steps.split(",")],
                         out / "memory", repeats=2 if args.quick else 3, timeout_s=900, threads=args.threads)
    print(f"done in {time.perf_counter() - t_all:.0f} s; tables in {out / 'results.md'}")


# ----------------------------------------------------------------------------- sweep
def sweep(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="sinusoid_study.py sweep", description="a grid of learner options")
    ap.add_argument("--out", required=True)
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--preset", default="finn")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--eval-tasks", type=int, default=500)
    ap.add_argument("--grid", default="{}", help="JSON: option -> list of values (GEMLearner options)")
    ap.add_argument("--base", default='{"inner": {"optimizer": "von"}, "lr": 1.0, "learn_sigma": true}',
                    help="JSON options every grid point starts from")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = json.loads(args.grid)
    keys = list(grid)
    specs = []
    for values in itertools.product(*[grid[k] for k in keys]):
        name = "-".join(f"{k}{v}" for k, v in zip(keys, values)) or "base"
        options = {**json.loads(args.base), **dict(zip(keys, values))}
        for seed in [int(s) for s in args.seeds.split(",")]:
            specs.append({"algo": args.algo, "preset": args.preset, "iterations": args.iterations, "seed": seed,
                          "eval_tasks": args.eval_tasks, "options": options, "name": name,
                          "out": str(out / "runs" / f"{name}-s{seed}")})
    rows = []
    for spec, res in fresh_processes(__file__, specs, jobs=args.jobs, env={"OMP_NUM_THREADS": "1"}):
        if "error" in res:
            print(f"{spec['name']} seed {spec['seed']}: failed ({res['error']})", flush=True)
            rows.append({"name": spec["name"], "seed": spec["seed"], "failed": True})
            continue
        row = {"name": spec["name"], "seed": spec["seed"], "options": json.dumps(spec["options"]),
               **{f"mse@{k}": round(res["mse_by_step"][k], 4) for k in STEPS},
               "nll": round(res["nll"], 4), "coverage90": round(res["coverage90"], 3),
               "s_per_iter": round(res["s_per_iter"], 4),
               **{k: round(v, 4) for k, v in res.items() if k.startswith("sigma0_")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_csv(out / "results.csv", rows)
    show = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "options"]
    lines = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in show) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- long runs
def long_table(paths: list[Path]) -> str:
    """Markdown rows (algorithm, iterations, MSE by step ± CI at 10, NLL, coverage, train s, σ₀)."""
    lines = ["| algo | iterations | " + " | ".join(f"MSE@{k}" for k in STEPS) + " | NLL | cov90 | train s | "
             "σ₀ median (p05–p95; min) |", "|---|---:|" + "---:|" * (len(STEPS) + 3) + "---|"]
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                s0 = (f"{float(r['sigma0_median']):.4f} ({float(r['sigma0_p05']):.4f}–{float(r['sigma0_p95']):.4f}; "
                      f"{float(r['sigma0_min']):.4f})" if r.get("sigma0_median") else "—")
                mse = " | ".join(f"{float(r[f'mse@{k}']):.3f}" for k in STEPS[:-1])
                lines.append(f"| {r['algo']} | {r['iterations']} | {mse} | {float(r['mse@10']):.3f} ± "
                             f"{float(r['ci95@10']):.3f} | {float(r['nll']):.3f} | {float(r['coverage90']):.3f} | "
                             f"{float(r['train_s']):.0f} | {s0} |")
    return "\n".join(lines)


def long(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="sinusoid_study.py long", description="one run meta-tested at milestones")
    ap.add_argument("--out", default=None, help="output folder (required unless --table)")
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--preset", default="finn")
    ap.add_argument("--milestones", default="1000,3000,10000,20000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--options", default="{}", help="algorithm options as JSON (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--meta-lr", type=float, default=1e-3, help="meta-optimizer learning rate")
    ap.add_argument("--table", default=None, help="comma-separated CSVs of earlier runs: print one markdown "
                                                 "table of them and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(long_table([Path(f) for f in args.table.split(",")]))
        return
    if args.out is None:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.meta_lr == 1e-3 else f"-mlr{args.meta_lr:g}"
    run = out / f"{args.preset}-{args.algo}{tag}-s{args.seed}"
    rows: list[dict] = []
    t_train = 0.0
    for i, it in enumerate(sorted(int(m) for m in args.milestones.split(","))):
        res = fresh_process(__file__, {
            "algo": args.algo, "preset": args.preset, "iterations": it, "seed": args.seed, "out": str(run),
            "log_every": max(1, it // 50), "checkpoint_every": min(1000, it), "eval_tasks": args.eval_tasks,
            "options": json.loads(args.options), "meta_lr": args.meta_lr, "threads": args.threads, "resume": i > 0})
        if "error" in res:
            raise SystemExit(f"{run.name} to {it} iterations failed: {res['error']}")
        t_train += res["train_s"]
        rows.append({"preset": args.preset, "algo": args.algo, "seed": args.seed, "iterations": it,
                     **{f"mse@{k}": res["mse_by_step"][k] for k in STEPS},
                     **{f"ci95@{k}": res["mse_ci95_by_step"][k] for k in STEPS if "mse_ci95_by_step" in res},
                     "nll": res.get("nll"), "coverage90": res.get("coverage90"), "train_s": round(t_train, 1),
                     **{k: v for k, v in res.items() if k.startswith("sigma0_")}})
        print(json.dumps(rows[-1]), flush=True)
        write_csv(out / f"{run.name}.csv", rows)


if __name__ == "__main__" and not run_worker(worker):
    modes = {"sweep": sweep, "long": long}
    mode = modes.get(sys.argv[1]) if len(sys.argv) > 1 else None
    (mode or catalogue)(sys.argv[2:] if mode else sys.argv[1:])
