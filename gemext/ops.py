"""Fused multi-tensor ops on diagonal Gaussians (sample, KL, ELBO backward, GEM statistic, von step), CPU and CUDA.

Every public function accepts a Tensor or a list of Tensors (then returns lists); one call
covers every tensor of the list (one OpenMP region on CPU, one kernel launch on CUDA).
Arguments are validated here, before any pointer reaches ``gemext._C``: wrong types and
dtypes raise ``TypeError``, wrong shapes, devices, list lengths, layouts and seeds raise
``ValueError``, each naming the argument. The prior (μ₀, ρ₀) must have exactly the shape of
the posterior (no broadcasting): stack per-task posteriors on a leading dimension and expand
the prior yourself. The one exception is :func:`gem_grad_`, which also takes posteriors
stacked as [T, *prior shape] and sums the statistic over the T tasks inside the kernel.

Randomness is counter-based: ε of element i (indexed over the concatenation of all tensors of
the list, or from ``starts[t]`` for tensor t when given) is a function of (seed, offset, i) only,
so ``elbo_backward`` and the backward of
``sample`` regenerate it instead of storing it, and CPU and CUDA draw the same ε. ``seed`` is
an int in [0, 2^63), ``offset`` an int in [0, 2^63); take seeds from :func:`new_seed` so that
``torch.manual_seed`` makes runs reproducible. ``starts`` (``sample``, ``elbo_backward``,
``elbo_backward_``, ``von_step_``) sets the global index of each tensor's element 0 explicitly,
so that a shard of a batch (e.g. the tasks one rank owns, see :func:`gemext.vi.task_starts`)
draws exactly the ε its elements draw in the full batch; any non-negative ints (not only
multiples of 4).

Each op is a ``torch.library.custom_op`` in the ``gemext`` namespace with a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` traces through it; ``sample``,
``gaussian_kl`` and ``gem_grad`` are differentiable.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _C, reference

__all__ = ["sample", "gaussian_kl", "elbo_backward", "elbo_backward_", "gem_grad", "gem_grad_",
           "von_step_", "new_seed"]

TensorOrList = Tensor | Sequence[Tensor]
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
_INT64_END = 2**63


# ----------------------------------------------------------------------------- validation
def _as_list(op: str, name: str, x: object) -> tuple[list[Tensor], bool]:
    if isinstance(x, Tensor):
        return [x], True
    if isinstance(x, (list, tuple)):
        for i, t in enumerate(x):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name}[{i}] is {type(t).__name__}, expected a Tensor")
        return list(x), False
    raise TypeError(f"{op}: {name} must be a Tensor or a list of Tensors, "
                    f"got {type(x).__name__}")


def _validate(op: str, ref: str, tasks: Sequence[str] = (), **args: object
              ) -> tuple[dict[str, list[Tensor]], bool]:
    """Checks that every argument matches ``args[ref]`` in kind (Tensor or list), length,
    shape, dtype (float32/float64) and device, and is contiguous. None values are skipped.
    The arguments named in ``tasks`` may also have shape (T, *ref's shape): see
    :func:`_task_count` for the checks across them."""
    lists: dict[str, list[Tensor]] = {}
    kinds: dict[str, bool] = {}
    for name, x in args.items():
        if x is not None:
            lists[name], kinds[name] = _as_list(op, name, x)
    base, single = lists[ref], kinds[ref]

    def label(name: str, i: int) -> str:
        return name if single else f"{name}[{i}]"

    for i, t in enumerate(base):
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"{op}: {label(ref, i)} has dtype {t.dtype}; "
                            "expected torch.float32 or torch.float64")
    dtype = base[0].dtype if base else None
    device = base[0].device if base else None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {label(ref, 0)} is on {device}; expected a cpu or cuda tensor")
    if device is not None and device.type == "cuda" and not _C.cuda:
        raise ValueError(f"{op}: {label(ref, 0)} is on {device} but gemext was built without "
                         "CUDA kernels (rebuild with nvcc available, GEMEXT_CUDA=1)")
    for name, ts in lists.items():
        if kinds[name] != single:
            kind = "a Tensor" if single else "a list of Tensors"
            raise TypeError(f"{op}: {name} must be {kind} like {ref}")
        if len(ts) != len(base):
            raise ValueError(f"{op}: {name} has {len(ts)} tensors but {ref} has {len(base)}")
        for i, (t, b) in enumerate(zip(ts, base)):
            if t.dtype != dtype:
                raise TypeError(f"{op}: {label(name, i)} has dtype {t.dtype} but "
                                f"{label(ref, 0)} has {dtype}")
            if t.device != device:
                raise ValueError(f"{op}: {label(name, i)} is on {t.device} but "
                                 f"{label(ref, 0)} is on {device}")
            if t.shape != b.shape and not (name in tasks and t.dim() == b.dim() + 1
                                           and t.shape[1:] == b.shape):
                dims = ", ".join(["T", *map(str, b.shape)]) + ("," if b.dim() == 0 else "")
                also = (f"; expected {tuple(b.shape)} or ({dims}) with a leading task "
                        "dimension T" if name in tasks else "")
                raise ValueError(f"{op}: {label(name, i)} has shape {tuple(t.shape)} but "
                                 f"{label(ref, i)} has {tuple(b.shape)}{also}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {label(name, i)} is not contiguous; "
                                 "call .contiguous() first")
    return lists, single


def _task_count(op: str, ref: str, lists: dict[str, list[Tensor]], single: bool,
                names: Sequence[str]) -> int | None:
    """The leading task dimension T shared by the lists ``names`` (each tensor already checked by
    :func:`_validate` to have the shape of ``lists[ref]``'s or (T, *that)); None when they have
    none. Mixed forms, different T and T = 0 raise ``ValueError``."""
    first: tuple[int | None, str, tuple] | None = None

    def what(n: int | None, lab: str, shape: tuple) -> str:
        kind = f"a task dimension T = {n}" if n is not None else "no task dimension"
        return f"{lab} has {kind} (shape {shape})"

    for name in names:
        for i, (t, b) in enumerate(zip(lists.get(name, ()), lists[ref])):
            n = int(t.shape[0]) if t.dim() == b.dim() + 1 else None
            lab, shape = (name if single else f"{name}[{i}]"), tuple(t.shape)
            if n == 0:
                raise ValueError(f"{op}: {lab} has shape {shape}: a task dimension of size 0; "
                                 "T must be >= 1")
            if first is None:
                first = (n, lab, shape)
            elif n != first[0]:
                raise ValueError(f"{op}: {what(n, lab, shape)} but {what(*first)}; every "
                                 "posterior tensor must have the same leading task dimension "
                                 "T, or none")
    return first[0] if first is not None else None


def _check_int(op: str, name: str, x: object) -> int:
    if isinstance(x, torch.SymInt):  # traced by torch.compile: checked when it was concrete
        return x
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    x = operator.index(x)
    if not 0 <= x < _INT64_END:
        raise ValueError(f"{op}: {name} must be in [0, 2**63), got {x}")
    return x


def _check_starts(op: str, starts: object, tensors: Sequence[Tensor], single: bool
                  ) -> list[int] | None:
    """None, or one global start index per tensor (an int is accepted for a single tensor)."""
    if starts is None:
        return None
    if single and not isinstance(starts, (list, tuple)):
        starts = [starts]
    if not isinstance(starts, (list, tuple)):
        raise TypeError(f"{op}: starts must be a list of ints (one per tensor), got {type(starts).__name__}")
    if len(starts) != len(tensors):
        raise ValueError(f"{op}: starts has {len(starts)} entries but there are {len(tensors)} tensors")
    out = [_check_int(op, f"starts[{i}]", x) for i, x in enumerate(starts)]
    for i, (s, t) in enumerate(zip(out, tensors)):
        if isinstance(s, int) and s + t.numel() > _INT64_END:
            raise ValueError(f"{op}: starts[{i}] + numel must be <= 2**63, got {s} + {t.numel()}")
    return out


def _check_real(op: str, name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(x).__name__}")
    return float(x)


def _check_bounded(op: str, name: str, x: object, lo: float, hi: float | None = None,
                   lo_open: bool = False) -> float:
    """A real in [lo, hi] ((lo, hi] with lo_open); NaN is rejected."""
    x = _check_real(op, name, x)
    ok = (x > lo if lo_open else x >= lo) and (hi is None or x <= hi)
    if not ok:
        lo_s = f"{'> ' if lo_open else '>= '}{lo:g}"
        want = f"{lo_s} and <= {hi:g}" if hi is not None else lo_s
        raise ValueError(f"{op}: {name} must be {want}, got {x}")
    return x


def new_seed(generator: torch.Generator | None = None) -> int:
    """A seed in [0, 2^63) drawn from torch's RNG (``torch.manual_seed`` makes it reproducible)."""
    return int(torch.randint(0, _INT64_END - 1, (), dtype=torch.int64, generator=generator))


# ----------------------------------------------------------------------------- launching
def _ptrs(ts: Sequence[Tensor]) -> list[int]:
    return [t.data_ptr() for t in ts]


def _numels(ts: Sequence[Tensor]) -> list[int]:
    return [t.numel() for t in ts]


def _launch(fn, like: Sequence[Tensor], *args) -> None:
    """Calls ``_C.fn(exec, *args)`` for tensors like ``like[0]``, under a CUDA device guard
    and on the current stream."""
    t = like[0]
    if t.device.type == "cuda":
        ctx = torch.cuda.device(t.device)
        stream = torch.cuda.current_stream(t.device).cuda_stream
    else:
        ctx, stream = contextlib.nullcontext(), 0
    with ctx:
        fn((_DTYPE_CODE[t.dtype], int(t.device.type == "cuda"), stream, torch.get_num_threads()),
           *args)


def _plain_eager(tensors: Sequence[Tensor], grad_sensitive: bool) -> bool:
    """True when running an op's implementation directly is indistinguishable from going
    through the dispatcher: eager mode with plain tensors, no modes or functorch transforms,
    and no autograd to record. The custom-op dispatch costs ~40-100 µs a call, which
    dominates the VI loop of small models."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or _get_current_dispatch_mode() is not None
            or torch._C._functorch.maybe_current_level() is not None):
        return False
    grad = grad_sensitive and torch.is_grad_enabled()
    return all(type(t) is Tensor and not (grad and t.requires_grad) for t in tensors)


def _call(op, impl, *args, differentiable: bool, mutated: Sequence[list[Tensor]] = ()):
    """``op(*args)``, or ``impl(*args)`` on the eager fast path (bumping the version counters
    of mutated tensors as the dispatcher would)."""
    tensors = [t for a in args if isinstance(a, list) for t in a]
    if not _plain_eager(tensors, differentiable or bool(mutated)):
        return op(*args)
    out = impl(*args)
    for ts in mutated:
        for t in ts:
            torch.autograd.graph.increment_version(t)
    return out


def _empty_like(ts: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]


# ----------------------------------------------------------------------------- custom ops
def _sample_impl(mu: list[Tensor], rho: list[Tensor], seed: int, offset: int,
                 starts: list[int] | None = None) -> list[Tensor]:
    theta = _empty_like(mu)
    _launch(_C.sample, mu, _ptrs(mu), _ptrs(rho), _ptrs(theta), _numels(mu), seed, offset,
            starts or [])
    return theta


_sample = torch.library.custom_op("gemext::sample", _sample_impl, mutates_args=())


def _reparam_grad_impl(grad: list[Tensor], rho: list[Tensor], seed: int, offset: int,
                       starts: list[int] | None = None) -> list[Tensor]:
    drho = _empty_like(rho)
    _launch(_C.reparam_grad, rho, _ptrs(grad), _ptrs(rho), _ptrs(drho), _numels(rho), seed, offset,
            starts or [])
    return drho


_reparam_grad = torch.library.custom_op("gemext::reparam_grad", _reparam_grad_impl, mutates_args=())


def _elbo_backward__impl(out_mu: list[Tensor], out_rho: list[Tensor], grad_theta: list[Tensor],
                    mu: list[Tensor], rho: list[Tensor], mu0: list[Tensor], rho0: list[Tensor],
                    seed: int, offset: int, beta: float, starts: list[int] | None = None) -> None:
    _launch(_C.elbo_backward, mu, _ptrs(grad_theta), _ptrs(mu), _ptrs(rho), _ptrs(mu0),
            _ptrs(rho0), _ptrs(out_mu), _ptrs(out_rho), _numels(mu), seed, offset, beta,
            starts or [])


_elbo_backward_ = torch.library.custom_op("gemext::elbo_backward_", _elbo_backward__impl,
                                          mutates_args=("out_mu", "out_rho"))


def _elbo_backward_impl(grad_theta: list[Tensor], mu: list[Tensor], rho: list[Tensor],
                   mu0: list[Tensor], rho0: list[Tensor], seed: int, offset: int,
                   beta: float, starts: list[int] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    out_mu, out_rho = _empty_like(mu), _empty_like(rho)
    _elbo_backward__impl(out_mu, out_rho, grad_theta, mu, rho, mu0, rho0, seed, offset, beta, starts)
    return out_mu, out_rho


_elbo_backward = torch.library.custom_op("gemext::elbo_backward", _elbo_backward_impl, mutates_args=())


def _gaussian_kl_impl(mu: list[Tensor], rho: list[Tensor], mu0: list[Tensor],
                 rho0: list[Tensor]) -> Tensor:
    out = mu[0].new_empty(())
    _launch(_C.gaussian_kl, mu, _ptrs(mu), _ptrs(rho), _ptrs(mu0), _ptrs(rho0), _numels(mu),
            out.data_ptr())
    return out


_gaussian_kl = torch.library.custom_op("gemext::gaussian_kl", _gaussian_kl_impl, mutates_args=())


def _gaussian_kl_backward_impl(mu: list[Tensor], rho: list[Tensor], mu0: list[Tensor],
                          rho0: list[Tensor], grad: Tensor
                          ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    outs = [_empty_like(mu) for _ in range(4)]
    grad = grad.to(mu[0].dtype).contiguous()
    _launch(_C.gaussian_kl_backward, mu, _ptrs(mu), _ptrs(rho), _ptrs(mu0), _ptrs(rho0),
            *(_ptrs(o) for o in outs), _numels(mu), grad.data_ptr())
    return tuple(outs)


_gaussian_kl_backward = torch.library.custom_op("gemext::gaussian_kl_backward", _gaussian_kl_backward_impl,
                                                mutates_args=())


def _gem_grad__impl(g_mu0: list[Tensor], g_rho0: list[Tensor], mu0: list[Tensor], rho0: list[Tensor],
               mu_a: list[Tensor], rho_a: list[Tensor], mu_b: list[Tensor], rho_b: list[Tensor],
               weight: float) -> None:
    """``mu_b == []`` selects GEM-BML, otherwise GEM-BML+. Posteriors of shape [T, *prior]
    (one more dimension than ``mu0``, the same T for all: checked by :func:`gem_grad_`) select
    the in-kernel sum over the T tasks."""
    ntasks = int(mu_a[0].shape[0]) if mu_a[0].dim() == mu0[0].dim() + 1 else 0
    _launch(_C.gem_grad, mu0, _ptrs(mu0), _ptrs(rho0), _ptrs(mu_a), _ptrs(rho_a), _ptrs(mu_b),
            _ptrs(rho_b), _ptrs(g_mu0), _ptrs(g_rho0), _numels(mu0), weight, True, ntasks)


_gem_grad_ = torch.library.custom_op("gemext::gem_grad_", _gem_grad__impl, mutates_args=("g_mu0", "g_rho0"))


def _gem_grad_impl(mu0: list[Tensor], rho0: list[Tensor], mu_a: list[Tensor], rho_a: list[Tensor],
              mu_b: list[Tensor], rho_b: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    g_mu0, g_rho0 = _empty_like(mu0), _empty_like(rho0)
    _launch(_C.gem_grad, mu0, _ptrs(mu0), _ptrs(rho0), _ptrs(mu_a), _ptrs(rho_a), _ptrs(mu_b),
            _ptrs(rho_b), _ptrs(g_mu0), _ptrs(g_rho0), _numels(mu0), 1.0, False, 0)
    return g_mu0, g_rho0


_gem_grad = torch.library.custom_op("gemext::gem_grad", _gem_grad_impl, mutates_args=())


def _von_step__impl(mu: list[Tensor], rho: list[Tensor], h: list[Tensor], grad: list[Tensor],
                    curv: list[Tensor], mu0: list[Tensor], rho0: list[Tensor],
                    correction: list[Tensor], seed: int, offset: int, lr: float, beta: float,
                    h_decay: float, damping: float, starts: list[int] | None = None) -> None:
    """``curv == []`` estimates the curvature from regenerated ε; ``correction == []`` puts
    h' in the μ preconditioner instead of subtracting a correction."""
    _launch(_C.von_step, mu, _ptrs(mu), _ptrs(rho), _ptrs(h), _ptrs(grad), _ptrs(curv),
            _ptrs(mu0), _ptrs(rho0), _ptrs(correction), _numels(mu), seed, offset, lr, beta,
            h_decay, damping, starts or [])


_von_step_ = torch.library.custom_op("gemext::von_step_", _von_step__impl,
                                     mutates_args=("mu", "rho", "h"))


# fake (meta) implementations: shapes only, for torch.compile / FakeTensor tracing
@_sample.register_fake
def _(mu, rho, seed, offset, starts=None):
    return _empty_like(mu)


@_reparam_grad.register_fake
def _(grad, rho, seed, offset, starts=None):
    return _empty_like(rho)


@_elbo_backward_.register_fake
def _(out_mu, out_rho, grad_theta, mu, rho, mu0, rho0, seed, offset, beta, starts=None):
    return None


@_elbo_backward.register_fake
def _(grad_theta, mu, rho, mu0, rho0, seed, offset, beta, starts=None):
    return _empty_like(mu), _empty_like(rho)


@_gaussian_kl.register_fake
def _(mu, rho, mu0, rho0):
    return mu[0].new_empty(())


@_gaussian_kl_backward.register_fake
def _(mu, rho, mu0, rho0, grad):
    return tuple(_empty_like(mu) for _ in range(4))


@_gem_grad_.register_fake
def _(g_mu0, g_rho0, mu0, rho0, mu_a, rho_a, mu_b, rho_b, weight):
    return None


@_gem_grad.register_fake
def _(mu0, rho0, mu_a, rho_a, mu_b, rho_b):
    return _empty_like(mu0), _empty_like(rho0)


@_von_step_.register_fake
def _(mu, rho, h, grad, curv, mu0, rho0, correction, seed, offset, lr, beta, h_decay, damping,
      starts=None):
    return None


# ----------------------------------------------------------------------------- autograd
def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, like)]


