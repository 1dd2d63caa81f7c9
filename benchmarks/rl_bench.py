"""Rollout-collector throughput: `python benchmarks/rl_bench.py [--tasks nav2d,halfcheetah-vel]`;
meta-RL comparison: `python benchmarks/rl_bench.py compare --algos maml,gem-bml+ --iterations 30`.
Run from the repository root with gemext installed (`pip install ".[rl]"`).

Prints environment steps per second (policy sampling included: the 2×100 Gaussian MLP) for
SyncVectorEnv and AsyncVectorEnv pools of several sizes, collecting `--episodes` full episodes
of one task per repeat (median over repeats, after one warm-up collection).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gemext.tasks.rl import RolloutCollector, sample_tasks
from gemext.train import RunConfig, evaluate, train


def throughput(task: str, mode: str, num_envs: int, episodes: int, repeats: int = 3) -> float:
    """Median env steps/s collecting `episodes` episodes with a fresh 2×100 policy."""
    with RolloutCollector(task, num_envs=num_envs, mode=mode, seed=0) as col:
        policy = col.make_policy()
        t = sample_tasks(task, 1, 0)[0]
        gen = torch.Generator().manual_seed(0)
        col.collect(policy, None, t, num_envs, gen)  # warm-up: worker start, first-call costs
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            batch = col.collect(policy, None, t, episodes, gen)
            rates.append(batch.num_steps / (time.perf_counter() - start))
    return statistics.median(rates)


def compare(argv: list[str]) -> None:
    """Train and meta-test one run per algorithm with the same budget; one figure for all."""
    # the one import that names an inner module (not part of the public gemext.train API)
    from gemext.families.rl import plot_return_comparison

    ap = argparse.ArgumentParser(prog="rl_bench.py compare")
    ap.add_argument("--task", default="nav2d")
    ap.add_argument("--algos", default="maml,gem-bml+,gem-bml,reptile")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--meta-lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", type=json.loads, default={})
    ap.add_argument("--out", default="benchmarks/out/rl")
    args = ap.parse_args(argv)
    runs = []
    for algo in args.algos.split(","):
        run = Path(args.out) / f"{args.task}-{algo}"
        train(RunConfig(task=args.task, algo=algo, iterations=args.iterations, seed=args.seed, out=str(run),
                        meta_lr=args.meta_lr, log_every=5, checkpoint_every=10, algo_options=args.options),
              progress=False, overwrite=True)
        m = evaluate(run)
        print(json.dumps({k: m[k] for k in ("algo", "iterations", "wall_s", "env_steps", "return_by_step",
                                            "return_ci95_by_step", "eval_tasks")}), flush=True)
        runs.append(run)
    plot_return_comparison(runs, Path(args.out) / f"{args.task}_return_vs_steps.png", f"{args.task} meta-test")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="nav2d,halfcheetah-vel")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--sync-envs", default="10,20,40")
    ap.add_argument("--async-envs", default="2,4,8")
    args = ap.parse_args(argv)
    for task in args.tasks.split(","):
        for mode, sizes in (("sync", args.sync_envs), ("async", args.async_envs)):
            for n in (int(s) for s in sizes.split(",")):
                rate = throughput(task, mode, n, args.episodes)
                print(json.dumps({"task": task, "mode": mode, "num_envs": n, "episodes": args.episodes,
                                  "steps_per_s": round(rate)}), flush=True)


if __name__ == "__main__":
    main()
