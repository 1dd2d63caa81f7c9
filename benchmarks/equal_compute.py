"""Equal-compute comparison: per seed, MAML meta-trains N iterations and its measured training
wall-clock W (metrics.json wall_s) becomes every other learner's `gemext train --time-budget W`, with
--iterations a large cap (--cap × N), on the same machine and thread count. Every training is a fresh
`python -m gemext train` subprocess (OMP_NUM_THREADS = --threads) that meta-tests the run afterwards
on the family's fixed meta-test tasks (the same for every run); the order of the learners after MAML
is reversed on every other seed (the odd positions in --seeds). The equal-iterations view is not
trained separately: it reports how many iterations each learner did in MAML's time.

    python benchmarks/equal_compute.py --family finn --out ec                        # 3 seeds, N 3000
    python benchmarks/equal_compute.py --family omniglot --data-root DATA --out ec   # 5w1s, N 1000
    python benchmarks/equal_compute.py --family finn --maml-iterations 20 --seeds 0,1 --eval-tasks 10 \\
        --algos gem-bml+,fomaml --out /tmp/ec_smoke                                  # smoke test

Learners: --algos (default gem-bml+,gem-bml,fomaml,reptile, and abml on sinusoid) and
--variant 'LABEL=ALGO:{json options}' (given to `gemext train --options`; the keys meta_batch, meta_lr
and inner_steps become its flags). Settings are chosen with --eval-split validation (tasks no report
uses), the result reported with the default test split. Writes into --out:
runs/<family>/<label>-s<seed>/ (run folders), runs.csv (every run), table.md (a header with date,
machine, torch, commit and command, then per family mean ± 95% Student-t CI over seeds; also printed)
and <family>.png (meta-test quality against training wall-clock). --resume-existing skips runs that
were meta-tested already (with the same budget); --dry-run prints the commands.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from common import ci95, command_line, commit, machine, parse_run, write_csv

FAMILIES = {"finn": ("sinusoid", "finn", 3000), "bmaml": ("sinusoid", "bmaml", 10000),  # task, preset, N
            "omniglot": ("omniglot", "5w1s", 1000), "tinyimagenet": ("tinyimagenet", "5w1s", 300)}
DEFAULT_ALGOS = "gem-bml+,gem-bml,fomaml,reptile"
# the quality columns read from metrics.json per kind of family: (column, reader, table heading, scale)
QUALITY = {
    "sinusoid": [("mse10", lambda m: m["mse_by_step"][10], "MSE@10", 1), ("nll", lambda m: m["nll"], "NLL", 1),
                 ("coverage90", lambda m: m["coverage90"], "cov90", 1),
                 ("mse10_ci95", lambda m: m["mse_ci95_by_step"][10], None, 1),
                 ("mse0", lambda m: m["mse_by_step"][0], None, 1)],
    "vision": [("accuracy", lambda m: m["accuracy"], "accuracy %", 100), ("nll", lambda m: m["nll"], "NLL", 1),
               ("ece", lambda m: m["ece"], "ECE", 1), ("ci95", lambda m: m["ci95"], None, 100)],
}
# keys of a --variant's JSON that are `gemext train` flags (the rest go to --options)
RUN_FLAGS = ("meta_batch", "meta_lr", "inner_steps")
COLUMNS = ["family", "label", "algo", "options", "seed", "iterations", "stopped_by", "wall_s", "time_budget",
           "error"]


def kind(family: str) -> str:
    return "sinusoid" if FAMILIES[family][0] == "sinusoid" else "vision"


def learners(family: str, algos: str | None, variants: list[str]) -> list[tuple[str, str, dict]]:
    """(label, algo, options) of the learners compared with MAML, in their order for even seeds."""
    algos = algos if algos is not None else DEFAULT_ALGOS + (",abml" if kind(family) == "sinusoid" else "")
    out = [(a.strip(), a.strip(), {}) for a in algos.split(",") if a.strip()] + [parse_run(v) for v in variants]
    folders = [folder(lb) for lb, _, _ in out]
    if "maml" in folders or len(set(folders)) != len(folders):
        raise SystemExit(f"learner labels must be distinct and not 'maml' (MAML sets the budget): {folders}")
    return out


def folder(label: str) -> str:
    return re.sub(r"[^\w+.-]+", "_", label)


def order(entries: list, position: int) -> list:
    """The learners' order on the `position`-th seed of the sweep: reversed on every other one."""
    return list(reversed(entries)) if position % 2 else list(entries)