def _sample_setup(ctx, inputs, output) -> None:
    _, rho, ctx.seed, ctx.offset, ctx.starts = inputs
    ctx.save_for_backward(*rho)


def _sample_backward(ctx, grads):
    rho = list(ctx.saved_tensors)
    grads = _zeros_for_none(grads, rho)  # dθ/dμ = 1, dθ/dρ = ε σ (ε regenerated)
    drho = _reparam_grad(grads, rho, ctx.seed, ctx.offset, ctx.starts)
    # the dispatcher drops an optional argument left at its default from the input structure
    return (grads, drho, None, None) + (() if ctx.starts is None else (None,))


def _kl_setup(ctx, inputs, output) -> None:
    ctx.n = len(inputs[0])
    ctx.save_for_backward(*(t for ts in inputs for t in ts))


def _kl_backward(ctx, grad):
    saved, n = ctx.saved_tensors, ctx.n
    lists = [list(saved[k * n:(k + 1) * n]) for k in range(4)]
    return tuple(_gaussian_kl_backward(*lists, grad))


def _gem_setup(ctx, inputs, output) -> None:
    ctx.sizes = [len(ts) for ts in inputs]
    ctx.save_for_backward(*(t for ts in inputs for t in ts))


def _gem_backward(ctx, g_mu0, g_rho0):
    """VJP of the reference formulas in torch ops (differentiable again, so double backward
    works); the forward pass is the fused kernel."""
    saved, lists, pos = ctx.saved_tensors, [], 0
    for size in ctx.sizes:
        lists.append(list(saved[pos:pos + size]))
        pos += size
    g_mu0, g_rho0 = _zeros_for_none(g_mu0, lists[0]), _zeros_for_none(g_rho0, lists[0])
    plus = bool(lists[4])
    grads: list[list[Tensor]] = [[] for _ in range(6 if plus else 4)]
    for i in range(len(lists[0])):
        args = [ts[i] for ts in lists[:6 if plus else 4]]
        _, vjp = torch.func.vjp(reference.gem_terms, *args)
        for k, gk in enumerate(vjp((g_mu0[i], g_rho0[i]))):
            grads[k].append(gk)
    if not plus:
        grads += [[], []]
    return tuple(grads)


