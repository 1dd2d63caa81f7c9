"""gemext.presets: the measured settings of `gemext train` for Python users, taken from the path the
families build their learners with, and the drop-in example built on them for every learner."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import gemext
from gemext import algorithms, bench_memory
from gemext.config import RunConfig
from gemext.families import vision
from gemext.families.sinusoid import SinusoidFamily
from gemext.tasks import Task
from gemext.tasks.vision import Conv4

NAMES = algorithms.names()
# (task, preset, --inner-steps): the settings compared with what `gemext train` builds
RUNS = [("sinusoid", "finn", None), ("sinusoid", "bmaml", None), ("sinusoid", "finn", 2), ("omniglot", "5w1s", None),
        ("omniglot", "20w5s", 3)]



def _plain(value):
    """Options as comparable data: modules (the likelihood) by type, buffers and parameters."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, nn.Module):
        return (type(value).__name__, {k: t.tolist() for k, t in value.state_dict().items()},
                sorted(n for n, _ in value.named_parameters()))
    return value


class _Built(Exception):
    pass


def _options_gemext_train_uses(monkeypatch, task: str, algo: str, preset: str, inner_steps: int | None) -> dict:
    """The options the family's build_learner (what `gemext train` runs) gives algorithms.create."""
    seen = {}

    def create(name, model, **options):
        assert name == algo
        seen.update(options)
        raise _Built

    config = RunConfig(task=task, algo=algo, preset=preset, inner_steps=inner_steps)
    if task == "sinusoid":
        family = SinusoidFamily(config)
    else:  # no data files: the learner's options never read them
        monkeypatch.setattr(vision, "load_split", lambda *a, **k: None)
        monkeypatch.setattr(vision, "FewShotTasks", lambda *a, **k: None)
        family = vision.VisionFamily(config)
    with monkeypatch.context() as patch, pytest.raises(_Built):
        patch.setattr(algorithms, "create", create)
        family.build_learner()
    assert seen.pop("seed") == config.seed
    if task == "sinusoid":
        assert _plain(family.learner_options()) == _plain(seen)
    return seen


@pytest.mark.parametrize("task,preset,inner_steps", RUNS, ids=[f"{t}-{p}-{k}" for t, p, k in RUNS])
@pytest.mark.parametrize("name", NAMES)
def test_presets_are_the_options_gemext_train_builds_the_learner_with(monkeypatch, name, task, preset, inner_steps):
    used = _options_gemext_train_uses(monkeypatch, task, name, preset, inner_steps)
    got = gemext.presets(task, name, preset=preset, inner_steps=inner_steps)
    assert _plain(got) == _plain(used)
    if inner_steps is not None:
        assert got["inner_steps"] == inner_steps
    if preset == gemext.preset_names(task)[0]:  # the default preset, as `gemext bench memory --presets` uses it
        assert _plain(gemext.presets(task, name, inner_steps=inner_steps)) == _plain(got)
        if inner_steps is not None:
            assert _plain(bench_memory.preset_options(task, name, inner_steps)) == _plain(got)


def test_presets_hold_the_measured_settings():
    gem = gemext.presets("sinusoid", "gem-bml+")
    assert gem["inner"]["optimizer"] == "von" and gem["sigma0_range"] == "shrink"
    assert float(gem["likelihood"].log_sigma.exp()) == pytest.approx(0.05)
    bmaml = gemext.presets("sinusoid", "gem-bml+", preset="bmaml")
    assert float(bmaml["likelihood"].log_sigma.exp()) == pytest.approx(0.15)
    assert gemext.presets("omniglot", "gem-bml+")["inner"]["optimizer"] == "ngvi"
    assert gemext.presets("omniglot", "maml", device="cuda" if torch.cuda.is_available() else "cpu")["vectorize"] \
        == ("auto" if torch.cuda.is_available() else False)
    # the run's options merge as `--options` does: a new σ₀ re-derives the NGVI step (lr·σ₀² = MAML's step)
    assert gemext.presets("omniglot", "gem-bml+", options={"sigma0": 0.1})["inner"]["lr"] == pytest.approx(8.0)
    assert float(gemext.presets("sinusoid", "maml", options={"sigma": 0.2})["likelihood"].log_sigma.exp()) \
        == pytest.approx(0.2)


def test_each_call_returns_fresh_options():
    first = gemext.presets("sinusoid", "abml")
    first["inner"]["optimizer_kwargs"]["rho_lr"] = 99.0
    first["likelihood"].log_sigma.fill_(3.0)
    again = gemext.presets("sinusoid", "abml")
    assert again["inner"]["optimizer_kwargs"]["rho_lr"] == 0.01
    assert float(again["likelihood"].log_sigma.exp()) == pytest.approx(0.5)


