"""Delta-posterior learners: MAML (second order), FOMAML (first order) and iMAML (implicit
gradient), plus the model take-over that every non-GEM learner of the catalogue shares.

Losses are the likelihood's summed negative log-likelihood (as in GEMLearner, so gradient scales
match), and the inner update is SGD with step size `lr` on it: φ ← φ − lr·∇ nll_support(φ).

- `maml`: L(Θ) = mean_τ nll_query(φ_K(Θ)), φ_0 = Θ, gradient by back-propagation through the
  unrolled inner SGD. Vectorised over tasks as `vmap(grad(task_loss))` with `torch.func`
  (`grad(vmap(...))` through training-mode BatchNorm gives wrong second-order gradients on
  torch 2.13); models whose forward mutates buffers (BatchNorm running statistics) are looped
  over tasks with plain autograd (`create_graph=True`), which `torch.func.grad` cannot do.
- `fomaml`: the same loss with the inner Jacobian replaced by the identity:
  ∇Θ ≈ mean_τ ∇ nll_query(φ_K).
- `imaml` (Rajeswaran et al. 2019): φ*(Θ) = argmin nll_support(φ) + λ/2‖φ − Θ‖² (approximated by
  K SGD steps from Θ); dφ*/dΘ = (I + H/λ)⁻¹ with H the Hessian of nll_support at φ*, so the
  meta-gradient is v = (I + H/λ)⁻¹ ∇ nll_query(φ*), solved by `cg_steps` of conjugate gradient
  with Hessian-vector products (forward-over-reverse, vmapped over tasks). Memory is independent
  of the inner steps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp, vmap

from ..gaussian import split_parameters
from ..linalg import conjugate_gradient
from ..tasks import Task
from .functional import FunctionalLearner, Params
from .predictors import BayesianPredictor
from .registry import register_variants


class MAMLLearner(FunctionalLearner):
    """MAML / FOMAML / iMAML over any nn.Module (delta posterior, meta-parameters θ₀).

    Options: inner_steps (K, default 5), lr (inner SGD step on the summed NLL, default 5e-4, i.e.
    Finn et al.'s 0.01 on the mean squared error for 10 points and σ = 0.5), likelihood
    (GaussianLikelihood(0.5) default), bayesian (which parameters are meta-learned; others stay
    fixed), vectorize ("auto"/True/False), seed, forward_kwargs (extra keyword arguments of every
    forward call); iMAML: reg (λ, default 1.0), cg_steps (default 5)."""

    variant_options = {"reg": ("imaml",), "cg_steps": ("imaml",)}

    def __init__(self, model: nn.Module, variant: str = "maml", inner_steps: int = 5, lr: float = 5e-4,
                 likelihood: nn.Module | None = None, bayesian=None, vectorize: bool | str = "auto",
                 seed: int = 0, reg: float = 1.0, cg_steps: int = 5,
                 forward_kwargs: dict | None = None) -> None:
        super().__init__()
        if variant not in ("maml", "fomaml", "imaml"):
            raise ValueError(f"MAMLLearner: unknown variant {variant!r}")
        if inner_steps < 0 or not lr > 0:
            raise ValueError(f"{variant}: inner_steps must be >= 0 and lr > 0, got {inner_steps}, {lr}")
        if variant == "imaml" and (not reg > 0 or cg_steps < 1):
            raise ValueError(f"imaml: reg must be > 0 and cg_steps >= 1, got {reg}, {cg_steps}")
        self.name = self.variant = variant
        self.inner_steps, self.lr = int(inner_steps), float(lr)
        self.reg, self.cg_steps = float(reg), int(cg_steps)
        self._take_over(model, likelihood, seed)
        names = split_parameters(self.net, bayesian)
        params = dict(self.net.named_parameters())
        self.theta0 = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in names])
        self._finish_take_over(names, vectorize, forward_kwargs)

    # -- inner loop --------------------------------------------------------------------------
    def _prox(self, phi: Params, theta: Params | None) -> torch.Tensor | float:
        if self.variant != "imaml" or theta is None:
            return 0.0
        return 0.5 * self.reg * sum(((p - t) ** 2).sum() for p, t in zip(phi, theta))

    @torch.enable_grad()
    def _adapt_batch(self, x, y, steps: int, callback: Callable[[int, Params], None] | None = None) -> Params:
        """Inner SGD on a stacked batch without a graph (meta-test, FOMAML, iMAML)."""
        theta = [p.detach().unsqueeze(0).expand(x.shape[0], *p.shape).contiguous() for p in self.theta0]
        phi = [t.clone() for t in theta]
        if callback is not None:
            callback(0, phi)
        for k in range(steps):
            phi = [p.detach().requires_grad_(True) for p in phi]
            loss = self._nll(phi, x, y) + self._prox(phi, theta)
            g = torch.autograd.grad(loss, phi)
            phi = [p.detach() - self.lr * gi for p, gi in zip(phi, g)]
            if callback is not None:
                callback(k + 1, phi)
        return phi

    def _task_loss(self, theta0: Params, xs, ys, xq, yq) -> torch.Tensor:
        """Second-order MAML loss of one task (differentiable in θ₀). Inside vmap the inner
        gradients come from torch.func.grad, otherwise from autograd with create_graph."""
        phi = list(theta0)
        for _ in range(self.inner_steps):
            if self.vectorize:
                g = grad(self._nll_one)(phi, xs, ys)
            else:
                g = torch.autograd.grad(self._nll_one(phi, xs, ys), phi, create_graph=True)
            phi = [p - self.lr * gi for p, gi in zip(phi, g)]
        return self._nll_one(phi, xq, yq)

    # -- meta-training -------------------------------------------------------------------------
    def _meta_backward(self, b: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        """(No inner-loop noise: task_range changes nothing.)"""
        T = len(b)
        if self.variant == "maml":
            grads, loss = self._maml_grads(b)
        elif self.variant == "fomaml":
            with torch.enable_grad():
                phi = [p.requires_grad_(True) for p in self._adapt_batch(b.x_support, b.y_support, self.inner_steps)]
                q = self._nll(phi, b.x_query, b.y_query)
                grads = [g.sum(0) for g in torch.autograd.grad(q, phi)]
            loss = float(q.detach())
        else:
            grads, loss = self._imaml_grads(b)
        self._accumulate(self.theta0, [g / T for g in grads])
        return {"nll_query": loss / (T * b.x_query.shape[1])}

    def _maml_grads(self, b: Task) -> tuple[Params, float]:
        theta0 = [p.detach() for p in self.theta0]
        if self.vectorize and self.forward_net.mlp is not None:
            # an MLP runs as batched GEMMs: plain autograd through the unrolled steps of all tasks
            # at once (the tasks are separable, so each task's inner gradient is its own) beats
            # vmap(grad) by ~20% on the sinusoid MLP
            with torch.enable_grad():
                th = [p.clone().requires_grad_(True) for p in theta0]
                phi = [p.unsqueeze(0).expand(len(b), *p.shape) for p in th]
                for _ in range(self.inner_steps):
                    g = torch.autograd.grad(self._nll(phi, b.x_support, b.y_support), phi, create_graph=True)
                    phi = [p - self.lr * gi for p, gi in zip(phi, g)]
                loss = self._nll(phi, b.x_query, b.y_query)
                return list(torch.autograd.grad(loss, th)), float(loss.detach())
        if self.vectorize:
            g, loss = vmap(grad_and_value(self._task_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")(
                theta0, b.x_support, b.y_support, b.x_query, b.y_query)
            return [gi.sum(0) for gi in g], float(loss.sum())
        total = [torch.zeros_like(t) for t in theta0]
        loss_sum = 0.0
        with torch.enable_grad():
            for t in range(len(b)):
                th = [p.clone().requires_grad_(True) for p in theta0]
                loss = self._task_loss(th, b.x_support[t], b.y_support[t], b.x_query[t], b.y_query[t])
                for acc, gi in zip(total, torch.autograd.grad(loss, th)):
                    acc.add_(gi)
                loss_sum += float(loss.detach())
        return total, loss_sum

    def _imaml_grads(self, b: Task) -> tuple[Params, float]:
        phi = self._adapt_batch(b.x_support, b.y_support, self.inner_steps)
        with torch.enable_grad():
            phi = [p.requires_grad_(True) for p in phi]
            q = self._nll(phi, b.x_query, b.y_query)
            rhs = [g.detach() for g in torch.autograd.grad(q, phi)]
        hvp = self._hvp_fn(phi, b.x_support, b.y_support)
        v = conjugate_gradient(lambda p: [pi + hi / self.reg for pi, hi in zip(p, hvp(p))], rhs, self.cg_steps)
        return [vi.sum(0) for vi in v], float(q.detach())

    def _hvp_fn(self, phi: Params, x, y) -> Callable[[Params], Params]:
        """p ↦ H p per task, H the Hessian of the support NLL at φ (stacked over tasks)."""
        phi = [p.detach() for p in phi]
        if self.vectorize:
            def one(ph, v, xi, yi):
                return jvp(lambda q: grad(self._nll_one)(q, xi, yi), (ph,), (v,))[1]
            batched = vmap(one, randomness="different")
            return lambda p: list(batched(phi, list(p), x, y))
        per_task = []
        with torch.enable_grad():
            for t in range(x.shape[0]):
                ph = [p[t].clone().requires_grad_(True) for p in phi]
                per_task.append((ph, torch.autograd.grad(self._nll_one(ph, x[t], y[t]), ph, create_graph=True)))

        def hvp(p: Params) -> Params:
            out = [torch.autograd.grad(g, ph, [pi[t] for pi in p], retain_graph=True)
                   for t, (ph, g) in enumerate(per_task)]
            return [torch.stack([o[i] for o in out]) for i in range(len(p))]
        return hvp

    # -- meta-testing -----------------------------------------------------------------------------
    def _inner_path(self, x, y, steps: int, on_step) -> Params:
        return self._adapt_batch(x, y, steps, None if on_step is None else (lambda k, phi: on_step(phi)))

    def _predictor(self, phi: Params, squeeze: bool) -> BayesianPredictor:
        return self._delta_predictor(phi, squeeze)


register_variants(MAMLLearner, "maml", "fomaml", "imaml")
