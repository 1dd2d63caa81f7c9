"""The learner contract, which every learner of the catalogue follows.

The contract (`MetaLearner`, checked over every registered learner by python_tests/test_contract.py):
- `parameters()` are the meta-parameters Θ; `meta_optimizer(lr)` the optimizer the training loop
  steps them with (Adam; MAML-TRPO: its trust-region step);
- `meta_backward(tasks, task_range=None)` accumulates the meta-gradient of a meta-batch into .grad
  (a mean over its tasks) and returns float statistics; `task_range=(first, total)` says where these
  tasks sit in a larger meta-batch sharded across processes, so their inner-loop noise is the
  full batch's; the supervised learners refuse a non-finite meta-gradient (FloatingPointError),
  leaving .grad as it was;
- `after_step()` runs after every optimizer step (the ρ₀ clamp of the Gaussian-prior learners) and
  returns extra statistics;
- `adapt(support, steps)` / `adapt_path(support, steps)` give predictors whose `predict(x)`
  returns one `Prediction` (mean and std for regression, probs for classification);
- `inner_steps` (the default adaptation length), `generator` (the learner's noise stream, saved
  with every checkpoint), `state_dict()` (everything predictions need besides that stream: a copy
  loaded from it draws the same predictions once its generator's state is copied too);
- the options `create(name, model, **options)` accepts are its class's keyword parameters, less
  those only other variants of the class use (its `variant_options`) (`option_names`); unknown,
  ignored or ill-typed ones are refused with the valid list.

Around it: the registry and option checks (`registry.py`), how a learner reads one task or a stacked
batch (`inputs.py`), the predictors and `Prediction` (`predictors.py`), and the model's functional
forward `FunctionalNet` (`gemext/functional_net.py`, below the learners: the VI data terms run it too)."""
from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import nn

from ..functional_net import FunctionalNet  # learners pickled by earlier versions name it here
from ..introspect import is_pointwise, mlp_plan  # noqa: F401  (earlier versions' import path)
from ..tasks import Task
from .inputs import meta_batch, support_batch
from .predictors import BayesianPredictor, Prediction  # noqa: F401  (earlier versions' import path)


