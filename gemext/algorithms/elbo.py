"""ELBO-gradient learners: back-propagation through variational inference (the first row of the
paper's matrix). Meta-parameters Θ = (μ₀, ρ₀) of a diagonal Gaussian prior, as in GEMLearner.

Per task, λ_K(Θ) = VI(Θ, D_support) is K differentiable steps on −ELBO(λ) = E_q[nll(D_s|θ)] +
β·KL(q_λ‖p_Θ) from λ₀ = Θ, with reparameterised samples θ = μ + σ·ε (ε from the fused kernels'
Philox stream, the same ε `gemext.vi.fit` draws for the same seed, so meta-test adaptation with the
fused `fit` follows the same update). The step is plain SGD on (μ, ρ), natural-gradient VI
(μ ← μ − clip(lr·σ²·∂μ, ±max_step·σ), ρ ← ρ − clip(rho_lr/2·∂ρ, ±max_step/√2): `gemext.vi.ngvi_update`,
the very rule of `gemext.vi.NaturalGradientVI`, with its resolved defaults) or the von step
(`fit(..., differentiable=True)`: `VonFit` with `reference.von_step`). The fused `sample` and
`gaussian_kl` have first-order backward formulas only, so inside the unrolled loop (which needs
the gradient of a gradient) θ = μ + σ·ε and the KL are written as differentiable torch
composites; the meta-loss at λ_K uses the fused ops.

- `abml` (Ravi & Beatson 2019, loss L[1]): meta-loss −ELBO(λ_K; D_support ∪ D_query) =
  E_{q_λK}[nll(D_all)] + β·KL(q_λK ‖ p_Θ), differentiated through the VI steps (their eq. 4).
- `pmaml-elbo` (loss L[2]): meta-loss E_{q_λK}[nll(D_query)], the ELBO of log p(D_query | D_support)
  whose variational distribution is the support posterior itself (so its KL to p(θ | D_support)
  ≈ q_λK vanishes), differentiated through the VI steps.
Memory grows with the inner steps (the unrolled graph), unlike the Gradient-EM learners.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import ops, reference
from ..gaussian import Posterior
from ..tasks import Task
from ..vi import DataTerm, NaturalGradientVI, VIConfig, fit, ngvi_update, task_starts
from .functional import Params, PriorLearner, vi_config
from .registry import register_variants

_DIFFERENTIABLE_VI = ("sgd", "ngvi", "von")


class VILearner(PriorLearner):
    """Shared by the ELBO-gradient and KL-chaser learners: a Gaussian prior over the model's
    parameters and a differentiable, task-vectorised VI inner loop.

    Options: sigma0 (initial prior std, default 0.05), inner (VIConfig or dict; optimizer "ngvi"
    (default, lr 0.2), "sgd" or "von" (the variational online Newton VI of the GEM learners, its
    options in optimizer_kwargs; the unrolled loop differentiates its steps with the curvature
    rows held as data); steps, lr, mc_samples, beta), inner_steps, lr, beta, mc_samples,
    likelihood (GaussianLikelihood(0.5) default), bayesian, vectorize, predict_samples, seed,
    forward_kwargs (extra keyword arguments of every forward call)."""

    def __init__(self, model: nn.Module, sigma0: float = 0.05, inner: VIConfig | dict | None = None,
                 inner_steps: int | None = None, lr: float | None = None, beta: float | None = None,
                 mc_samples: int | None = None, likelihood: nn.Module | None = None, bayesian=None,
                 vectorize: bool | str = "auto", predict_samples: int = 20, seed: int = 0,
                 forward_kwargs: dict | None = None) -> None:
        super().__init__()
        if inner is None:
            inner = VIConfig(steps=5, optimizer="ngvi", lr=0.2)
        self.inner = vi_config(self.name, inner, steps=inner_steps, lr=lr, beta=beta, mc_samples=mc_samples)
        opt = self.inner.optimizer
        if not (isinstance(opt, str) and opt.lower() in _DIFFERENTIABLE_VI):
            raise ValueError(f"{self.name}: the differentiable VI supports optimizer 'sgd', 'ngvi' or 'von', "
                             f"got {opt!r}")
        # von's options were checked by VIConfig; ngvi takes its two, sgd none
        allowed = {"ngvi": {"rho_lr", "max_step"}, "sgd": set()}.get(opt.lower(), set(self.inner.optimizer_kwargs))
        extra = set(self.inner.optimizer_kwargs) - allowed
        if extra or self.inner.batch_size is not None:
            raise ValueError(f"{self.name}: the differentiable VI takes no optimizer_kwargs {sorted(extra)} "
                             "and no batch_size")
        self._take_over(model, likelihood, seed)
        self._make_prior(sigma0, bayesian)
        self._finish_take_over(self.prior.names, vectorize, forward_kwargs, self.inner)
        self.predict_samples = predict_samples

    @property
    def inner_steps(self) -> int:
        return self.inner.steps

    # -- differentiable VI --------------------------------------------------------------------------
    def _vi(self, x, y, mu0: Params, rho0: Params, steps: int, create_graph: bool,
            task_range: tuple[int, int] | None = None) -> tuple[Params, Params, float]:
        """K steps of VI from λ = prior on a stacked batch; prior tensors without a task dimension
        (μ₀, ρ₀, possibly graph-connected). Returns (μ_K, ρ_K, last data term)."""
        T, cfg = x.shape[0], self.inner
        pm = [m.unsqueeze(0).expand(T, *m.shape) for m in mu0]
        pr = [r.unsqueeze(0).expand(T, *r.shape) for r in rho0]
        if not create_graph:
            pm, pr = [m.detach() for m in pm], [r.detach() for r in pr]
        mu, rho = [m.clone() for m in pm], [r.clone() for r in pr]  # distinct from the prior's nodes
        if cfg.optimizer.lower() == "von":
            return self._vi_von(self._term(x, y), mu, rho, pm, pr, steps, create_graph, task_range)
        ngvi = cfg.optimizer.lower() == "ngvi"
        if ngvi:  # the optimizer's own resolved defaults (ρ step, trust region), so `fit` and `_vi` agree
            hp = NaturalGradientVI([torch.zeros(1), torch.zeros(1)], lr=cfg.lr, **cfg.optimizer_kwargs).defaults
            rho_lr, max_step = hp["rho_lr"], hp["max_step"]
        S, last = cfg.mc_samples, float("nan")
        with torch.enable_grad():
            for _ in range(steps):
                if not create_graph:
                    mu = [m.detach().requires_grad_(True) for m in mu]
                    rho = [r.detach().requires_grad_(True) for r in rho]
                seed = ops.new_seed(self.generator)
                data = 0.0
                for s in range(S):
                    eps = self._eps(mu, seed, s, task_range)
                    data = data + self._nll([m + r.exp() * e for m, r, e in zip(mu, rho, eps)], x, y) / S
                kl = sum(reference.kl_terms(m, r, m0, r0).sum() for m, r, m0, r0 in zip(mu, rho, pm, pr))
                g = torch.autograd.grad(data + cfg.beta * kl, mu + rho, create_graph=create_graph)
                g_mu, g_rho = g[:len(mu)], g[len(mu):]
                if ngvi:  # NaturalGradientVI's own rule (trust region included), as a function
                    new = [ngvi_update(m, r, gm, gr, cfg.lr, rho_lr, max_step)
                           for m, r, gm, gr in zip(mu, rho, g_mu, g_rho)]
                    mu, rho = [n[0] for n in new], [n[1] for n in new]
                else:
                    mu = [m - cfg.lr * gm for m, gm in zip(mu, g_mu)]
                    rho = [r - cfg.lr * gr for r, gr in zip(rho, g_rho)]
                last = float(data.detach())
        if not create_graph:
            mu, rho = [m.detach() for m in mu], [r.detach() for r in rho]
        return mu, rho, last

    def _vi_von(self, term: DataTerm, mu: Params, rho: Params, pm: Params, pr: Params, steps: int,
                create_graph: bool, task_range: tuple[int, int] | None) -> tuple[Params, Params, float]:
        """`_vi` with the variational online Newton step: `gemext.vi`'s own von loop, in its
        differentiable mode when the graph is wanted."""
        res = fit(term, term.x.shape[1], Posterior(self.names, pm, pr), Posterior(self.names, mu, rho),
                  replace(self.inner, steps=steps), self.generator, task_range=task_range, differentiable=create_graph)
        return res.posterior.mu, res.posterior.rho, res.nll

    def _term(self, x: torch.Tensor, y: torch.Tensor) -> DataTerm:
        return DataTerm(self.forward_net, self.net.likelihood, x, y, self.names)

    @staticmethod
    @torch.no_grad()
    def _eps(like: Params, seed: int, offset: int, task_range: tuple[int, int] | None = None) -> Params:
        """The kernels' ε for tensors shaped like `like` (θ = 0 + 1·ε)."""
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in like]
        return ops.sample(zeros, zeros, seed, offset, task_starts(like, task_range))

    def _expected_nll(self, mu: Params, rho: Params, x, y, task_range: tuple[int, int] | None = None) -> torch.Tensor:
        """E_q[nll] by `mc_samples` draws of the fused `sample` op (first-order differentiable)."""
        seed = ops.new_seed(self.generator)
        S = self.inner.mc_samples
        starts = task_starts(mu, task_range)
        return sum(self._nll(ops.sample(mu, rho, seed, s, starts), x, y) for s in range(S)) / S

    def _fit(self, x, y, prior: Posterior, init: Posterior, steps: int, callback=None,
             task_range: tuple[int, int] | None = None):
        """The fused, graph-free VI of gemext.vi (same update and ε stream as `_vi`)."""
        cfg = replace(self.inner, steps=steps)
        return fit(self._term(x, y), x.shape[1], prior, init, cfg, self.generator, callback=callback,
                   task_range=task_range)

    # -- meta-testing -------------------------------------------------------------------------------
    def _inner_path(self, x, y, steps: int, on_step) -> Posterior:
        prior = self.prior.expand(x.shape[0])
        callback = None if on_step is None else (lambda k, post: on_step(post.clone()))
        return self._fit(x, y, prior, prior, steps, callback).posterior


