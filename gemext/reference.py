"""Pure-PyTorch versions of every fused op in :mod:`gemext.ops`: the textbook formulas of the
Gaussian prior, posterior and Gradient-EM statistic as plain differentiable torch ops, computed in
the dtype they are given. Three users:
- the tests, with float64 tensors: the oracle;
- the benchmarks, with float32 tensors: the "eager" baseline;
- the package itself, where a differentiable composite is needed and the kernels are first-order:
  `gem_terms` is the backward of :func:`gemext.ops.gem_grad`, `von_step` the von step the
  back-propagating learners unroll (`gemext.vi.fit(..., differentiable=True)`), `kl_terms` the
  KL inside the unrolled inner loop of `abml` / `pmaml-elbo`.
It is never a silent fallback: a call to a kernel runs the kernel or fails.
Signatures mirror :mod:`gemext.ops`; a Tensor in gives a Tensor out, a list gives a list.

:func:`normal` reproduces the kernels' noise (Philox-4x32-10 + Box-Muller, see
``csrc/gemext_math.h``) with vectorised numpy uint64 arithmetic, so tests compare ε
element by element.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TensorOrList = Tensor | Sequence[Tensor]

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_LO32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: Sequence[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox-4x32-10 on arrays of 32-bit counter words (held in uint64); returns 4 word arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _LO32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _LO32)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


def _uniform(w: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float32:
        return ((w >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0**-24
    return (w.astype(np.float64) + 0.5) * 2.0**-32


def normal(seed: int, offset: int, numel: int, dtype: torch.dtype = torch.float64,
           start: int = 0) -> Tensor:
    """ε of global elements ``start .. start+numel-1`` as the kernels draw it for tensors of
    ``dtype`` (float32 uses 24-bit uniforms, float64 32-bit), computed in float64."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float64)
    g0, g1 = start // 4, (start + numel + 3) // 4
    g = np.arange(g0, g1, dtype=np.uint64)
    off = np.full_like(g, offset & 0xFFFFFFFF), np.full_like(g, offset >> 32)
    w = philox4x32_10((g & _LO32, g >> np.uint64(32), *off), (seed & 0xFFFFFFFF, seed >> 32))
    u = [_uniform(x, dtype) for x in w]
    out = np.empty((g1 - g0, 4))
    for p in (0, 1):
        r = np.sqrt(-2.0 * np.log(u[2 * p]))
        angle = 2.0 * np.pi * u[2 * p + 1]
        out[:, 2 * p], out[:, 2 * p + 1] = r * np.cos(angle), r * np.sin(angle)
    flat = out.reshape(-1)[start - 4 * g0:start - 4 * g0 + numel]
    return torch.from_numpy(flat.copy())


def _listify(*args: TensorOrList | None) -> tuple[list, bool]:
    single = isinstance(args[0], Tensor)
    return [([a] if single else list(a)) if a is not None else None for a in args], single


def _noise_like(tensors: list[Tensor], seed: int, offset: int,
                starts: Sequence[int] | None = None) -> list[Tensor]:
    """The kernels' ε for a list, indexed over the concatenation of all its tensors (or from
    ``starts[t]`` for tensor t)."""
    if starts is None:
        starts = np.cumsum([0] + [t.numel() for t in tensors])[:-1].tolist()
    elif isinstance(starts, int):
        starts = [starts]
    dtype = tensors[0].dtype if tensors else torch.float64
    return [normal(seed, offset, t.numel(), dtype, int(s)).view(t.shape).to(t.device, t.dtype)
            for t, s in zip(tensors, starts)]


def _unlist(single: bool, *lists: list):
    res = tuple(x[0] if single else x for x in lists)
    return res[0] if len(res) == 1 else res


def sample(mu: TensorOrList, rho: TensorOrList, seed: int, offset: int = 0,
           starts: Sequence[int] | None = None) -> TensorOrList:
    """θ = μ + exp(ρ)·ε."""
    (mu, rho), single = _listify(mu, rho)
    eps = _noise_like(mu, seed, offset, starts)
    return _unlist(single, [m + torch.exp(r) * e for m, r, e in zip(mu, rho, eps)])


def kl_terms(mu: Tensor, rho: Tensor, mu0: Tensor, rho0: Tensor) -> Tensor:
    """Element-wise KL(q‖p) of diagonal Gaussians."""
    var0 = torch.exp(2 * rho0)
    return rho0 - rho + (torch.exp(2 * rho) + (mu - mu0) ** 2) / (2 * var0) - 0.5


