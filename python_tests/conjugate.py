"""Linear-Gaussian regression with orthogonal features: the exact posterior of a diagonal Gaussian
prior is diagonal, so the VI family contains it, and log p(D; Θ) has a closed form."""
from __future__ import annotations

import math

import torch


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


def problem(seed: int = 0, n_tr: int = 6, n_val: int = 5, d: int = 4, noise: float = 0.3):
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
