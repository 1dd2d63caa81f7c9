"""Sinusoid meta-iteration time of GEM-BML+ settings against each other, in one process: the
inner VI (von / ngvi, von's own options), the second fit (joint / sequential), the inner steps.
The settings take turns iteration by iteration (same task batches, one intra-op thread), so a busy
machine slows them alike and the ratios stay meaningful.

    python benchmarks/bench_gem_variants.py --out benchmarks/out/variants [--iterations 30] [--keep-freed-memory]
    python benchmarks/bench_gem_variants.py --out benchmarks/out/inner_vi --settings inner-vi

--settings: a named set (`fit`, the default: von / ngvi × joint / sequential second fit;
`inner-vi`: ngvi at its former default settings, von, von without backtracking, with diagonal
coupling, and with 1 + 1 steps; `second-fit`: cheaper second fits (fewer steps; the sequential
fit, which forms the query's rows only and so bounds from below the cost of any second fit that
reuses the support fit's rows) beside MAML) or JSON {"label": {options}}. Each setting is the
learner `gemext train sinusoid --algo ALGO --options OPTIONS` builds; an "algo" key in a setting
names another learner than --algo. Writes variants.md and variants.json (median ms per
meta-iteration, ratio to the first setting)."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import family_learner, interleaved, stamp

_NGVI = {"optimizer": "ngvi", "lr": 0.2, "optimizer_kwargs": {"rho_lr": 0.01}}
SETTINGS = {
    "fit": {
        "von, joint (default)": {},
        "von, sequential": {"all_fit": "sequential"},
        "ngvi, joint": {"inner": _NGVI},
        "ngvi, sequential": {"inner": _NGVI, "all_fit": "sequential"},
    },
    "inner-vi": {
        "ngvi (previous default)": {"inner": {"optimizer": "ngvi"}, "lr": 1.25, "sigma0": 0.02, "beta": 0.1},
        "von (default)": {},
        "von, no backtracking": {"inner": {"optimizer": "von", "optimizer_kwargs": {"backtrack": 0}}},
        "von, coupling diag": {"inner": {"optimizer": "von", "optimizer_kwargs": {"coupling": "diag"}}},
        "von, 1 + 1 steps": {"inner_steps": 1, "query_steps": 1},
    },
    "second-fit": {
        "joint, 5 + 5 (default)": {},
        "sequential, 5 + 5": {"all_fit": "sequential"},
        "joint, 5 + 2": {"query_steps": 2},
        "sequential, 5 + 2": {"all_fit": "sequential", "query_steps": 2},
        "maml (its default)": {"algo": "maml"},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/variants")
    ap.add_argument("--algo", default="gem-bml+")
    ap.add_argument("--iterations", type=int, default=30, help="meta-iterations per setting, the first 3 warm-up")
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--settings", default="fit", help=f"{' or '.join(SETTINGS)}, or JSON {{\"label\": {{options}}}}")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory for reuse, as `gemext train` does (gemext.allocator)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.keep_freed_memory:
        from gemext.allocator import keep_freed_memory
        keep_freed_memory()
    settings = SETTINGS[args.settings] if args.settings in SETTINGS else json.loads(args.settings)
    learners = {}
    for label, options in settings.items():
        torch.manual_seed(0)
        options = dict(options)
        family, learner, _ = family_learner("sinusoid", options.pop("algo", args.algo), algo_options=options)
        learners[label] = (learner, learner.meta_optimizer(1e-3))
    g = torch.Generator().manual_seed(0)
    batch = [None]

    def draw(_: int) -> None:  # every setting meets the same batch in a round
        batch[0] = family.sample(args.meta_batch, g)

    def iteration(learner, opt) -> None:
        opt.zero_grad()
        learner.meta_backward(batch[0])
        opt.step()
        learner.after_step()

    warm = min(3, args.iterations - 1)
    times = interleaved({label: lambda lo=lo: iteration(*lo) for label, lo in learners.items()},
                        args.iterations - warm, warmup=warm, before_round=draw)
    first = next(iter(settings))
    med = {label: statistics.median(ts) for label, ts in times.items()}
    rows = [{"setting": label, "options": settings[label], "ms": 1e3 * med[label], "ratio": med[label] / med[first]}
            for label in settings]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = (f"{stamp()}, 1 thread, {args.algo}, meta-batch {args.meta_batch}, {args.iterations} iterations "
            f"(median after {warm}){', freed memory kept' if args.keep_freed_memory else ''}")
    lines = [head, "", f"| setting | ms / meta-iteration | × {first} |", "|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    (out / "variants.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
