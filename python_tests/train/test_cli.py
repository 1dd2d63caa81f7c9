"""The `gemext` command itself: help, refusals (one line, exit 2, the closest names), and the
line that closes `gemext train` / `gemext eval`."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from fixtures import run_cli

from gemext import cli

QUICK = ["--iterations", "2", "--inner-steps", "1", "--meta-batch", "2", "--no-progress"]


def test_bare_commands_print_their_help():
    # the real command: help on stdout (where -h prints it), nothing on stderr, exit 2 (a missing
    # subcommand is a usage error, as any other missing argument)
    for argv, listed in ([], ("info", "train", "eval", "bench")), (["bench"], ("memory",)):
        proc = subprocess.run([sys.executable, "-m", "gemext", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout.startswith(f"usage: gemext{' bench' if argv else ''} ") and proc.stderr == ""
        assert all(name in proc.stdout for name in listed)


def test_train_help_ends_with_examples_that_run_as_written(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "-h"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    examples = out[out.index("\nexamples:\n"):].splitlines()[2:]
    commands = [line.strip() for line in examples if line.startswith("  gemext train ")]
    assert [shlex.split(c)[2] for c in commands] == ["sinusoid", "omniglot", "nav2d"]
    assert any("--data-root" in c for c in commands)
    for line in examples:  # printed as written: no line re-wrapped into another
        assert line.startswith("  gemext train ") or line.startswith("  # "), line
    for command in commands:  # each one parses and passes the checks made before a run starts
        argv = [str(tmp_path) if a.startswith("~") else a for a in shlex.split(command)[1:]]
        args = cli.parser().parse_args(argv)
        cli._check_preset(args.task, args.preset)
        cli._check_option_names(args.task, args.algo, args.options)


@pytest.mark.parametrize("argv, line", [
    (["train", "sinusiod", "--algo", "maml"], "argument task: invalid choice: 'sinusiod' (did you mean sinusoid?)"),
    (["train", "sinusoid", "--algo", "gem-bml++"], "argument --algo: invalid choice: 'gem-bml++' "
                                                   "(did you mean gem-bml+?)"),
    (["train", "sinusoid", "--algo", "mamll"], "argument --algo: invalid choice: 'mamll' (did you mean maml?)"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--options", '{"sigma00": 0.1}'],
     "gem-bml+: unknown option(s) sigma00 (did you mean sigma0?); valid: "),
    (["train", "sinusoid", "--algo", "maml", "--preset", "fin"],
     "unknown sinusoid preset 'fin' (did you mean finn?); available: finn, "),
    (["train", "omniglot", "--algo", "maml", "--preset", "5w1"], "unknown omniglot preset '5w1' (did you mean 5w1s?)"),
    (["train", "nav2d", "--algo", "maml", "--options", '{"max_kll": 0.1}'],
     "unknown RL option(s) max_kll (did you mean max_kl?); valid: "),
    (["train", "sinusoid", "--algo", "maml", "--itrations", "5"],
     "unrecognized arguments: --itrations (did you mean --iterations?) 5"),
    (["bench", "memory", "--out", "b", "--algos", "reptile,mamll"],
     "argument --algos: unknown algorithm(s) mamll (did you mean maml?)"),
])
def test_misspelt_names_are_refused_with_the_closest_ones(argv, line, capsys, tmp_path):
    code, out, err = run_cli([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])], capsys)
    prog = "gemext bench memory" if argv[0] == "bench" else "gemext train"
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and line in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()


def test_a_name_another_learner_takes_is_not_taken_for_a_misspelling(capsys, tmp_path):
    # sigma0 is GEM's, reg is iMAML's: the learner's own check says so, with no guess
    for options, line in (('{"sigma0": 0.1}', "maml: unknown option(s) sigma0; valid: "),
                          ('{"reg": 2}', "maml: option reg is used only by imaml")):
        code, _, err = run_cli(["train", "sinusoid", "--algo", "maml", "--options", options, *QUICK,
                             "--out", str(tmp_path / "r")], capsys)
        assert code == 2 and line in err and "did you mean" not in err, err


@pytest.mark.parametrize("argv", [
    ["train", "sinusoid", "--algo", "maml", "--iterations", "0"],  # a flag's own check
    ["train", "sinusoid"],  # a required flag left out
    ["train", "sinusoid", "--algo", "maml", "--device", "tpu"],  # argparse's choices
    ["train", "sinusoid", "--algo", "maml", "--options", "[1]"],
    ["train", "sinusoid", "--algo", "maml", "--ways", "5"],  # the family's check
    ["train", "sinusoid", "--algo", "maml", "--options", '{"seed": 1}'],  # the run's settings
    ["train", "sinusoid", "--algo", "maml", "--options", '{"lr": "x"}'],  # the learner's option check
    ["train", "sinusoid", "--algo", "maml", "--options", '{"sigma": "x"}'],  # the family's option
    ["train", "sinusoid", "--algo", "maml", "--iterations=--"],  # argparse's empty list
    ["train", "sinusoid", "--algo", "maml", "--resume"],  # the run folder's
    ["eval", "."],  # not a run folder
    ["bench", "memory", "--out", "b", "--inner-steps", "0"],
])
def test_every_refusal_is_one_line_and_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*argv, *(["--out", "run", *QUICK[-1:]] if argv[0] == "train" else [])], capsys)
    prog = {"train": "gemext train", "eval": "gemext eval", "bench": "gemext bench memory"}[argv[0]]
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "usage:" not in err and "Traceback" not in err
    if "sigma" in argv[-1]:  # named, although the likelihood is what refuses it
        assert "option sigma (the likelihood noise) must be a number > 0, got 'x'" in err


def test_train_and_eval_close_with_a_summary_line(tmp_path, capsys):
    """stdout keeps the metrics as JSON (what scripts read); the last line on stderr names what
    ran, its headline figures and where the results and plots are."""
    run = tmp_path / "run"
    base = ["train", "sinusoid", "--algo", "reptile", *QUICK, "--eval-tasks", "10", "--eval-steps", "2",
            "--out", str(run)]
    code, out, err = run_cli([*base, "--no-eval"], capsys)
    assert code == 0 and out == ""
    assert err.splitlines()[-1] == (f"sinusoid reptile: 2 iterations, not meta-tested (gemext eval {run}); "
                                    f"run folder: {run}")
    code, out, err = run_cli([*base, "--iterations", "3", "--resume"], capsys)
    metrics = json.loads(out)
    mse, ci = metrics["mse_by_step"][-1], metrics["mse_ci95_by_step"][-1]
    assert code == 0 and re.fullmatch(
        rf"sinusoid reptile, 3 iterations: MSE after 2 steps {mse:.4g} ± {ci:.4g}, NLL {metrics['nll']:.4g} ± "
        rf"\S+ on 10 test tasks; results and plots: {re.escape(str(run))}", err.splitlines()[-1]), err
    code, out, err = run_cli(["eval", str(run), "--tasks", "5", "--split", "validation"], capsys)
    assert code == 0 and json.loads(out)["eval_tasks"] == 5
    assert err.splitlines()[-1].startswith("sinusoid reptile, 3 iterations: MSE after 2 steps ")
    assert err.splitlines()[-1].endswith(f" on 5 validation tasks; results and plots: {run}")


def test_the_summary_names_each_familys_headline_figures():
    vision = {"task": "omniglot", "algo": "maml", "iterations": 1000, "accuracy": 0.932, "ci95": 0.0051,
              "ece": 0.0412, "nll": 0.2, "ways": 5, "shots": 1, "eval_tasks": 600, "eval_split": "test"}
    assert cli.summary(vision, "runs/o") == ("omniglot maml 5-way 1-shot, 1000 iterations: accuracy 93.20% ± 0.51, "
                                             "ECE 0.041 on 600 test tasks; results and plots: runs/o")
    rl = {"task": "nav2d", "algo": "gem-bml+", "iterations": 30, "stopped_by": "time_budget",
          "return_by_step": [-43.2, -27.4, -21.5, -19.2], "return_ci95_by_step": [4.9, 3.7, 2.1, 1.6],
          "eval_tasks": 40, "eval_split": "test"}
    assert cli.summary(rl, "r") == ("nav2d gem-bml+, 30 iterations (time budget): return after 3 updates -19.2 ± 1.6 "
                                    "(before: -43.2) on 40 test tasks; results and plots: r")