class MetaLearner(nn.Module, abc.ABC):
    """The contract of every learner (see the module docstring)."""

    name: str = "?"
    inner_steps: int  # the default number of inner steps of adapt()
    generator: torch.Generator  # the learner's own noise stream (saved with checkpoints)

    @abc.abstractmethod
    def meta_backward(self, tasks: Any, task_range: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient of a batch of tasks (a mean over them) into the
        meta-parameters' .grad; return float statistics."""

    @abc.abstractmethod
    def adapt(self, support: Any, steps: int | None = None) -> Any:
        """A predictor for one task (or a stacked batch) adapted on its support set."""

    @abc.abstractmethod
    def adapt_path(self, support: Any, steps: int) -> list:
        """Predictors after 0..steps inner updates on a stacked batch of supports (for meta-test)."""

    def meta_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimizer of the meta-parameters (the training loop zeroes, steps and saves it)."""
        return torch.optim.Adam(self.parameters(), lr=lr)

    def after_step(self) -> dict[str, float]:
        """Called after every meta-optimizer step; returns extra statistics for the log."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device


class SupervisedLearner(MetaLearner):
    """A learner of (x, y) tasks: meta-batches are `gemext.tasks.Task`s and it tells one task from
    a stacked batch by the rank of its model's inputs (learned from the first data, saved), by the
    same rule in meta_backward and adapt (`inputs.py`). Subclasses implement `_meta_backward` on a
    checked, stacked batch; `meta_backward` guards it (a non-finite meta-gradient never reaches .grad)."""

    def __init__(self) -> None:
        super().__init__()
        # rank of ONE input point of the model (x of a task is [N, *point]), learned from the first
        # data seen and saved with the learner: it tells a single task from a stacked batch (-1: unknown)
        self.register_buffer("input_rank", torch.tensor(-1))

    forward_net: FunctionalNet  # the functional forward of its model (set by the model's take-over)

    def _note_input_rank(self, rank: int) -> None:
        if int(self.input_rank) < 0:
            self.input_rank.fill_(rank)

    @abc.abstractmethod
    def _meta_backward(self, batch: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        """meta_backward on a checked, stacked batch on the learner's device: accumulate its
        meta-gradient into .grad, return float statistics."""

    def meta_backward(self, tasks: Task | list[Task], task_range: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient of `tasks` (a stacked Task, one unstacked Task, or a list of
        Tasks) into .grad, a mean over the tasks. A meta-gradient that is not finite (NaN or Inf in
        any entry, or an infinite loss), or an inner loop that diverges (FloatingPointError), is
        refused with a FloatingPointError, .grad left exactly as it was before the call."""
        batch = self._batch(tasks)
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # this call's meta-gradient is formed in .grad on its own, what was there set aside, so a bad
        # one is dropped without touching what the caller accumulated before
        saved = [p.grad for _, p in params]
        for _, p in params:
            p.grad = None

        def restore() -> None:
            for (_, p), g in zip(params, saved):
                p.grad = g
        try:
            with torch.enable_grad():  # a gradient is what it computes, also under the caller's torch.no_grad()
                stats = self._meta_backward(batch, task_range)
        except FloatingPointError as e:
            restore()
            raise self._non_finite(batch, f"an inner loop diverged: {e}") from e
        except BaseException:
            restore()
            raise
        new = [(n, p.grad) for n, p in params if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for _, g in new]).all()) if new else True
        # an infinite loss has no meaningful gradient even where autograd's is finite (the training
        # loop skips such steps too); a NaN statistic with a finite gradient is one left unmeasured
        # (the last step's loss of an inner loop of zero steps)
        overflow = [k for k, v in stats.items() if math.isinf(v)]
        if not finite or overflow:
            restore()
            bad = [n for n, g in new if not bool(torch.isfinite(g).all())]
            listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            what = (f"NaN or Inf in the gradient of {listed}" if bad else
                    f"the loss {', '.join(f'{k}={stats[k]}' for k in overflow)}")
            raise self._non_finite(batch, what)
        for (_, p), g in zip(params, saved):  # this call's contribution added to what was there
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)
        return stats

    def _non_finite(self, batch: Task, problem: str) -> FloatingPointError:
        """The refusal of a non-finite meta-gradient, with the data's scale (the usual cause)."""
        scale = [f"|{n}| up to {float(torch.cat([a.flatten(), b.flatten()]).abs().max()):.3g}"
                 for n, a, b in (("x", batch.x_support, batch.x_query), ("y", batch.y_support, batch.y_query))
                 if a.is_floating_point() and a.numel() + b.numel() > 0]
        return FloatingPointError(
            f"{self.name}: non-finite meta-gradient ({problem}); refused, .grad is left as it was before this call. "
            f"Likely cause: data too large for {self.forward_net.dtype} arithmetic (this batch has "
            f"{', '.join(scale) or 'no floating data'}: the likelihood's squared errors or the inner steps overflow) "
            "or an inner step size (lr) too large for the data; standardise x and y, or lower lr")

    def _batch(self, tasks: Task | list[Task]) -> Task:
        """A checked meta-batch on the learner's device (`inputs.meta_batch`); its points' rank recorded."""
        batch = meta_batch(self.forward_net, int(self.input_rank), tasks, self.name, self.device)
        self._note_input_rank(batch.x_support.dim() - 2)
        return batch

    def _support_batch(self, support) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch (x, y) of a support and whether predictions are squeezed back to one task
        (`inputs.support_batch`); the points' rank recorded when it was one task's."""
        x, y, squeeze = support_batch(self.forward_net, int(self.input_rank), support, self.device)
        if squeeze:
            self._note_input_rank(x.dim() - 2)
        return x, y, squeeze

