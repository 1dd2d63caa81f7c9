"""Sinusoid meta-iteration time under glibc's default malloc against `keep_freed_memory()` (what
`gemext train` applies), in alternating fresh processes: the allocator is process state, so the two
cannot share a process; alternating pairs keep a drifting machine's speed out of the ratio. Each
point is a `gemext bench memory` worker (the learner with its training presets, `finn` MLP,
meta-batch 25, 1 thread; median over --repeats meta-iterations after a warm-up).

    python benchmarks/bench_malloc.py [--algo gem-bml+] [--pairs 8] [--repeats 20]

Prints each pair's ms per meta-iteration (default, kept) and their ratio, then the median ratio."""
from __future__ import annotations

import argparse
import os
import statistics


def main() -> None:
    from gemext import bench_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=5)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the measuring processes
    spec = {"task": "sinusoid", "algo": a.algo, "inner_steps": a.inner_steps, "device": "cpu",
            "repeats": a.repeats, "meta_batch": 25, "ways": 5, "shots": 1, "query": 15, "presets": True}
    ratios = []
    for _ in range(a.pairs):
        ms = {mode: 1e3 * bench_memory.run_point({**spec, "keep_freed_memory": mode == "kept"})["time_per_iter_s"]
              for mode in ("default", "kept")}
        ratios.append(ms["default"] / ms["kept"])
        print(f"default {ms['default']:7.1f} ms   kept {ms['kept']:7.1f} ms   ratio {ratios[-1]:.2f}", flush=True)
    print(f"{a.algo}: median ratio default / kept {statistics.median(ratios):.2f} over {a.pairs} pairs "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
