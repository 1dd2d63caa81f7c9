"""The settings of a run (config.json): the common fields every task family reads, and the few
family flags (preset, ways, shots, data_root) that a family must declare to accept."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FAMILY_FLAGS = ("preset", "ways", "shots", "data_root")
EVAL_SPLITS = ("test", "validation")  # read only by the families that declare them
# config.json keys besides the RunConfig fields: what the run resolved its settings to and which
# gemext ran it, a record for people and scripts (runs are rebuilt from the fields alone)
RECORD_KEYS = ("resolved", "gemext_version", "git_commit")
# algo_options keys a run refuses, with what to do instead: settings that have their own flag (the
# family passes them to the learner itself), and the likelihood, an object the family builds
REFUSED_OPTIONS = {
    **{k: f"use --{k.replace('_', '-')}" for k in ("seed", "device", "iterations", "meta_lr", "preset", "ways",
                                                    "shots", "data_root")},
    "likelihood": "the task family sets it (sinusoid: use \"sigma\" for the Gaussian noise, \"learn_noise\" "
                  "to learn it; vision tasks are categorical)",
}


@dataclass
class RunConfig:
    task: str
    algo: str
    preset: str | None = None
    iterations: int = 1000
    inner_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/run"
    meta_lr: float = 1e-3
    meta_batch: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    eval_tasks: int | None = None  # None: the family's default (600; RL 40)
    eval_steps: int | None = None
    ways: int | None = None
    shots: int | None = None
    data_root: str | None = None
    algo_options: dict[str, Any] = field(default_factory=dict)
    max_bad_steps: int = 10  # consecutive non-finite meta-steps before the run stops
    # seconds of training wall-clock (across resumes): the run stops after the iteration that crosses
    # it, `iterations` staying an upper bound; None: no budget
    time_budget: float | None = None
    # the tasks of the meta-test after training: "test" (the reported result) or "validation"
    # (tasks no report uses, for choosing settings)
    eval_split: str = "test"

    def validate(self) -> None:
        """The checks that do not depend on the task family (gemext.families checks the rest)."""
        for name in ("iterations", "log_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_tasks", "meta_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_steps", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_budget is not None and not (isinstance(self.time_budget, (int, float))
                                                 and 0 < self.time_budget < float("inf")):
            raise ValueError(f"time_budget must be a number of seconds > 0, got {self.time_budget!r}")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}")
        if not isinstance(self.algo_options, dict):
            raise TypeError(f"algo_options must be a dict, got {type(self.algo_options).__name__}")
        for key in self.algo_options:
            if key in REFUSED_OPTIONS:
                raise ValueError(f"option {key} cannot be given in --options: {REFUSED_OPTIONS[key]}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
