"""Few-shot classification runs (omniglot, tinyimagenet, miniimagenet): presets, learner defaults
and the meta-test (accuracy with 95% CI, NLL, Brier score, ECE/MCE and a reliability diagram)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .. import algorithms
from ..algorithms import MetaLearner
from ..metrics import (
    brier_score,
    categorical_nll,
    expected_calibration_error,
    max_calibration_error,
    mean_ci95,
    plot_reliability,
    reliability_data,
)
from ..progress import Progress
from ..runs import best_effort
from ..tasks import Task
from ..tasks.vision import FewShotTasks, load_split, make_backbone
from ..vi import CategoricalLikelihood
from .base import SupervisedFamily, merge_options

# The paper's settings: N-way K-shot.
PRESETS: dict[str, tuple[int, int]] = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
QUERY = {"omniglot": 5, "tinyimagenet": 15, "miniimagenet": 15}  # query images per class
META_BATCH = {"omniglot": 8, "tinyimagenet": 4, "miniimagenet": 4}
# the dataset split of each eval_split; Omniglot's usual split (1200 / 423 characters) has no validation classes
EVAL_SPLIT = {"test": {"omniglot": "test", "tinyimagenet": "test", "miniimagenet": "test"},
              "validation": {"tinyimagenet": "val", "miniimagenet": "val"}}
CALIBRATION_BINS = 15
# accuracy_by_step: the final step predicts with the learner's full predictive (GEM: 20 posterior draws);
# steps 0..K-1 with at most this many draws (on one CPU thread the 20-draw predictive at every step
# made a 600-episode GEM meta-test take half an hour).
INTERMEDIATE_SAMPLES = 2

# Inner step sizes follow Finn et al. (MAML): a step of `MEAN_LOSS_STEP` on the *mean* cross-entropy
# of the support set (Omniglot 5-way 0.4, 20-way 0.1; miniImageNet 0.01). Every learner here
# minimises the *summed* categorical NLL, so the same step is MEAN_LOSS_STEP / (N·K) on it
# (`summed_nll_step`): 0.08 for Omniglot 5w1s, 0.016 for 5w5s.
MEAN_LOSS_STEP = {("omniglot", 5): 0.4, ("omniglot", 20): 0.1}
MEAN_LOSS_STEP_OTHER = {"omniglot": 0.1, "tinyimagenet": 0.01, "miniimagenet": 0.01}
MAML_TRAIN_STEPS = {("omniglot", 5): 1, ("omniglot", 20): 5}  # Finn et al.; 5 elsewhere

# Classification defaults (summed categorical NLL), tuned on Omniglot 5w1s (benchmarks/RESULTS.md,
# "Few-shot vision"; tuning notes in benchmarks/HISTORY.md). GEM-BML/GEM-BML+:
# - inner "ngvi" with lr·σ₀² = the MAML step above (lr derived in learner_options), so the first step is
#   MAML's and the learned σ₀² a per-weight step size; `von` costs ~10× its time per Conv4 meta-iteration;
# - β = 0.01: under a natural step β = 1 pulls μ back ~lr = 32× too far, and the KL of ~113k weights
#   swamps the NLL of 5 images;
# - σ₀ 0.05: the best of 0.03–0.1; learned only downwards ("shrink"), as a growing σ₀ lengthens ngvi's steps;
# - all_fit "sequential": ahead of the joint refit with ngvi here (the joint one wins on sinusoid with von).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "gem-bml": dict(sigma0=0.05, inner=dict(optimizer="ngvi", beta=0.01), inner_steps=5, sigma0_range="shrink",
                    all_fit="sequential"),
    "gem-bml+": dict(sigma0=0.05, inner=dict(optimizer="ngvi", beta=0.01), inner_steps=5,
                     sigma0_range="shrink", all_fit="sequential"),
    "reptile": dict(sigma0=1.0, inner=dict(optimizer="adam", lr=0.001), inner_steps=5),
}
_GEM = ("gem-bml", "gem-bml+", "kl-chaser")
_MAML = ("maml", "fomaml", "imaml")


def summed_nll_step(task: str, ways: int, shots: int) -> float:
    """Finn et al.'s inner step on the mean support cross-entropy, rescaled to the summed NLL."""
    mean_step = MEAN_LOSS_STEP.get((task, ways), MEAN_LOSS_STEP_OTHER[task])
    return mean_step / (ways * shots)


def learner_options(config, ways: int, shots: int) -> dict[str, Any]:
    """VISION_DEFAULTS for the run's algorithm, updated with config.algo_options, with the inner
    step sizes filled in by the rules above where neither gives one."""
    opts = merge_options(VISION_DEFAULTS.get(config.algo, {}), config.algo_options)
    step = summed_nll_step(config.task, ways, shots)
    if config.algo in _GEM and "lr" not in opts:
        inner = dict(opts.get("inner") or {})
        if inner.get("optimizer") == "ngvi" and "lr" not in inner:
            inner["lr"] = step / float(opts.get("sigma0", 0.05)) ** 2
            opts["inner"] = inner
    if config.algo in _MAML:
        opts.setdefault("lr", step)
        opts.setdefault("inner_steps", MAML_TRAIN_STEPS.get((config.task, ways), 5))
    if config.inner_steps is not None:
        opts["inner_steps"] = config.inner_steps
    # tasks of a meta-batch: looped on CPU, where that is faster than vmap; vmapped on GPUs
    opts.setdefault("vectorize", "auto" if str(config.device).startswith("cuda") else False)
    opts.setdefault("likelihood", CategoricalLikelihood())
    return opts


