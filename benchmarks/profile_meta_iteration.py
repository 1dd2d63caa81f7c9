"""Where the time of a GEM-BML+ meta-iteration with the `von` inner VI goes (sinusoid `finn`, the
training defaults, 1 thread, freed memory kept as `gemext train` does). Each phase of the inner
loop is a `torch.profiler.record_function` range of `VonFit`, timed by torch.profiler (whose
per-op bookkeeping every phase includes); "rest" is the meta-iteration's time outside them (the
meta-gradient, Adam, the Python of the loop).

    python benchmarks/profile_meta_iteration.py --out benchmarks/out/profile [--iterations 40] [--meta-batch 25]

Writes profile.md and profile.json (ms per meta-iteration per phase, and per inner step)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import family_learner, stamp
from torch.profiler import ProfilerActivity, profile

from gemext.allocator import keep_freed_memory

# (range, phase): the profiler ranges of `VonFit`
PHASES = [
    ("von.sample_terms", "sample θ = μ + σε; forward, data gradient, GGN rows R, control variate R(θ − μ)"),
    ("von.solve", "Woodbury terms: RΛ⁻¹Rᵀ, Cholesky, Rv, Rᵀz"),
    ("von.update", "per-weight update (fused von_step_)"),
    ("von.line_search", "line search (objective at the start, one forward over 5 candidates per task)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/profile")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--meta-batch", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    family, learner, _ = family_learner("sinusoid", "gem-bml+")
    opt = learner.meta_optimizer(1e-3)
    g = torch.Generator().manual_seed(0)
    warm = 10
    batches = [family.sample(args.meta_batch, g) for _ in range(warm + args.iterations)]

    def iteration(batch) -> None:
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
        learner.after_step()

    for batch in batches[:warm]:
        iteration(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for batch in batches[warm:]:
            iteration(batch)
        total = time.perf_counter() - t
    spent = {e.key: e.cpu_time_total * 1e-6 for e in prof.key_averages()}  # seconds per range
    n, steps = args.iterations, 2 * learner.inner_steps  # the support fit, then the joint one
    rows = [{"phase": phase, "ms": 1e3 * spent.get(key, 0.0) / n} for key, phase in PHASES]
    rows.append({"phase": "rest (meta-gradient, Adam, the loop's Python)",
                 "ms": 1e3 * (total - sum(spent.get(key, 0.0) for key, _ in PHASES)) / n})
    ms_total = 1e3 * total / n
    head = (f"{stamp()}, 1 thread, gem-bml+ (von, {learner.inner_steps} + {learner.inner_steps} steps), meta-batch "
            f"{args.meta_batch}, mean of {n} profiled meta-iterations after {warm}: {ms_total:.1f} ms each")
    lines = [head, "", "| phase | ms / meta-iteration | ms / inner step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['phase']} | {r['ms']:.2f} | {r['ms'] / steps:.3f} | {r['ms'] / ms_total:.0%} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    (out / "profile.json").write_text(json.dumps({"header": head, "ms_total": ms_total, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
