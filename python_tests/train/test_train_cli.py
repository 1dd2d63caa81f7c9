"""Run folders, exact resume, atomic checkpoints and the command line."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import run_cli

from gemext import _C, cli, runs
from gemext.train import RunConfig, evaluate, load_checkpoint, train

FAST = {"inner_steps": 2}


def _config(out: Path, **kw) -> RunConfig:
    base = dict(task="sinusoid", algo="gem-bml+", iterations=30, out=str(out), log_every=5,
                checkpoint_every=10, eval_tasks=40, meta_batch=5, algo_options=dict(FAST))
    base.update(kw)
    return RunConfig(**base)


def _state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")["learner"]


def test_run_folder_contents(tmp_path):
    run = train(_config(tmp_path / "r", iterations=12), progress=False)
    m = evaluate(run, tasks=30, steps=3)
    for f in ("config.json", "checkpoint.pt", "log.csv", "metrics.json", "mse_vs_steps.png", "predictions.png"):
        assert (run / f).exists(), f
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("task", "algo", "seed", "iterations", "wall_s", "mse_by_step", "nll", "coverage90"):
        assert key in saved, key
    assert len(saved["mse_by_step"]) == 4 and saved["iterations"] == 12
    assert 0.0 <= m["coverage90"] <= 1.0
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iteration,") and len(rows) == 1 + 3  # iterations 5, 10, 12


def test_resume_after_interruption_is_exact(tmp_path):
    full = train(_config(tmp_path / "full"), progress=False)

    class Crash(Exception):
        pass

    def crash(i):
        if i == 25:  # after the checkpoint at 20: iterations 21..25 are lost and redone
            raise Crash
    with pytest.raises(Crash):
        train(_config(tmp_path / "cut"), progress=False, on_iteration=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["iteration"] == 20
    train(_config(tmp_path / "cut"), resume=True, progress=False)
    a, b = _state(full), _state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "full" / "log.csv").read_text().splitlines()[1:] != []
    lines_full = [r.split(",")[0] for r in (tmp_path / "full" / "log.csv").read_text().splitlines()]
    lines_cut = [r.split(",")[0] for r in (tmp_path / "cut" / "log.csv").read_text().splitlines()]
    assert lines_full == lines_cut  # no duplicated log rows after resuming


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "r"
    train(_config(run, iterations=10), progress=False)
    good = _state(run)
    import gemext.train as T

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(T.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(_config(run, iterations=20), resume=True, progress=False)
    monkeypatch.undo()
    kept = _state(run)
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_corrupt_or_incompatible_checkpoint_is_refused(tmp_path):
    run = tmp_path / "r"
    train(_config(run, iterations=5), progress=False)
    with pytest.raises(ValueError, match="algo"):
        train(_config(run, algo="reptile", iterations=10), resume=True, progress=False)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        train(_config(run, iterations=10), resume=True, progress=False)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    run = tmp_path / "r"
    train(_config(run, iterations=5), progress=False)
    evaluate(run, tasks=10, steps=1, plots=False)
    assert "mse_by_step" in json.loads((run / "metrics.json").read_text())
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(_config(run, algo="reptile", iterations=5), progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["config"]["algo"] == "gem-bml+"  # untouched
    train(_config(run, algo="reptile", iterations=5), progress=False, overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["algo"] == "reptile" and "mse_by_step" not in metrics  # replaced, not merged
    code = cli.main(["train", "sinusoid", "--algo", "maml", "--iterations", "2", "--out", str(run), "--no-eval",
                     "--no-progress"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exclude each other"):
        train(_config(run, iterations=5), progress=False, overwrite=True, resume=True)


def test_resuming_further_removes_the_stale_meta_test_plots(tmp_path, capsys):
    """`train --resume --no-eval` replaces metrics.json with training-only metrics: the earlier
    meta-test's plots (the family's eval_outputs) go with it, and `gemext eval` writes them again;
    a resume that trains nothing keeps them, and --overwrite removes them."""
    from gemext.families.sinusoid import SinusoidFamily

    run = tmp_path / "r"
    argv = ["train", "sinusoid", "--algo", "reptile", "--inner-steps", "1", "--meta-batch", "3", "--out", str(run),
            "--eval-tasks", "10", "--eval-steps", "1", "--no-progress"]
    assert cli.main([*argv, "--iterations", "3", "--no-eval"]) == 0
    before = {f.name for f in run.iterdir()}
    assert evaluate(run)["iterations"] == 3
    plots = {f.name for f in run.iterdir()} - before
    assert plots == set(SinusoidFamily.eval_outputs) == {"mse_vs_steps.png", "predictions.png"}
    assert cli.main([*argv, "--iterations", "5", "--resume", "--no-eval"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iterations"] == 5 and "mse_by_step" not in metrics
    assert not any((run / f).exists() for f in plots)
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"] == 5
    assert all((run / f).exists() for f in plots)
    # a resume that trains nothing says so and keeps the meta-test that belongs to its checkpoint
    capsys.readouterr()
    assert cli.main([*argv, "--iterations", "5", "--resume", "--no-eval"]) == 0
    assert "already at iteration 5 of --iterations 5; nothing to train" in capsys.readouterr().err
    assert "mse_by_step" in json.loads((run / "metrics.json").read_text())
    assert all((run / f).exists() for f in plots)
    # --overwrite replaces the run, its plots included
    assert cli.main([*argv, "--iterations", "2", "--overwrite", "--no-eval"]) == 0
    assert not any((run / f).exists() for f in plots)


def test_resume_refuses_settings_that_change_the_trajectory(tmp_path):
    run = tmp_path / "r"
    train(_config(run, iterations=5), progress=False)
    with pytest.raises(ValueError, match="meta_lr: 0.001 -> 0.01"):
        train(_config(run, iterations=10, meta_lr=0.01), resume=True, progress=False)
    with pytest.raises(ValueError, match="algo_options.*inner_steps.*3"):
        train(_config(run, iterations=10, algo_options={"inner_steps": 3}), resume=True, progress=False)
    with pytest.raises(ValueError, match="meta_batch"):
        train(_config(run, iterations=10, meta_batch=6), resume=True, progress=False)
    with pytest.raises(ValueError, match="at iteration 5, beyond --iterations 3"):
        train(_config(run, iterations=3), resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["meta_lr"] == 0.001  # config.json still tells the truth
    train(_config(run, iterations=8, log_every=2, eval_tasks=7), resume=True, progress=False)  # allowed
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 8


def test_a_second_training_into_a_locked_folder_stops_at_once(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with runs.RunLock(run):  # another training holds the folder
        with pytest.raises(runs.RunFolderBusy, match=f"in use by another training \\(pid {os.getpid()}\\)"):
            train(_config(run, iterations=2), progress=False)
        assert not (run / "checkpoint.pt").exists()
    train(_config(run, iterations=2), progress=False)  # released: the folder is usable
    assert not list(run.glob("*.tmp"))


def test_a_checkpoint_damaged_inside_is_detected(tmp_path):
    run = tmp_path / "r"
    train(_config(run, iterations=20), progress=False)
    env = torch.load(run / "checkpoint.pt", weights_only=True)
    payload = bytearray(env["payload"])
    payload[len(payload) // 2] ^= 0x40  # one flipped bit: torch may still load it, the checksum may not pass
    torch.save({**env, "payload": bytes(payload)}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"damaged.*SHA-256.*checkpoint.pt.prev \(iteration 10\) is good"):
        train(_config(run, iterations=30), resume=True, progress=False)


def test_eval_returns_its_metrics_when_the_folder_cannot_be_written(tmp_path, monkeypatch):
    import gemext.plots

    run = train(_config(tmp_path / "r", iterations=2), progress=False)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(gemext.plots, "plot_regression", read_only)
    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.warns(RuntimeWarning, match="could not write.*Permission denied"):
        m = evaluate(run, tasks=10, steps=2)
    assert len(m["mse_by_step"]) == 3


def test_short_gem_bml_plus_run_beats_untrained_model(tmp_path):
    """Meta-training must lower the adapted meta-test MSE well below that of the initial prior."""
    torch.manual_seed(0)
    untrained = train(_config(tmp_path / "u", iterations=1, algo_options={}), progress=False)
    trained = train(_config(tmp_path / "t", iterations=150, meta_batch=10, algo_options={}), progress=False)
    before = evaluate(untrained, tasks=200, plots=False)["mse_by_step"][-1]
    after = evaluate(trained, tasks=200, plots=False)["mse_by_step"][-1]
    assert after < 0.75 * before, (before, after)


def test_cli_info(capsys):
    code, out, _ = run_cli(["info"], capsys)
    info = json.loads(out)
    assert code == 0
    assert {"version", "cuda", "cuda_available", "openmp", "torch", "threads"} <= set(info)
    assert info["cuda"] == bool(_C.cuda)
    assert info["cuda_available"] == torch.cuda.is_available()


@pytest.mark.parametrize("argv, needle", [
    (["train", "sinusoid", "--algo", "nope"], "invalid choice: 'nope'"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "-3"], "expected a positive integer"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "ten"], "expected a positive integer"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--inner-steps", "-1"], "expected an integer >= 0"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--data-root", "/no/such/dir"], "no such directory"),
    (["train", "sinusoid", "--algo", "gem-bml+", "--options", "{bad"], "expected a JSON object"),
    (["train", "mnist", "--algo", "gem-bml+"], "invalid choice: 'mnist'"),
    (["eval", "/no/such/run"], "no such directory"),
])
def test_cli_bad_input_exits_2_with_one_clear_line(argv, needle, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and needle in err


def test_cli_unknown_preset_and_unwritable_out(tmp_path, capsys):
    code, _, err = run_cli(["train", "sinusoid", "--algo", "gem-bml+", "--preset", "nope", "--iterations", "1",
                         "--out", str(tmp_path / "x"), "--no-progress"], capsys)
    assert code == 2 and "unknown sinusoid preset 'nope'" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "1",
                         "--out", str(blocker / "sub"), "--no-progress"], capsys)
    assert code == 2 and "cannot write into the output folder" in err


def test_cli_train_and_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", "sinusoid", "--algo", "reptile", "--iterations", "4", "--inner-steps", "2",
                            "--meta-batch", "3", "--eval-tasks", "20", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and json.loads(stdout)["iterations"] == 4
    code, stdout, err = run_cli(["eval", str(out), "--tasks", "10", "--steps", "2"], capsys)
    assert code == 0 and json.loads(stdout)["eval_tasks"] == 10
    assert err.splitlines()[-1].endswith(f" on 10 test tasks; results and plots: {out}")


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
def test_sigterm_writes_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    code = ("import os, signal, sys\n"
            "from gemext.train import RunConfig, train, Interrupted\n"
            f"cfg = RunConfig(task='sinusoid', algo='gem-bml+', iterations=1000, out={str(out)!r}, "
            "checkpoint_every=1000, meta_batch=2, algo_options={'inner_steps': 1})\n"
            "def hook(i):\n"
            "    if i == 7: os.kill(os.getpid(), signal.SIGTERM)\n"
            "try:\n"
            "    train(cfg, progress=False, on_iteration=hook)\n"
            "except Interrupted as e:\n"
            "    print('interrupted', e.iteration); sys.exit(143)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert "interrupted 7" in proc.stdout
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 7


def test_diverging_inner_loop_is_skipped_then_stops_cleanly(tmp_path):
    """A huge inner SGD step (no trust region) makes every VI diverge: steps are skipped, never written as NaN, and the
    run stops with a clear error after max_bad_steps."""
    cfg = _config(tmp_path / "r", iterations=50, max_bad_steps=3,
                  algo_options={"lr": 1e6, "inner_steps": 3, "inner": {"optimizer": "sgd"}})
    with pytest.raises(FloatingPointError, match="3 consecutive meta-iterations"):
        train(cfg, progress=False)
    state = _state(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in state.values())
    # a run shorter than max_bad_steps whose every iteration is skipped fails too (it trained nothing)
    short = _config(tmp_path / "s", iterations=2, max_bad_steps=3,
                    algo_options={"lr": 1e6, "inner_steps": 3, "inner": {"optimizer": "sgd"}})
    with pytest.raises(FloatingPointError, match="2 consecutive meta-iterations"):
        train(short, progress=False)


def test_progress_lines_without_a_terminal_and_a_live_log(tmp_path):
    """Batch jobs (no TTY) see plain progress lines during training and the meta-test, and log.csv
    grows every --log-every iterations, not only at checkpoints."""
    out = tmp_path / "r"
    seen: list[int] = []

    def hook(i):
        if i == 7:  # before the checkpoint at 10, after the log rows at 3 and 6
            seen.extend(int(r.split(",")[0]) for r in (out / "log.csv").read_text().splitlines()[1:])
    train(_config(out, iterations=10, log_every=3, checkpoint_every=10), progress=None, on_iteration=hook)
    assert seen == [3, 6]
    proc = subprocess.run([sys.executable, "-m", "gemext", "eval", str(out), "--tasks", "150", "--steps", "1"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "meta-test gem-bml+ (150 tasks): 2/2" in proc.stderr


def test_plots_leave_the_users_matplotlib_alone(tmp_path):
    code = ("import matplotlib, sys; matplotlib.use('svg'); from gemext.train import RunConfig, train, evaluate; "
            f"r = train(RunConfig(task='sinusoid', algo='maml', iterations=2, out={str(tmp_path / 'r')!r}), "
            "progress=False); "
            "evaluate(r, tasks=10, steps=1); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert (tmp_path / "r" / "predictions.png").stat().st_size > 1000


def test_cli_refuses_misuse_with_a_clear_message_before_allocating(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("gemext ")
    base = ["train", "sinusoid", "--iterations", "1", "--no-eval", "--no-progress"]
    cases = [
        (["--algo", "maml", "--meta-batch", "2000000000"], "needs about .* GiB"),
        (["--algo", "gem-bml+", "--options", '{"sigm0": 0.1}'],
         r"unknown option\(s\) sigm0 \(did you mean sigma0\?\); valid: .*sigma0"),
    ]
    for i, (args, message) in enumerate(cases):
        assert cli.main(base + args + ["--out", str(tmp_path / f"r{i}")]) == 2
        assert re.search(message, capsys.readouterr().err), message
    with pytest.raises(SystemExit) as info:
        cli.main(base + ["--algo", "maml", "--seed", str(2**64)])
    assert info.value.code == 2 and "below 2**63" in capsys.readouterr().err


def test_gymnasium_ids_are_registered_by_importing_gemext():
    code = ("import sys, gemext; assert 'gymnasium' not in sys.modules; import gymnasium; "
            "env = gymnasium.make('gemext/Nav2D-v0'); env.reset(seed=0); print(env.spec.max_episode_steps)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "100", proc.stderr[-2000:]
    # the package that defines the environments, imported before gymnasium (the hook must not re-enter it)
    code = "import gemext.tasks.rl, gymnasium; print(gymnasium.make('gemext/Nav2D-v0').spec.max_episode_steps)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "100", proc.stderr[-2000:]


def test_settings_a_task_family_does_not_read_are_refused(tmp_path, capsys):
    base = ["--iterations", "1", "--no-eval", "--no-progress"]
    cases = [(["sinusoid", "--algo", "maml", "--ways", "5"], "--ways does not apply to sinusoid"),
             (["nav2d", "--algo", "maml", "--preset", "finn", "--shots", "2"],
              "--preset, --shots do not apply to nav2d")]
    for i, (args, message) in enumerate(cases):
        assert cli.main(["train", *args, *base, "--out", str(tmp_path / f"r{i}")]) == 2
        assert message in capsys.readouterr().err


def test_run_log_appends_rows_and_truncates_on_resume(tmp_path):
    from gemext.runs import RunLog

    path = tmp_path / "log.csv"
    log = RunLog(path)
    for i in (1, 2, 3):
        log.add({"iteration": i, "loss": i / 10})
    inode = path.stat().st_ino
    log.add({"iteration": 4, "loss": 0.4})  # same columns: appended in place, not rewritten
    assert path.stat().st_ino == inode
    assert path.read_text().splitlines() == ["iteration,loss", "1,0.1", "2,0.2", "3,0.3", "4,0.4"]
    log.add({"iteration": 5, "loss": 0.5, "kl": 1.0})  # a new column: the file is rewritten with it
    assert path.read_text().splitlines()[0] == "iteration,loss,kl" and path.read_text().splitlines()[-1] == "5,0.5,1.0"
    resumed = RunLog(path, resume_from=3)  # a checkpoint at 3: rows logged after it are dropped
    assert [r["iteration"] for r in resumed.rows] == ["1", "2", "3"]
    assert path.read_text().splitlines()[-1] == "3,0.3,"


def test_sinusoid_learn_noise_puts_log_s_under_the_prior(tmp_path):
    """`learn_noise`: log s becomes a weight of the model, under the GEM prior (so meta-learned),
    and the meta-test's predictive std uses each sample's own s."""
    from gemext.train import load_run, open_family

    run = train(_config(tmp_path / "n", iterations=5, algo_options={**FAST, "learn_noise": True, "sigma": 0.2}),
                progress=False)
    _, family, learner, _ = load_run(run)
    family.close()
    assert "likelihood.log_sigma" in learner.prior.names
    i = learner.prior.names.index("likelihood.log_sigma")
    assert float(learner.prior.mu0[i].detach()) != pytest.approx(float(torch.log(torch.tensor(0.2))))  # learned
    metrics = evaluate(run, tasks=40, plots=False)
    assert all(math.isfinite(v) for v in metrics["mse_by_step"]) and math.isfinite(metrics["nll"])
    with pytest.raises(ValueError, match="learn_noise must be true or false"):
        open_family(_config(tmp_path / "b", algo_options={"learn_noise": "yes"})).learner_options()


def test_cli_eval_predict_samples(tmp_path, capsys):
    """`gemext eval --predict-samples N` changes the predictive of a sampling learner (and says so
    in metrics.json); a learner that does not sample refuses it with one line."""
    gem = train(_config(tmp_path / "g", iterations=3), progress=False)
    runs = {}
    for n in (2, 50):
        code, stdout, _ = run_cli(["eval", str(gem), "--tasks", "20", "--predict-samples", str(n)], capsys)
        assert code == 0
        runs[n] = json.loads(stdout)
        assert runs[n]["predict_samples"] == n
    assert runs[2]["nll"] != runs[50]["nll"]  # the predictive mixture changed
    maml = train(_config(tmp_path / "m", algo="maml", iterations=2), progress=False)
    code, _, err = run_cli(["eval", str(maml), "--tasks", "20", "--predict-samples", "10"], capsys)
    assert code == 2 and "maml does not sample its predictions" in err


def test_train_and_eval_keep_freed_memory_unless_told_otherwise(monkeypatch, tmp_path):
    """`gemext train`/`eval` ask glibc to keep freed memory (1.3× on the sinusoid von step); the
    user's own MALLOC_*_ settings or GEMEXT_KEEP_FREED_MEMORY=0 win; other commands leave malloc alone."""
    import platform

    from gemext import allocator
    for var in (*allocator._ENV, "GEMEXT_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(var, raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # every mallopt accepted,
        out = subprocess.run([sys.executable, "-c", "from gemext.allocator import keep_freed_memory; "  # in a
                              "print(keep_freed_memory())"], capture_output=True, text=True, check=True)  # child:
        assert out.stdout.strip() == "True"  # the suite's own process keeps glibc's defaults
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GEMEXT_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info"]) == 0 and calls == []
    out = tmp_path / "run"
    assert cli.main(["train", "sinusoid", "--algo", "maml", "--iterations", "2", "--no-eval", "--out", str(out),
                     "--no-progress"]) == 0
    assert calls == [1]


def test_sinusoid_preset_defaults_sit_between_the_family_defaults_and_the_users_options(tmp_path):
    from gemext.families.sinusoid import PRESET_DEFAULTS, SINUSOID_DEFAULTS
    from gemext.train import open_family

    def noise(**kw) -> float:
        family = open_family(_config(tmp_path / "p", **{"algo_options": {}, **kw}))
        try:
            return float(family.learner_options()["likelihood"].log_sigma.exp())
        finally:
            family.close()

    bmaml = PRESET_DEFAULTS["bmaml"]["gem-bml+"]["sigma"]
    assert bmaml != SINUSOID_DEFAULTS["gem-bml+"]["sigma"]
    assert noise(preset="finn") == pytest.approx(SINUSOID_DEFAULTS["gem-bml+"]["sigma"])
    assert noise(preset="bmaml") == pytest.approx(bmaml)
    assert noise(preset="bmaml", algo="gem-bml") == pytest.approx(SINUSOID_DEFAULTS["gem-bml"]["sigma"])
    assert noise(preset="bmaml", algo_options={"sigma": 0.3}) == pytest.approx(0.3)  # the user's wins


def test_checkpoints_load_from_a_str_path(tmp_path):
    run = train(_config(tmp_path / "s", iterations=2), progress=False)
    assert load_checkpoint(str(run / "checkpoint.pt"))["iteration"] == 2


def test_refused_options_and_runs_leave_no_folder(tmp_path, capsys, monkeypatch):
    """Options a run cannot take are refused with what to do instead, naming the user's option; a run
    refused before it wrote anything leaves no (empty, locked) run folder behind."""
    monkeypatch.delenv("GEMEXT_DATA", raising=False)
    base = ["--iterations", "1", "--no-eval", "--no-progress"]
    cases = [
        (["sinusoid", "--algo", "gem-bml+", "--options", '{"seed": 1}'], "option seed cannot be given in --options: "
                                                                          "use --seed"),
        (["sinusoid", "--algo", "gem-bml+", "--options", '{"likelihood": "gaussian"}'],
         'option likelihood cannot be given in --options: the task family sets it (sinusoid: use "sigma"'),
        (["sinusoid", "--algo", "gem-bml+", "--options", '{"query_steps": -2}'],
         "gem-bml+: option query_steps must be >= 0, got -2"),
        (["sinusoid", "--algo", "gem-bml+", "--options", '{"inner": {"lrr": 1}}'],
         "gem-bml+: option inner has unknown key(s) lrr; valid: steps, optimizer, lr"),
        (["sinusoid", "--algo", "gem-bml+", "--options", '{"predict_samples": 0}'],
         "gem-bml+: option predict_samples must be an integer >= 1, got 0"),
        (["sinusoid", "--algo", "maml", "--options", '{"sigma0": 0.1}'], "maml: unknown option(s) sigma0"),
        (["sinusoid", "--algo", "maml", "--options", '{"reg": 2}'], "maml: option reg is used only by imaml"),
        (["sinusoid", "--algo", "gem-bml+", "--preset", "nope"], "unknown sinusoid preset 'nope'"),
        (["sinusoid", "--algo", "gem-bml+", "--resume"], "cannot resume: no checkpoint"),
        (["omniglot", "--algo", "maml"],
         "no data root: set --data-root DIR or the GEMEXT_DATA environment variable (in Python: root=DIR)"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"r{i}" / "run"
        assert cli.main(["train", *args, *base, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / f"r{i}").exists(), args
    kept = tmp_path / "kept"  # a folder the user made stays
    kept.mkdir()
    assert cli.main(["train", "sinusoid", "--algo", "maml", "--preset", "nope", *base, "--out", str(kept)]) == 2
    assert kept.is_dir()


def test_resume_accepts_a_default_spelled_out(tmp_path):
    run = tmp_path / "r"
    train(_config(run, iterations=1, meta_batch=None, checkpoint_every=1), progress=False)
    with pytest.raises(ValueError, match="meta_batch: 25 -> 24"):
        train(_config(run, iterations=2, meta_batch=24), resume=True, progress=False)
    with pytest.raises(ValueError, match="preset='finn', but this run has preset='bmaml'"):
        train(_config(run, iterations=2, preset="bmaml"), resume=True, progress=False)
    train(_config(run, iterations=2, meta_batch=25, preset="finn"), resume=True, progress=False)  # the defaults
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2


def test_cli_uses_the_familys_threads_unless_omp_num_threads_is_set(monkeypatch, tmp_path):
    """`gemext train sinusoid` runs on one intra-op thread (the family's `threads`); the user's
    OMP_NUM_THREADS wins; families without a setting keep torch's default; eval reads the task
    from the run folder."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cli._family_threads("omniglot")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        cli._family_threads("sinusoid")
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        (tmp_path / "config.json").write_text(json.dumps({"task": "sinusoid"}))
        cli._family_threads(runs.run_task(tmp_path))
        assert torch.get_num_threads() == 1
        assert runs.run_task(tmp_path / "missing") is None
    finally:
        torch.set_num_threads(before)


def test_validation_tasks_are_fixed_and_apart_from_the_test_tasks(tmp_path, capsys):
    # --eval-split validation meta-tests on tasks of their own seed: the same on every call, other
    # than the test tasks; metrics.json says which split its figures are; a resume may change it
    from gemext.families import get
    from gemext.families.base import EVAL_SEED, VALIDATION_SEED
    assert VALIDATION_SEED != EVAL_SEED
    run = tmp_path / "r"
    code, _, err = run_cli(["train", "sinusoid", "--algo", "maml", "--iterations", "6", "--eval-tasks", "20",
                         "--eval-split", "validation", "--out", str(run), "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["eval_split"] == "validation"
    assert saved["eval_split"] == "validation"
    again = evaluate(run, plots=False)
    test = evaluate(run, plots=False, split="test")
    assert again["mse_by_step"] == saved["mse_by_step"] and again["eval_split"] == "validation"
    assert test["eval_split"] == "test" and test["mse_by_step"] != saved["mse_by_step"]
    assert json.loads((run / "metrics.json").read_text())["eval_split"] == "test"
    family = get("sinusoid")(RunConfig(task="sinusoid", algo="maml", eval_split="validation"))
    assert family.eval_seed == VALIDATION_SEED
    train(RunConfig(task="sinusoid", algo="maml", iterations=8, out=str(run), eval_split="test"), resume=True,
          progress=False)
    code, _, err = run_cli(["eval", str(run), "--split", "nope"], capsys)
    assert code == 2 and "--split" in err


def test_a_vision_task_without_validation_classes_refuses_the_validation_split(tmp_path, capsys):
    # refused before any data is read or any folder written, naming the task and the way out
    code, _, err = run_cli(["train", "omniglot", "--algo", "maml", "--eval-split", "validation",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "omniglot has no validation classes" in err and "--eval-split test" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="eval_split must be one of test, validation"):
        RunConfig(task="sinusoid", algo="maml", eval_split="val").validate()


def _git_head() -> str | None:
    """The commit `gemext.runs.source_commit` must find: HEAD of the checkout the package runs from."""
    import gemext

    package = Path(gemext.__file__).resolve().parent
    proc = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                          text=True)
    lines = proc.stdout.split()
    return lines[1] if proc.returncode == 0 and Path(lines[0]).resolve() == package.parent else None


def test_config_json_records_the_resolved_settings(tmp_path, capsys, monkeypatch):
    """config.json keeps the settings as given (what --resume compares and eval rebuilds the run
    from) and records what they resolved to and which gemext ran them."""
    import gemext

    run = tmp_path / "r"
    argv = ["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "1", "--inner-steps", "1", "--no-eval",
            "--no-progress", "--out", str(run)]
    head = _git_head()
    runs.source_commit.cache_clear()  # looked up once per process: here, now
    assert cli.main(argv) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] is None and cfg["meta_batch"] is None and cfg["inner_steps"] == 1  # as given
    resolved = cfg["resolved"]
    assert resolved["preset"] == "finn" and resolved["meta_batch"] == 25 and resolved["inner_steps"] == 1
    opts = resolved["learner_options"]
    assert opts["sigma0"] == 0.02 and opts["inner"] == {"optimizer": "von"} and opts["inner_steps"] == 1
    assert opts["likelihood"] == {"type": "GaussianLikelihood", "sigma": 0.05}
    assert cfg["gemext_version"] == gemext.__version__
    assert cfg["git_commit"] in (head, _git_head())  # (a commit may land meanwhile)
    # the record does not stop a resume, nor an eval, that reads config.json back
    assert cli.main([*argv, "--iterations", "2", "--resume"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2
    assert evaluate(run, tasks=5, steps=1, plots=False)["iterations"] == 2
    # a preset given: its own settings (bmaml's likelihood noise for GEM-BML+); no git: no commit, no failure
    runs.source_commit.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    try:
        argv = [*argv[:-1], str(tmp_path / "b"), "--preset", "bmaml", "--meta-batch", "2", "--options",
                '{"learn_noise": true}']
        assert cli.main(argv) == 0
    finally:
        runs.source_commit.cache_clear()
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["git_commit"] is None and cfg["resolved"]["preset"] == "bmaml" and cfg["resolved"]["meta_batch"] == 2
    assert cfg["resolved"]["learner_options"]["likelihood"] == {"type": "GaussianLikelihood", "sigma": 0.15,
                                                                "learned": ["log_sigma"]}


def test_a_start_that_fails_before_training_leaves_nothing_to_overwrite(tmp_path, capsys):
    """An option the learner accepts but cannot train with fails in the first meta-iteration: the
    run folder it made goes (a folder the user made stays, empty of run files), and the retry
    needs no --overwrite."""
    base = ["train", "sinusoid", "--algo", "maml", "--iterations", "1", "--inner-steps", "1", "--meta-batch", "2",
            "--no-eval", "--no-progress"]
    bad = ["--options", '{"forward_kwargs": {"bogus": 1}}']
    kept = tmp_path / "kept"
    kept.mkdir()
    for out in (tmp_path / "new" / "run", kept):
        assert cli.main([*base, *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gemext train: error: ") and "bogus" in err and "Traceback" not in err, err
        if out == kept:
            assert kept.is_dir() and not any((kept / f).exists() for f in runs.RUN_FILES)
        else:
            assert not (tmp_path / "new").exists()
        code, err = cli.main([*base, "--out", str(out)]), capsys.readouterr().err
        assert code == 0 and load_checkpoint(out / "checkpoint.pt")["iteration"] == 1, err


def test_an_overwrite_that_fails_before_training_gives_the_replaced_run_back(tmp_path, capsys):
    """--overwrite sets the previous run aside until the new one trains: a start that fails first
    leaves the previous run (its files and meta-test plots) as it was; one that trains replaces it."""
    base = ["train", "sinusoid", "--algo", "maml", "--iterations", "1", "--inner-steps", "1", "--meta-batch", "2",
            "--no-progress", "--eval-tasks", "4", "--out", str(tmp_path)]
    assert cli.main(base) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    assert "checkpoint.pt" in before and "mse_vs_steps.png" in before
    bad = ["--overwrite", "--no-eval", "--options", '{"forward_kwargs": {"bogus": 1}}']
    assert cli.main([*base, *bad]) == 2
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before and not (tmp_path / runs.REPLACED).exists()
    capsys.readouterr()
    assert cli.main([*base, "--overwrite", "--no-eval", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    assert not (tmp_path / "mse_vs_steps.png").exists() and not (tmp_path / runs.REPLACED).exists()
