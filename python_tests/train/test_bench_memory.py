"""The memory/time-vs-inner-steps benchmark: CSV and plot from fresh worker processes."""
from __future__ import annotations

import csv
import math

import pytest

from gemext import bench_memory


def test_run_writes_csv_and_png(tmp_path, capsys):
    path = bench_memory.run("sinusoid", ["reptile", "higher-nope"], [1, 2], tmp_path, repeats=1, meta_batch=2)
    assert path == tmp_path / "memory.csv"
    assert "skipping higher-nope" in capsys.readouterr().out
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["algo", "inner_steps", "peak_mem_mb", "time_per_iter_s"]
    assert [(r["algo"], int(r["inner_steps"])) for r in rows] == [("reptile", 1), ("reptile", 2)]
    for r in rows:
        assert float(r["peak_mem_mb"]) >= 0 and 0 < float(r["time_per_iter_s"]) < 60
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_give_the_learners_the_training_options(monkeypatch, tmp_path):
    # `gemext bench memory --presets`: GEM-BML+ on vision shapes with the vision presets (NGVI), not
    # its class default (von)
    seen = []
    monkeypatch.setattr(bench_memory, "run_point", lambda spec, timeout_s: seen.append(spec) or
                        {"peak_mem_mb": 1.0, "time_per_iter_s": 1.0})
    from gemext.cli import main
    assert main(["bench", "memory", "--task", "omniglot", "--algos", "gem-bml+", "--inner-steps", "1",
                 "--out", str(tmp_path), "--presets"]) == 0
    assert seen[0]["presets"] is True
    opts = bench_memory.preset_options("omniglot", "gem-bml+", 1)
    assert opts["inner"]["optimizer"] == "ngvi" and opts["inner_steps"] == 1


def test_the_command_measures_the_learners_as_trained_unless_told_otherwise(monkeypatch, tmp_path, capsys):
    # `gemext bench memory` starts every learner from `gemext train`'s options for the task; --no-presets
    # from the class defaults (and `run` defaults to the same)
    import inspect

    seen = []
    monkeypatch.setattr(bench_memory, "run_point", lambda spec, timeout_s: seen.append(spec) or
                        {"peak_mem_mb": 1.0, "time_per_iter_s": 1.0})
    from gemext.cli import main
    args = ["bench", "memory", "--task", "sinusoid", "--algos", "gem-bml+", "--inner-steps", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0 and seen[-1]["presets"] is True
    assert main([*args, "--no-presets"]) == 0 and seen[-1]["presets"] is False
    assert main([*args, "--presets"]) == 0 and seen[-1]["presets"] is True
    assert inspect.signature(bench_memory.run).parameters["presets"].default is True
    with pytest.raises(SystemExit):
        main(["bench", "memory", "-h"])
    assert "--no-presets" in capsys.readouterr().out


def test_bench_memory_points_run_on_the_familys_threads(monkeypatch, tmp_path):
    # like `gemext train`: sinusoid points on one thread unless OMP_NUM_THREADS or --threads says otherwise
    seen = []
    monkeypatch.setattr(bench_memory, "run_point", lambda spec, timeout_s: seen.append(spec) or
                        {"peak_mem_mb": 1.0, "time_per_iter_s": 1.0})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from gemext.cli import main
    args = ["bench", "memory", "--algos", "fomaml", "--inner-steps", "1", "--out", str(tmp_path)]
    assert main([*args, "--task", "sinusoid"]) == 0 and seen[-1]["threads"] == 1
    assert main([*args, "--task", "omniglot"]) == 0 and seen[-1]["threads"] is None
    assert main([*args, "--task", "omniglot", "--threads", "2"]) == 0 and seen[-1]["threads"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main([*args, "--task", "sinusoid"]) == 0 and seen[-1]["threads"] is None


def test_the_command_line_takes_every_task_shape_the_benchmark_has(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench_memory, "run_point", lambda spec, timeout_s: seen.append(spec) or
                        {"peak_mem_mb": 1.0, "time_per_iter_s": 1.0})
    from gemext.cli import main
    for task in bench_memory.TASKS:
        assert main(["bench", "memory", "--task", task, "--algos", "gem-bml+", "--inner-steps", "1",
                     "--out", str(tmp_path / task), "--presets"]) == 0
        assert seen[-1]["task"] == task
        assert bench_memory.preset_options(task, "gem-bml+", 1)["inner_steps"] == 1


def test_measure_vision_shapes_with_the_higher_peer():
    pytest.importorskip("higher")
    spec = {"task": "omniglot", "algo": "higher-maml", "inner_steps": 1, "device": "cpu", "repeats": 1,
            "meta_batch": 1, "ways": 2, "shots": 1, "query": 1}
    res = bench_memory.measure(spec)
    assert set(res) == {"peak_mem_mb", "time_per_iter_s"}
    assert math.isfinite(res["peak_mem_mb"]) and res["time_per_iter_s"] > 0


def test_run_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        bench_memory.run("cifar", ["reptile"], [1], tmp_path)
    with pytest.raises(ValueError, match="unknown algorithm"):
        bench_memory.run("sinusoid", ["nope"], [1], tmp_path)
    with pytest.raises(ValueError, match="inner steps"):
        bench_memory.run("sinusoid", ["reptile"], [0], tmp_path)
    with pytest.raises(ValueError, match="nothing was measured"):
        bench_memory.run("sinusoid", ["higher-nope"], [1], tmp_path)


def test_plain_and_higher_peers_compute_the_same_maml_meta_gradient():
    """The two peers are one algorithm (second-order MAML, SGD step 0.01 on the mean loss): their
    meta-gradients agree, and with gemext's MAML at the equivalent summed-NLL step (lr = 0.01·2s²/N)."""
    pytest.importorskip("higher")
    import copy

    import torch

    from gemext import algorithms
    from gemext.tasks.sinusoid import SinusoidTasks
    from gemext.vi import GaussianLikelihood

    family = SinusoidTasks("finn")
    torch.manual_seed(0)
    model = family.make_model().double()
    b = family.sample(3, torch.Generator().manual_seed(1))
    b = type(b)(*(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query)))
    grads = []
    for peer in (bench_memory._HigherMAML, bench_memory._PlainMAML):
        m = copy.deepcopy(model)
        peer(m, 2, False).meta_backward(b)
        grads.append([p.grad for p in m.parameters()])
    for g_h, g_p in zip(*grads):
        torch.testing.assert_close(g_p, g_h, rtol=1e-9, atol=1e-12)
    s, n = 0.5, b.x_support.shape[1]
    learner = algorithms.create("maml", copy.deepcopy(model), inner_steps=2, lr=0.01 * 2 * s**2 / n,
                                likelihood=GaussianLikelihood(s)).double()
    learner.meta_backward(b)
    # gemext's meta-loss is the task mean of the summed query NLL: the peers' mean MSE scaled by N/(2s²)
    scale = b.x_query.shape[1] / (2 * s**2)
    for g_h, p in zip(grads[0], learner.parameters()):
        torch.testing.assert_close(p.grad, g_h * scale, rtol=1e-6, atol=1e-9)


def test_a_point_keeps_freed_memory_only_when_asked(monkeypatch):
    from gemext import allocator
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    spec = {"task": "sinusoid", "algo": "reptile", "inner_steps": 1, "device": "cpu", "repeats": 1,
            "meta_batch": 2, "ways": 5, "shots": 1, "query": 1}
    bench_memory.measure(spec)
    assert calls == []
    bench_memory.measure({**spec, "keep_freed_memory": True})
    assert calls == [1]
