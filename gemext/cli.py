"""The `gemext` command: info, train, eval, bench (argument types in gemext.cli_args, the closing line
in gemext.cli_summary)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import build_info
from .cli_args import (
    HelpFormatter,
    Parser,
    choice,
    did_you_mean,
    existing_dir,
    nonneg_int,
    options_json,
    positive_float,
    positive_int,
    positive_int_list,
    seed_arg,
)
from .cli_summary import summary
from .config import EVAL_SPLITS
from .distributed import PeerFailure, is_main_process

TRAIN_EXAMPLES = """\
examples:
  # sinusoid regression in MAML's setting (preset finn)
  gemext train sinusoid --algo gem-bml+ --preset finn --iterations 3000
  # Omniglot 5-way 1-shot, read from ~/data/omniglot (never downloaded)
  gemext train omniglot --algo maml --preset 5w1s --data-root ~/data --iterations 1000
  # 2-D navigation meta-RL (pip install ".[rl]"), 10 tasks per meta-iteration
  gemext train nav2d --algo gem-bml+ --iterations 30 --meta-batch 10
"""


def parser() -> argparse.ArgumentParser:
    from . import __version__, algorithms
    from .bench_memory import TASKS as BENCH_TASKS
    from .train import TASKS

    fmt = HelpFormatter
    p = Parser(prog="gemext", description="Gradient-EM Bayesian meta-learning", formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"gemext {__version__}")
    # the parser of the command given, for its help (a command given no subcommand prints it) and
    # its refusals (main)
    p.set_defaults(parser_of=p)
    sub = p.add_subparsers(dest="command", metavar="{info,train,eval,bench}")
    i = sub.add_parser("info", help="print build information as JSON (cuda: gemext's CUDA kernels are compiled "
                                    "in this build; cuda_available: torch sees a CUDA device now)", formatter_class=fmt)
    i.set_defaults(parser_of=i)

    t = sub.add_parser("train", help="meta-train an algorithm on a task family", formatter_class=fmt,
                       epilog=TRAIN_EXAMPLES)
    t.set_defaults(parser_of=t)
    t.add_argument("task", type=choice(TASKS), choices=TASKS, help="task family")
    t.add_argument("--algo", required=True, type=choice(algorithms.names()), choices=algorithms.names(),
                   help="algorithm")
    t.add_argument("--preset", default=None, help="task preset (sinusoid: finn, bmaml, bmaml-100; "
                                                    "vision: 5w1s, 5w5s, 20w1s, 20w5s)")
    t.add_argument("--iterations", type=positive_int, default=1000,
                   help="meta-iterations (in total, also when resuming)")
    t.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="stop after the iteration that crosses SECONDS of training wall-clock (counted across "
                        "resumes; --iterations stays the upper bound); then checkpoint and meta-test as usual")
    t.add_argument("--inner-steps", type=nonneg_int, default=None, help="inner-loop steps (default: the algorithm's "
                                                                          "preset for the task)")
    t.add_argument("--seed", type=seed_arg, default=0, help="seed of every random stream of the run")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--out", default=None, help="run folder (default runs/TASK-ALGO-sSEED)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings; "
                                                          "--iterations may grow, --time-budget change)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    t.add_argument("--data-root", type=existing_dir, default=None, help="data folder (default $GEMEXT_DATA)")
    t.add_argument("--ways", type=positive_int, default=None,
                   help="classes per episode (vision; default: the preset's)")
    t.add_argument("--shots", type=positive_int, default=None,
                   help="examples per class (vision; default: the preset's)")
    t.add_argument("--meta-lr", type=positive_float, default=1e-3, help="meta-optimizer (Adam) learning rate")
    t.add_argument("--meta-batch", type=positive_int, default=None, help="tasks per meta-iteration (default: the "
                                                                           "task family's)")
    t.add_argument("--log-every", type=positive_int, default=10, help="iterations between log.csv rows and progress "
                                                                      "lines")
    t.add_argument("--checkpoint-every", type=positive_int, default=100, help="iterations between checkpoints")
    t.add_argument("--eval-tasks", type=positive_int, default=None, help="meta-test tasks after training (default: "
                                                                          "the task family's, 600; RL 40)")
    t.add_argument("--eval-steps", type=nonneg_int, default=None, help="meta-test adaptation steps (default: the "
                                                                        "learner's, at least 10 for regression)")
    t.add_argument("--eval-split", choices=EVAL_SPLITS, default="test",
                   help="tasks of the meta-test after training: the reported test tasks, or validation tasks "
                        "for choosing settings (sinusoid and RL: another seed; vision: the validation classes)")
    t.add_argument("--options", type=options_json, default={},
                   help="algorithm options as JSON, e.g. '{\"sigma0\": 0.1}'")
    t.add_argument("--no-eval", action="store_true", help="skip the meta-test after training")
    t.add_argument("--no-progress", action="store_true", help="no progress bar or lines")

    e = sub.add_parser("eval", help="meta-test a trained run", formatter_class=fmt)
    e.set_defaults(parser_of=e)
    e.add_argument("dir", type=existing_dir, help="run folder")
    e.add_argument("--tasks", type=positive_int, default=None, help="meta-test tasks (default: the run's eval_tasks)")
    e.add_argument("--steps", type=nonneg_int, default=None, help="adaptation steps (default: the run's)")
    e.add_argument("--data-root", type=existing_dir, default=None,
                   help="data folder, if not where the run was trained from (vision tasks)")
    e.add_argument("--split", choices=EVAL_SPLITS, default=None,
                   help="meta-test on the test or the validation tasks (default: the run's --eval-split)")
    e.add_argument("--predict-samples", type=positive_int, default=None,
                   help="posterior samples of the predictive (default: the learner's; sampling learners only)")

    b = sub.add_parser("bench", help="benchmarks", formatter_class=fmt)
    b.set_defaults(parser_of=b)
    bsub = b.add_subparsers(dest="bench", metavar="{memory}")
    m = bsub.add_parser("memory", help="peak memory and time per meta-iteration vs inner steps", formatter_class=fmt)
    m.set_defaults(parser_of=m)
    m.add_argument("--task", default="sinusoid", choices=BENCH_TASKS, help="task shapes")
    m.add_argument("--algos", default="gem-bml+,reptile",
                   help="comma-separated algorithms (or the peers higher-maml, plain-maml)")
    m.add_argument("--inner-steps", type=positive_int_list, default="1,5,10,20", help="comma-separated inner steps")
    m.add_argument("--out", required=True, help="output folder (CSV and plot)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to measure")
    m.add_argument("--repeats", type=positive_int, default=3, help="timed meta-iterations per point")
    m.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads of every measuring process (default: OMP_NUM_THREADS when set, else "
                        "the task family's: 1 for sinusoid, torch's default otherwise)")
    m.add_argument("--presets", dest="presets", action="store_true", default=True,
                   help="the learners with `gemext train`'s options for the task (the default)")
    m.add_argument("--no-presets", dest="presets", action="store_false",
                   help="the learners with the algorithms' class defaults instead")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:  # refused by the command's own parser, which names it as `gemext train: error: ...`
        args.parser_of.error("unrecognized arguments: " + " ".join(
            a + (did_you_mean(a.split("=")[0], _flags(args.parser_of)) if a.startswith("-") else "") for a in extra))
    if args.command is None or (args.command == "bench" and args.bench is None):
        # a command without its subcommand: its help (on stdout, where -h prints it), and exit 2 as
        # for any other missing argument, so that a script that left it out does not pass as done
        args.parser_of.print_help()
        return 2
    prog = " ".join(["gemext", args.command, *([args.bench] if args.command == "bench" else [])])
    # argparse turns `--flag=--` into [] without calling the flag's type; no flag takes an empty list
    empty = [k for k, v in vars(args).items() if isinstance(v, list) and not v]
    if empty:
        args.parser_of.error(f"argument --{empty[0].replace('_', '-')}: expected a value")
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
            print(json.dumps(metrics, indent=2), flush=True)
            print(summary(metrics, args.dir), file=sys.stderr)
            return 0
        if args.command == "bench":
            return _bench(args)
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:  # a refused setting, file or folder
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (PeerFailure, FloatingPointError) as exc:  # a dead peer rank, a run that keeps diverging
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """A parser's long flags (argparse keeps its actions in `_actions`; no public list exists)."""
    return [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]


