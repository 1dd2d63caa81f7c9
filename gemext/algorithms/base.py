"""The learner contract and what every learner of the catalogue shares: the registry, the
functional forward over stacked per-task parameters, and Bayesian prediction from a posterior.

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
  ignored or ill-typed ones are refused with the valid list."""
from __future__ import annotations

import abc
import contextlib
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import ops
from ..gaussian import Posterior
from ..tasks import Task, as_batch, expect_tensor
from ..vi import CategoricalLikelihood, GaussianLikelihood
from ..vi.terms import mlp_forward

# domain ("supervised": a model fitted on (x, y) tasks; "rl": a policy meta-trained on rollouts)
# -> name -> (learner class, variant or None)
_REGISTRY: dict[str, dict[str, tuple[type, str | None]]] = {"supervised": {}, "rl": {}}
_RESERVED = ("self", "model", "variant")


def register_class(cls: type, *names: str, domain: str = "supervised") -> None:
    """Register `cls(model, **options)` under each name."""
    for n in names:
        _REGISTRY[domain][n] = (cls, None)


def register_variants(cls: type, *variants: str, domain: str = "supervised") -> None:
    """Register `cls(model, variant=name, **options)` under each variant name."""
    for v in variants:
        _REGISTRY[domain][v] = (cls, v)


def _domain(domain: str) -> dict[str, tuple[type, str | None]]:
    if domain not in _REGISTRY:
        raise ValueError(f"unknown learner domain {domain!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[domain]


def _class_params(name: str, domain: str = "supervised") -> dict[str, inspect.Parameter]:
    """The keyword parameters of the learner class's __init__ along its bases (followed while an
    __init__ forwards **options), whichever variant uses them."""
    found: dict[str, inspect.Parameter] = {}
    for klass in _domain(domain)[name][0].__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RESERVED:
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def _other_variants(name: str, option: str, domain: str = "supervised") -> tuple[str, ...]:
    """The variants that use `option` when `name` (a variant of a shared class) does not; () when
    `name` uses it. A class declares such options in `variant_options` (option -> its variants)."""
    cls, variant = _domain(domain)[name]
    users = getattr(cls, "variant_options", {}).get(option)
    return () if variant is None or users is None or variant in users else tuple(users)


def _option_params(name: str, domain: str = "supervised") -> dict[str, inspect.Parameter]:
    """The options of `name`: its class's keyword parameters, less those only other variants use."""
    return {k: p for k, p in _class_params(name, domain).items() if not _other_variants(name, k, domain)}


def option_names(name: str, domain: str = "supervised") -> list[str]:
    """The options `create(name, model, **options)` accepts."""
    return sorted(_option_params(name, domain))


# annotation (as written, postponed) -> accepted Python types, for the option type check
_SIMPLE_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "dict": (dict,)}


def _type_error(name: str, option: str, annotation: str, value: Any) -> str | None:
    """Why `value` does not fit the option's annotation (None when it does or cannot be checked)."""
    allowed: list[type] = []
    for part in (a.strip() for a in str(annotation).split("|")):
        if part == "None":
            allowed.append(type(None))
        elif part in _SIMPLE_TYPES:
            allowed += _SIMPLE_TYPES[part]
        else:
            return None  # a richer type (a module, a tuple, a config object): the learner checks it
    if not allowed or isinstance(value, tuple(allowed)):
        if not (isinstance(value, bool) and bool not in allowed):  # True is not a number here
            return None
    return f"{name}: option {option} must be {annotation}, got {type(value).__name__} {value!r}"


def check_options(name: str, options: dict[str, Any], domain: str = "supervised") -> None:
    """Refuse unknown or ill-typed options with the list of valid ones."""
    params = _option_params(name, domain)
    unknown = sorted(set(options) - set(params))
    for option in unknown:
        users = _other_variants(name, option, domain)
        if users:  # accepted by the class, but this variant would ignore it
            raise ValueError(f"{name}: option {option} is used only by {', '.join(users)}, not by {name}; "
                             f"valid: {', '.join(sorted(params))}")
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(params))}")
    for option, value in options.items():
        why = _type_error(name, option, params[option].annotation, value)
        if why is not None:
            raise TypeError(why)


