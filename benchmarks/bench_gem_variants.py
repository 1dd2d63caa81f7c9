"""Sinusoid meta-iteration time of GEM-BML+ settings against each other, in one process: the
inner VI (von / ngvi), the second fit (joint / sequential), the inner steps. The settings take
turns iteration by iteration (same task batches, one intra-op thread), so a busy machine slows
them alike and the ratios stay meaningful.

    python benchmarks/bench_gem_variants.py --out benchmarks/out/variants [--iterations 30] [--keep-freed-memory]

Each setting is the algorithm's SINUSOID_DEFAULTS updated with its options. Writes variants.md and
variants.json (median ms per meta-iteration, ratio to the first setting)."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from gemext import algorithms
from gemext.families.sinusoid import SINUSOID_DEFAULTS
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.vi import GaussianLikelihood

SETTINGS = {
    "von, joint (default)": {},
    "von, sequential": {"all_fit": "sequential"},
    "ngvi, joint": {"inner": {"optimizer": "ngvi", "lr": 0.2, "optimizer_kwargs": {"rho_lr": 0.01}}},
    "ngvi, sequential": {"inner": {"optimizer": "ngvi", "lr": 0.2, "optimizer_kwargs": {"rho_lr": 0.01}},
                         "all_fit": "sequential"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/variants")
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--settings", default=None, help='JSON {"label": {options}} (default: von/ngvi × joint/sequential)')
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory for reuse, as `gemext train` does (gemext.allocator)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.keep_freed_memory:
        from gemext.allocator import keep_freed_memory
        keep_freed_memory()
    settings = json.loads(args.settings) if args.settings else SETTINGS
    data = SinusoidTasks("finn")
    learners = {}
    for label, extra in settings.items():
        torch.manual_seed(0)
        opts = {**SINUSOID_DEFAULTS[args.algo], **extra}
        opts["likelihood"] = GaussianLikelihood(opts.pop("sigma", 0.5))
        learner = algorithms.create(args.algo, data.make_model(), seed=0, **opts)
        learners[label] = (learner, learner.meta_optimizer(1e-3))
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {label: [] for label in settings}
    for i in range(args.iterations):
        batch = data.sample(args.meta_batch, g, "train")
        order = list(settings) if i % 2 == 0 else list(reversed(settings))
        for label in order:
            learner, opt = learners[label]
            t = time.perf_counter()
            opt.zero_grad()
            learner.meta_backward(batch)
            opt.step()
            learner.after_step()
            times[label].append(time.perf_counter() - t)
    first = next(iter(settings))
    warm = min(3, args.iterations - 1)
    med = {label: statistics.median(ts[warm:]) for label, ts in times.items()}
    rows = [{"setting": label, "options": settings[label], "ms": 1e3 * med[label], "ratio": med[label] / med[first]}
            for label in settings]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"1 thread, {args.algo}, meta-batch {args.meta_batch}, {args.iterations} iterations (median after {warm})"
            f"{', freed memory kept' if args.keep_freed_memory else ''}")
    lines = [head, "", f"| setting | ms / meta-iteration | × {first} |", "|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    (out / "variants.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
