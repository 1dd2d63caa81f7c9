"""Rollout-collector throughput: `python benchmarks/rl_bench.py [--tasks nav2d,halfcheetah-vel]`;
meta-RL comparison: `python benchmarks/rl_bench.py compare --algos maml,gem-bml+ --iterations 30`;
equal meta-iterations and equal wall-clock over seeds: `python benchmarks/rl_bench.py equal --out DIR`
then `python benchmarks/rl_bench.py table --runs DIR` (see `equal`); several tasks at equal
iterations: `python benchmarks/rl_bench.py tasks --runs DIR`; the parts of a vector step (env step,
policy action, async round trip): `python benchmarks/rl_bench.py parts`; how far one inner update
moves a trained run's policy: `python benchmarks/rl_bench.py stepkl --run RUN`.
Run with gemext installed (`pip install ".[rl]"`).

Prints environment steps per second (policy sampling included: the 2×100 Gaussian MLP) for
SyncVectorEnv and AsyncVectorEnv pools of several sizes, collecting `--episodes` full episodes
of one task per repeat (median over repeats, after one warm-up collection).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ci95, command_line, interleaved, parse_run, stamp, write_csv

from gemext.tasks.rl import RolloutCollector, sample_tasks
from gemext.train import RunConfig, evaluate, train


def throughput(task: str, mode: str, num_envs: int, episodes: int, repeats: int = 3) -> float:
    """Median env steps/s collecting `episodes` episodes with a fresh 2×100 policy."""
    with RolloutCollector(task, num_envs=num_envs, mode=mode, seed=0) as col:
        policy = col.make_policy()
        t = sample_tasks(task, 1, 0)[0]
        gen = torch.Generator().manual_seed(0)
        col.collect(policy, None, t, num_envs, gen)  # warm-up: worker start, first-call costs
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            batch = col.collect(policy, None, t, episodes, gen)
            rates.append(batch.num_steps / (time.perf_counter() - start))
    return statistics.median(rates)


def parts(argv: list[str]) -> None:
    """What one vector step of a collection is made of, in µs: a single environment's step (zero
    action, no wrappers beyond gymnasium's), the policy's action for --envs observations, and an async
    pool's round trip (1 and --envs workers of nav2d, whose step is negligible), each the median of --steps.
    The figures from which a many-core collection can be estimated."""
    import gymnasium as gym
    import numpy as np

    from gemext.tasks.rl import env_id, register_envs

    ap = argparse.ArgumentParser(prog="rl_bench.py parts")
    ap.add_argument("--tasks", default="halfcheetah-vel,ant-vel")
    ap.add_argument("--envs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args(argv)
    register_envs()

    def median_us(fn, n: int) -> float:
        return round(1e6 * statistics.median(interleaved({"fn": fn}, n, warmup=0)["fn"]), 1)

    torch.set_num_threads(1)
    for task in args.tasks.split(","):
        env = gym.make(env_id(task), disable_env_checker=True)
        env.unwrapped.set_task(sample_tasks(task, 1, 0)[0])
        env.reset(seed=0)
        zero = np.zeros(env.action_space.shape, dtype=np.float32)

        def step(env=env, zero=zero):
            if any(env.step(zero)[2:4]):
                env.reset()
        with RolloutCollector(task, num_envs=1, seed=0) as col:
            policy = col.make_policy()
        obs = torch.zeros(args.envs, policy.obs_dim)
        act = median_us(lambda policy=policy, obs=obs: policy.act(obs, None, None, False), args.steps)
        print(json.dumps({"task": task, "env_step_us": median_us(step, args.steps),
                          f"policy_act_us_{args.envs}": act}), flush=True)
        env.close()
    for workers in dict.fromkeys((1, args.envs)):
        with RolloutCollector("nav2d", num_envs=workers, mode="async", seed=0) as col:
            col.envs.reset(seed=0)
            zeros = np.zeros((workers, 2), dtype=np.float32)
            trip = median_us(lambda col=col, zeros=zeros: col.envs.step(zeros), args.steps)
            print(json.dumps({"async_round_trip_us": trip, "workers": workers}), flush=True)


def compare(argv: list[str]) -> None:
    """Train and meta-test one run per algorithm with the same budget; one figure for all."""
    # the one import that names an inner module (not part of the public gemext.train API)
    from gemext.families.rl import plot_return_comparison

    ap = argparse.ArgumentParser(prog="rl_bench.py compare")
    ap.add_argument("--task", default="nav2d")
    ap.add_argument("--algos", default="maml,gem-bml+,gem-bml,reptile")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--meta-lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", type=json.loads, default={})
    ap.add_argument("--out", default="benchmarks/out/rl")
    args = ap.parse_args(argv)
    runs = []
    for algo in args.algos.split(","):
        run = Path(args.out) / f"{args.task}-{algo}"
        train(RunConfig(task=args.task, algo=algo, iterations=args.iterations, seed=args.seed, out=str(run),
                        meta_lr=args.meta_lr, log_every=5, checkpoint_every=10, algo_options=args.options),
              progress=False, overwrite=True)
        m = evaluate(run)
        print(json.dumps({k: m[k] for k in ("algo", "iterations", "wall_s", "env_steps", "return_by_step",
                                            "return_ci95_by_step", "eval_tasks")}), flush=True)
        runs.append(run)
    plot_return_comparison(runs, Path(args.out) / f"{args.task}_return_vs_steps.png", f"{args.task} meta-test")


FAILED = "failed.txt"  # in a run folder of `equal` whose training stopped with an error


def equal(argv: list[str]) -> None:
    """Per seed, MAML-TRPO trains N meta-iterations and is meta-tested; its training wall-clock W
    (metrics.json wall_s) is that seed's budget. Every other learner trains N iterations and is
    meta-tested (the equal-iterations result, its run folder copied to <label>-s<seed>-it<N>), then
    resumes the same run with --time-budget W and is meta-tested again (equal wall-clock, in
    <label>-s<seed>). Each training is a fresh `python -m gemext train` (OMP_NUM_THREADS=--threads)."""
    import os
    import shutil
    import subprocess

    ap = argparse.ArgumentParser(prog="rl_bench.py equal")
    ap.add_argument("--task", default="nav2d")
    ap.add_argument("--algos", default="maml,gem-bml+,gem-bml,reptile")
    ap.add_argument("--variant", action="append", default=[],
                    help="'LABEL=ALGO:{json options}' (meta_lr and meta_batch there override the flags)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--meta-batch", type=int, default=10)
    ap.add_argument("--meta-lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tasks", type=int, default=None, help="meta-test tasks (default: the family's, 40)")
    ap.add_argument("--resume-existing", action="store_true",
                    help="keep the runs already meta-tested in --out (MAML's gives its seed's budget)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    entries = [parse_run(a) for a in args.algos.split(",") if a] + [parse_run(v) for v in args.variant]
    if not any(algo == "maml" for _, algo, _ in entries):
        raise SystemExit("rl_bench.py equal: MAML (--algos maml) sets the wall-clock budget")
    entries.sort(key=lambda e: e[1] != "maml")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def gemext_train(label: str, algo: str, options: dict, seed: int, *extra: str) -> dict:
        run = out / f"{label}-s{seed}"
        options = dict(options)  # a variant's meta_lr and meta_batch are flags
        meta_lr, meta_batch = options.pop("meta_lr", args.meta_lr), options.pop("meta_batch", args.meta_batch)
        cmd = [sys.executable, "-m", "gemext", "train", args.task, "--algo", algo, "--meta-batch", str(meta_batch),
               "--meta-lr", str(meta_lr), "--seed", str(seed), "--out", str(run), "--log-every", "5",
               "--checkpoint-every", "50", "--options", json.dumps(options), "--no-progress", *extra]
        if args.eval_tasks is not None:
            cmd += ["--eval-tasks", str(args.eval_tasks)]
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(done.stderr)
        if done.returncode:  # e.g. a run that diverged: recorded (the table lists it), the others go on
            why = [line for line in done.stderr.splitlines() if "error" in line.lower()][-1:] or ["exit status"]
            (run / FAILED).write_text(f"{' '.join(extra)}: {why[0]}\n")
            return {}
        return json.loads((run / "metrics.json").read_text())

    def done(run: Path, budget: float | None = None) -> dict | None:
        path = run / "metrics.json"
        if args.resume_existing and (run / FAILED).exists():
            return {}
        if not (args.resume_existing and path.exists()):
            return None
        m = json.loads(path.read_text())
        return m if budget is None or m.get("stopped_by") == "time_budget" else None

    for seed in (int(s) for s in args.seeds.split(",")):
        budget = None
        for label, algo, options in entries:
            first = out / f"{label}-s{seed}-it{args.iterations}"
            m = done(first)
            if m is None:
                m = gemext_train(label, algo, options, seed, "--iterations", str(args.iterations), "--overwrite")
                shutil.copytree(out / f"{label}-s{seed}", first, dirs_exist_ok=True)
            if not m:
                continue  # failed before N iterations: no equal-time run either
            if algo == "maml":
                budget = m["wall_s"]
            elif done(out / f"{label}-s{seed}", budget) is None:
                gemext_train(label, algo, options, seed, "--iterations", str(500 * args.iterations), "--time-budget",
                             str(budget), "--resume")


def _meta_test(m: dict) -> dict:
    """A run's meta-test figures by update k, as flat columns: return{k}, ci{k} (over its test tasks)
    and, with a posterior, spread{k} (over posterior draws)."""
    out = {f"return{k}": r for k, r in enumerate(m["return_by_step"])}
    out.update({f"ci{k}": r for k, r in enumerate(m["return_ci95_by_step"])})
    out.update({f"spread{k}": r for k, r in enumerate(m.get("return_spread_by_step", []))})
    return out


def table(argv: list[str]) -> None:
    """The runs of `equal` in --runs: per learner mean ± 95% Student-t CI over seeds of the meta-test
    return after 0..K updates at equal iterations and at equal wall-clock (table.md, runs.csv) and
    the training return after one update against iterations and against seconds (curves.png)."""
    import re

    import numpy as np

    from gemext.plots import new_figure

    ap = argparse.ArgumentParser(prog="rl_bench.py table")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    args = ap.parse_args(argv)
    root = Path(args.runs)
    rows, logs = [], {}
    for metrics in sorted(root.glob("*/metrics.json")):
        match = re.fullmatch(rf"(.+)-s(\d+)(-it{args.iterations})?", metrics.parent.name)
        if not match:
            continue
        label, seed, equal_its = match.group(1), int(match.group(2)), bool(match.group(3))
        if label == "maml" and not equal_its:
            continue  # MAML's equal-time run is its N-iteration run
        m = json.loads(metrics.read_text())
        if (metrics.parent / FAILED).exists():  # the metrics of its N-iteration meta-test, not of this run
            logs.setdefault(label, []).append(np.genfromtxt(metrics.parent / "log.csv", delimiter=",", names=True))
            continue
        row = {"label": label, "seed": seed, "view": "iterations" if equal_its else "wall-clock",
               "iterations": m["iterations"], "wall_s": round(m["wall_s"], 1), **_meta_test(m)}
        rows.append(row)
        if not equal_its or label == "maml":
            logs.setdefault(label, []).append(np.genfromtxt(metrics.parent / "log.csv", delimiter=",", names=True))
    for failed in sorted(root.glob(f"*/{FAILED}")):
        match = re.fullmatch(r"(.+)-s(\d+)", failed.parent.name)
        if match:
            rows.append({"label": match.group(1), "seed": int(match.group(2)), "view": "wall-clock",
                         "failed": failed.read_text().strip()})
    if not rows:
        sys.exit(f"rl_bench.py table: no meta-tested LABEL-sSEED runs of `equal` in {root}")
    write_csv(root / "runs.csv", rows)
    steps = sorted({int(k[6:]) for r in rows for k in r if k.startswith("return")})
    lines = [stamp(), "", command_line("rl_bench.py", ["table"] + argv), ""]
    for view in ("iterations", "wall-clock"):
        what = f"{args.iterations} meta-iterations each" if view == "iterations" else \
            f"each seed's budget the training time of MAML's {args.iterations} iterations"
        lines += [f"At equal {view} ({what}; mean ± 95% Student-t CI over seeds):",
                  "", "| learner | seeds | iterations | train s | " + " | ".join(f"return after {k}" for k in steps)
                  + " | spread over posterior draws after 0 / " + str(steps[-1]) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(steps) + "---|"]
        for label in dict.fromkeys(r["label"] for r in rows):
            rs = [r for r in rows if r["label"] == label and (r["view"] == view or label == "maml")]
            failed = [r for r in rs if "failed" in r]
            rs = [r for r in rs if "failed" not in r]
            if not rs:
                continue

            def cell(key: str, digits: int = 1, rs: list[dict] = rs) -> str:
                v = [r[key] for r in rs if key in r]
                return f"{np.mean(v):.{digits}f} ± {ci95(v):.{digits}f}" if len(v) > 1 else \
                    (f"{v[0]:.{digits}f}" if v else "—")
            spread = f"{cell('spread0')} / {cell(f'spread{steps[-1]}')}" if "spread0" in rs[0] else "—"
            seeds = f"{len(rs)}" + (f" (+{len(failed)} failed: seed {', '.join(str(r['seed']) for r in failed)})"
                                    if failed else "")
            lines.append(f"| {label} | {seeds} | {np.mean([r['iterations'] for r in rs]):.0f} | "
                         f"{np.mean([r['wall_s'] for r in rs]):.0f} | " + " | ".join(cell(f"return{k}") for k in steps)
                         + f" | {spread} |")
        lines.append("")
    (root / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    fig = new_figure((10, 3.6))
    axes = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(logs.items()):
        color = f"C{i}"
        for j, log in enumerate(runs):
            for ax, x in zip(axes, ("iteration", "wall_s")):
                ax.plot(log[x], log["return_post"], color=color, alpha=0.7, lw=1, label=label if j == 0 else None)
    low = min(float(np.min(log["return_post"])) for runs in logs.values() for log in runs)
    robust = float(np.percentile(np.concatenate([log["return_post"] for runs in logs.values() for log in runs]), 1))
    for ax, xlabel in zip(axes, ("meta-iteration", "training seconds")):
        ax.set(xlabel=xlabel, ylabel="training return after 1 update",
               title=f"nav2d, {len(logs)} learners, each seed a line")
        if low < 2 * robust:  # a diverging run would flatten every other curve
            ax.set_ylim(bottom=2 * robust)
            ax.set_title(f"{ax.get_title()} (clipped at {2 * robust:.0f}; lowest {low:.0f})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=120)


def tasks_table(argv: list[str]) -> None:
    """Runs of several tasks trained for the same iterations (hence the same environment steps), in
    --runs as TASK-ALGO-sSEED folders (`gemext train` outputs): per task and learner the meta-test
    return after 0..K updates, mean ± 95% Student-t CI over seeds (or ± the CI over test tasks for a
    single seed), and the spread over posterior draws (tasks.md, runs.csv); per task the training
    return after one update against iterations, each seed a line (curves.png)."""
    import re

    import numpy as np

    from gemext.plots import new_figure

    ap = argparse.ArgumentParser(prog="rl_bench.py tasks")
    ap.add_argument("--runs", required=True)
    args = ap.parse_args(argv)
    root = Path(args.runs)
    rows, logs = [], {}
    for metrics in sorted(root.glob("*/metrics.json")):
        match = re.fullmatch(r"(.+?)-(maml|gem-bml\+?|reptile)-s(\d+)", metrics.parent.name)
        if not match:
            continue
        task, algo, seed = match.group(1), match.group(2), int(match.group(3))
        m = json.loads(metrics.read_text())
        rows.append({"task": task, "algo": algo, "seed": seed, "iterations": m["iterations"],
                     "env_steps": m["env_steps"], "wall_s": round(m["wall_s"], 1), **_meta_test(m)})
        logs.setdefault(task, {}).setdefault(algo, []).append(
            np.genfromtxt(metrics.parent / "log.csv", delimiter=",", names=True))
    if not rows:
        sys.exit(f"rl_bench.py tasks: no meta-tested TASK-ALGO-sSEED runs in {root}")
    write_csv(root / "runs.csv", rows)
    steps = sorted({int(k[6:]) for r in rows for k in r if k.startswith("return")})
    lines = [stamp(), "", command_line("rl_bench.py", ["tasks"] + argv), "",
             "Meta-test return after k updates: mean ± 95% Student-t CI over seeds; with one seed, ± the 95% CI",
             "over its test tasks (marked *).", ""]
    lines += ["| task | learner | seeds | iterations | env steps | train s | "
              + " | ".join(f"after {k}" for k in steps) + f" | spread over posterior draws after 0 / {steps[-1]} |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(steps) + "---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for algo in dict.fromkeys(r["algo"] for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and r["algo"] == algo]

            def cell(k: int, rs: list[dict] = rs) -> str:
                v = [r[f"return{k}"] for r in rs]
                return f"{np.mean(v):.1f} ± {ci95(v):.1f}" if len(v) > 1 else f"{v[0]:.1f} ± {rs[0][f'ci{k}']:.1f}*"
            spread = " / ".join(f"{np.mean([r[f'spread{k}'] for r in rs]):.1f}" for k in (0, steps[-1])) \
                if "spread0" in rs[0] else "—"
            mean = lambda key, rs=rs: np.mean([r[key] for r in rs])
            lines.append(f"| {task} | {algo} | {', '.join(str(r['seed']) for r in rs)} | "
                         f"{mean('iterations'):.0f} | {mean('env_steps') / 1e6:.1f} M | "
                         f"{mean('wall_s'):.0f} | " + " | ".join(cell(k) for k in steps)
                         + f" | {spread} |")
    (root / "tasks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    cols = min(2, len(logs))
    rows_ = -(-len(logs) // cols)
    fig = new_figure((5 * cols, 3.4 * rows_))
    axes = np.atleast_1d(fig.subplots(rows_, cols)).flatten()
    for ax, (task, by_algo) in zip(axes, logs.items()):
        for i, (algo, runs) in enumerate(by_algo.items()):
            for j, log in enumerate(runs):
                ax.plot(log["iteration"], log["return_post"], color=f"C{i}", alpha=0.7, lw=1,
                        label=algo if j == 0 else None)
        ax.set(xlabel="meta-iteration", ylabel="training return after 1 update", title=task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(logs):]:  # an odd number of tasks leaves one panel empty
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=120)


def step_kl(argv: list[str]) -> None:
    """How far one inner update moves a trained run's policy: the mean KL(π_μ₀ ‖ π_adapted) over
    the states of π_μ₀'s rollouts on --tasks new tasks, for the run's own inner step and, for a GEM
    run, the natural-gradient step (inner_optimizer "natural", lr 1) from the same prior; and the median
    |action mean| of π_μ₀ on those states (nav2d clips actions at ±0.1: far beyond it, updates that
    move the mean change no action)."""
    import dataclasses

    from gemext.record import load_run, open_family
    from gemext.tasks.rl import mean_kl

    ap = argparse.ArgumentParser(prog="rl_bench.py stepkl")
    ap.add_argument("--run", required=True)
    ap.add_argument("--tasks", type=int, default=10)
    args = ap.parse_args(argv)
    config, family, learner, _ = load_run(args.run)
    steps, families = {"own step": learner}, [family]
    try:
        if config.algo in ("gem-bml", "gem-bml+"):
            # the natural step's learner: a family of its own (a learner owns its policy), the same prior
            options = {**config.algo_options, "inner_optimizer": "natural", "inner_lr": 1.0, "inner_options": None}
            families.append(open_family(dataclasses.replace(config, algo_options=options)))
            steps["natural step"] = families[-1].build_learner()
            steps["natural step"].load_state_dict(learner.state_dict())
        tasks = sample_tasks(config.task, args.tasks, 3)
        prior = learner.adapt(tasks, 0)
        states = [family.sampler.rollouts(p, t) for p, t in zip(prior, tasks)]
        means = torch.cat([family.sampler.policy.mean_log_std(b.observations, p)[0].flatten()
                           for b, p in zip(states, prior)])
        print(json.dumps({"run": args.run, "median |action mean|": round(float(means.abs().median()), 3)}))
        for name, lrn in steps.items():
            adapted = lrn.adapt(tasks, 1)
            kls = [float(mean_kl(family.sampler.policy, a, b, p)) for a, b, p in zip(adapted, states, prior)]
            print(json.dumps({"run": args.run, "step": name, "kl": [round(k, 4) for k in kls],
                              "median": round(statistics.median(kls), 4)}), flush=True)
    finally:
        for f in families:
            f.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    if argv[:1] == ["equal"]:
        return equal(argv[1:])
    if argv[:1] == ["table"]:
        return table(argv[1:])
    if argv[:1] == ["parts"]:
        return parts(argv[1:])
    if argv[:1] == ["tasks"]:
        return tasks_table(argv[1:])
    if argv[:1] == ["stepkl"]:
        return step_kl(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="nav2d,halfcheetah-vel")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--sync-envs", default="10,20,40")
    ap.add_argument("--async-envs", default="2,4,8")
    args = ap.parse_args(argv)
    for task in args.tasks.split(","):
        for mode, sizes in (("sync", args.sync_envs), ("async", args.async_envs)):
            for n in (int(s) for s in sizes.split(",")):
                rate = throughput(task, mode, n, args.episodes)
                print(json.dumps({"task": task, "mode": mode, "num_envs": n, "episodes": args.episodes,
                                  "steps_per_s": round(rate)}), flush=True)


if __name__ == "__main__":
    main()
