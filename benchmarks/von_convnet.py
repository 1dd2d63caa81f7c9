"""The curvature VI (`von`) on a Conv4 with BatchNorm against NGVI, GEM-BML+ on Omniglot 5w1s shapes
(synthetic 28×28 images, meta-batch 8, 5 + 5 inner steps, 5 query images per class, one thread).

Variants, each in a fresh process (its own peak RSS):
- ngvi: the vision preset (natural-gradient VI, no fitted variances);
- von exact: von with the GGN rows of the model as it runs (BatchNorm's batch statistics depend on
  every point: one backward over the batch per row);
- von held: von with the rows taken point by point with each BatchNorm's batch statistics held as
  data (`FunctionalNet.held_stats`: one per-point backward for all rows; the rows leave out how a
  weight moves the other points' outputs through the statistics).

Per variant: median seconds per meta-iteration after a warm-up, the peak RSS the iterations add,
how the line search treated the mean steps (accepted fraction of each task's Gauss-Newton step:
1, 1/2, ..., 1/16, or 0 = rejected), and the fitted σ²/σ₀² of the support posterior per layer
(quantiles 10/50/90%). Writes OUT/von_convnet.md and .json.

    python benchmarks/von_convnet.py --out benchmarks/out/von_convnet [--iterations 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from common import command_line, fresh_processes, run_worker, stamp

VARIANTS = ("ngvi", "von exact", "von held")


def worker(spec: dict) -> dict:
    import torch

    from gemext.allocator import keep_freed_memory
    keep_freed_memory()
    torch.set_num_threads(1)
    from gemext.bench_memory import make_point, time_and_memory
    from gemext.vi import VonFit

    variant = spec["variant"]
    options = {} if variant == "ngvi" else {"inner": {"optimizer": "von", "beta": 1.0}}
    learner, batch = make_point(dict(task="omniglot", algo="gem-bml+", inner_steps=5, meta_batch=spec["meta_batch"],
                                     ways=5, shots=1, query=5, device="cpu", presets=True, options=options))
    if variant == "von held":
        learner.forward_net.held_stats = True
    fractions: collections.Counter = collections.Counter()
    search = VonFit.line_search

    def counted(self, *args, **kwargs):  # the line-search phase returns each task's accepted fraction
        frac = search(self, *args, **kwargs)
        fractions.update(round(float(f), 4) for f in frac)
        return frac

    VonFit.line_search = counted
    res = time_and_memory(learner, batch, "cpu", spec["iterations"])
    ratios = {}  # the support posterior's variances against the prior's, per weight tensor
    if variant != "ngvi":
        post = learner.adapt(batch).posterior
        for name, rho, rho0 in zip(learner.names, post.rho, learner.prior.rho0):
            r = torch.exp(2 * (rho - rho0.detach())).flatten().double()
            ratios[name] = [round(float(v), 4) for v in torch.quantile(r, torch.tensor([0.1, 0.5, 0.9]).double())]
    return {"variant": variant, "s_per_iter": res["time_per_iter_s"], "peak_mb": res["peak_mem_mb"],
            "fractions": dict(sorted(fractions.items(), reverse=True)), "sigma2_ratio_q10_50_90": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/von_convnet")
    ap.add_argument("--iterations", type=int, default=2, help="timed meta-iterations per variant (after a warm-up)")
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    specs = [{"variant": v, "iterations": args.iterations, "meta_batch": args.meta_batch}
             for v in args.variants.split(",")]
    for spec, res in fresh_processes(__file__, specs):
        if "error" in res:
            raise SystemExit(f"{spec['variant']}: {res['error']}")
        rows.append(res)
        print(res, flush=True)
    ref = next((r for r in rows if r["variant"] == "ngvi"), rows[0])
    lines = [f"# von on a Conv4 with BatchNorm vs NGVI ({stamp()}, one thread)", "",
             f"`{command_line(__file__, sys.argv[1:])}`", "",
             "| variant | s / meta-iteration | × ngvi | peak RSS added (MB) | × ngvi | line search: fraction → steps |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fr = ", ".join(f"{k}: {v}" for k, v in r["fractions"].items()) or "—"
        lines.append(f"| {r['variant']} | {r['s_per_iter']:.2f} | {r['s_per_iter'] / ref['s_per_iter']:.1f}× | "
                     f"{r['peak_mb']:.0f} | {r['peak_mb'] / max(ref['peak_mb'], 1e-9):.1f}× | {fr} |")
    for r in rows:
        if r["sigma2_ratio_q10_50_90"]:
            lines += ["", f"σ²/σ₀² of the support posterior, {r['variant']} (quantiles 10 / 50 / 90%):", "",
                      "| weight | q10 | q50 | q90 |", "|---|---|---|---|"]
            lines += [f"| {n} | {q[0]} | {q[1]} | {q[2]} |" for n, q in r["sigma2_ratio_q10_50_90"].items()]
    (out / "von_convnet.md").write_text("\n".join(lines) + "\n")
    (out / "von_convnet.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__" and not run_worker(worker):
    main()