@pytest.mark.parametrize("task,preset", [("sinusoid", "finn"), ("sinusoid", "bmaml-100"), ("omniglot", None),
                                         ("miniimagenet", "5w5s")])
def test_preset_training_is_what_gemext_train_trains_with(monkeypatch, task, preset):
    config = RunConfig(task=task, algo="maml", preset=preset)
    if task == "sinusoid":
        family = SinusoidFamily(config)
    else:
        monkeypatch.setattr(vision, "load_split", lambda *a, **k: None)
        monkeypatch.setattr(vision, "FewShotTasks", lambda *a, **k: None)
        family = vision.VisionFamily(config)
    assert gemext.preset_training(task, "maml", preset=preset) == {"meta_lr": config.meta_lr,
                                                                  "meta_batch": family.meta_batch}


def test_preset_names_put_the_default_first():
    assert gemext.preset_names("sinusoid") == ["finn", "bmaml", "bmaml-100"]
    assert gemext.preset_names("omniglot") == ["5w1s", "5w5s", "20w1s", "20w5s"]


@pytest.mark.parametrize("call", [
    lambda: gemext.presets("sinusoids", "maml"),
    lambda: gemext.preset_training("sinusoids", "maml"),
    lambda: gemext.preset_names("sinusoids"),
], ids=["presets", "preset_training", "preset_names"])
def test_an_unknown_task_is_refused_naming_the_valid_ones(call):
    with pytest.raises(ValueError, match="unknown task 'sinusoids'; presets exist for sinusoid, omniglot, "
                                         "tinyimagenet, miniimagenet"):
        call()


def test_unknown_algorithms_presets_and_rl_tasks_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=f"algorithm 'mamll' is not available for sinusoid; choose one of "
                                         f"{re.escape(', '.join(NAMES))}"):
        gemext.presets("sinusoid", "mamll")
    with pytest.raises(ValueError, match="algorithm 'mamll' is not available for omniglot"):
        gemext.preset_training("omniglot", "mamll")
    with pytest.raises(ValueError, match="unknown preset '5w1s' for sinusoid; choose one of finn, bmaml, bmaml-100"):
        gemext.presets("sinusoid", "maml", preset="5w1s")
    with pytest.raises(ValueError, match="unknown preset 'finn' for omniglot; choose one of 5w1s, 5w5s, 20w1s, 20w5s"):
        gemext.preset_training("omniglot", "maml", preset="finn")
    with pytest.raises(ValueError, match="nav2d is a meta-RL task.*rollout sampler.*gemext train nav2d.*"
                                         "Presets exist for sinusoid"):
        gemext.presets("nav2d", "maml")
    with pytest.raises(ValueError, match="option likelihood cannot be given"):
        gemext.presets("sinusoid", "maml", options={"likelihood": None})


def _episodes(n: int, ways: int = 5, shots: int = 1, query: int = 2, side: int = 16) -> Task:
    g = torch.Generator().manual_seed(0)
    labels = lambda per: torch.arange(ways).repeat_interleave(per).expand(n, -1).clone()  # noqa: E731
    return Task(torch.rand(n, ways * shots, 1, side, side, generator=g), labels(shots),
                torch.rand(n, ways * query, 1, side, side, generator=g), labels(query))


def test_a_vision_preset_gives_a_conv4_learner_its_ngvi_and_the_class_default_warns_of_von():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of a costly curvature
        learner = algorithms.create("gem-bml+", Conv4(1, 5, hidden=8, image_size=16),
                                    **gemext.presets("omniglot", "gem-bml+", preset="5w1s"))
    assert learner.inner.optimizer == "ngvi" and learner.inner.beta == 0.01
    assert learner.inner.lr * 0.05 ** 2 == pytest.approx(0.08)  # Finn et al.'s Omniglot 5w1s step
    opt = learner.meta_optimizer(gemext.preset_training("omniglot", "gem-bml+")["meta_lr"])
    for _ in range(2):
        opt.zero_grad()
        learner.meta_backward(_episodes(2))
        opt.step()
        learner.after_step()
    ep = _episodes(1)[0]
    probs = learner.adapt((ep.x_support, ep.y_support)).predict(ep.x_query).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    with pytest.warns(UserWarning, match=r"gem-bml\+: the inner VI 'von' .* costs about N backward passes for N "
                                         r"points .*9\.4x NGVI's time"):
        algorithms.create("gem-bml+", Conv4(1, 5, hidden=8, image_size=16))