_sample.register_autograd(_sample_backward, setup_context=_sample_setup)
_gaussian_kl.register_autograd(_kl_backward, setup_context=_kl_setup)
_gem_grad.register_autograd(_gem_backward, setup_context=_gem_setup)


# ----------------------------------------------------------------------------- public API
def sample(mu: TensorOrList, rho: TensorOrList, seed: int, offset: int = 0,
           starts: Sequence[int] | None = None) -> TensorOrList:
    """θ = μ + exp(ρ)·ε with ε = N(0, 1) from (seed, offset, element index). Differentiable in
    μ and ρ (the backward regenerates ε). ``starts``: global index of each tensor's element 0
    (default: the cumulative numel)."""
    lists, single = _validate("sample", "mu", mu=mu, rho=rho)
    seed, offset = _check_int("sample", "seed", seed), _check_int("sample", "offset", offset)
    starts = _check_starts("sample", starts, lists["mu"], single)
    if not lists["mu"]:
        return []
    theta = _call(_sample, _sample_impl, lists["mu"], lists["rho"], seed, offset, starts,
                  differentiable=True)
    return theta[0] if single else theta


def gaussian_kl(mu: TensorOrList, rho: TensorOrList, mu0: TensorOrList,
                rho0: TensorOrList) -> Tensor:
    """Σ KL(N(μ, σ²) ‖ N(μ₀, σ₀²)) over all elements of all tensors, accumulated in float64;
    a 0-dim tensor of the inputs' dtype. Differentiable in all four arguments."""
    lists, _ = _validate("gaussian_kl", "mu", mu=mu, rho=rho, mu0=mu0, rho0=rho0)
    if not lists["mu"]:
        return torch.zeros(())
    return _call(_gaussian_kl, _gaussian_kl_impl, *lists.values(), differentiable=True)