def names(domain: str = "supervised") -> list[str]:
    """Names registered in a domain (gemext.algorithms.names loads the RL learners first)."""
    return sorted(_domain(domain))


def create(name: str, model: nn.Module, domain: str = "supervised", **options: Any) -> MetaLearner:
    """A learner of algorithm `name` over `model` (which it takes ownership of)."""
    registry = _domain(domain)
    if name not in registry:
        what = "unknown algorithm" if all(name not in r for r in _REGISTRY.values()) else "no learner for"
        raise ValueError(f"{what} {name!r} in the {domain} domain; available: {', '.join(names(domain))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_options(name, options, domain)
    cls, variant = registry[name]
    return cls(model, **options) if variant is None else cls(model, variant=variant, **options)


def _task_loop_reason(model: nn.Module) -> str | None:
    """Why the tasks of a meta-batch cannot be vmapped for this model (None when they can):
    BatchNorm running statistics are mutated by the forward, and torch.func has no batching rule
    for the fused recurrent kernels (nn.RNN / LSTM / GRU)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return f"{type(m).__name__} updates its running statistics"
        if isinstance(m, nn.RNNBase):
            return f"torch.func cannot vmap {type(m).__name__}"
    return None


# Modules whose forward treats each point of a batch on its own, deterministically (exact types: a
# subclass may override forward). A model built only of these has per-point Jacobians that a
# per-point vmap gives at the cost of one backward (`DataTerm`'s GGN rows); BatchNorm (batch
# statistics), Dropout (random), Softmax (its dim may be the batch) and any custom module are not.
_POINTWISE = (nn.Sequential, nn.ModuleList, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
              nn.ConvTranspose2d, nn.ConvTranspose3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
              nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity,
              nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_pointwise(model: nn.Module, batch_norm: bool = False) -> bool:
    """Whether `model` maps each point of a batch independently of the others (see _POINTWISE).
    batch_norm=True: also when BatchNorm is the only coupling, i.e. pointwise once the statistics
    each BatchNorm normalises with are held fixed. A custom module whose own forward treats points
    independently may say so with the class attribute ``gemext_pointwise = True`` (its submodules
    are still checked)."""
    for m in model.modules():
        if type(m) in (nn.Flatten, nn.Unflatten):  # pointwise when the batch dimension 0 stays out
            if (m.start_dim if type(m) is nn.Flatten else m.dim) < 1:
                return False
        elif not (type(m) in _POINTWISE or (batch_norm and type(m) in _BATCH_NORMS)
                  or type(m).__dict__.get("gemext_pointwise") is True):
            return False
    return True


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


# Element-wise activations (exact types) of the MLP plan below.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity)


def mlp_plan(model: nn.Module, names: list[str], prefix: str = "") -> list[tuple] | None:
    """For an nn.Sequential of nn.Linear and element-wise activations whose Linear weights and
    biases are all in `names` (under `prefix`): its layers as ("linear", weight index, bias index or
    None) and ("act", module) steps, which `DataTerm` differentiates by hand (per-point Jacobians
    as outer products, no batched GEMM of rank one). None for any other model."""
    if type(model) is not nn.Sequential:
        return None
    plan: list[tuple] = []
    for key, m in model._modules.items():  # as Sequential.forward runs them: a module used twice, twice
        if type(m) is nn.Linear:
            w, b = f"{prefix}{key}.weight", f"{prefix}{key}.bias"
            if w not in names or (m.bias is not None and b not in names):
                return None  # a fixed (non-Bayesian) or tied weight (named once): the generic path
            plan.append(("linear", names.index(w), names.index(b) if m.bias is not None else None))
        elif type(m) in _ELEMENTWISE:
            plan.append(("act", m))
        else:
            return None
    return plan if any(step[0] == "linear" for step in plan) else None


def input_layer(model: nn.Module) -> nn.Module | None:
    """The layer that first reads a point when that can be known: `model` itself when it is a
    Linear, convolution or Embedding, or the first module of an nn.Sequential (nested ones entered)
    after element-wise activations and dropout; None otherwise (a custom forward may reshape x)."""
    if type(model) is not nn.Sequential:
        return model if isinstance(model, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)) else None
    for m in model:
        if type(m) in _ELEMENTWISE or isinstance(m, nn.modules.dropout._DropoutNd):
            continue
        return input_layer(m)
    return None


def point_ranks(layer: nn.Module | None) -> tuple[int, int | None] | None:
    """(least, most or None) dimensions of one input point that `layer` (an `input_layer`) accepts;
    None when unknown."""
    if isinstance(layer, nn.modules.conv._ConvNd):  # [C, *spatial]
        return len(layer.kernel_size) + 1, len(layer.kernel_size) + 1
    if isinstance(layer, nn.Linear):  # [..., in_features]
        return 1, None
    if isinstance(layer, nn.Embedding):  # indices of any shape, a scalar one included
        return 0, None
    return None


def resolve_vectorize(name: str, model: nn.Module, vectorize: bool | str) -> bool:
    """The learners' one rule for `vectorize`: "auto" vmaps the tasks unless the model needs the
    loop over tasks; True on such a model is refused with the reason."""
    if not (vectorize is True or vectorize is False or vectorize == "auto"):
        raise ValueError(f"{name}: option vectorize must be True, False or 'auto', got {vectorize!r}")
    reason = _task_loop_reason(model)
    if vectorize == "auto":
        return reason is None
    if vectorize and reason is not None:
        raise ValueError(f"{name}: vectorize=True is impossible here ({reason} inside torch.func transforms); "
                         "use vectorize='auto' or False (a loop over tasks)")
    return bool(vectorize)


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
    `one_point_held`); `mlp`: the module's
    `mlp_plan` (or None); `input_layer`: the model's `input_layer` (or None), for `check_input`."""

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
        self._vmapped = vmap(self._one, in_dims=(0, 0), randomness="different")

    def __getstate__(self) -> dict:  # the vmapped closure is rebuilt, not pickled (torch.save(learner))
        return {k: v for k, v in self.__dict__.items() if k != "_vmapped"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_checked", set())  # saved before check_forward existed
        self._build()

    def _one(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
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
        return self._one(theta, x.unsqueeze(0)).squeeze(0)

    def forward_recording(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One task's outputs (θ without a task dimension) as the model computes them, and the
        (mean, variance) each BatchNorm normalised with, in call order, as data."""
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        with _batch_norm_forwards(self.module, _recording(stats)):
            return self._one(theta, x), stats

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
        return torch.stack([self._one(tuple(t[i] for t in theta), x[i]) for i in range(x.shape[0])])


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
    same rule in meta_backward and adapt. Subclasses implement `_meta_backward` on a checked,
    stacked batch; `meta_backward` guards it (a non-finite meta-gradient never reaches .grad)."""

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

    def _reads_one_task(self, x: Any, caller: str) -> bool:
        """The one rule by which meta_backward (`caller` "tasks") and adapt ("support") read a Task
        from its x_support: one unstacked task when it has one dimension fewer than the learner's
        batches, a stacked batch when it has as many; the rank of a point is the one the learner
        recorded, or, before it has seen data, what the model's first layer reads (`_task_rank`)."""
        what = f"{caller}.x_support" if caller == "tasks" else f"{caller}: x_support"
        self.forward_net.check_input(what, x)
        rank = int(self.input_rank)
        if rank < 0:  # not recorded: a later call may still show the points differently
            rank = self._task_rank(x, caller)
        if x.dim() not in (rank + 1, rank + 2):
            raise ValueError(f"{caller}: x_support has shape {tuple(x.shape)}, but this learner's inputs have "
                             f"{rank} dimension(s) per point: expected [N, ...] for one task or [T, N, ...] for "
                             "a batch")
        return x.dim() == rank + 1

    def _batch(self, tasks: Task | list[Task]) -> Task:
        """A meta-batch for meta_backward, checked: one unstacked Task made a batch of one (the rule
        of `_reads_one_task`), sizes and values (as_batch), inputs the model can read, and query
        points (the meta-loss is measured on them)."""
        if isinstance(tasks, Task) and self._reads_one_task(tasks.x_support, "tasks"):
            tasks = Task(*(expect_tensor(f"tasks.{f.name}", getattr(tasks, f.name)).unsqueeze(0)
                           for f in fields(Task)))
        batch = as_batch(tasks)
        for name in ("x_support", "x_query"):
            self.forward_net.check_input(f"tasks.{name}", getattr(batch, name))
        rank = int(self.input_rank)
        if rank >= 0 and batch.x_support.dim() != rank + 2:  # a list of tasks stacked into a batch
            raise ValueError(f"tasks: x_support stacks to shape {tuple(batch.x_support.shape)}, but this learner's "
                             f"inputs have {rank} dimension(s) per point: expected [T, N, ...]")
        if batch.x_query.shape[1] == 0:
            raise ValueError(f"tasks: the query set is empty (x_query has shape {tuple(batch.x_query.shape)}); "
                             f"{self.name}'s meta-gradient is measured on the query points")
        batch = batch.to(self.device)
        for name in ("x_support", "x_query"):
            self.forward_net.check_forward(f"tasks.{name}", getattr(batch, name), tasks=True)
        self._note_input_rank(batch.x_support.dim() - 2)
        return batch

    def _task_rank(self, x: torch.Tensor, caller: str) -> int:
        """The rank of one point that a Task's x_support implies while the learner has not seen data:
        a stacked batch (x.dim() - 2) unless the model's first layer cannot read such points but can
        read one task's (x.dim() - 1). Refused when the model cannot tell and a batch would mean scalar
        points, the one reading of [A, B] that an unstacked task of A points [A, B] shares."""
        batch, single = x.dim() - 2, x.dim() - 1
        ranks = point_ranks(self.forward_net.input_layer)
        if ranks is None:
            if batch == 0:
                how = ("Pass a list of Tasks, one per task ([task] for a single one)" if caller == "tasks" else
                       "Pass one task as an (x, y) pair")
                raise ValueError(
                    f"{caller}: a Task whose x_support has shape {tuple(x.shape)} is ambiguous before this learner "
                    f"has seen data: {x.shape[0]} tasks of scalar points, or one task of {x.shape[0]} points of "
                    f"shape {tuple(x.shape[1:])}? {how}; a stacked Task is read as a batch once the learner "
                    "knows its points (from meta_backward or an (x, y) pair)")
            return batch
        lo, hi = ranks
        for rank in (batch, single):
            if rank >= lo and (hi is None or rank <= hi):
                return rank
        raise ValueError(f"{caller}: x_support has shape {tuple(x.shape)}, but the model's first layer "
                         f"({type(self.forward_net.input_layer).__name__}) reads points of "
                         f"{lo if hi == lo else f'at least {lo}'} dimension(s): expected [N, ...] for one task or "
                         "[T, N, ...] for a batch")

    def _support_batch(self, support) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch (x, y) of a support and whether predictions are squeezed back to one task.

        The rule: an (x, y) pair is ONE task; a Task is a stacked batch [T, N, ...], or one task
        when it has one dimension fewer than the learner's batches (`_reads_one_task`, the rule of
        meta_backward too). Anything else is refused."""
        if isinstance(support, Task):
            if self._reads_one_task(support.x_support, "support"):  # one unstacked task
                return self._support_batch((support.x_support, support.y_support))
            batch = as_batch(support)
            self.forward_net.check_forward("support: x_support", batch.x_support.to(self.device), tasks=True)
            return batch.x_support, batch.y_support, False
        if not (isinstance(support, (tuple, list)) and len(support) == 2):
            raise TypeError("support must be an (x, y) pair of tensors or a gemext.tasks.Task")
        rank = int(self.input_rank)
        x, y = support
        self.forward_net.check_input("support: x", x)
        expect_tensor("support: y", y)
        if rank >= 0 and x.dim() != rank + 1:
            hint = (" — a stacked batch of tasks: pass it as a gemext.tasks.Task, whose tensors carry the task "
                    "dimension" if x.dim() == rank + 2 else "")
            raise ValueError(f"support: an (x, y) pair is one task, [N, ...] with {rank} dimension(s) per point, "
                             f"got x of shape {tuple(x.shape)}{hint}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"support: x holds {x.shape[0]} points but y holds {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("support: the support set is empty")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("support: x contains NaN or Inf")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("support: y contains NaN or Inf")
        self.forward_net.check_forward("support: x", x.to(self.device), tasks=False)
        self._note_input_rank(x.dim() - 1)
        return x.unsqueeze(0), y.unsqueeze(0), True


@dataclass
class Prediction:
    """What every predictor returns: the predictive mean and std of a regression likelihood, or
    the class probabilities of a categorical one (the other fields None). Stacked over tasks
    unless the predictor was adapted on a single (x, y) support."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    probs: torch.Tensor | None = None


class BayesianPredictor:
    """Predictions of a (stacked or single-task) posterior averaged over `samples` draws:
    regression → mean and std of the predictive mixture; classification → class probabilities."""

    def __init__(self, net: FunctionalNet, likelihood: nn.Module, posterior: Posterior,
                 squeeze: bool, samples: int = 20, generator: torch.Generator | None = None) -> None:
        self.net, self.likelihood, self.posterior = net, likelihood, posterior
        self.squeeze, self.samples, self.generator = squeeze, samples, generator
        self.delta = all(bool(torch.isneginf(r).all()) for r in posterior.rho)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:
        self.net.check_input("predict: x", x)
        self.net.check_forward("predict: x", x, tasks=not self.squeeze)
        xb = x.unsqueeze(0) if self.squeeze else x
        outs, lik_params = [], []
        for theta in self._draws():
            outs.append(self.net(list(theta), xb))
            lik_params.append(dict(zip(self.posterior.names, theta)))
        outs_t = torch.stack(outs)
        if isinstance(self.likelihood, GaussianLikelihood):
            lp = [{k: v for k, v in p.items() if k.startswith("likelihood.")} for p in lik_params]
            mean, std = self.likelihood.predictive(outs_t, [self._bcast(p, mean_shape=outs_t.shape[1:]) for p in lp])
            return Prediction(mean=mean[0], std=std[0]) if self.squeeze else Prediction(mean=mean, std=std)
        if isinstance(self.likelihood, CategoricalLikelihood):
            probs = self.likelihood.predictive(outs_t)
            return Prediction(probs=probs[0] if self.squeeze else probs)
        raise TypeError(f"no predictive rule for likelihood {type(self.likelihood).__name__}")

    def _draws(self):
        """The parameter sets the prediction averages over (stacked over tasks): the posterior
        mean for a delta posterior, else `samples` reparameterised draws. Subclasses (particle
        posteriors) override it."""
        seed = ops.new_seed(self.generator)  # drawn in both cases: the generator's stream is unchanged
        if self.delta:
            return [self.posterior.mu]
        return [ops.sample(self.posterior.mu, self.posterior.rho, seed, s) for s in range(self.samples)]

    @staticmethod
    def _bcast(p: dict[str, torch.Tensor], mean_shape: torch.Size) -> dict[str, torch.Tensor]:
        # per-task likelihood parameters [T] broadcast over the data dims of the predictions
        return {k: v.reshape(v.shape[0], *([1] * (len(mean_shape) - 1))) for k, v in p.items()}