def command(args, family: str, algo: str, options: dict, seed: int, iterations: int, budget: float | str | None,
            run: Path, n: int) -> list[str]:
    """`gemext train` of one run; every run logs every max(10, N/100) iterations, N being MAML's."""
    task, preset, _ = FAMILIES[family]
    cmd = [sys.executable, "-m", "gemext", "train", task, "--algo", algo, "--preset", preset, "--seed", str(seed),
           "--iterations", str(iterations), "--device", args.device, "--out", str(run), "--overwrite",
           "--no-progress", "--log-every", str(max(10, n // 100)),
           # one checkpoint, at the end: a fast learner would otherwise spend more of its budget writing them
           "--checkpoint-every", str(iterations)]
    if budget is not None:
        cmd += ["--time-budget", str(budget)]
    flags = {k: options[k] for k in RUN_FLAGS if k in options}  # run settings, not learner options
    options = {k: v for k, v in options.items() if k not in RUN_FLAGS}
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if options:
        cmd += ["--options", json.dumps(options)]
    if args.eval_split != "test":
        cmd += ["--eval-split", args.eval_split]
    if args.eval_tasks:
        cmd += ["--eval-tasks", str(args.eval_tasks)]
    if args.data_root and kind(family) == "vision":
        cmd += ["--data-root", args.data_root]
    return cmd


def finished(run: Path, family: str, budget: float | None) -> dict | None:
    """The metrics of a run in `run` that was trained with `budget` and meta-tested, else None."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        QUALITY[kind(family)][0][1](metrics)
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return metrics if config.get("time_budget") == budget else None


def record(family: str, label: str, algo: str, options: dict, seed: int, metrics: dict | None, budget,
           error: str = "") -> dict:
    row = {"family": family, "label": label, "algo": algo, "options": json.dumps(options) if options else "",
           "seed": seed, "time_budget": budget if budget is not None else "", "error": error}
    if metrics is not None:
        row.update(iterations=metrics["iterations"], stopped_by=metrics.get("stopped_by", ""),
                   wall_s=metrics["wall_s"], **{c: read(metrics) for c, read, _, _ in QUALITY[kind(family)]})
    return row


def summary(rows: list[dict], column: str, scale: float = 1) -> tuple[float, float] | None:
    """Mean and 95% Student-t half-width over the runs' values of `column` (None when none has it)."""
    vals = [scale * float(r[column]) for r in rows if r.get(column) not in (None, "")]
    return (statistics.mean(vals), ci95(vals)) if vals else None


def _cell(s: tuple[float, float] | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    return f"{s[0]:.{digits}g} ± {s[1]:.2g}" if math.isfinite(s[1]) else f"{s[0]:.{digits}g}"


def family_table(family: str, rows: list[dict], n: int) -> list[str]:
    """Markdown: the equal-compute table and the equal-iterations view of one family's runs."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if r["family"] == family and not r.get("error"):
            by_label.setdefault(r["label"], []).append(r)
    quality = [(c, head, scale) for c, _, head, scale in QUALITY[kind(family)] if head]
    lines = [f"### {family}: equal compute (training wall-clock of MAML's {n} iterations, per seed)", "",
             "| learner | seeds | " + " | ".join(h for _, h, _ in quality) + " | iterations | wall s |",
             "|---|---:|" + "---:|" * (len(quality) + 2)]
    for label, rs in by_label.items():
        cells = [_cell(summary(rs, c, scale)) for c, _, scale in quality]
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) +
                     f" | {_cell(summary(rs, 'iterations'), 4)} | {_cell(summary(rs, 'wall_s'))} |")
    lines += ["", f"Equal iterations ({family}): not trained separately; the iterations each learner did in "
              "MAML's time, against MAML's N.", "",
              "| learner | iterations done | × N | ms / iteration |", "|---|---:|---:|---:|"]
    for label, rs in by_label.items():
        its = summary(rs, "iterations")
        ms = summary([{"v": 1e3 * float(r["wall_s"]) / max(int(r["iterations"]), 1)} for r in rs], "v")
        lines.append(f"| {label} | {_cell(its, 4)} | {its[0] / n:.2f} | {_cell(ms)} |")
    failed = [f"{r['label']}-s{r['seed']}" for r in rows if r["family"] == family and r.get("error")]
    return lines + (["", f"Failed runs (left out): {', '.join(failed)}"] if failed else []) + [""]


def plot(family: str, rows: list[dict], path: Path) -> None:
    from gemext.plots import new_figure

    column, _, head, scale = QUALITY[kind(family)][0]
    fig = new_figure((5.5, 4))
    ax = fig.subplots()
    labels = list(dict.fromkeys(r["label"] for r in rows if r["family"] == family and not r.get("error")))
    for i, label in enumerate(labels):
        rs = [r for r in rows if r["family"] == family and r["label"] == label and not r.get("error")]
        color = f"C{i % 10}"
        ax.scatter([float(r["wall_s"]) for r in rs], [scale * float(r[column]) for r in rs], color=color, alpha=0.35,
                   s=14)
        (x, dx), (y, dy) = summary(rs, "wall_s"), summary(rs, column, scale)
        ax.errorbar([x], [y], xerr=[0 if math.isnan(dx) else dx], yerr=[0 if math.isnan(dy) else dy], color=color,
                    marker="o", capsize=3, label=f"{label} ({len(rs)} seed{'' if len(rs) == 1 else 's'})")
    ax.set(xlabel="training wall-clock (s)", ylabel=f"meta-test {head}", title=f"{family}: equal compute, "
           "runs and mean ± 95% CI")
    if kind(family) == "sinusoid":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def header(args, argv: list[str]) -> str:
    import torch

    return "\n".join([
        "# Equal-compute comparison", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine()}, device {args.device}, {args.threads} torch thread(s) per run (OMP_NUM_THREADS), "
        "one run of this sweep at a time (other load on the machine is not controlled)",
        f"- torch {torch.__version__}, commit {commit()}",
        f"- command: `{command_line(__file__, argv)}`",
        "- each learner's --time-budget is the wall_s of MAML's run of the same seed; mean ± 95% Student-t CI "
        "over seeds; meta-test on the family's fixed tasks", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--algos", default=None, help=f"comma-separated learners besides MAML (default {DEFAULT_ALGOS}, "
                   "and abml on sinusoid)")
    p.add_argument("--variant", action="append", default=[], help="LABEL=ALGO:JSON options; repeatable")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--maml-iterations", type=int, default=None, help="MAML's N (default: finn 3000, bmaml 10000, "
                   "omniglot 1000, tinyimagenet 300)")
    p.add_argument("--cap", type=int, default=100, help="the other learners' --iterations: cap × N")
    p.add_argument("--eval-tasks", type=int, default=None, help="meta-test tasks (default: the family's)")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"],
                   help="meta-test on the test tasks (the result) or on validation tasks (choosing settings)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every training process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data-root", default=None, help="vision data folder (default $GEMEXT_DATA)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume-existing", action="store_true", help="skip runs already meta-tested with this budget")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    if not families or any(f not in FAMILIES for f in families):
        p.error(f"--family: expected some of {', '.join(FAMILIES)}, got {args.family!r}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 3 and not args.dry_run:
        print(f"note: {len(seeds)} seed(s); the comparison wants at least 3", file=sys.stderr)
    out = Path(args.out)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    quality = list(dict.fromkeys(c for fam in families for c, *_ in QUALITY[kind(fam)]))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows: list[dict] = []

    def train(family, label, algo, options, seed, iterations, budget, n) -> dict | None:
        run = out / "runs" / family / f"{folder(label)}-s{seed}"
        metrics = finished(run, family, budget) if args.resume_existing else None
        shown = budget if budget is not None or label == "maml" else f"<wall_s of maml-s{seed}>"  # (dry run)
        cmd = command(args, family, algo, options, seed, iterations, shown, run, n)
        if args.dry_run or metrics is not None:
            print(("# done before, reused: " if metrics is not None else "") + shlex.join(cmd), flush=True)
        if args.dry_run:
            return metrics
        error = ""
        if metrics is None:
            print(f"[{family} {label} s{seed}] " + shlex.join(cmd[2:]), flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            metrics = finished(run, family, budget) if proc.returncode == 0 else None
            if metrics is None:
                error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                print(f"  FAILED: {proc.stderr[-1500:]}", file=sys.stderr)
            else:
                print(f"  {metrics['iterations']} iterations ({metrics['stopped_by']}) in {metrics['wall_s']:.1f} s",
                      flush=True)
        add(record(family, label, algo, options, seed, metrics, budget, error))
        return metrics

    def add(row: dict) -> None:
        rows.append(row)
        write_csv(out / "runs.csv", rows, COLUMNS + quality)  # after every run: partial results survive

    sections = []
    for family in families:
        n = args.maml_iterations or FAMILIES[family][2]
        compared = learners(family, args.algos, args.variant)
        for position, seed in enumerate(seeds):
            maml = train(family, "maml", "maml", {}, seed, n, None, n)
            budget = maml["wall_s"] if maml is not None else None
            for label, algo, options in order(compared, position):
                if budget is None and not args.dry_run:
                    add(record(family, label, algo, options, seed, None, None, "MAML's run failed"))
                    continue
                train(family, label, algo, options, seed, args.cap * n, budget, n)
        if not args.dry_run:
            sections += family_table(family, rows, n)
            plot(family, rows, out / f"{family}.png")
    if args.dry_run:
        return 0
    text = header(args, argv) + "\n" + "\n".join(sections)
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
