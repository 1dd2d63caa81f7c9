"""The `gemext` command: info, train, eval, bench."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import build_info
from .config import EVAL_SPLITS
from .distributed import PeerFailure, is_main_process


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _seed(s: str) -> int:
    v = _nonneg_int(s)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
    return v


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {s!r}")
    return vals


def _existing_dir(s: str) -> str:
    if not Path(s).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {s}")
    return s


def _options(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({exc.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    from . import __version__, algorithms
    from .bench_memory import TASKS as BENCH_TASKS
    from .train import TASKS

    fmt = _Help
    p = argparse.ArgumentParser(prog="gemext", description="Gradient-EM Bayesian meta-learning", formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"gemext {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information as JSON (cuda: gemext's CUDA kernels are compiled "
                               "in this build; cuda_available: torch sees a CUDA device now)", formatter_class=fmt)

    t = sub.add_parser("train", help="meta-train an algorithm on a task family", formatter_class=fmt)
    t.add_argument("task", choices=TASKS, help="task family")
    t.add_argument("--algo", required=True, choices=algorithms.names(), help="algorithm")
    t.add_argument("--preset", default=None, help="task preset (sinusoid: finn, bmaml, bmaml-100; "
                                                    "vision: 5w1s, 5w5s, 20w1s, 20w5s)")
    t.add_argument("--iterations", type=_positive_int, default=1000,
                   help="meta-iterations (in total, also when resuming)")
    t.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop after the iteration that crosses SECONDS of training wall-clock (counted across "
                        "resumes; --iterations stays the upper bound); then checkpoint and meta-test as usual")
    t.add_argument("--inner-steps", type=_nonneg_int, default=None, help="inner-loop steps (default: the algorithm's "
                                                                          "preset for the task)")
    t.add_argument("--seed", type=_seed, default=0, help="seed of every random stream of the run")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--out", default=None, help="run folder (default runs/TASK-ALGO-sSEED)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings; "
                                                          "--iterations may grow, --time-budget change)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    t.add_argument("--data-root", type=_existing_dir, default=None, help="data folder (default $GEMEXT_DATA)")
    t.add_argument("--ways", type=_positive_int, default=None,
                   help="classes per episode (vision; default: the preset's)")
    t.add_argument("--shots", type=_positive_int, default=None,
                   help="examples per class (vision; default: the preset's)")
    t.add_argument("--meta-lr", type=_positive_float, default=1e-3, help="meta-optimizer (Adam) learning rate")
    t.add_argument("--meta-batch", type=_positive_int, default=None, help="tasks per meta-iteration (default: the "
                                                                           "task family's)")
    t.add_argument("--log-every", type=_positive_int, default=10, help="iterations between log.csv rows and progress "
                                                                      "lines")
    t.add_argument("--checkpoint-every", type=_positive_int, default=100, help="iterations between checkpoints")
    t.add_argument("--eval-tasks", type=_positive_int, default=None, help="meta-test tasks after training (default: "
                                                                          "the task family's, 600; RL 40)")
    t.add_argument("--eval-steps", type=_nonneg_int, default=None, help="meta-test adaptation steps (default: the "
                                                                        "learner's, at least 10 for regression)")
    t.add_argument("--eval-split", choices=EVAL_SPLITS, default="test",
                   help="tasks of the meta-test after training: the reported test tasks, or validation tasks "
                        "for choosing settings (sinusoid and RL: another seed; vision: the validation classes)")
    t.add_argument("--options", type=_options, default={}, help="algorithm options as JSON, e.g. '{\"sigma0\": 0.1}'")
    t.add_argument("--no-eval", action="store_true", help="skip the meta-test after training")
    t.add_argument("--no-progress", action="store_true", help="no progress bar or lines")

    e = sub.add_parser("eval", help="meta-test a trained run", formatter_class=fmt)
    e.add_argument("dir", type=_existing_dir, help="run folder")
    e.add_argument("--tasks", type=_positive_int, default=None, help="meta-test tasks (default: the run's eval_tasks)")
    e.add_argument("--steps", type=_nonneg_int, default=None, help="adaptation steps (default: the run's)")
    e.add_argument("--data-root", type=_existing_dir, default=None,
                   help="data folder, if not where the run was trained from (vision tasks)")
    e.add_argument("--split", choices=EVAL_SPLITS, default=None,
                   help="meta-test on the test or the validation tasks (default: the run's --eval-split)")
    e.add_argument("--predict-samples", type=_positive_int, default=None,
                   help="posterior samples of the predictive (default: the learner's; sampling learners only)")

    b = sub.add_parser("bench", help="benchmarks", formatter_class=fmt)
    bsub = b.add_subparsers(dest="bench", required=True)
    m = bsub.add_parser("memory", help="peak memory and time per meta-iteration vs inner steps", formatter_class=fmt)
    m.add_argument("--task", default="sinusoid", choices=BENCH_TASKS, help="task shapes")
    m.add_argument("--algos", default="gem-bml+,reptile",
                   help="comma-separated algorithms (or the peers higher-maml, plain-maml)")
    m.add_argument("--inner-steps", type=_int_list, default="1,5,10,20", help="comma-separated inner steps")
    m.add_argument("--out", required=True, help="output folder (CSV and plot)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to measure")
    m.add_argument("--repeats", type=_positive_int, default=3, help="timed meta-iterations per point")
    m.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op threads of every measuring process (default: OMP_NUM_THREADS when set, else "
                        "the task family's: 1 for sinusoid, torch's default otherwise)")
    m.add_argument("--presets", action="store_true", help="the learners with `gemext train`'s options for the task "
                   "(default: the algorithms' class defaults)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    # argparse turns `--flag=--` into [] without calling the flag's type; no flag takes an empty list
    empty = [k for k, v in vars(args).items() if isinstance(v, list) and not v]
    if empty:
        p.error(f"argument --{empty[0].replace('_', '-')}: expected a value")
    try:
        if args.command == "info":
            print(json.dumps(build_info(), indent=2))
            return 0
        if args.command in ("train", "eval"):
            # the inner loops' per-step temporaries: reuse freed memory instead of faulting it in again
            from .allocator import keep_freed_memory
            keep_freed_memory()
            from .runs import run_task  # eval: a folder without a run is reported by evaluate
            _family_threads(args.task if args.command == "train" else run_task(args.dir))
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            from .train import evaluate
            metrics = evaluate(args.dir, tasks=args.tasks, steps=args.steps, data_root=args.data_root,
                               predict_samples=args.predict_samples, split=args.split)
            print(json.dumps(metrics, indent=2))
            return 0
        if args.command == "bench":
            from . import algorithms
            from .bench_memory import run as bench_run
            algos = [a.strip() for a in args.algos.split(",") if a.strip()]
            from .bench_memory import PEERS
            unknown = [a for a in algos if a not in algorithms.names() and a not in PEERS
                       and not a.startswith("higher-")]
            if unknown:
                p.error(f"--algos: unknown algorithm(s) {', '.join(unknown)}; "
                        f"available: {', '.join(algorithms.names())}")
            threads = args.threads
            if threads is None and "OMP_NUM_THREADS" not in os.environ:  # as train would run the task
                from . import families
                threads = families.get(args.task).threads
            csv_path = bench_run(args.task, algos, args.inner_steps, args.out, args.device, repeats=args.repeats,
                                 presets=args.presets, threads=threads)
            print(f"wrote {csv_path}")
            return 0
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:
        print(f"gemext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (PeerFailure, FloatingPointError) as exc:  # a dead peer rank, a run that keeps diverging
        print(f"gemext {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gemext {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


def _family_threads(task: str | None) -> None:
    """The task family's intra-op threads (`TaskFamily.threads`), unless OMP_NUM_THREADS is set."""
    if task is None or "OMP_NUM_THREADS" in os.environ:
        return
    from . import families
    try:
        threads = families.get(task).threads
    except ValueError:  # an unknown task: train refuses it with the list
        return
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def _train(args) -> int:
    from .train import Interrupted, RunConfig, evaluate, train

    out = args.out or f"runs/{args.task}-{args.algo}-s{args.seed}"
    config = RunConfig(task=args.task, algo=args.algo, preset=args.preset, iterations=args.iterations,
                       inner_steps=args.inner_steps, seed=args.seed, device=args.device, out=out,
                       meta_lr=args.meta_lr, meta_batch=args.meta_batch, log_every=args.log_every,
                       checkpoint_every=args.checkpoint_every, eval_tasks=args.eval_tasks,
                       eval_steps=args.eval_steps, ways=args.ways, shots=args.shots,
                       data_root=args.data_root, algo_options=args.options, time_budget=args.time_budget,
                       eval_split=args.eval_split)
    try:
        run = train(config, resume=args.resume, progress=False if args.no_progress else None,
                    overwrite=args.overwrite)
    except Interrupted as exc:
        print(f"gemext train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if not is_main_process():  # under torchrun rank 0 alone evaluates and reports
        return 0
    if not args.no_eval:
        metrics = evaluate(run)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list) or len(v) <= 12}, indent=2))
    print(f"run folder: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