def elbo_backward(grad_theta: TensorOrList, mu: TensorOrList, rho: TensorOrList,
                  mu0: TensorOrList, rho0: TensorOrList, seed: int, offset: int = 0,
                  beta: float = 1.0, starts: Sequence[int] | None = None
                  ) -> tuple[TensorOrList, TensorOrList]:
    """(∂/∂μ, ∂/∂ρ) of −ELBO = nll(θ) + β·KL(q‖p) for θ = ``sample(mu, rho, seed, offset,
    starts)`` and ``grad_theta`` = ∂nll/∂θ: dμ = g + β(μ−μ₀)/σ₀², dρ = g·ε·σ + β(σ²/σ₀² − 1)."""
    lists, single = _validate("elbo_backward", "mu", grad_theta=grad_theta, mu=mu, rho=rho,
                              mu0=mu0, rho0=rho0)
    seed = _check_int("elbo_backward", "seed", seed)
    offset = _check_int("elbo_backward", "offset", offset)
    beta = _check_real("elbo_backward", "beta", beta)
    starts = _check_starts("elbo_backward", starts, lists["mu"], single)
    if not lists["mu"]:
        return [], []
    d_mu, d_rho = _call(_elbo_backward, _elbo_backward_impl, *lists.values(), seed, offset, beta,
                        starts, differentiable=False)
    return (d_mu[0], d_rho[0]) if single else (d_mu, d_rho)


