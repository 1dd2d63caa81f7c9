"""gemext's learners against the peers a user would otherwise reach for, per meta-iteration: time and
peak memory on sinusoid (the `finn` MLP, meta-batch 25) and Omniglot 5-way 1-shot shapes (Conv4,
meta-batch 4, synthetic images), at k = 1, 5, 20 inner steps.

Peers: second-order MAML with the `higher` library (a per-task innerloop_ctx, as its examples) and
the same MAML as a plain per-task PyTorch loop (functional_call + autograd.grad). learn2learn is
not measured: it does not build on Python 3.11 (its Cython extension fails to compile), the
interpreter this project targets. gemext learners run with their training presets (`gemext train`'s
defaults for the task). Every point is a fresh process (gemext.bench_memory), one thread by default;
ratios are against higher's MAML at the same task and k, measured in the same run.

    python benchmarks/bench_peers.py --out benchmarks/out/peers [--tasks sinusoid,omniglot] [--steps 1,5,20]
        [--device cuda]

Writes peers.csv, peers.md (table) and peers.png (time per meta-iteration vs k).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
from pathlib import Path

ALGOS = ("gem-bml+", "gem-bml", "maml", "fomaml", "reptile", "imaml", "higher-maml", "plain-maml")


def main() -> None:
    from gemext import bench_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default="sinusoid,omniglot")
    ap.add_argument("--steps", default="1,5,20")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every point this many times, interleaved, and report the median (shared machines)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where every point runs (peak memory: RSS on cpu, allocated device memory on cuda)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="every measuring process (peers too) keeps freed memory, as `gemext train` does")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every measuring process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for task in args.tasks.split(","):
        base = {"task": task, "device": args.device, "repeats": args.repeats, "ways": 5, "shots": 1, "query": 15,
                "meta_batch": 25 if task == "sinusoid" else 4, "presets": True, "options": {},
                "keep_freed_memory": args.keep_freed_memory}
        algos = []
        for algo in args.algos.split(","):
            reason = bench_memory._peer_unavailable(algo) if algo in bench_memory.PEERS else None
            if reason:
                print(f"skipping {algo}: {reason}", flush=True)
            else:
                algos.append(algo)
        points: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):  # every point once per round: slow drifts of a shared machine hit all alike
            for k in (int(s) for s in args.steps.split(",")):
                for algo in algos:
                    res = bench_memory._run_point({**base, "algo": algo, "inner_steps": k}, timeout_s=1800)
                    points.setdefault((algo, k), []).append(res)
                    print(f"{task:>9} {algo:>12} k={k:<3} round {rnd + 1}: {1e3 * res['time_per_iter_s']:10.1f} ms "
                          f"{res['peak_mem_mb']:8.1f} MB", flush=True)
        for (algo, k), results in sorted(points.items(), key=lambda kv: (algos.index(kv[0][0]), kv[0][1])):
            rows.append({"task": task, "algo": algo, "inner_steps": k,
                         "time_per_iter_s": statistics.median(r["time_per_iter_s"] for r in results),
                         "peak_mem_mb": max(r["peak_mem_mb"] for r in results)})
    with open(out / "peers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "algo", "inner_steps", "time_per_iter_s", "peak_mem_mb"])
        w.writeheader()
        w.writerows({k: r[k] for k in w.fieldnames} for r in rows)
    ref = {(r["task"], r["inner_steps"]): r["time_per_iter_s"] for r in rows if r["algo"] == "higher-maml"}
    lines = [f"Date {datetime.date.today()}; machine {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; device {args.device}; {args.threads} thread(s); median of {args.repeats} "
             "meta-iterations after a warm-up, each point in a fresh process"
             f"{f', median over {args.rounds} interleaved rounds' if args.rounds > 1 else ''}"
             f"{', freed memory kept (glibc)' if args.keep_freed_memory else ''}.", "",
             "| task | algorithm | k | ms / meta-iteration | peak MB | speed-up vs higher MAML |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        h = ref.get((r["task"], r["inner_steps"]))
        t = r["time_per_iter_s"]
        ratio = f"{h / t:.1f}×" if h and t and math.isfinite(t) else "—"
        lines.append(f"| {r['task']} | {r['algo']} | {r['inner_steps']} | {1e3 * t:.1f} | "
                     f"{r['peak_mem_mb']:.1f} | {ratio} |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, out / "peers.png")


def _plot(rows: list[dict], path: Path) -> None:
    from gemext.plots import new_figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = new_figure((5 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for algo in dict.fromkeys(r["algo"] for r in rows if r["task"] == task):
            pts = [r for r in rows if r["task"] == task and r["algo"] == algo]
            ax.plot([r["inner_steps"] for r in pts], [1e3 * r["time_per_iter_s"] for r in pts], marker="o", label=algo,
                    ls="--" if algo in ("higher-maml", "plain-maml") else "-")
        ax.set(xlabel="inner steps k", ylabel="ms per meta-iteration", title=task, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
