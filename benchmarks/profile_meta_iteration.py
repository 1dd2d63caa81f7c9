"""Where the time of a GEM-BML+ meta-iteration with the `von` inner VI goes (sinusoid `finn`, the
training defaults, 1 thread, freed memory kept as `gemext train` does). Each phase of the inner
loop is timed by wrapping the function that does it; "rest" is the meta-iteration's time outside
them (the meta-gradient, Adam, the Python of the loop).

    python benchmarks/profile_meta_iteration.py --out benchmarks/out/profile [--iterations 40] [--meta-batch 25]

Writes profile.md and profile.json (ms per meta-iteration per phase, and per inner step)."""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import platform
import time
from pathlib import Path

import torch

from gemext import algorithms, ops
from gemext.allocator import keep_freed_memory
from gemext.families.sinusoid import SINUSOID_DEFAULTS
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.vi import GaussianLikelihood, loop, terms, von

# (owner, attribute, phase): the function that does each phase, patched where the inner loop looks it up
PHASES = [
    (ops, "sample", "sample θ = μ + σε (fused)"),
    (terms.DataTerm, "value_grad_rows", "forward, data gradient and GGN rows R"),
    (loop, "rows_times", "control variate R(θ − μ)"),
    (von.VariationalOnlineNewton, "terms", "Woodbury terms: RΛ⁻¹Rᵀ, Cholesky, Rv, Rᵀz"),
    (ops, "von_step_", "per-weight update (fused von_step_)"),
    (loop, "_merit", "objective at the start of a fit"),
    (loop, "_backtrack_", "line search (one forward over 5 candidates per task)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/profile")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--meta-batch", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    spent: collections.Counter[str] = collections.Counter()

    def timed(fn, phase):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[phase] += time.perf_counter() - t
        return wrapper

    for owner, name, phase in PHASES:
        setattr(owner, name, timed(getattr(owner, name), phase))
    data = SinusoidTasks("finn")
    torch.manual_seed(0)
    opts = dict(SINUSOID_DEFAULTS["gem-bml+"])
    opts["likelihood"] = GaussianLikelihood(opts.pop("sigma", 0.5))
    learner = algorithms.create("gem-bml+", data.make_model(), seed=0, **opts)
    opt = learner.meta_optimizer(1e-3)
    g = torch.Generator().manual_seed(0)
    warm = 10
    batches = [data.sample(args.meta_batch, g, "train") for _ in range(warm + args.iterations)]
    total = 0.0
    for i, batch in enumerate(batches):
        if i == warm:
            spent.clear()
        t = time.perf_counter()
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
        learner.after_step()
        total += time.perf_counter() - t if i >= warm else 0.0
    n, steps = args.iterations, 2 * learner.inner_steps  # the support fit, then the joint one
    rows = [{"phase": phase, "ms": 1e3 * spent[phase] / n} for _, _, phase in PHASES]
    rows.append({"phase": "rest (meta-gradient, Adam, the loop's Python)",
                 "ms": 1e3 * (total - sum(spent.values())) / n})
    ms_total = 1e3 * total / n
    head = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"1 thread, gem-bml+ (von, {learner.inner_steps} + {learner.inner_steps} steps), meta-batch "
            f"{args.meta_batch}, mean of {n} meta-iterations after {warm}: {ms_total:.1f} ms each")
    lines = [head, "", "| phase | ms / meta-iteration | ms / inner step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['phase']} | {r['ms']:.2f} | {r['ms'] / steps:.3f} | {r['ms'] / ms_total:.0%} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    (out / "profile.json").write_text(json.dumps({"header": head, "ms_total": ms_total, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
