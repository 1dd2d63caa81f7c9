"""The Gradient-EM theorem and the VI loop against the exact conjugate model."""
from __future__ import annotations

import torch
from conjugate import exact_posterior, log_marginal, problem

from gemext import ops
from gemext.gaussian import Posterior
from gemext.vi import GaussianLikelihood, VIConfig, fit


def _grads(fn, mu0, rho0):
    m, r = mu0.clone().requires_grad_(), rho0.clone().requires_grad_()
    return torch.autograd.grad(fn(m, r), (m, r))


def test_gem_grad_at_exact_posterior_is_marginal_likelihood_gradient():
    phi, y, _, _, mu0, rho0, noise = problem()
    mu, rho = exact_posterior(phi, y, mu0, rho0, noise)
    g_mu0, g_rho0 = ops.gem_grad(mu0, rho0, mu, rho)
    e_mu0, e_rho0 = _grads(lambda m, r: log_marginal(phi, y, m, r, noise), mu0, rho0)
    torch.testing.assert_close(g_mu0, e_mu0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_rho0, e_rho0, rtol=1e-9, atol=1e-10)


def test_gem_bml_plus_is_gradient_of_query_given_support():
    phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise = problem(seed=1)
    phi_all, y_all = torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val])
    post_tr = exact_posterior(phi_tr, y_tr, mu0, rho0, noise)
    post_all = exact_posterior(phi_all, y_all, mu0, rho0, noise)
    g = ops.gem_grad(mu0, rho0, *post_all, *post_tr)
    e = _grads(lambda m, r: log_marginal(phi_all, y_all, m, r, noise) - log_marginal(phi_tr, y_tr, m, r, noise),
               mu0, rho0)
    torch.testing.assert_close(g[0], e[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g[1], e[1], rtol=1e-9, atol=1e-10)
    # and a wrong posterior would not pass: the check can fail
    g_bad = ops.gem_grad(mu0, rho0, post_all[0] + 0.05, post_all[1], *post_tr)
    assert not torch.allclose(g_bad[0], e[0], atol=1e-3)


def _vi(phi, y, mu0, rho0, noise, steps, lr=0.02, samples=16, seed=0, optimizer="adam", init=None):
    lik = GaussianLikelihood(noise)
    x = phi.unsqueeze(0)  # one task

    def nll(theta, index):
        return lik.nll(x @ theta[0].unsqueeze(-1), y.view(1, -1, 1))
    prior = Posterior(["w"], [mu0.unsqueeze(0)], [rho0.unsqueeze(0)])
    cfg = VIConfig(steps=steps, optimizer=optimizer, lr=lr, mc_samples=samples)
    return fit(nll, len(y), prior, init or prior, cfg, torch.Generator().manual_seed(seed)).posterior


def test_vi_converges_to_exact_posterior():
    phi, y, _, _, mu0, rho0, noise = problem(seed=2)
    mu, rho = exact_posterior(phi, y, mu0, rho0, noise)
    # a two-stage step size (fast, then fine) instead of thousands of small steps
    q = _vi(phi, y, mu0, rho0, noise, steps=300, lr=0.02, samples=8)
    q = _vi(phi, y, mu0, rho0, noise, steps=300, lr=0.003, samples=8, init=q)
    torch.testing.assert_close(q.mu[0][0], mu, atol=0.05, rtol=0)
    assert (mu - mu0).abs().max() > 0.3  # the prior mean itself is far off: the check can fail
    torch.testing.assert_close(q.rho[0][0], rho, atol=0.08, rtol=0)
    # the KL to the exact posterior is small, far below that of the starting point (the prior)
    kl_fit = float(ops.gaussian_kl(q.mu[0][0], q.rho[0][0], mu, rho))
    kl_start = float(ops.gaussian_kl(mu0, rho0, mu, rho))
    assert kl_fit < 0.02 * kl_start


def test_vi_with_minibatches_and_sgd_moves_toward_posterior():
    phi, y, _, _, mu0, rho0, noise = problem(seed=3, n_tr=12)
    mu, rho = exact_posterior(phi, y, mu0, rho0, noise)
    lik = GaussianLikelihood(noise)

    def nll(theta, index):
        xs, ys = (phi, y) if index is None else (phi[index], y[index])
        return lik.nll(xs.unsqueeze(0) @ theta[0].unsqueeze(-1), ys.view(1, -1, 1))
    prior = Posterior(["w"], [mu0.unsqueeze(0)], [rho0.unsqueeze(0)])
    cfg = VIConfig(steps=800, optimizer="sgd", lr=2e-3, mc_samples=4, batch_size=4)
    q = fit(nll, len(y), prior, prior, cfg, torch.Generator().manual_seed(0)).posterior
    before = float(ops.gaussian_kl(mu0, rho0, mu, rho))
    after = float(ops.gaussian_kl(q.mu[0][0], q.rho[0][0], mu, rho))
    assert after < 0.1 * before


def test_vi_is_reproducible_from_generator():
    phi, y, _, _, mu0, rho0, noise = problem(seed=4)
    a = _vi(phi, y, mu0, rho0, noise, steps=20, samples=2, seed=7)
    b = _vi(phi, y, mu0, rho0, noise, steps=20, samples=2, seed=7)
    c = _vi(phi, y, mu0, rho0, noise, steps=20, samples=2, seed=8)
    assert torch.equal(a.mu[0], b.mu[0]) and torch.equal(a.rho[0], b.rho[0])
    assert not torch.equal(a.mu[0], c.mu[0])


def test_vi_config_rejects_bad_values():
    import pytest
    with pytest.raises(ValueError, match="optimizer"):
        VIConfig(optimizer="nope")
    with pytest.raises(ValueError, match="mc_samples"):
        VIConfig(mc_samples=0)
    with pytest.raises(ValueError, match="lr"):
        VIConfig(lr=-1)
    with pytest.raises(TypeError, match="optimizer"):
        VIConfig(optimizer=int)


def test_natural_gradient_step_lands_on_exact_posterior_mean():
    """With σ at the exact posterior's and the exact expected gradient, one natural step of lr = 1
    from anywhere is Newton's step on the linear-Gaussian ELBO: it lands on the exact mean."""
    from gemext.vi import NaturalGradientVI

    phi, y, _, _, mu0, rho0, noise = problem(seed=5)
    mu_exact, rho_exact = exact_posterior(phi, y, mu0, rho0, noise)
    mu = (mu0 + 0.7).clone().requires_grad_()
    rho = rho_exact.clone().requires_grad_()
    mu.grad = phi.T @ (phi @ mu.detach() - y) / noise**2 + (mu.detach() - mu0) * torch.exp(-2 * rho0)
    rho.grad = torch.zeros_like(rho)
    NaturalGradientVI([mu, rho], lr=1.0, max_step=None).step()
    torch.testing.assert_close(mu.detach(), mu_exact, rtol=1e-10, atol=1e-12)


def test_natural_gradient_trust_region_caps_each_step_at_max_step_sigmas():
    from gemext.vi import NaturalGradientVI

    mu = torch.zeros(3, requires_grad=True)
    rho = torch.log(torch.tensor([0.1, 0.2, 0.3])).requires_grad_()
    mu.grad = torch.tensor([1e6, -1e6, 1e-3])
    rho.grad = torch.zeros(3)
    NaturalGradientVI([mu, rho], lr=1.0, max_step=2.0).step()
    torch.testing.assert_close(mu.detach(), torch.tensor([-0.2, 0.4, -0.09e-3]))
    import pytest
    with pytest.raises(ValueError, match="max_step"):
        NaturalGradientVI([mu, rho], max_step=0)
    with pytest.raises(ValueError, match="ρ tensors"):
        NaturalGradientVI([mu])