def elbo_backward_(out_mu: TensorOrList, out_rho: TensorOrList, grad_theta: TensorOrList,
                   mu: TensorOrList, rho: TensorOrList, mu0: TensorOrList, rho0: TensorOrList,
                   seed: int, offset: int = 0, beta: float = 1.0,
                   starts: Sequence[int] | None = None) -> None:
    """:func:`elbo_backward` written into the buffers ``out_mu``, ``out_rho`` (the VI hot path:
    no allocation). The outputs may be the same tensors as ``grad_theta`` (exact aliasing)."""
    lists, single = _validate("elbo_backward_", "mu", out_mu=out_mu, out_rho=out_rho,
                              grad_theta=grad_theta, mu=mu, rho=rho, mu0=mu0, rho0=rho0)
    seed = _check_int("elbo_backward_", "seed", seed)
    offset = _check_int("elbo_backward_", "offset", offset)
    beta = _check_real("elbo_backward_", "beta", beta)
    starts = _check_starts("elbo_backward_", starts, lists["mu"], single)
    if lists["mu"]:
        _call(_elbo_backward_, _elbo_backward__impl, *lists.values(), seed, offset, beta, starts,
              differentiable=False, mutated=(lists["out_mu"], lists["out_rho"]))


_POSTERIORS = ("mu_a", "rho_a", "mu_b", "rho_b")


