"""Sweep of the GEM learners' settings with the von inner VI on a sinusoid preset: prior std σ₀,
likelihood noise s, β, inner steps, learned or fixed σ₀ — the measurements behind SINUSOID_DEFAULTS.

Each grid point is a real run folder (gemext.train.train), meta-tested on the same fixed-seed fresh
tasks; results.csv / results.md list MSE after 0, 1, 2, 5, 10 steps, NLL, 90% coverage, seconds per
meta-iteration and the learned σ₀'s median/min/max.

    python benchmarks/von_sweep.py --out sweep --iterations 1000 \\
        --grid '{"sigma0": [0.05, 0.1], "sigma": [0.05, 0.1], "beta": [1.0]}'
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = (0, 1, 2, 5, 10)


def worker(spec: dict) -> dict:
    import torch

    from gemext.train import RunConfig, evaluate, load_checkpoint, train
    torch.set_num_threads(1)
    cfg = RunConfig(task="sinusoid", algo=spec["algo"], preset=spec["preset"], iterations=spec["iterations"],
                    seed=spec["seed"], out=spec["out"], log_every=max(1, spec["iterations"] // 20),
                    checkpoint_every=spec["iterations"], eval_tasks=spec["eval_tasks"], eval_steps=max(STEPS),
                    algo_options=spec["options"])
    train(cfg, progress=False, overwrite=True)
    metrics = evaluate(cfg.out, tasks=spec["eval_tasks"], steps=max(STEPS), plots=False)
    ckpt = load_checkpoint(Path(cfg.out) / "checkpoint.pt")
    rho0 = torch.cat([v.reshape(-1) for k, v in ckpt["learner"].items() if "rho0" in k])
    s0 = rho0.exp()
    return {"s_per_iter": metrics["wall_s"] / spec["iterations"], "mse_by_step": metrics["mse_by_step"],
            "nll": metrics["nll"], "coverage90": metrics["coverage90"],
            "sigma0_median": float(s0.median()), "sigma0_min": float(s0.min()), "sigma0_max": float(s0.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--preset", default="finn")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--eval-tasks", type=int, default=500)
    ap.add_argument("--grid", default="{}", help="JSON: option -> list of values (GEMLearner options)")
    ap.add_argument("--base", default='{"inner": {"optimizer": "von"}, "lr": 1.0, "learn_sigma": true}',
                    help="JSON options every grid point starts from")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = json.loads(args.grid)
    keys = list(grid)
    specs = []
    for values in itertools.product(*[grid[k] for k in keys]):
        for seed in [int(s) for s in args.seeds.split(",")]:
            opts = {**json.loads(args.base), **dict(zip(keys, values))}
            name = "-".join(f"{k}{v}" for k, v in zip(keys, values)) or "base"
            specs.append({"algo": args.algo, "preset": args.preset, "iterations": args.iterations, "seed": seed,
                          "eval_tasks": args.eval_tasks, "options": opts, "name": name,
                          "out": str(out / "runs" / f"{name}-s{seed}")})
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = list(specs)
    running: list[tuple[dict, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            spec = pending.pop(0)
            running.append((spec, subprocess.Popen([sys.executable, __file__, "--out", args.out, "--worker",
                                                    json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)))
        spec, proc = running.pop(0)
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"{spec['name']} seed {spec['seed']}: failed (exit {proc.returncode})", flush=True)
            rows.append({"name": spec["name"], "seed": spec["seed"], "failed": True})
            continue
        res = json.loads(stdout.strip().splitlines()[-1])
        row = {"name": spec["name"], "seed": spec["seed"], "options": json.dumps(spec["options"]),
               **{f"mse@{k}": round(res["mse_by_step"][k], 4) for k in STEPS},
               "nll": round(res["nll"], 4), "coverage90": round(res["coverage90"], 3),
               "s_per_iter": round(res["s_per_iter"], 4),
               **{k: round(res[k], 4) for k in ("sigma0_median", "sigma0_min", "sigma0_max")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    show = [c for c in cols if c != "options"]
    lines = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in show) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
