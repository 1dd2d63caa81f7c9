"""Time per GEM-BML+ meta-iteration on sinusoid `finn` shapes (MLP 1-40-40-1, meta-batch 25, 5 + 5
inner steps) with each inner VI, measured interleaved in one process (round-robin over the variants,
median over rounds) so a loaded machine slows every variant alike; reports ratios to ngvi.

    OMP_NUM_THREADS=1 python benchmarks/bench_inner_vi.py --rounds 15
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemext.train import RunConfig, build

VARIANTS = {
    "ngvi (previous default)": {"inner": {"optimizer": "ngvi"}, "lr": 1.25, "sigma0": 0.02, "beta": 0.1},
    "von (default)": {},
    "von, no backtracking": {"inner": {"optimizer": "von", "optimizer_kwargs": {"backtrack": 0}}},
    "von, coupling diag": {"inner": {"optimizer": "von", "optimizer_kwargs": {"coupling": "diag"}}},
    "von, 1 + 1 steps": {"inner_steps": 1, "query_steps": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=3, help="meta-iterations per variant per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    learners = {}
    for name, opts in VARIANTS.items():
        fam, learner, T = build(RunConfig(task="sinusoid", algo="gem-bml+", out="unused", algo_options=opts))
        batch = fam.sample(T, torch.Generator().manual_seed(0))
        learner.meta_backward(batch)  # warm-up
        learners[name] = (learner, batch)
    times: dict[str, list[float]] = {n: [] for n in learners}
    for _ in range(args.rounds):
        for name, (learner, batch) in learners.items():
            t0 = time.perf_counter()
            for _ in range(args.per_round):
                learner.zero_grad(set_to_none=True)
                learner.meta_backward(batch)
            times[name].append((time.perf_counter() - t0) / args.per_round)
    base = statistics.median(times["ngvi (previous default)"])
    print("| inner VI | ms per meta-iteration (median) | × ngvi |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1000 * m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