def _gem_lists(op: str, mu0, rho0, mu_a, rho_a, mu_b, rho_b, tasks: bool = False, **buffers):
    """The validated lists and ``single``; with ``tasks``, also the posteriors' leading task
    dimension T (None: the prior's shape)."""
    if (mu_b is None) != (rho_b is None):
        raise ValueError(f"{op}: mu_b and rho_b must be given together (GEM-BML+) or both None")
    lists, single = _validate(op, "mu0", _POSTERIORS if tasks else (), **buffers, mu0=mu0,
                              rho0=rho0, mu_a=mu_a, rho_a=rho_a, mu_b=mu_b, rho_b=rho_b)
    ntasks = _task_count(op, "mu0", lists, single, _POSTERIORS) if tasks else None
    lists.setdefault("mu_b", [])
    lists.setdefault("rho_b", [])
    return (lists, single, ntasks) if tasks else (lists, single)


def gem_grad(mu0: TensorOrList, rho0: TensorOrList, mu_a: TensorOrList, rho_a: TensorOrList,
             mu_b: TensorOrList | None = None, rho_b: TensorOrList | None = None
             ) -> tuple[TensorOrList, TensorOrList]:
    """The Gradient-EM ascent direction (ĝ_μ₀, ĝ_ρ₀) for the prior (μ₀, ρ₀) from the posterior
    λ_a = (μ_a, ρ_a): ĝ_μ₀ = (μa−μ₀)/σ₀², ĝ_ρ₀ = ((μa−μ₀)² + σa²)/σ₀² − 1. With λ_b (GEM-BML+)
    the same statistic of λ_b is subtracted. Differentiable in every argument."""
    lists, single = _gem_lists("gem_grad", mu0, rho0, mu_a, rho_a, mu_b, rho_b)
    if not lists["mu0"]:
        return [], []
    args = [lists[k] for k in ("mu0", "rho0", "mu_a", "rho_a", "mu_b", "rho_b")]
    g_mu0, g_rho0 = _call(_gem_grad, _gem_grad_impl, *args, differentiable=True)
    return (g_mu0[0], g_rho0[0]) if single else (g_mu0, g_rho0)