def ways_shots(config) -> tuple[int, int]:
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"unknown vision preset {config.preset!r}; available: {', '.join(PRESETS)}")
    ways, shots = PRESETS[config.preset or "5w1s"]
    ways, shots = config.ways or ways, config.shots or shots
    if ways < 2:  # one class: every prediction is right (accuracy 1, ECE 0), nothing is measured
        raise ValueError(f"--ways must be >= 2 for a classification episode, got {ways}")
    return ways, shots


class VisionFamily(SupervisedFamily):
    """N-way K-shot episodes of a vision dataset (its training split; meta-test on fixed episodes
    of its test split)."""

    tasks = ("omniglot", "tinyimagenet", "miniimagenet")
    flags = ("preset", "ways", "shots", "data_root")
    preset_names = tuple(PRESETS)  # "5w1s" first: the default
    headline = ("accuracy", "ece")
    eval_batch = 10  # meta-test episodes adapted together
    eval_outputs = ("reliability.json", "reliability.png")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.task = config.task
        self.ways, self.shots = ways_shots(config)
        self.query = QUERY[config.task]
        self.train = FewShotTasks(load_split(config.task, "train", config.data_root), self.ways, self.shots,
                                  self.query, config.seed)
        self._test: dict[str, FewShotTasks] = {}

    @property
    def test(self) -> FewShotTasks:
        """The meta-test's episodes (fixed: seed 0 for every run), from the classes of the run's
        eval_split."""
        split = self.config.eval_split
        if split not in self._test:
            self._test[split] = FewShotTasks(load_split(self.task, EVAL_SPLIT[split][self.task], self.config.data_root),
                                             self.ways, self.shots, self.query, seed=0)
        return self._test[split]

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.task not in EVAL_SPLIT[config.eval_split]:
            raise ValueError(f"{config.task} has no validation classes (its usual split is meta-train / meta-test "
                             "only); choose its settings on another task or meta-test with --eval-split test")

    @classmethod
    def with_defaults(cls, settings: dict[str, Any]) -> dict[str, Any]:
        settings = dict(settings)
        # a preset is its ways and shots
        settings["ways"], settings["shots"] = ways_shots(SimpleNamespace(**settings))
        settings["preset"] = None
        settings["meta_batch"] = settings.get("meta_batch") or META_BATCH[settings["task"]]
        return settings

    @classmethod
    def learner_options_for(cls, config) -> dict[str, Any]:
        """`learner_options` at the run's ways and shots (its preset, or --ways / --shots)."""
        return learner_options(config, *ways_shots(config))

    def build_learner(self) -> MetaLearner:
        opts = self.learner_options_for(self.config)
        learner = algorithms.create(self.config.algo, make_backbone(self.task, self.ways), seed=self.config.seed,
                                    **opts)
        return learner.to(self.config.device)

    @property
    def meta_batch(self) -> int:
        return self.config.meta_batch or META_BATCH[self.task]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Task:
        return self.train.sample(n, self.generator if generator is None else generator)

    def evaluate(self, learner: MetaLearner, tasks: int | None, steps: int | None, run: Path, plots: bool,
                 progress: bool | None = None) -> dict[str, Any]:
        """Meta-test on n fixed episodes: adapt on the support, predict the query."""
        config, n = self.config, self.eval_tasks(tasks)
        K = steps if steps is not None else (config.eval_steps or learner.inner_steps)
        acc_by_step: list[list[float]] = [[] for _ in range(K + 1)]
        probs_all, labels_all = [], []
        starts = range(0, n, self.eval_batch)
        for start in Progress(starts, len(starts), f"meta-test {config.algo} ({n} episodes)",
                              every=max(1, len(starts) // 10), enabled=progress):
            ep = self.test.episodes(range(start, min(n, start + self.eval_batch))).to(learner.device)
            path = learner.adapt_path(ep, K)
            for k, pred in enumerate(path):
                if k < K and hasattr(pred, "samples"):  # intermediate steps: a cheaper predictive
                    pred.samples = min(pred.samples, INTERMEDIATE_SAMPLES)
                probs = pred.predict(ep.x_query).probs
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
                  "ways": self.ways, "shots": self.shots}
        if plots:
            data = reliability_data(probs, labels, CALIBRATION_BINS)
            with best_effort(f"the reliability data and plot into {run}"):
                # for combined plots (benchmarks/vision_study.py)
                (run / "reliability.json").write_text(json.dumps(data))
                plot_reliability(data, str(run / "reliability.png"),
                                 title=f"{config.algo} {config.task} {self.ways}-way {self.shots}-shot")
        return result