class ELBOLearner(VILearner):
    """ABML (`abml`, L[1]) and the ELBO-gradient L[2] cell (`pmaml-elbo`); see the module docstring
    and VILearner for the options."""

    def __init__(self, model: nn.Module, variant: str = "abml", **options: Any) -> None:
        if variant not in ("abml", "pmaml-elbo"):
            raise ValueError(f"ELBOLearner: unknown variant {variant!r}")
        self.name = self.variant = variant
        super().__init__(model, **options)

    def _meta_backward(self, b: Task, task_range: tuple[int, int] | None) -> dict[str, float]:
        T = len(b)
        mu0, rho0 = list(self.prior.mu0), list(self.prior.rho0)
        mu, rho, nll_s = self._vi(b.x_support, b.y_support, mu0, rho0, self.inner.steps, create_graph=True,
                                  task_range=task_range)
        stats = {"nll_support": nll_s / (T * b.x_support.shape[1])}
        with torch.enable_grad():
            if self.variant == "abml":
                x, y = b.joint()
                data = self._expected_nll(mu, rho, x, y, task_range)
                kl = ops.gaussian_kl(mu, rho, [m.unsqueeze(0).expand_as(t).contiguous() for m, t in zip(mu0, mu)],
                                     [r.unsqueeze(0).expand_as(t).contiguous() for r, t in zip(rho0, rho)])
                loss = data + self.inner.beta * kl
                stats["nll_all"] = float(data.detach()) / (T * x.shape[1])
                stats["kl"] = float(kl.detach()) / T
            else:
                loss = self._expected_nll(mu, rho, b.x_query, b.y_query, task_range)
                stats["nll_query"] = float(loss.detach()) / (T * b.x_query.shape[1])
            (loss / T).backward()
        return stats


register_variants(ELBOLearner, "abml", "pmaml-elbo")