def gem_grad_(g_mu0: TensorOrList, g_rho0: TensorOrList, mu0: TensorOrList, rho0: TensorOrList,
              mu_a: TensorOrList, rho_a: TensorOrList, mu_b: TensorOrList | None = None,
              rho_b: TensorOrList | None = None, weight: float = 1.0) -> None:
    """Adds ``weight``·ĝ into ``g_mu0``, ``g_rho0`` in place (e.g. ``weight=-1/T`` into the
    prior's ``.grad`` so that any torch optimizer ascends the meta-objective).

    The posteriors (``mu_a``, ``rho_a``, ``mu_b``, ``rho_b``) have either the prior's shape
    (element-wise ĝ), or one more, leading, task dimension: [T, *prior shape], the same T
    for every tensor of the lists, T >= 1. Then ``g += weight · Σ_t ĝ(μ₀, ρ₀; λ_t)`` in one
    launch: each output element is summed by one thread over t = 0 .. T-1 in that order, in
    the tensors' dtype, so the result is deterministic and the same on CPU and CUDA; with T = 1
    it is bitwise the element-wise call on the posteriors' only slice. ``g_mu0``, ``g_rho0``,
    ``mu0`` and ``rho0`` always have the prior's shape."""
    lists, _, _ = _gem_lists("gem_grad_", mu0, rho0, mu_a, rho_a, mu_b, rho_b, tasks=True,
                             g_mu0=g_mu0, g_rho0=g_rho0)
    weight = _check_real("gem_grad_", "weight", weight)
    if lists["mu0"]:
        args = [lists[k] for k in ("g_mu0", "g_rho0", "mu0", "rho0", "mu_a", "rho_a", "mu_b",
                                   "rho_b")]
        _call(_gem_grad_, _gem_grad__impl, *args, weight, differentiable=False,
              mutated=(lists["g_mu0"], lists["g_rho0"]))


