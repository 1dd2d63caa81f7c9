"""`FunctionalNet`: a model called with parameters that carry a leading task dimension, the one way
the learners and the VI data terms (`gemext.vi.DataTerm`) run a user's model; and the checks that
refuse, naming it, an input the model cannot read."""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .tasks import expect_tensor
from .vi.terms import mlp_forward


@contextlib.contextmanager
def _batch_norm_forwards(module: nn.Module, make: Callable[[nn.Module, Callable], Callable]):
    """Every BatchNorm of `module` runs `make(bn, its own forward)` instead of its forward, inside."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.forward = make(m, type(m).forward.__get__(m))
    try:
        yield
    finally:
        for m in bns:
            m.__dict__.pop("forward", None)


def _recording(stats: list) -> Callable[[nn.Module, Callable], Callable]:
    def make(m: nn.Module, forward: Callable) -> Callable:
        def recording(x: torch.Tensor) -> torch.Tensor:
            if m.training or m.running_mean is None:  # it normalises with the batch's statistics
                dims = [0, *range(2, x.dim())]
                stats.append((x.detach().mean(dims), x.detach().var(dims, unbiased=False)))
            else:
                stats.append((m.running_mean, m.running_var))
            return forward(x)
        return recording
    return make


def _held(stats: list) -> Callable[[nn.Module, Callable], Callable]:
    it = iter(stats)

    def make(m: nn.Module, forward: Callable) -> Callable:
        def held(x: torch.Tensor) -> torch.Tensor:
            mean, var = next(it)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + m.eps)
            return out if m.weight is None else out * m.weight.reshape(shape) + m.bias.reshape(shape)
        return held
    return make


def _is_inplace_capture_error(e: RuntimeError) -> bool:
    """Whether `e` is torch.func's refusal of an in-place op on a tensor captured by a grad
    transform ("During a grad (vjp, jvp, grad, etc) transform, the function provided attempted to
    call in-place operation (aten::add_.Tensor) that would mutate a captured Tensor...")."""
    msg = str(e)
    return "During a grad" in msg and "in-place operation" in msg and "captured Tensor" in msg


class _FirstLayerReached(BaseException):
    """Ends `FunctionalNet.check_forward`'s forward where the first checked layer is called (a
    BaseException: a forward's own `except Exception` must not swallow it)."""

    def __init__(self, name: str, layer: nn.Module, args: tuple) -> None:
        super().__init__(name)
        self.name, self.layer, self.args = name, layer, args


# Layers whose input `_layer_input_problem` knows how to check: the first of them that a forward calls
# ends `check_forward`'s trial forward (other modules run, a custom module's own weights included).
_CHECKED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase, nn.modules.batchnorm._BatchNorm,
                   nn.LayerNorm, nn.GroupNorm)

# What a failing forward raises that `check_forward` re-raises naming the input (same class, chained).
_FORWARD_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)


def _layer_input_problem(layer: nn.Module, inp: torch.Tensor) -> tuple[type[Exception], str] | None:
    """Why `layer` (one of _CHECKED_LAYERS) cannot read `inp`: (exception class, what it expects and what
    `inp` has), or None."""
    if isinstance(layer, nn.Embedding):
        if inp.is_floating_point() or inp.is_complex() or inp.dtype == torch.bool:
            return TypeError, f"needs integer indices (torch.long), its input has dtype {inp.dtype}"
        return None  # (not the indices' range: the check is made once per shape and dtype, not per value)
    wdtype = next((t.dtype for t in itertools.chain(layer.parameters(False), layer.buffers(False))
                   if t.is_floating_point()), None)
    if wdtype is not None and inp.dtype != wdtype:
        return TypeError, f"needs {wdtype}, its input has dtype {inp.dtype}: convert x with .to({wdtype})"
    got = inp.shape[-1] if inp.dim() else "no"  # features: the last dimension
    if isinstance(layer, nn.Linear):
        if got != layer.in_features:
            return ValueError, f"takes {layer.in_features} features per point, its input has {got}"
    elif isinstance(layer, nn.modules.conv._ConvNd):
        k = len(layer.kernel_size)
        if inp.dim() not in (k + 1, k + 2):
            return ValueError, (f"reads points of {k + 1} dimensions ([C, *spatial], {k + 2} with the batch), "
                                f"its input has shape {tuple(inp.shape)}")
        if inp.shape[-k - 1] != layer.in_channels:
            return ValueError, f"takes {layer.in_channels} channels, its input has {inp.shape[-k - 1]}"
    elif isinstance(layer, nn.RNNBase):
        if got != layer.input_size:
            return ValueError, f"takes {layer.input_size} features per step, its input has {got}"
    elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        want = layer.num_features if isinstance(layer, nn.modules.batchnorm._BatchNorm) else layer.num_channels
        if inp.dim() < 2 or inp.shape[1] != want:
            return ValueError, f"takes {want} channels in dimension 1, its input has shape {tuple(inp.shape)}"
    elif isinstance(layer, nn.LayerNorm):
        shape = tuple(layer.normalized_shape)
        if tuple(inp.shape[inp.dim() - len(shape):]) != shape:
            return ValueError, f"normalises trailing dimensions {shape}, its input has shape {tuple(inp.shape)}"
    return None


