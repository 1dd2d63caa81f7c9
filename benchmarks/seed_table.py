"""Across-seed table and plot of sinusoid studies (benchmarks/sinusoid_study.py), one study folder per
seed: per algorithm the mean over seeds of MSE after k steps, NLL and 90% coverage, ± the 95%
Student-t interval over seeds (the between-seed spread, not the test-task noise).

    python benchmarks/seed_table.py --studies s0,s1,s2 --out seeds
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from common import STEPS, ci95, plot_mse_vs_steps, write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", required=True, help="comma-separated study folders (each with results.csv)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    by_algo: dict[tuple[str, str], list[dict]] = {}
    for d in args.studies.split(","):
        with open(Path(d) / "results.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r.get("error"):
                    continue
                by_algo.setdefault((r["preset"], r["algo"]), []).append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = [f"mse_{k}" for k in STEPS] + ["nll", "coverage90"]
    lines = ["| preset | algorithm | seeds | " + " | ".join(f"MSE@{k}" for k in STEPS) + " | NLL | cov90 |",
             "|---|---|---:|" + "---|" * (len(STEPS) + 2)]
    rows = []
    for (preset, algo), rs in sorted(by_algo.items(), key=lambda kv: float(statistics.mean(
            float(r["mse_10"]) for r in kv[1]))):
        row = {"preset": preset, "algo": algo, "seeds": len(rs)}
        cells = []
        for c in cols:
            vals = [float(r[c]) for r in rs if r.get(c) not in (None, "")]
            if not vals:
                cells.append("—")
                continue
            if not all(math.isfinite(v) for v in vals):  # a diverged seed: no mean to speak of
                row[c], row[c + "_ci95"] = math.inf, math.nan
                cells.append(f"diverged ({sum(not math.isfinite(v) for v in vals)}/{len(vals)} seeds)")
                continue
            m, ci = statistics.mean(vals), ci95(vals)
            row[c], row[c + "_ci95"] = m, ci
            cells.append(f"{m:.3g} ± {ci:.2g}" if math.isfinite(ci) else f"{m:.3g}")
        rows.append(row)
        lines.append(f"| {preset} | {algo} | {len(rs)} | " + " | ".join(cells) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    write_csv(out / "seeds.csv", rows)
    print("\n".join(lines))
    finite = [r for r in rows if all(math.isfinite(r.get(f"mse_{k}", math.nan)) for k in STEPS)]  # diverged: not drawn
    plot_mse_vs_steps({f"sinusoid {rows[0]['preset'] if rows else ''}: mean over seeds ± 95% CI": [
        (f"{r['algo']} ({r['seeds']} seeds)", [r[f"mse_{k}"] for k in STEPS], [r[f"mse_{k}_ci95"] for k in STEPS])
        for r in finite]}, out / "mse_vs_steps.png", steps=list(STEPS))


if __name__ == "__main__":
    main()
