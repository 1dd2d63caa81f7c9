"""MSE after 0/1/10 adaptation steps of a trained sinusoid run on tasks of its training pool against
fresh test tasks (300 of each by default): does a run under-fit its tasks, or memorise its pool?

    python benchmarks/train_vs_test.py RUN_DIR [--tasks 300] [--steps 10]
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gemext.train import load_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    _, family, learner, _ = load_run(args.run)
    print("| tasks | " + " | ".join(f"MSE@{k}" for k in (0, 1, args.steps)) + " |\n|---|---:|---:|---:|")
    for split in ("train", "test"):
        batch = family.data.sample(args.tasks, torch.Generator().manual_seed(123), split)
        path = learner.adapt_path(batch, args.steps)
        mse = [float(((path[k].predict(batch.x_query).mean - batch.y_query) ** 2).mean()) for k in (0, 1, args.steps)]
        print(f"| {split} | " + " | ".join(f"{m:.3f}" for m in mse) + " |")


if __name__ == "__main__":
    main()
