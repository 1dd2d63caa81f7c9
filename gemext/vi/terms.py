"""`DataTerm`: the data term of a fit (summed NLL of a batch of tasks, its gradient and GGN rows)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


# ----------------------------------------------------------------------------- data terms
class DataTerm:
    """The summed negative log-likelihood of a batch of tasks, −Σ log p(y | f(x; θ)), as the
    callable ``nll(theta, index)`` that `fit` takes, plus what curvature-aware VI needs: the rows
    of a square-root factor R of the generalised Gauss-Newton matrix, G = RᵀR = Σ_n J_nᵀ H_n J_n
    (J_n the Jacobian of point n's outputs, H_n the likelihood's Hessian in output space).

    forward(theta, x) -> outputs [T, N, ...] (θ with a leading task dimension); θ entries named
    ``likelihood.*`` (a learned noise scale) are passed to the likelihood instead of the model."""

    def __init__(self, forward: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                 likelihood: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> None:
        self.forward, self.likelihood, self.x, self.y, self.names = forward, likelihood, x, y, names
        self.lik_idx = [i for i, n in enumerate(names) if n.startswith("likelihood.")]

    def tasks(self, index: torch.Tensor) -> DataTerm:
        """The same data term over the tasks `index` (a LongTensor; repeats allowed)."""
        return DataTerm(self.forward, self.likelihood, self.x[index], self.y[index], self.names)

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
                 generator: torch.Generator | None) -> list[torch.Tensor]:
        """Rows of R per task: a list over θ of [T, M, *shape] tensors (zero for ``likelihood.*``
        entries, whose curvature `lik_curvature` gives). Gaussian likelihoods give the exact GGN
        (M = points × outputs); the categorical one a Monte-Carlo Fisher with one label sampled
        from the model per point (M = points; unbiased for the GGN)."""
        return self.value_grad_rows(theta, index, generator)[2]

    def value_grad_rows(self, theta: list[torch.Tensor], index: torch.Tensor | None,
                        generator: torch.Generator | None) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """(nll, ∂nll/∂θ, GGN rows) from ONE forward pass: the data gradient is the pullback of
        ∂nll/∂outputs, batched with the rows' cotangents into a single vmapped backward."""
        xs, ys = self._data(index)
        model_idx = [i for i in range(len(theta)) if i not in self.lik_idx]
        with torch.enable_grad():
            if getattr(self.forward, "vectorize", True):
                out, vjp = torch.func.vjp(lambda *th: self.forward(self._fill(theta, model_idx, th), xs),
                                          *[theta[i].detach() for i in model_idx])
                pullback = torch.func.vmap(vjp)
            else:
                # a forward that updates buffers (BatchNorm's running statistics, looped tasks) cannot
                # run under torch.func.vjp: plain autograd, the backward batched over the cotangents
                # (several times slower on small nets)
                model_theta = [theta[i].detach().requires_grad_(True) for i in model_idx]
                out = self.forward(self._fill(theta, model_idx, model_theta), xs)

                def pullback(cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    return torch.autograd.grad(out, model_theta, cot, is_grads_batched=True)
            o = out.detach().requires_grad_(True)
            full = [t.detach() for t in theta]
            lik_theta = [full[i].requires_grad_(True) for i in self.lik_idx]
            loss = self.likelihood.nll(o, ys, self._lik_params(full, ys))
            d_out, *d_lik = torch.autograd.grad(loss, [o] + lik_theta)
            cot = self.likelihood.ggn_cotangents(out.detach(), self._lik_params([t.detach() for t in full], ys),
                                                 generator)
            pulled = pullback(torch.cat([d_out.unsqueeze(0), cot]))  # [1 + M, T, ...]
        grads: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        it, it_lik = iter(pulled), iter(d_lik)
        for i, t in enumerate(theta):
            if i in self.lik_idx:
                grads.append(next(it_lik))
                rows.append(t.new_zeros(t.shape[0], cot.shape[0], *t.shape[1:]))
            else:
                p = next(it).detach()
                grads.append(p[0])
                rows.append(p[1:].transpose(0, 1))
        return float(loss.detach()), grads, rows

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
