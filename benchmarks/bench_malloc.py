"""Sinusoid meta-iteration time under glibc's default malloc against `keep_freed_memory()` (what
`gemext train` applies), in alternating fresh processes: the allocator is process state, so the two
cannot share a process; alternating pairs keep a drifting machine's speed out of the ratio.

    python benchmarks/bench_malloc.py [--algo gem-bml+] [--pairs 8] [--iterations 20]

Prints each pair's ms per meta-iteration (default, kept) and their ratio, then the median ratio."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def child(algo: str, keep: bool, iterations: int, warmup: int = 5) -> float:
    if keep:
        from gemext.allocator import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() was not applied (not glibc, or MALLOC_*_ set)")
    import torch

    from gemext import algorithms
    from gemext.families.sinusoid import SINUSOID_DEFAULTS
    from gemext.tasks.sinusoid import SinusoidTasks
    from gemext.vi import GaussianLikelihood
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = SinusoidTasks("finn")
    opts = dict(SINUSOID_DEFAULTS[algo])
    opts["likelihood"] = GaussianLikelihood(opts.pop("sigma", 0.5))
    learner = algorithms.create(algo, data.make_model(), seed=0, **opts)
    opt = learner.meta_optimizer(1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [data.sample(25, g, "train") for _ in range(warmup + iterations)]
    for i, b in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        opt.zero_grad()
        learner.meta_backward(b)
        opt.step()
    return (time.perf_counter() - t0) / iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(child(a.algo, a.child == "keep", a.iterations))
        return
    ratios = []
    for _ in range(a.pairs):
        ms = {}
        for mode in ("default", "keep"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--algo", a.algo,
                                  "--iterations", str(a.iterations)], capture_output=True, text=True, check=True)
            ms[mode] = 1e3 * float(out.stdout.strip().splitlines()[-1])
        ratios.append(ms["default"] / ms["keep"])
        print(f"default {ms['default']:7.1f} ms   kept {ms['keep']:7.1f} ms   ratio {ratios[-1]:.2f}", flush=True)
    print(f"{a.algo}: median ratio default / kept {statistics.median(ratios):.2f} over {a.pairs} pairs "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
