"""Few-shot vision runs end to end: gemext.train.train + evaluate on Omniglot (real data, skipped
when absent) and on a generated miniImageNet fixture; presets and learner defaults."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixtures import write_miniimagenet

from gemext.families import vision as VT
from gemext.train import RunConfig, evaluate, train

_DATA = Path(os.environ.get("GEMEXT_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
METRIC_KEYS = {"task", "algo", "seed", "iterations", "wall_s", "accuracy", "ci95", "ece", "mce", "nll"}


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory):
    """The data root, with GEMEXT_CACHE pointing at one session-wide folder, so the Omniglot cache
    (≈10 s to build) is decoded once for every test here."""
    if not (_DATA / "omniglot").is_dir():
        pytest.skip(f"omniglot data not found: {_DATA / 'omniglot'} (set GEMEXT_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMEXT_CACHE", str(tmp_path_factory.mktemp("gemext-cache")))
        yield str(_DATA)


def _check_run(run: Path, metrics: dict, ways: int, shots: int, eval_tasks: int) -> None:
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    saved = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved) and saved["iterations"] == 2
    assert (saved["ways"], saved["shots"], saved["eval_tasks"]) == (ways, shots, eval_tasks)
    assert 0.0 <= saved["accuracy"] <= 1.0 and saved["ci95"] >= 0 and saved["nll"] > 0
    assert 0.0 <= saved["ece"] <= saved["mce"] <= 1.0
    assert len(saved["accuracy_by_step"]) == saved["eval_steps"] + 1
    png = run / "reliability.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rel = json.loads((run / "reliability.json").read_text())
    from gemext.families.vision import VisionFamily
    assert set(VisionFamily.eval_outputs) == {"reliability.json", "reliability.png"}  # removed on a longer resume
    assert sum(rel["count"]) == eval_tasks * ways * VT.QUERY[saved["task"]]


def test_omniglot_5w1s_train_and_evaluate(omniglot_root, tmp_path):
    torch.manual_seed(0)
    cfg = RunConfig(task="omniglot", algo="gem-bml+", preset="5w1s", iterations=2, meta_batch=2, inner_steps=1,
                    eval_tasks=4, data_root=omniglot_root, out=str(tmp_path / "run"), log_every=1)
    run = train(cfg, progress=False)
    metrics = evaluate(run)
    _check_run(run, metrics, 5, 1, 4)
    assert metrics["eval_steps"] == 1
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,wall_s,skipped") and len(log) == 3


def test_presets_and_unknown_preset():
    for name, (ways, shots) in {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}.items():
        assert VT.ways_shots(RunConfig(task="omniglot", algo="maml", preset=name)) == (ways, shots)
    assert VT.ways_shots(RunConfig(task="omniglot", algo="maml")) == (5, 1)  # default preset
    assert VT.ways_shots(RunConfig(task="omniglot", algo="maml", preset="5w5s", shots=2)) == (5, 2)
    with pytest.raises(ValueError, match="--ways must be >= 2"):
        VT.ways_shots(RunConfig(task="omniglot", algo="maml", ways=1))
    with pytest.raises(ValueError, match="unknown vision preset '7w3s'.*5w1s"):
        VT.ways_shots(RunConfig(task="omniglot", algo="maml", preset="7w3s"))


def test_learner_defaults_follow_the_step_rule():
    cfg = lambda algo, **kw: RunConfig(task="omniglot", algo=algo, **kw)  # noqa: E731
    # MAML: Finn et al.'s 0.4 on the mean cross-entropy = 0.4/5 on the summed NLL of 5 images, 1 step
    maml = VT.learner_options(cfg("maml"), 5, 1)
    assert maml["lr"] == pytest.approx(0.08) and maml["inner_steps"] == 1 and maml["vectorize"] is False
    assert VT.learner_options(cfg("fomaml"), 5, 5)["lr"] == pytest.approx(0.016)
    assert VT.learner_options(cfg("maml", device="cuda"), 5, 1)["vectorize"] == "auto"
    # GEM-BML+: natural-gradient VI with lr·σ₀² = that step, recomputed for a given sigma0
    gem = VT.learner_options(cfg("gem-bml+"), 5, 1)
    assert gem["inner"]["optimizer"] == "ngvi" and gem["inner"]["lr"] * gem["sigma0"] ** 2 == pytest.approx(0.08)
    assert VT.learner_options(cfg("gem-bml+", algo_options={"sigma0": 0.1}), 5, 1)["inner"]["lr"] == pytest.approx(8.0)
    given = VT.learner_options(cfg("gem-bml+", algo_options={"inner": {"optimizer": "ngvi", "lr": 3.0}}), 5, 1)
    assert given["inner"]["lr"] == 3.0
    # a partial inner dict updates the preset's (its β 0.01 stays); another optimizer drops the preset's lr
    assert given["inner"]["beta"] == VT.VISION_DEFAULTS["gem-bml+"]["inner"]["beta"] == 0.01
    adam = VT.learner_options(cfg("gem-bml+", algo_options={"inner": {"optimizer": "adam"}}), 5, 1)["inner"]
    assert adam["beta"] == 0.01 and adam["optimizer"] == "adam" and "lr" not in adam
    assert VT.learner_options(cfg("maml", inner_steps=3, algo_options={"lr": 0.5}), 5, 1)["inner_steps"] == 3
    mini = VT.learner_options(RunConfig(task="miniimagenet", algo="maml"), 5, 1)
    assert mini["lr"] == pytest.approx(0.002) and mini["inner_steps"] == 5


def test_miniimagenet_fixture_through_vision_family(tmp_path, monkeypatch):
    write_miniimagenet(tmp_path / "data", per_class=16)  # 1 shot + 15 query per class
    monkeypatch.setenv("GEMEXT_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(task="miniimagenet", algo="maml", ways=2, shots=1, iterations=2, meta_batch=2, inner_steps=1,
                    eval_tasks=3, data_root=str(tmp_path / "data"), out=str(tmp_path / "run"))
    from gemext.train import build

    family, learner, meta_batch = build(cfg)
    assert isinstance(family, VT.VisionFamily) and meta_batch == 2 and family.query == VT.QUERY["miniimagenet"]
    assert family.train.split.num_classes == 3 and family.test.split.num_classes == 2
    b = family.sample(2, torch.Generator().manual_seed(0))
    assert b.x_support.shape == (2, 2, 3, 84, 84) and b.x_query.shape == (2, 30, 3, 84, 84)
    run = train(cfg, progress=False)
    _check_run(run, evaluate(run), 2, 1, 3)


def test_relative_data_root_and_eval_from_elsewhere(tmp_path, monkeypatch):
    """A relative --data-root is recorded as an absolute path, so `gemext eval` works from any
    directory; `eval --data-root` points a run at data that moved."""
    from gemext import cli

    write_miniimagenet(tmp_path / "data", per_class=16)
    monkeypatch.setenv("GEMEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["train", "miniimagenet", "--algo", "maml", "--ways", "2", "--shots", "1", "--iterations", "1",
            "--meta-batch", "1", "--inner-steps", "1", "--eval-tasks", "2", "--data-root", "data", "--out", "run",
            "--no-eval", "--no-progress"]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_root"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["eval", str(tmp_path / "run"), "--tasks", "2", "--steps", "1"]) == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    assert cli.main(["eval", str(tmp_path / "run"), "--tasks", "2", "--steps", "1"]) == 2  # data gone: an error
    assert cli.main(["eval", str(tmp_path / "run"), "--tasks", "2", "--steps", "1",
                     "--data-root", str(tmp_path / "moved")]) == 0
