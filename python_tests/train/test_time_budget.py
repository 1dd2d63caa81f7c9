"""`gemext train --time-budget`: the run stops after the iteration that crosses the budget, records
it, and resumes by it. Time is made deterministic: the loop's clock (gemext.train._clock) advances
exactly one second per meta-iteration, so no test depends on how fast the machine is."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import gemext.train as T
from gemext import cli
from gemext.config import RunConfig
from gemext.train import load_checkpoint

SECONDS_PER_ITERATION = 1.0


@pytest.fixture
def clock(monkeypatch):
    """The training loop's clock, moved on by SECONDS_PER_ITERATION at the start of every meta-step
    (so the budget's test in the step after iteration k sees k seconds since the run started)."""
    now = [1000.0]
    real_step = T.meta_step

    def ticking_step(*args, **kwargs):
        now[0] += SECONDS_PER_ITERATION
        return real_step(*args, **kwargs)
    monkeypatch.setattr(T, "_clock", lambda: now[0])
    monkeypatch.setattr(T, "meta_step", ticking_step)
    return now


def _train(run: Path, *extra: str, capsys=None) -> tuple[int, str]:
    argv = ["train", "sinusoid", "--algo", "maml", "--iterations", "50", "--inner-steps", "1", "--meta-batch", "3",
            "--eval-tasks", "5", "--log-every", "5", "--checkpoint-every", "100", "--out", str(run), *extra]
    code = cli.main(argv)
    return code, capsys.readouterr().err if capsys is not None else ""


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _logged(run: Path) -> list[int]:
    with open(run / "log.csv", newline="") as f:
        return [int(r["iteration"]) for r in csv.DictReader(f)]


def _same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoint.pt")["learner"], load_checkpoint(b / "checkpoint.pt")["learner"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_budget_stops_after_the_crossing_iteration_and_is_recorded(tmp_path, clock, capsys):
    run = tmp_path / "r"
    code, err = _train(run, "--time-budget", "7.5", capsys=capsys)  # 8 s after iteration 8: stop there
    assert code == 0
    m = _metrics(run)
    assert m["iterations"] == 8 and m["stopped_by"] == "time_budget"
    assert m["wall_s"] == pytest.approx(8.0)
    assert "mse_by_step" in m  # meta-tested as usual
    assert json.loads((run / "config.json").read_text())["time_budget"] == 7.5
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["iteration"] == 8 and ckpt["config"]["time_budget"] == 7.5
    assert _logged(run) == [5, 8]  # the last iteration is logged though not a multiple of --log-every
    last = [ln for ln in err.splitlines() if ln.startswith("maml sinusoid:")][-1]
    assert last.startswith("maml sinusoid: 8/50 ") and "stopped=time budget spent" in last
    # `gemext eval` reads the checkpoint's iteration and keeps the record
    assert cli.main(["eval", str(run), "--tasks", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["iterations"] == 8 and out["stopped_by"] == "time_budget"


def test_budget_exactly_reached_and_never_reached(tmp_path, clock, capsys):
    code, _ = _train(tmp_path / "a", "--time-budget", "8", capsys=capsys)  # reached, not crossed: >= stops
    assert code == 0 and _metrics(tmp_path / "a")["iterations"] == 8
    code, _ = _train(tmp_path / "b", "--time-budget", "1000", "--iterations", "6", capsys=capsys)
    m = _metrics(tmp_path / "b")
    assert code == 0 and m["iterations"] == 6 and m["stopped_by"] == "iterations"
    # crossed on the last iteration: the run did all its iterations
    code, _ = _train(tmp_path / "c", "--time-budget", "6", "--iterations", "6", "--no-eval", capsys=capsys)
    m = _metrics(tmp_path / "c")
    assert code == 0 and m["iterations"] == 6 and m["stopped_by"] == "iterations"
    # without a budget: --iterations, as before
    code, _ = _train(tmp_path / "d", "--iterations", "7", "--no-eval", capsys=capsys)
    m = _metrics(tmp_path / "d")
    assert code == 0 and m["iterations"] == 7 and m["stopped_by"] == "iterations"
    assert json.loads((tmp_path / "d" / "config.json").read_text())["time_budget"] is None


def test_resume_by_the_budget(tmp_path, clock, capsys):
    run = tmp_path / "r"
    assert _train(run, "--time-budget", "7.5", capsys=capsys)[0] == 0
    # the same budget: nothing more to train, said so; the meta-test of the checkpoint is kept
    code, err = _train(run, "--time-budget", "7.5", "--resume", "--no-eval", capsys=capsys)
    assert code == 0 and "time budget spent" in err and "of --time-budget 7.5; nothing to train" in err
    m = _metrics(run)
    assert m["iterations"] == 8 and m["stopped_by"] == "time_budget" and "mse_by_step" in m
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 8
    # a larger budget continues from the checkpoint's iteration 8 to the crossing iteration 13
    code, err = _train(run, "--time-budget", "12.5", "--resume", capsys=capsys)
    assert code == 0 and "nothing to train" not in err
    m = _metrics(run)
    assert m["iterations"] == 13 and m["stopped_by"] == "time_budget" and m["wall_s"] == pytest.approx(13.0)
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 13
    assert json.loads((run / "config.json").read_text())["time_budget"] == 12.5
    assert _logged(run) == [5, 8, 10, 13]
    # bit-for-bit the run trained for 13 iterations in one go
    assert _train(tmp_path / "straight", "--iterations", "13", "--no-eval", capsys=capsys)[0] == 0
    _same_state(run, tmp_path / "straight")
    # without a budget the resume goes on to --iterations
    code, _ = _train(run, "--iterations", "15", "--resume", "--no-eval", capsys=capsys)
    m = _metrics(run)
    assert code == 0 and m["iterations"] == 15 and m["stopped_by"] == "iterations"


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf"])
def test_bad_budgets_are_refused_by_the_cli(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "sinusoid", "--algo", "maml", "--time-budget", value, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--time-budget" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "10"])
def test_bad_budgets_are_refused_by_the_config(value):
    with pytest.raises(ValueError, match="time_budget"):
        RunConfig(task="sinusoid", algo="maml", time_budget=value).validate()
