"""Rollout-collector throughput: `python -m gemext.tasks.rl.bench [--tasks nav2d,halfcheetah-vel]`.

Prints environment steps per second (policy sampling included: the 2×100 Gaussian MLP) for
SyncVectorEnv and AsyncVectorEnv pools of several sizes, collecting `--episodes` full episodes
of one task per repeat (median over repeats, after one warm-up collection).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .envs import sample_tasks
from .rollouts import RolloutCollector


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


def main(argv: list[str] | None = None) -> None:
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
