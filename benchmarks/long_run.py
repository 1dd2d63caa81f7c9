"""One long sinusoid meta-training run, meta-tested at milestones: MSE after 0/1/2/5/10 steps, NLL,
90% coverage and the learned prior std σ₀ (median, 5th/95th percentile, min, max) at each milestone.

It is the stability check of a learned σ₀ (does MSE@10 at 20000 iterations stay at or below the
3000-iteration figure?) and the long-budget comparison on a preset, in one run per algorithm: the run
is trained to the first milestone, meta-tested, then resumed (the one allowed change of a run is a
longer --iterations) to the next, so every milestone sees the same trajectory.

    python benchmarks/long_run.py --out long --algo gem-bml+ --preset bmaml \\
        --milestones 1000,3000,10000,20000
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

STEPS = (0, 1, 2, 5, 10)


def sigma0_stats(run: Path) -> dict:
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


def table(paths: list[Path]) -> str:
    """Markdown rows (algorithm, iterations, MSE by step ± CI at 10, NLL, coverage, train s, σ₀)."""
    lines = ["| algo | iterations | MSE@0 | MSE@1 | MSE@2 | MSE@5 | MSE@10 | NLL | cov90 | train s | "
             "σ₀ median (p05–p95; min) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
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


def main() -> None:
    import torch

    from gemext.train import RunConfig, evaluate, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
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
    args = ap.parse_args()
    if args.table:
        print(table([Path(f) for f in args.table.split(",")]))
        return
    torch.set_num_threads(args.threads)
    milestones = sorted(int(m) for m in args.milestones.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.meta_lr == 1e-3 else f"-mlr{args.meta_lr:g}"
    run = out / f"{args.preset}-{args.algo}{tag}-s{args.seed}"
    rows: list[dict] = []
    t_train = 0.0
    for i, it in enumerate(milestones):
        cfg = RunConfig(task="sinusoid", algo=args.algo, preset=args.preset, iterations=it, seed=args.seed,
                        out=str(run), log_every=max(1, it // 50), checkpoint_every=min(1000, it),
                        eval_tasks=args.eval_tasks, eval_steps=max(STEPS), algo_options=json.loads(args.options),
                        meta_lr=args.meta_lr)
        t0 = time.perf_counter()
        train(cfg, resume=i > 0, progress=False, overwrite=i == 0)
        t_train += time.perf_counter() - t0
        m = evaluate(run, tasks=args.eval_tasks, steps=max(STEPS), plots=False)
        row = {"preset": args.preset, "algo": args.algo, "seed": args.seed, "iterations": it,
               **{f"mse@{k}": m["mse_by_step"][k] for k in STEPS},
               **{f"ci95@{k}": m["mse_ci95_by_step"][k] for k in STEPS if "mse_ci95_by_step" in m},
               "nll": m.get("nll"), "coverage90": m.get("coverage90"), "train_s": round(t_train, 1),
               **sigma0_stats(run)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / f"{run.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