def _one_line(exc: BaseException) -> str:
    """An error's message as the one line after `gemext CMD: error:` (the API's messages may carry
    their own context prefix, `bench memory: ...`, which the command's name already gives)."""
    return " ".join(str(exc).split()).removeprefix("bench memory: ")


def _bench(args) -> int:
    from . import algorithms
    from .bench_memory import PEERS
    from .bench_memory import run as bench_run

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    known = [*algorithms.names(), *PEERS]
    unknown = [a for a in algos if a not in known and not a.startswith("higher-")]
    if unknown:
        raise ValueError("argument --algos: unknown algorithm(s) "
                         + ", ".join(a + did_you_mean(a, known) for a in unknown)
                         + f"; available: {', '.join(known)}")
    threads = args.threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:  # as train would run the task
        from . import families
        threads = families.get(args.task).threads
    csv_path = bench_run(args.task, algos, args.inner_steps, args.out, args.device, repeats=args.repeats,
                         presets=args.presets, threads=threads)
    print(f"wrote {csv_path}")
    return 0


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

    _check_preset(args.task, args.preset)
    _check_option_names(args.task, args.algo, args.options)
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
    if args.no_eval:
        try:
            metrics = json.loads((Path(run) / "metrics.json").read_text())
        except (OSError, ValueError):  # the run is done all the same: the line names what is known
            metrics = {"task": args.task, "algo": args.algo}
    else:
        metrics = evaluate(run)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list) or len(v) <= 12}, indent=2),
              flush=True)
    print(summary(metrics, run), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- checks before a run
def _check_preset(task: str, preset: str | None) -> None:
    """Refuse an unknown --preset with the closest names, before a run folder is made (a family
    that reads no preset refuses the flag itself, naming it)."""
    from . import families

    names = families.get(task).preset_names
    if preset is not None and names and preset not in names:
        raise ValueError(f"unknown {task} preset {preset!r}{did_you_mean(preset, names)}; "
                         f"available: {', '.join(names)}")


def _check_option_names(task: str, algo: str, options: dict) -> None:
    """Refuse --options keys that no learner of the task's family takes, when one of them looks like
    a misspelling of a valid option, naming the likely one. Keys another learner takes, and keys
    without a likely spelling, are left to the learner's own check (gemext.algorithms), which says
    which learners use them."""
    from . import algorithms, families
    from .config import REFUSED_OPTIONS

    family = families.get(task)
    extra, domain = family.family_options, family.domain
    valid = sorted({*algorithms.option_names(algo, domain), *extra} - set(REFUSED_OPTIONS))
    anyone = {o for a in algorithms.names(domain) for o in algorithms.option_names(a, domain)} | set(extra)
    what = "unknown RL option(s)" if domain == "rl" else f"{algo}: unknown option(s)"
    typos = [k for k in options if k not in anyone and k not in REFUSED_OPTIONS]
    hints = {k: did_you_mean(k, valid) for k in typos}
    if any(hints.values()):
        raise ValueError(f"{what} {', '.join(k + hints[k] for k in typos)}; valid: {', '.join(valid)}")
    sigma = options.get("sigma") if "sigma" in family.family_options else None
    if sigma is not None and not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
        # the family passes it to the likelihood, whose own check cannot name the option
        raise ValueError(f"option sigma (the likelihood noise) must be a number > 0, got {sigma!r}")


if __name__ == "__main__":
    sys.exit(main())