def von_step_(mu: TensorOrList, rho: TensorOrList, h: TensorOrList, grad: TensorOrList,
              curv: TensorOrList | None, mu0: TensorOrList, rho0: TensorOrList, seed: int,
              offset: int, lr: float, beta: float, h_decay: float, damping: float,
              correction: TensorOrList | None = None,
              starts: Sequence[int] | None = None) -> None:
    """One variational online Newton step on q = N(μ, σ²), σ = exp(ρ), with prior
    N(μ₀, σ₀²), updating ``mu``, ``rho`` and the curvature average ``h`` in place:

    - c = ``curv``, or max(g·ε/σ, 0) with ε regenerated as ``sample(mu, rho, seed, offset,
      starts)`` drew it (so pass the seed/offset of the sample that ``grad`` was taken at);
    - h' = (1 − h_decay)·h + h_decay·c, λ₀ = β/σ₀²;
    - μ' = μ − lr·(g + λ₀(μ − μ₀)) / (λ₀ + h' + damping), or with ``correction``
      μ' = μ − lr·(g + λ₀(μ − μ₀) − correction) / (λ₀ + damping);
    - ρ' = −½·log(λ₀ + h').

    All use the old μ, ρ, h. ``grad``, ``curv``, ``mu0``, ``rho0``, ``correction`` are read only.
    lr > 0, beta >= 0, 0 < h_decay <= 1, damping >= 0."""
    op = "von_step_"
    lists, single = _validate(op, "mu", mu=mu, rho=rho, h=h, grad=grad, curv=curv, mu0=mu0,
                              rho0=rho0, correction=correction)
    seed, offset = _check_int(op, "seed", seed), _check_int(op, "offset", offset)
    lr = _check_bounded(op, "lr", lr, 0.0, lo_open=True)
    beta = _check_bounded(op, "beta", beta, 0.0)
    h_decay = _check_bounded(op, "h_decay", h_decay, 0.0, 1.0, lo_open=True)
    damping = _check_bounded(op, "damping", damping, 0.0)
    starts = _check_starts(op, starts, lists["mu"], single)
    if lists["mu"]:
        args = [lists.get(k, []) for k in ("mu", "rho", "h", "grad", "curv", "mu0", "rho0",
                                            "correction")]
        _call(_von_step_, _von_step__impl, *args, seed, offset, lr, beta, h_decay, damping,
              starts, differentiable=False, mutated=(lists["mu"], lists["rho"], lists["h"]))
