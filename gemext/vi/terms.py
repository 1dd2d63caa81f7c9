"""`DataTerm`, the data term of a fit (summed NLL of a batch of tasks, its gradient and GGN rows),
and the protocols of its partners: `NLL` (what `fit` takes), `CurvatureTerm` (what von's
curvature and line search take) and `Forward` (the model a DataTerm calls)."""
from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# ----------------------------------------------------------------------------- data terms
CHUNK = 8  # cotangents per batched backward on the general path of `DataTerm.value_grad_rows`


class NLL(Protocol):
    """The summed negative log-likelihood over tasks and the points `index` (a LongTensor of data
    indices, or None for all of them) at θ with a leading task dimension."""

    def __call__(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class CurvatureTerm(NLL, Protocol):
    """An `NLL` that also gives von its GGN curvature and its line search's per-task objective
    (`DataTerm` is one; see there)."""

    def task_nll(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor: ...
    def tasks(self, index: torch.Tensor) -> CurvatureTerm: ...
    def value_grad_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None,
                        generator: torch.Generator | None, rows_out: torch.Tensor | None = None
                        ) -> tuple[float, list[torch.Tensor], torch.Tensor, torch.Tensor]: ...
    def lik_curvature(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> dict[int, torch.Tensor]: ...


@runtime_checkable
class Forward(Protocol):
    """The model a `DataTerm` calls: outputs [T, N, ...] for θ and inputs x [T, N, ...] with a leading
    task dimension. Its traits say how its points depend on each other, which picks the way of
    `DataTerm.value_grad_rows` (`FunctionalNet` has them); a plain callable forward(θ, x) is taken
    as vectorised over tasks with coupled points."""

    vectorize: bool  # one call for all tasks, else the tasks are looped
    pointwise: bool  # each point mapped on its own: `one_point`
    held_stats: bool  # so too once its BatchNorm statistics are held: `forward_recording`, `one_point_held`
    mlp: list[tuple] | None  # its `mlp_plan`, differentiated by hand

    def __call__(self, theta: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor: ...
    def one_point(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor: ...
    def one_point_held(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor, stats: list) -> torch.Tensor: ...
    def forward_recording(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor) -> tuple[torch.Tensor, list]: ...


_PLAIN = SimpleNamespace(vectorize=True, pointwise=False, held_stats=False, mlp=None)  # a plain callable's traits


class DataTerm:
    """The summed negative log-likelihood of a batch of tasks, −Σ log p(y | f(x; θ)), as the
    callable ``nll(theta, index)`` that `fit` takes, plus what curvature-aware VI needs: the rows
    of a square-root factor R of the generalised Gauss-Newton matrix, G = RᵀR = Σ_n J_nᵀ H_n J_n
    (J_n the Jacobian of point n's outputs, H_n the likelihood's Hessian in output space).

    θ entries named ``likelihood.*`` (a learned noise scale) are passed to the likelihood instead of
    the model `forward`."""

    def __init__(self, forward: Forward | Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                 likelihood: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> None:
        self.forward, self.likelihood, self.x, self.y, self.names = forward, likelihood, x, y, names
        self.structure = forward if isinstance(forward, Forward) else _PLAIN
        self.lik_idx = [i for i, n in enumerate(names) if n.startswith("likelihood.")]

    def tasks(self, index: torch.Tensor) -> DataTerm:
        """The same data term over the tasks `index` (a LongTensor; repeats allowed)."""
        sub = copy.copy(self)  # not through __init__: its protocol check costs more than the copy
        sub.x, sub.y = self.x[index], self.y[index]
        return sub

    def _data(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x, self.y) if index is None else (self.x[:, index], self.y[:, index])

    def _lik_params(self, theta: list[torch.Tensor], ys: torch.Tensor) -> dict[str, torch.Tensor]:
        # per-task likelihood parameters [T] broadcast over the data dims
        return {self.names[i]: theta[i].reshape(theta[i].shape[0], *([1] * (ys.dim() - 1))) for i in self.lik_idx}

    def __call__(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
        xs, ys = self._data(index)
        return self.likelihood.nll(self.forward(theta, xs), ys, self._lik_params(theta, ys))

    @torch.no_grad()
    def task_nll(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
        """The data term of each task, [T]."""
        xs, ys = self._data(index)
        return self.likelihood.nll(self.forward(theta, xs), ys, self._lik_params(theta, ys), per_task=True)

    def ggn_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The rows of R per task over the flattened θ, [T, M, D] (zero columns for
        ``likelihood.*`` entries, whose curvature `lik_curvature` gives). Gaussian likelihoods give
        the exact GGN (M = points × outputs, point-major); the categorical one a Monte-Carlo Fisher
        with one label sampled from the model per point (M = points; unbiased for the GGN)."""
        return self.value_grad_rows(theta, index, generator)[2]

    def value_grad_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None, generator: torch.Generator | None,
                        rows_out: torch.Tensor | None = None
                        ) -> tuple[float, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(nll, ∂nll/∂θ, GGN rows R [T, M, D] as in `ggn_rows`, the GGN diagonal Σ_m R² [T, D]).
        `rows_out`: a tensor the rows may be written into (and returned) when its shape and dtype fit,
        e.g. the rows of the previous step, no longer needed: a fresh block each step costs page
        faults.

        The data gradient is the pullback of ∂nll/∂outputs, batched with the rows' cotangents. Four
        ways, the first that applies: an MLP plan (`FunctionalNet.mlp`, points as vectors) by hand,
        `_mlp_pullback`; a pointwise forward (`FunctionalNet.pointwise`) pulls each point's cotangents
        back through that point alone, one backward's work for every row; a forward pointwise but for
        BatchNorm (`FunctionalNet.held_stats`), task by task: the gradient by the model's own
        backward, the rows point by point with each BatchNorm's batch statistics held as data (the
        GGN of the points' outputs at fixed statistics: it leaves out how a weight moves the others'
        outputs through the batch's mean and variance); otherwise one backward over all points per
        row, CHUNK rows at a time."""
        xs, ys = self._data(index)
        model_idx = [i for i in range(len(theta)) if i not in self.lik_idx]
        full = [t.detach() for t in theta]
        plan = self.structure.mlp if xs.dim() == 3 else None  # points as vectors
        pointwise = plan is None and self.structure.pointwise
        held = plan is None and not pointwise and self.structure.held_stats
        with torch.enable_grad():
            if plan is not None:
                out, layers = mlp_forward(plan, full, xs, record=True)
            elif pointwise:
                with torch.no_grad():
                    out = self.forward(full, xs)
            elif held:  # task by task: the model's forward, its BatchNorm statistics recorded
                task_theta, outs, stats = [], [], []
                for t in range(xs.shape[0]):
                    th = [full[i][t].detach().requires_grad_(True) for i in model_idx]
                    o, st = self.forward.forward_recording(tuple(self._fill([f[t] for f in full], model_idx, th)),
                                                           xs[t])
                    task_theta.append(th)
                    outs.append(o)
                    stats.append(st)
                out = torch.stack(outs)
            elif self.structure.vectorize:
                out, vjp = torch.func.vjp(lambda *th: self.forward(self._fill(full, model_idx, th), xs),
                                          *[full[i] for i in model_idx])
                pullback = torch.func.vmap(vjp)
            else:
                # a forward that updates buffers (BatchNorm's running statistics, looped tasks) cannot
                # run under torch.func.vjp: plain autograd, the backward batched over the cotangents
                # (several times slower on small nets)
                model_theta = [full[i].detach().requires_grad_(True) for i in model_idx]
                out = self.forward(self._fill(full, model_idx, model_theta), xs)

                def pullback(cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    return torch.autograd.grad(out, model_theta, cot, is_grads_batched=True, retain_graph=True)
            o = out.detach().requires_grad_(True)
            lik_theta = [full[i].clone().requires_grad_(True) for i in self.lik_idx]
            lik_full = list(full)
            for i, t in zip(self.lik_idx, lik_theta):
                lik_full[i] = t
            loss = self.likelihood.nll(o, ys, self._lik_params(lik_full, ys))
            d_out, *d_lik = torch.autograd.grad(loss, [o] + lik_theta)
            cot = self.likelihood.ggn_cotangents(out.detach(), self._lik_params(full, ys), generator)  # [K, T, N, ...]
            T, N, K = out.shape[0], out.shape[1], cot.shape[0]
            if plan is not None:
                return float(loss.detach()), *_mlp_pullback(plan, full, layers, d_out, cot, self.lik_idx, d_lik,
                                                            rows_out)
            if pointwise:
                pulled = self._pointwise_pullback(full, model_idx, xs, torch.cat([d_out.unsqueeze(0), cot]))
                model_grads = [p[:, :, 0].sum(1) for p in pulled]  # [T, N, 1 + K, ...] each
                model_rows = [p[:, :, 1:].reshape(T, N * K, -1) for p in pulled]
            elif held:
                per_task = [torch.autograd.grad(o, th, d) for o, th, d in zip(outs, task_theta, d_out)]
                model_grads = [torch.stack(gs) for gs in zip(*per_task)]
                del outs, per_task  # the forwards' graphs
                pulled = self._pointwise_pullback(full, model_idx, xs, cot, stats)
                model_rows = [p.reshape(T, N * K, -1) for p in pulled]
            else:
                # row m = n·K + k is point n's cotangent k, zero at every other point
                eye = torch.eye(N, dtype=cot.dtype, device=cot.device).reshape(N, 1, 1, N, *([1] * (cot.dim() - 3)))
                rows_cot = (eye * cot.unsqueeze(0)).reshape(N * K, *out.shape)
                # [1 + M, T, ...], CHUNK cotangents per batched backward: each holds a copy of the
                # backward's activations (a Conv4 with BatchNorm on 75 query images took 24 GB at once)
                chunks = [pullback(c) for c in torch.cat([d_out.unsqueeze(0), rows_cot]).split(CHUNK)]
                pulled = [torch.cat(ps) for ps in zip(*chunks)] if len(chunks) > 1 else chunks[0]
                model_grads = [p[0] for p in pulled]
                model_rows = [p[1:].reshape(N * K, T, -1).transpose(0, 1) for p in pulled]
        grads: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        it, it_rows, it_lik = iter(model_grads), iter(model_rows), iter(d_lik)
        for i, t in enumerate(full):
            if i in self.lik_idx:
                grads.append(next(it_lik))
                rows.append(t.new_zeros(T, N * K, t[0].numel()))
            else:
                grads.append(next(it).detach())
                rows.append(next(it_rows).detach())
        R = torch.cat(rows, -1)
        return float(loss.detach()), grads, R, (R * R).sum(1)

    def _pointwise_pullback(self, full: list[torch.Tensor], model_idx: list[int], xs: torch.Tensor,
                            cot: torch.Tensor, stats: list | None = None) -> tuple[torch.Tensor, ...]:
        """Each point's cotangents [C, T, N, ...] pulled back through that point's output alone:
        per model weight tensor [T, N, C, ...] (a vmap over tasks, then points, of a vmapped vjp).
        The tasks are looped when the forward loops them, or when `stats` (each task's BatchNorm
        statistics, `FunctionalNet.forward_recording`) are held as data."""
        vm = torch.func.vmap

        def pullback(one_point: Callable) -> Callable:
            def point(th: tuple[torch.Tensor, ...], xn: torch.Tensor, cn: torch.Tensor) -> tuple[torch.Tensor, ...]:
                _, vjp = torch.func.vjp(lambda *p: one_point(tuple(self._fill(list(th), model_idx, p)), xn),
                                        *[th[i] for i in model_idx])
                return vm(vjp)(cn)
            return vm(point, in_dims=(None, 0, 1))

        if stats is None and self.structure.vectorize:
            return vm(pullback(self.forward.one_point), in_dims=(0, 0, 1))(tuple(full), xs, cot)
        one = [self.forward.one_point] * xs.shape[0] if stats is None else \
            [lambda th, xn, st=st: self.forward.one_point_held(th, xn, st) for st in stats]
        per_task = [pullback(f)(tuple(p[t] for p in full), xs[t], cot[:, t]) for t, f in enumerate(one)]
        return tuple(torch.stack(ps) for ps in zip(*per_task))

    @staticmethod
    def _fill(theta: list[torch.Tensor], model_idx: list[int], model_theta) -> list[torch.Tensor]:
        full = [t.detach() for t in theta]
        for i, t in zip(model_idx, model_theta):
            full[i] = t
        return full

    def lik_curvature(self, theta: list[torch.Tensor], index: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Fisher information of the likelihood's own parameters (diagonal): {θ index: [T, ...]}."""
        if not self.lik_idx:
            return {}
        _, ys = self._data(index)
        n = ys[0].numel()  # points × outputs per task
        return {i: torch.full_like(theta[i], self.likelihood.fisher_per_output * n) for i in self.lik_idx}


# ----------------------------------------------------------------------------- MLP by hand
def mlp_forward(plan: list[tuple], theta: list[torch.Tensor], x: torch.Tensor, record: bool = False
                ) -> tuple[torch.Tensor, list[tuple]]:
    """The outputs of an `mlp_plan` network for θ with a leading task dimension T and inputs
    x [T, ..., in] (one batched GEMM per layer; differentiable). record=True (no graph) also
    returns what its pullback needs: per linear layer (step, its input [T, P, in], the derivative
    of the activations between the previous linear layer and it, or None), then (None, None, that
    derivative after the last linear layer)."""
    T, lead = x.shape[0], x.shape[1:-1]
    h, d, layers = x.reshape(T, -1, x.shape[-1]), None, []
    for step in plan:
        if step[0] == "linear":
            if record:
                layers.append((step, h, d))
            w = theta[step[1]]
            if h.shape[-1] != w.shape[-1]:  # what nn.Linear would say, not bmm's batch-shape message
                raise ValueError(f"model: a Linear layer takes {w.shape[-1]} features per point, its input "
                                 f"has {h.shape[-1]} (input points of shape {tuple(x.shape[1:])} per task)")
            h = torch.bmm(h, w.transpose(1, 2)) if step[2] is None else \
                torch.baddbmm(theta[step[2]].unsqueeze(1), h, w.transpose(1, 2))
            d = None
        elif record:  # an element-wise activation: its derivative by autograd (any activation, no table)
            with torch.enable_grad():
                z = h.detach().requires_grad_(True)
                a = step[1](z.clone())  # clone: an in-place activation must not write into z
                (g,) = torch.autograd.grad(a, z, torch.ones_like(a))
            h, d = a.detach(), g if d is None else d * g
        else:
            h = step[1](h)
    layers.append((None, None, d))
    return h.reshape(T, *lead, h.shape[-1]), layers


def _mlp_pullback(plan: list[tuple], theta: list[torch.Tensor], layers: list[tuple], d_out: torch.Tensor,
                  cot: torch.Tensor, lik_idx: list[int], d_lik: list[torch.Tensor], rows_out: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The data gradient, the GGN rows [T, N·K, D] and their diagonal Σ_m R² [T, D] of an
    `mlp_plan` network: the cotangents of every point ([T, N, 1 + K, O]: ∂nll/∂outputs, then the K
    rows' cotangents) go back through the layers together; a point's weight rows are outer products
    of its cotangent and its input, so their squares sum as (Σ_k δ²)ᵀ h² — no pass over R."""
    T, N, K = d_out.shape[0], d_out.shape[1], cot.shape[0]
    sizes = [t[0].numel() for t in theta]
    offsets = [sum(sizes[:i]) for i in range(len(theta))]
    shape = (T, N * K, sum(sizes))
    fits = rows_out is not None and rows_out.shape == shape and rows_out.dtype == d_out.dtype \
        and rows_out.device == d_out.device and rows_out.is_contiguous()
    R = (rows_out if fits else d_out.new_empty(shape)).view(T, N, K, -1)
    diag = d_out.new_zeros(T, sum(sizes))
    grads: list[torch.Tensor | None] = [None] * len(theta)
    for i, g in zip(lik_idx, d_lik):
        grads[i] = g
        R[..., offsets[i]:offsets[i] + sizes[i]] = 0
    delta = torch.cat([d_out.unsqueeze(2), cot.permute(1, 2, 0, 3)], 2)  # [T, N, 1 + K, O]
    d_last = layers[-1][2]
    if d_last is not None:
        delta = delta * d_last.unsqueeze(2)
    for j in range(len(layers) - 2, -1, -1):
        (_, wi, bi), h, d = layers[j]
        w = theta[wi]
        O, I = w.shape[1], w.shape[2]
        grads[wi] = torch.bmm(delta[:, :, 0].transpose(1, 2), h)
        torch.mul(delta[:, :, 1:].unsqueeze(-1), h[:, :, None, None, :],
                  out=R[..., offsets[wi]:offsets[wi] + sizes[wi]].view(T, N, K, O, I))
        d2 = delta[:, :, 1:].square().sum(2)  # [T, N, O]
        diag[:, offsets[wi]:offsets[wi] + sizes[wi]] = torch.bmm(d2.transpose(1, 2), h.square()).reshape(T, -1)
        if bi is not None:
            grads[bi] = delta[:, :, 0].sum(1)
            R[..., offsets[bi]:offsets[bi] + sizes[bi]] = delta[:, :, 1:]
            diag[:, offsets[bi]:offsets[bi] + sizes[bi]] = d2.sum(1)
        if j > 0:
            delta = torch.bmm(delta.reshape(T, -1, O), w).reshape(T, N, K + 1, I)
            if d is not None:
                delta = delta * d.unsqueeze(2)
    return [g.reshape(t.shape) for g, t in zip(grads, theta)], R.reshape(T, N * K, -1), diag
