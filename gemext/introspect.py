"""What a user's model tells of itself before it runs, read off its modules: whether its tasks can be
vmapped, whether it maps each point on its own, the MLP plan of a plain Sequential, and the layer
that first reads a point."""
from __future__ import annotations

from torch import nn


def task_loop_reason(model: nn.Module) -> str | None:
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
