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

STEPS = (0, 1, 2, 5, 10)
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95% Student-t quantiles by sample size


def _ci(values: list[float]) -> float:
    n = len(values)
    return T95.get(n, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")


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
            m, ci = statistics.mean(vals), _ci(vals)
            row[c], row[c + "_ci95"] = m, ci
            cells.append(f"{m:.3g} ± {ci:.2g}" if math.isfinite(ci) else f"{m:.3g}")
        rows.append(row)
        lines.append(f"| {preset} | {algo} | {len(rs)} | " + " | ".join(cells) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    with open(out / "seeds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))
    _plot(rows, out / "mse_vs_steps.png")


def _plot(rows: list[dict], path: Path) -> None:
    from gemext.plots import new_figure

    fig = new_figure((5.5, 4))
    ax = fig.subplots()
    for r in rows:
        ys = [r.get(f"mse_{k}") for k in STEPS]
        if not all(y is not None and math.isfinite(y) for y in ys):
            continue  # diverged: nothing to draw
        cis = [r.get(f"mse_{k}_ci95", 0.0) for k in STEPS]
        ax.errorbar(list(STEPS), ys, yerr=[c if math.isfinite(c) else 0.0 for c in cis], marker="o", capsize=3,
                    label=f"{r['algo']} ({r['seeds']} seeds)")
    ax.set(xlabel="gradient steps at meta-test", ylabel="MSE", yscale="log",
           title=f"sinusoid {rows[0]['preset'] if rows else ''}: mean over seeds ± 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