def gaussian_kl(mu: TensorOrList, rho: TensorOrList, mu0: TensorOrList,
                rho0: TensorOrList) -> Tensor:
    """Σ KL(q‖p) over every element of every tensor (a 0-dim tensor)."""
    lists, _ = _listify(mu, rho, mu0, rho0)
    terms = [kl_terms(*xs).sum() for xs in zip(*lists)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def elbo_grads(g: Tensor, mu: Tensor, rho: Tensor, mu0: Tensor, rho0: Tensor, eps: Tensor,
               beta: float) -> tuple[Tensor, Tensor]:
    """∂/∂μ, ∂/∂ρ of −ELBO = nll(θ) + β·KL for one tensor, given g = ∂nll/∂θ and ε."""
    sigma, var0 = torch.exp(rho), torch.exp(2 * rho0)
    return g + beta * (mu - mu0) / var0, g * eps * sigma + beta * (sigma**2 / var0 - 1)


def elbo_backward(grad_theta: TensorOrList, mu: TensorOrList, rho: TensorOrList,
                  mu0: TensorOrList, rho0: TensorOrList, seed: int, offset: int = 0,
                  beta: float = 1.0, eps: TensorOrList | None = None,
                  starts: Sequence[int] | None = None):
    """(∂/∂μ, ∂/∂ρ) of −ELBO; ε regenerated from (seed, offset, starts) unless given."""
    (g, mu, rho, mu0, rho0, eps), single = _listify(grad_theta, mu, rho, mu0, rho0, eps)
    eps = eps if eps is not None else _noise_like(mu, seed, offset, starts)
    out = [elbo_grads(*xs, beta) for xs in zip(g, mu, rho, mu0, rho0, eps)]
    return _unlist(single, [o[0] for o in out], [o[1] for o in out])


def elbo_backward_(out_mu: TensorOrList, out_rho: TensorOrList, grad_theta: TensorOrList,
                   mu: TensorOrList, rho: TensorOrList, mu0: TensorOrList, rho0: TensorOrList,
                   seed: int, offset: int = 0, beta: float = 1.0,
                   eps: TensorOrList | None = None, starts: Sequence[int] | None = None) -> None:
    """:func:`elbo_backward` written into ``out_mu``, ``out_rho`` (eager, with temporaries)."""
    (out_mu, out_rho, g, mu, rho, mu0, rho0, eps), _ = _listify(
        out_mu, out_rho, grad_theta, mu, rho, mu0, rho0, eps)
    eps = eps if eps is not None else _noise_like(mu, seed, offset, starts)
    for om, orho, *xs in zip(out_mu, out_rho, g, mu, rho, mu0, rho0, eps):
        dm, dr = elbo_grads(*xs, beta)
        om.copy_(dm)
        orho.copy_(dr)


def gem_terms(mu0: Tensor, rho0: Tensor, mu_a: Tensor, rho_a: Tensor,
              mu_b: Tensor | None = None, rho_b: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """ĝ for one tensor: GEM-BML, or GEM-BML+ when λ_b = (μ_b, ρ_b) is given. The prior
    broadcasts against the posterior, so a posterior [T, *prior shape] gives ĝ per task."""
    var0 = torch.exp(2 * rho0)
    if mu_b is None:
        return (mu_a - mu0) / var0, ((mu_a - mu0) ** 2 + torch.exp(2 * rho_a)) / var0 - 1
    g_rho = ((mu_a - mu0) ** 2 + torch.exp(2 * rho_a) - (mu_b - mu0) ** 2
             - torch.exp(2 * rho_b)) / var0
    return (mu_a - mu_b) / var0, g_rho


def gem_grad(mu0: TensorOrList, rho0: TensorOrList, mu_a: TensorOrList, rho_a: TensorOrList,
             mu_b: TensorOrList | None = None, rho_b: TensorOrList | None = None):
    """(ĝ_μ₀, ĝ_ρ₀), the Gradient-EM ascent direction."""
    lists, single = _listify(mu0, rho0, mu_a, rho_a, mu_b, rho_b)
    n = len(lists[0])
    lists = [x if x is not None else [None] * n for x in lists]
    out = [gem_terms(*xs) for xs in zip(*lists)]
    return _unlist(single, [o[0] for o in out], [o[1] for o in out])


def gem_grad_(g_mu0: TensorOrList, g_rho0: TensorOrList, mu0: TensorOrList, rho0: TensorOrList,
              mu_a: TensorOrList, rho_a: TensorOrList, mu_b: TensorOrList | None = None,
              rho_b: TensorOrList | None = None, weight: float = 1.0) -> None:
    """Adds weight·ĝ into ``g_mu0``, ``g_rho0`` (eager, with temporaries). Posteriors with a
    leading task dimension, [T, *prior shape], add weight·Σ_t ĝ(prior, posterior_t): the prior
    broadcast over the T tasks, ĝ per task, summed over dim 0."""
    (g_mu0, g_rho0), _ = _listify(g_mu0, g_rho0)
    d_mu, d_rho = gem_grad(*(_listify(mu0, rho0, mu_a, rho_a, mu_b, rho_b)[0]))
    for b, d in zip(g_mu0 + g_rho0, d_mu + d_rho):
        b.add_(d.sum(0) if d.dim() == b.dim() + 1 else d, alpha=weight)


def von_terms(mu: Tensor, rho: Tensor, h: Tensor, grad: Tensor, curv: Tensor | None,
              mu0: Tensor, rho0: Tensor, eps: Tensor | None, lr: float, beta: float,
              h_decay: float, damping: float, correction: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(μ', ρ', h') of one VON step for one tensor; ``eps`` is needed only when ``curv`` is None."""
    c = curv if curv is not None else torch.clamp_min(grad * eps / torch.exp(rho), 0)
    h_new = (1 - h_decay) * h + h_decay * c
    lam0 = beta * torch.exp(-2 * rho0)
    num = grad + lam0 * (mu - mu0)
    if correction is None:
        mu_new = mu - lr * num / (lam0 + h_new + damping)
    else:
        mu_new = mu - lr * (num - correction) / (lam0 + damping)
    return mu_new, -0.5 * torch.log(lam0 + h_new), h_new


def von_step(mu: TensorOrList, rho: TensorOrList, h: TensorOrList, grad: TensorOrList,
             curv: TensorOrList | None, mu0: TensorOrList, rho0: TensorOrList, seed: int,
             offset: int, lr: float, beta: float, h_decay: float, damping: float,
             correction: TensorOrList | None = None, starts: Sequence[int] | None = None,
             eps: TensorOrList | None = None):
    """(μ', ρ', h') of a VON step, functionally; ε regenerated from (seed, offset, starts)
    unless given (only used without ``curv``)."""
    (mu, rho, h, grad, curv, mu0, rho0, correction, eps), single = _listify(
        mu, rho, h, grad, curv, mu0, rho0, correction, eps)
    n = len(mu)
    if curv is None and eps is None:
        eps = _noise_like(mu, seed, offset, starts)
    curv, correction, eps = (x if x is not None else [None] * n for x in (curv, correction, eps))
    out = [von_terms(m, r, hh, g, c, m0, r0, e, lr, beta, h_decay, damping, corr)
           for m, r, hh, g, c, m0, r0, e, corr in zip(mu, rho, h, grad, curv, mu0, rho0, eps,
                                                       correction)]
    return _unlist(single, [o[0] for o in out], [o[1] for o in out], [o[2] for o in out])


def von_step_(mu: TensorOrList, rho: TensorOrList, h: TensorOrList, grad: TensorOrList,
              curv: TensorOrList | None, mu0: TensorOrList, rho0: TensorOrList, seed: int,
              offset: int, lr: float, beta: float, h_decay: float, damping: float,
              correction: TensorOrList | None = None, starts: Sequence[int] | None = None,
              eps: TensorOrList | None = None) -> None:
    """:func:`von_step` written back into ``mu``, ``rho``, ``h`` (eager, with temporaries)."""
    new = von_step(mu, rho, h, grad, curv, mu0, rho0, seed, offset, lr, beta, h_decay, damping,
                   correction, starts, eps)
    (mu, rho, h), single = _listify(mu, rho, h)
    if single:
        new = tuple([x] for x in new)
    for dst, src in zip(mu + rho + h, new[0] + new[1] + new[2]):
        dst.copy_(src)


# ------------------------------------------------------------------ the conjugate oracle
# Linear-Gaussian regression with orthogonal features: the exact posterior of a diagonal Gaussian
# prior is diagonal, so the VI family contains it, and log p(D; Θ) has a closed form. The best
# check of a Gradient-EM meta-gradient: at the exact posterior it IS ∇_Θ log p(D; Θ).
def orthogonal_features(n: int, d: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[n, d] with orthogonal columns of different norms (n >= d)."""
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=generator, dtype=torch.float64))
    norms = scale * (0.5 + torch.rand(d, generator=generator, dtype=torch.float64) * 2)
    return q * norms


def exact_posterior(phi, y, mu0, rho0, noise):
    """Diagonal exact posterior (μ, ρ) for y = Φθ + N(0, noise²) given ΦᵀΦ diagonal."""
    prec = torch.exp(-2 * rho0) + (phi * phi).sum(0) / noise**2
    var = 1 / prec
    mu = var * (mu0 * torch.exp(-2 * rho0) + phi.T @ y / noise**2)
    return mu, 0.5 * torch.log(var)


def log_marginal(phi, y, mu0, rho0, noise):
    """log N(y; Φμ₀, Φ diag(σ₀²) Φᵀ + noise² I), differentiable in μ₀, ρ₀."""
    cov = phi @ torch.diag(torch.exp(2 * rho0)) @ phi.T + noise**2 * torch.eye(len(y), dtype=phi.dtype)
    return torch.distributions.MultivariateNormal(phi @ mu0, covariance_matrix=cov).log_prob(y)


def conjugate_problem(seed: int = 0, n_tr: int = 6, n_val: int = 5, d: int = 4, noise: float = 0.3):
    """(Φ_tr, y_tr, Φ_val, y_val, μ₀, ρ₀, noise) of a random instance."""
    g = torch.Generator().manual_seed(seed)
    # support and query each with orthogonal columns, so their union has a diagonal Gram too
    phi_tr = orthogonal_features(n_tr, d, g)
    phi_val = orthogonal_features(n_val, d, g)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    y_tr = phi_tr @ theta + noise * torch.randn(n_tr, generator=g, dtype=torch.float64)
    y_val = phi_val @ theta + noise * torch.randn(n_val, generator=g, dtype=torch.float64)
    mu0 = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    rho0 = math.log(0.8) + 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    return phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise
