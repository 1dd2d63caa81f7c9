"""Drop-in use of every supervised learner outside the training loop: one rule for reading a Task
in meta_backward and adapt, adaptation under torch.no_grad(), inputs checked against the first layer
a custom forward calls, and non-finite meta-gradients refused with .grad left as it was."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gemext import algorithms
from gemext.tasks import Task
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.train import meta_step

NAMES = algorithms.names()
# options that keep each learner small and quick (1 inner step everywhere)
QUICK = {"kl-chaser": dict(query_steps=1), "bmaml": dict(particles=2)}


def _batch(n: int = 3, seed: int = 0) -> Task:
    return SinusoidTasks("finn").sample(n, torch.Generator().manual_seed(seed))


class _Custom(nn.Module):
    """A forward the learner cannot see into (not an nn.Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


def _learner(name: str, model: type[nn.Module] | None = None, **options):
    torch.manual_seed(0)  # the same initial weights for each learner of a model class
    model = model() if model is not None else SinusoidTasks("finn").make_model()
    return algorithms.create(name, model, **{"inner_steps": 1, "seed": 0, **QUICK.get(name, {}), **options})


def _grads(learner) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in learner.parameters()]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _stack1(task: Task) -> Task:
    return Task(*(t.unsqueeze(0) for t in (task.x_support, task.y_support, task.x_query, task.y_query)))


# ------------------------------------------------------------------ one rule for reading a Task
@pytest.mark.parametrize("name", NAMES)
def test_meta_backward_reads_an_unstacked_task_as_one_task(name, device):
    """An unstacked Task ([N, 1] points) used to be read by meta_backward as N one-point tasks;
    it is one task, as in adapt: the meta-gradient of the same task stacked as a batch of one."""
    b = _batch(2).to(device)
    one, stacked = _learner(name).to(device), _learner(name).to(device)
    # a fresh learner reads it from the model's first layer (a Linear reads points of >= 1 dimension)
    _assert_same([one.meta_backward(b[0])], [stacked.meta_backward(b[0:1])])
    _assert_same(_grads(one), _grads(stacked))
    assert int(one.input_rank) == int(stacked.input_rank) == 1
    # once the learner knows its points, by the rank it recorded
    one.meta_backward(b[1])
    stacked.meta_backward(_stack1(b[1]))
    _assert_same(_grads(one), _grads(stacked))


@pytest.mark.parametrize("name", NAMES)
def test_an_unstacked_task_on_a_custom_forward_is_refused_until_the_points_are_known(name):
    """A custom forward does not say what a point is: [N, 1] could be N scalar-point tasks or one
    task, so meta_backward refuses it as adapt does; a list of Tasks is a batch, and once the learner
    has recorded its points the unstacked Task is one task."""
    b = _batch(2)
    learner, stacked = _learner(name, _Custom), _learner(name, _Custom)
    for call in (learner.meta_backward, learner.adapt):
        with pytest.raises(ValueError, match=r"ambiguous before this learner has seen data"):
            call(b[0])
    assert int(learner.input_rank) == -1 and all(p.grad is None for p in learner.parameters())
    learner.meta_backward([b[0]])
    stacked.meta_backward(b[0:1])
    _assert_same(_grads(learner), _grads(stacked))
    learner.meta_backward(b[1])
    stacked.meta_backward(b[1:2])
    _assert_same(_grads(learner), _grads(stacked))


# ------------------------------------------------------------------ adaptation under no_grad
@pytest.mark.parametrize("name", NAMES)
def test_adapt_and_predict_work_under_no_grad(name, device):
    """The inner fit turns gradients on where it needs them: the same predictions with and without
    torch.no_grad(), none of which requires grad."""
    b = _batch(2).to(device)
    learner = _learner(name).to(device)
    learner.meta_backward(b)

    def predictions() -> list[torch.Tensor]:
        learner.generator.manual_seed(3)
        single = learner.adapt((b.x_support[0], b.y_support[0])).predict(b.x_query[0])
        batch = learner.adapt(b, steps=2).predict(b.x_query)
        path = learner.adapt_path(b, 1)[-1].predict(b.x_query)
        return [t for p in (single, batch, path) for t in (p.mean, p.std)]
    with_grad = predictions()
    with torch.no_grad():
        without = predictions()
    assert not any(t.requires_grad for t in with_grad + without)
    _assert_same(with_grad, without)


@pytest.mark.parametrize("name", NAMES)
def test_meta_backward_works_under_no_grad(name, device):
    b = _batch(2).to(device)
    plain, quiet = _learner(name).to(device), _learner(name).to(device)
    stats = plain.meta_backward(b)
    with torch.no_grad():
        _assert_same([quiet.meta_backward(b)], [stats])
    _assert_same(_grads(quiet), _grads(plain))


# ------------------------------------------------------------------ inputs of a custom forward
@pytest.mark.parametrize("name", NAMES)
def test_a_custom_forward_gets_inputs_checked_against_its_first_layer(name):
    """Integer inputs or the wrong feature count on a custom forward used to surface as raw
    torch/vmap errors; they are named against the first layer the forward calls, in meta_backward,
    adapt and predict, and a refused input records nothing."""
    b = _batch(2)
    learner = _learner(name, _Custom)
    ints = Task(b.x_support.long(), b.y_support, b.x_query.long(), b.y_query)
    wide = Task(*(t.expand(-1, -1, 3) if i % 2 == 0 else t
                  for i, t in enumerate((b.x_support, b.y_support, b.x_query, b.y_query))))
    layer = re.escape("the model's first layer (Linear 'body.0')")
    with pytest.raises(TypeError, match=rf"tasks.x_support \(shape \(2, 10, 1\), dtype torch.int64\): {layer} "
                                        r"needs torch.float32, its input has dtype torch.int64: convert x"):
        learner.meta_backward(ints)
    with pytest.raises(ValueError, match=rf"tasks.x_support \(shape \(2, 10, 3\), dtype torch.float32\): {layer} "
                                         "takes 1 features per point, its input has 3"):
        learner.meta_backward(wide)
    with pytest.raises(TypeError, match=rf"support: x \(shape \(10, 1\), dtype torch.int64\): {layer} needs"):
        learner.adapt((ints.x_support[0], b.y_support[0]))
    with pytest.raises(ValueError, match=rf"support: x \(shape \(10, 3\), dtype torch.float32\): {layer} takes 1"):
        learner.adapt((wide.x_support[0], b.y_support[0]))
    assert int(learner.input_rank) == -1 and all(p.grad is None for p in learner.parameters())
    learner.meta_backward(b)  # the right inputs still work
    predictor = learner.adapt((b.x_support[0], b.y_support[0]))
    with pytest.raises(ValueError, match=rf"predict: x \(shape \(10, 3\), dtype torch.float32\): {layer} takes 1"):
        predictor.predict(wide.x_query[0])
    with pytest.raises(ValueError, match=rf"support: x_support \(shape \(2, 10, 3\).*{layer} takes 1"):
        learner.adapt(wide)


class _Reshaping(nn.Module):
    """A forward that reshapes its input before its first layer (two features per point)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x.reshape(x.shape[0], 2))


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 1)

    def forward(self, x):  # x: [N, 2] indices per point
        return self.out(self.emb(x).sum(-2))


@pytest.mark.parametrize("name", ["gem-bml+", "maml", "abml", "bmaml"])  # the check is shared by all learners
def test_a_forward_that_fails_before_its_first_layer_is_named_with_the_original_chained(name):
    b = _batch(2)
    learner = _learner(name, _Reshaping)
    with pytest.raises(RuntimeError, match=r"tasks.x_support \(shape \(2, 10, 1\), dtype torch.float32\): the "
                                           r"model's forward cannot read it: shape '\[10, 2\]' is invalid") as e:
        learner.meta_backward(b)
    assert isinstance(e.value.__cause__, RuntimeError)  # torch's own error, kept
    with pytest.raises(RuntimeError, match=r"support: x \(shape \(10, 1\).*forward cannot read it"):
        learner.adapt((b.x_support[0], b.y_support[0]))
    # an Embedding reads integer indices
    emb = _learner(name, _Lookup)
    ids = torch.randint(0, 5, (2, 4, 2), generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 4, 1, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match=r"first layer \(Embedding 'emb'\) needs integer indices"):
        emb.meta_backward(Task(ids.float(), y, ids.float(), y))
    emb.meta_backward(Task(ids, y, ids, y))


# ------------------------------------------------------------------ non-finite meta-gradients
def _overflowing(b: Task) -> Task:
    big = lambda t: torch.full_like(t, 1e30)  # noqa: E731  (its square overflows float32)
    return Task(b.x_support, big(b.y_support), b.x_query, big(b.y_query))


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_meta_gradient_is_refused_and_grad_is_kept(name, device):
    """Overflowing targets used to write NaN into .grad (MAML) for the user's optimizer to step;
    meta_backward refuses them, naming the problem and its likely cause, and .grad is exactly what
    it was: the same tensors with the same values, or None."""
    b = _batch(2).to(device)
    learner, reference = _learner(name).to(device), _learner(name).to(device)
    learner.generator.manual_seed(1)
    learner.meta_backward(b)
    before = [p.grad for p in learner.parameters()]
    values = _grads(learner)
    match = rf"{re.escape(name)}: non-finite meta-gradient \(.*\); refused, .grad is left as it was.*Likely cause.*" \
            r"\|y\| up to 1e\+30"
    with pytest.raises(FloatingPointError, match=match):
        learner.meta_backward(_overflowing(b))
    assert all(p.grad is g for p, g in zip(learner.parameters(), before))
    _assert_same(_grads(learner), values)
    # accumulation goes on as if the refused call had not happened
    learner.generator.manual_seed(2)
    learner.meta_backward(b)
    for k in (1, 2):
        reference.generator.manual_seed(k)
        reference.meta_backward(b)
    _assert_same(_grads(learner), _grads(reference))
    # on cleared gradients nothing is written
    learner.zero_grad(set_to_none=True)
    with pytest.raises(FloatingPointError, match="non-finite meta-gradient"):
        learner.meta_backward(_overflowing(b))
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_the_training_step_skips_a_refused_meta_gradient(name, device):
    """gemext.train's meta_step keeps its guard: the refusal is a skipped step, Θ unchanged, the
    reason kept for the log; a good batch then steps."""
    b = _batch(2).to(device)
    learner = _learner(name).to(device)
    opt = learner.meta_optimizer(1e-3)
    theta = [p.detach().clone() for p in learner.parameters()]
    step = meta_step(learner, opt, _overflowing(b))
    assert not step.stepped and "non-finite meta-gradient" in step.error
    _assert_same([p.detach() for p in learner.parameters()], theta)
    assert meta_step(learner, opt, b).stepped


@pytest.mark.parametrize("name", ["abml", "pmaml-elbo"])
def test_an_infinite_loss_is_refused_but_an_unmeasured_statistic_is_not(name):
    """The ELBO learners' gradient of an overflowing loss comes out finite (ngvi's trust region bounds
    the inner steps) but means nothing: refused, as the training loop skips it. A NaN statistic with a
    finite gradient is one left unmeasured (the last step's loss of zero inner steps): not refused."""
    b = _batch(2)
    learner = _learner(name)
    with pytest.raises(FloatingPointError, match=r"non-finite meta-gradient \(the loss nll_support=inf"):
        learner.meta_backward(_overflowing(b))
    assert all(p.grad is None for p in learner.parameters())
    learner = _learner(name, inner_steps=0)
    stats = learner.meta_backward(b)
    assert stats["nll_support"] != stats["nll_support"]
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.grad is not None)
