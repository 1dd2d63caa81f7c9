"""Few-shot classification runs: presets, learner defaults and the meta-test (accuracy with 95% CI,
NLL, Brier score, ECE/MCE and a reliability diagram), used by gemext.train for omniglot,
tinyimagenet and miniimagenet."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import algorithms
from ..metrics import (brier_score, categorical_nll, expected_calibration_error,
                       max_calibration_error, mean_ci95, plot_reliability, reliability_data)
from ..vi import CategoricalLikelihood
from . import Task
from .vision import FewShotTasks, load_split, make_backbone

# The paper's settings: N-way K-shot.
PRESETS: dict[str, tuple[int, int]] = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
QUERY = {"omniglot": 5, "tinyimagenet": 15, "miniimagenet": 15}  # query images per class
META_BATCH = {"omniglot": 8, "tinyimagenet": 4, "miniimagenet": 4}
TEST_SPLIT = {"omniglot": "test", "tinyimagenet": "test", "miniimagenet": "test"}
CALIBRATION_BINS = 15

# Learner defaults for classification (Adam inside VI as in the paper; summed categorical NLL).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "gem-bml": dict(sigma0=0.05, inner=dict(optimizer="adam", lr=0.01), inner_steps=5),
    "gem-bml+": dict(sigma0=0.05, inner=dict(optimizer="adam", lr=0.01), inner_steps=5),
    "reptile": dict(sigma0=1.0, inner=dict(optimizer="adam", lr=0.001), inner_steps=5),
}


def ways_shots(config) -> tuple[int, int]:
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"unknown vision preset {config.preset!r}; available: {', '.join(PRESETS)}")
    ways, shots = PRESETS[config.preset or "5w1s"]
    return config.ways or ways, config.shots or shots


class VisionFamily:
    """Adapts the episodic samplers to the task-family interface of gemext.train."""

    kind = "classification"

    def __init__(self, task: str, ways: int, shots: int, root: str | None, seed: int) -> None:
        self.task, self.ways, self.shots, self.query = task, ways, shots, QUERY[task]
        self.train = FewShotTasks(load_split(task, "train", root), ways, shots, self.query, seed)
        self._test_root = root
        self._test: FewShotTasks | None = None

    @property
    def test(self) -> FewShotTasks:
        if self._test is None:  # fixed episodes: seed 0 for every run
            self._test = FewShotTasks(load_split(self.task, TEST_SPLIT[self.task], self._test_root),
                                      self.ways, self.shots, self.query, seed=0)
        return self._test

    def sample(self, n: int, generator: torch.Generator, split: str = "train") -> Task:
        if split != "train":
            raise ValueError("meta-test episodes are fixed: use VisionFamily.test.episodes(indices)")
        return self.train.sample(n, generator)


def build(config):
    ways, shots = ways_shots(config)
    family = VisionFamily(config.task, ways, shots, config.data_root, config.seed)
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in VISION_DEFAULTS.get(config.algo, {}).items()}
    opts.update(config.algo_options)
    if config.inner_steps is not None:
        opts["inner_steps"] = config.inner_steps
    opts.setdefault("likelihood", CategoricalLikelihood())
    learner = algorithms.create(config.algo, make_backbone(config.task, ways), seed=config.seed, **opts)
    return family, learner.to(config.device), config.meta_batch or META_BATCH[config.task]


def evaluate(config, family: VisionFamily, learner, n: int, steps: int | None, run: Path, plots: bool,
             batch: int = 10) -> dict:
    """Meta-test on n fixed episodes: adapt on the support, predict the query."""
    K = steps if steps is not None else (config.eval_steps or learner.inner.steps)
    acc_by_step: list[list[float]] = [[] for _ in range(K + 1)]
    probs_all, labels_all = [], []
    for start in range(0, n, batch):
        ep = family.test.episodes(range(start, min(n, start + batch))).to(learner.device)
        path = learner.adapt_path(ep, K)
        for k, pred in enumerate(path):
            probs = pred.predict(ep.x_query)
            acc_by_step[k] += (probs.argmax(-1) == ep.y_query).double().mean(1).tolist()
        probs_all.append(probs.reshape(-1, probs.shape[-1]).cpu())
        labels_all.append(ep.y_query.reshape(-1).cpu())
    probs, labels = torch.cat(probs_all), torch.cat(labels_all)
    acc, ci = mean_ci95(acc_by_step[-1])
    result = {"accuracy": acc, "ci95": ci, "accuracy_by_step": [mean_ci95(a)[0] for a in acc_by_step],
              "ece": expected_calibration_error(probs, labels, CALIBRATION_BINS),
              "mce": max_calibration_error(probs, labels, CALIBRATION_BINS),
              "nll": categorical_nll(probs, labels), "brier": brier_score(probs, labels),
              "calibration_bins": CALIBRATION_BINS, "eval_tasks": n, "eval_steps": K,
              "ways": family.ways, "shots": family.shots}
    if plots:
        plot_reliability(reliability_data(probs, labels, CALIBRATION_BINS), str(run / "reliability.png"),
                         title=f"{config.algo} {config.task} {family.ways}-way {family.shots}-shot")
    return result