class FunctionalNet:
    """Calls `module` with parameters that carry a leading task dimension: one vmapped call for
    all tasks (`vectorize=True`), or a loop over tasks (needed when the forward mutates buffers,
    e.g. BatchNorm running statistics, and sometimes faster for large conv nets on CPU).
    Random ops (Dropout) draw independently per task under vmap, as in the loop.
    `forward_kwargs`: extra keyword arguments of every forward call (e.g. a mask).
    `pointwise`: the module maps each point on its own (`is_pointwise`), so `one_point` gives the
    output of one point and per-point Jacobians may be taken point by point (the tasks vmapped or
    looped, as `vectorize` says); `held_stats`: it does so once its BatchNorm statistics are held
    fixed (`is_pointwise(batch_norm=True)`; an approximation, opt-in; see `forward_recording` and
    `one_point_held`); `mlp`: the module's `mlp_plan` (or None); `input_layer`: the model's
    `input_layer` (or None), for `check_input` (those three read off the model by `gemext.introspect`)."""

    def __init__(self, module: nn.Module, names: list[str], vectorize: bool,
                 forward_kwargs: dict | None = None, pointwise: bool = False, mlp: list[tuple] | None = None,
                 input_layer: nn.Module | None = None, held_stats: bool = False) -> None:
        self.module, self.names, self.vectorize = module, names, vectorize
        self.forward_kwargs = dict(forward_kwargs or {})
        self.pointwise = pointwise and not self.forward_kwargs
        self.held_stats = held_stats and not self.pointwise and not self.forward_kwargs
        self.mlp = mlp if not self.forward_kwargs else None
        self.input_layer = input_layer
        self._checked: set[tuple] = set()  # (point shape, dtype, device) that check_forward passed
        self._build()

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's weights."""
        tensors = itertools.chain(self.module.parameters(), self.module.buffers())
        return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())

    def check_input(self, what: str, x: Any) -> None:
        """Refuse, naming it, an input `x` the model cannot read: not a tensor, a floating dtype other
        than the model's, or integers for a first layer that needs floats."""
        expect_tensor(what, x)
        if x.is_floating_point() and x.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {x.dtype} but the model's weights are {self.dtype}: "
                            f"convert it with .to({self.dtype})")
        if not x.is_floating_point() and isinstance(self.input_layer, (nn.Linear, nn.modules.conv._ConvNd)):
            layer = type(self.input_layer).__name__
            raise TypeError(f"{what} has dtype {x.dtype} but the model's first layer ({layer}) needs "
                            f"{self.dtype}: convert it with .to({self.dtype})")

    def check_forward(self, what: str, x: torch.Tensor, tasks: bool) -> None:
        """Refuse, naming it, an input `x` (`tasks`: with a leading task dimension) that the model's
        forward cannot read: a trial forward on one task (no gradient, the model's buffers and the
        random stream left untouched) stops where the first weight layer it calls (Linear,
        convolution, Embedding, recurrent or normalisation layer) is about to run, and that layer's
        input is checked against the layer (dtype, features or channels); an error the forward raises
        before is re-raised naming the input, the original chained. A custom forward may reshape or
        convert x, so this is where a wrong input shows, not at x itself. Done once per point shape
        and dtype."""
        one = x[0] if tasks and x.dim() > 0 else x
        key = (tuple(one.shape[1:]), one.dtype, one.device)
        if one.dim() == 0 or one.shape[0] == 0 or key in self._checked:  # (no point: left to the caller)
            return
        names = set(self.names)
        hooks = []

        def make(name: str) -> Callable:
            def stop(layer: nn.Module, args: tuple) -> None:
                raise _FirstLayerReached(name, layer, args)
            return stop
        for name, m in self.module.named_modules():
            if isinstance(m, _CHECKED_LAYERS):
                hooks.append(m.register_forward_pre_hook(make(name.removeprefix("model."))))
        # buffers a forward may update (running statistics, counters) are copies here
        state = {n: b.clone() for n, b in self.module.named_buffers() if n not in names}
        devices = [one.device] if one.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                functional_call(self.module, state, (one,), self.forward_kwargs)
        except _FirstLayerReached as reached:
            inp = reached.args[0] if reached.args and isinstance(reached.args[0], torch.Tensor) else None
            problem = None if inp is None else _layer_input_problem(reached.layer, inp)
            if problem is not None:
                kind, why = problem
                layer = type(reached.layer).__name__ + (f" '{reached.name}'" if reached.name else "")
                raise kind(f"{what} (shape {tuple(x.shape)}, dtype {x.dtype}): the model's first layer ({layer}) "
                           f"{why}") from None
        except _FORWARD_ERRORS as e:
            if isinstance(e, torch.OutOfMemoryError):  # not the input's fault
                raise
            kind = next(k for k in _FORWARD_ERRORS if isinstance(e, k))
            raise kind(f"{what} (shape {tuple(x.shape)}, dtype {x.dtype}): the model's forward cannot read it: "
                       f"{e}") from e
        finally:
            for h in hooks:
                h.remove()
        self._checked.add(key)

    def _build(self) -> None:
        self._vmapped = vmap(self.one_task, in_dims=(0, 0), randomness="different")

    def __getstate__(self) -> dict:  # the vmapped closure is rebuilt, not pickled (torch.save(learner))
        return {k: v for k, v in self.__dict__.items() if k != "_vmapped"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_checked", set())  # saved before check_forward existed
        self._build()

    def one_task(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """One task's outputs: θ and x without a task dimension."""
        try:
            out = functional_call(self.module, dict(zip(self.names, theta)), (x,), self.forward_kwargs)
        except RuntimeError as e:  # the one place the model's forward runs inside torch.func transforms
            if self.vectorize and _is_inplace_capture_error(e):
                raise RuntimeError(
                    "the model's forward mutates a tensor in place (a buffer, e.g. a call counter or running "
                    "statistic), which the vmapped inner loops (torch.func transforms) cannot do; create the "
                    "learner with vectorize=False (it then loops over the tasks)") from e
            raise
        if not isinstance(out, torch.Tensor):  # every forward but the MLP plan's comes through here
            raise TypeError(f"model must return a tensor, got {type(out).__name__}")
        return out

    def one_point(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """The output of one point `x` (no batch dimension) for one task's θ."""
        return self.one_task(theta, x.unsqueeze(0)).squeeze(0)

    def forward_recording(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One task's outputs (θ without a task dimension) as the model computes them, and the
        (mean, variance) each BatchNorm normalised with, in call order, as data."""
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        with _batch_norm_forwards(self.module, _recording(stats)):
            return self.one_task(theta, x), stats

    def one_point_held(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor,
                       stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The output of one point `x` with every BatchNorm normalising by `stats` (from
        `forward_recording` of its task): the point's output in that batch, its Jacobian without the
        statistics' dependence on θ."""
        with _batch_norm_forwards(self.module, _held(stats)):
            return self.one_point(theta, x)

    def __call__(self, theta: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:  # one batched GEMM per layer, no functional_call/vmap dispatch
            return mlp_forward(self.mlp, theta, x)[0]
        if self.vectorize:
            return self._vmapped(tuple(theta), x)
        return torch.stack([self.one_task(tuple(t[i] for t in theta), x[i]) for i in range(x.shape[0])])
