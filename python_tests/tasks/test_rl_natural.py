"""The trust-region natural-gradient VI for policies (gemext.tasks.rl.natural) against dense float64
references built here: the Fisher as the Hessian of torch.distributions' KL, the step as a dense
solve, the objective by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import gemext.tasks.rl as rl
from gemext.gaussian import Posterior
from gemext.tasks.rl import EpisodeBatch
from gemext.tasks.rl.natural import PolicyFisher, TrustRegionVI, natural_fit

T, H, K = 2, 4, 3


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(3,), generator=g).double()
    names = [n for n, _ in pol.named_parameters()]
    batches = []
    for t in range(T):
        mask = torch.ones(H, K, dtype=torch.float64)
        if t == 1:
            mask[2:, 0] = 0  # one episode ended early: padding must not count
        b = EpisodeBatch(torch.randn(H, K, 2, generator=g, dtype=torch.float64),
                         torch.randn(H, K, 2, generator=g, dtype=torch.float64),
                         torch.randn(H, K, generator=g, dtype=torch.float64), mask)
        batches.append(rl.process(b))
    theta = tuple(torch.stack([p.detach() + 0.1 * t * torch.randn(p.shape, generator=g, dtype=torch.float64)
                               for t in range(T)]) for p in pol.parameters())
    return pol, names, batches, theta


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v, like):
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _states(b: EpisodeBatch):
    return b.observations.reshape(-1, 2), b.actions.reshape(-1, 2), b.advantages.reshape(-1), b.mask.reshape(-1)


def _dense_fisher(pol, names, theta_t, obs, w):
    """Σ_t w_t ∇²_θ KL(π_θ₀(·|s_t) ‖ π_θ(·|s_t)) at θ₀ = theta_t, by autograd through torch.distributions."""
    like = [t for t in theta_t]
    with torch.no_grad():
        m0, s0 = pol.mean_log_std(obs, dict(zip(names, like)))

    def kl(v):
        m, s = pol.mean_log_std(obs, dict(zip(names, _unflat(v, like))))
        return (kl_divergence(Normal(m0, s0.exp()), Normal(m, s.exp())).sum(-1) * w).sum()
    return torch.autograd.functional.hessian(kl, _flat(like))


def test_fisher_products_and_diagonal_match_the_hessian_of_the_kl():
    pol, names, batches, theta = _setup()
    obs = torch.stack([bt.observations.reshape(-1, 2) for bt in batches])
    w = torch.stack([bt.mask.reshape(-1) for bt in batches]) * torch.tensor([[1.5], [0.7]], dtype=torch.float64)
    fisher = PolicyFisher(pol, names, obs, w, theta, chunk=5)  # chunks smaller than the states
    g = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in theta)
    # the diagonal two ways: by layers (the MLP policy's path) and from per-state Jacobians (any policy)
    fv, diag, jac_diag = fisher.fvp(v), fisher.diagonal(), fisher._jacobian_diagonal()
    for i in range(T):
        F = _dense_fisher(pol, names, [t[i] for t in theta], obs[i], w[i])
        torch.testing.assert_close(_flat([x[i] for x in fv]), F @ _flat([x[i] for x in v]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_flat([x[i] for x in diag]), torch.diagonal(F), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_flat([x[i] for x in jac_diag]), torch.diagonal(F), rtol=1e-10, atol=1e-12)
        assert float(F.abs().max()) > 0.1  # not a vacuous comparison


def _objective_by_hand(pol, names, theta_t, b: EpisodeBatch, scale, logp_b, mu_p, prec_p):
    obs, act, adv, mask = _states(b)
    m, s = pol.mean_log_std(obs, dict(zip(names, theta_t)))
    logp = Normal(m, s.exp()).log_prob(act).sum(-1)
    data = -scale * (mask * torch.exp(logp - logp_b) * adv).sum() / mask.sum()
    return data + 0.5 * sum((p * (t - mp) ** 2).sum() for t, mp, p in zip(theta_t, mu_p, prec_p))


def test_one_step_is_the_dense_newton_step_with_the_fisher_and_variances_its_diagonal():
    pol, names, batches, theta = _setup()
    scale, beta = 12.0, 0.5
    prior = Posterior(names, [t.clone() for t in theta], [torch.full_like(t, -1.0) for t in theta])
    # a wide trust region and exact CG (19 weights): the step is the Newton step, accepted whole
    opts = TrustRegionVI(max_kl=1e6, cg_iters=40)
    post, info = natural_fit(pol, names, batches, scale, prior, prior, 1, beta, opts)
    assert info["accepted"] == 1.0
    for i, b in enumerate(batches):
        th = [t[i].detach() for t in theta]
        obs, act, adv, mask = _states(b)
        with torch.no_grad():
            m, s = pol.mean_log_std(obs, dict(zip(names, th)))
            logp_b = Normal(m, s.exp()).log_prob(act).sum(-1)
        prec_p = [beta * math.exp(2.0) * torch.ones_like(t) for t in th]
        x = _flat(th).requires_grad_()
        r = torch.autograd.grad(_objective_by_hand(pol, names, _unflat(x, th), b, scale, logp_b, th, prec_p), x)[0]
        F = _dense_fisher(pol, names, th, obs, mask * scale / mask.sum())
        P = torch.diag(_flat(prec_p)) + F
        torch.testing.assert_close(_flat([m_[i] for m_ in post.mu]), _flat(th) - torch.linalg.solve(P, r),
                                   rtol=1e-9, atol=1e-11)  # CG's rounding
        torch.testing.assert_close(_flat([r_[i] for r_ in post.rho]), -0.5 * torch.log(torch.diagonal(P)),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_kl", [1e-3, 1e-5])
def test_the_step_stays_in_the_trust_region_and_lowers_the_objective(max_kl):
    pol, names, batches, theta = _setup(2)
    scale = 200.0  # the data dominate the prior: the Newton step alone would leave the region
    prior = Posterior(names, [t.clone() for t in theta], [torch.full_like(t, 1.0) for t in theta])
    post, info = natural_fit(pol, names, batches, scale, prior, prior, 1, 1.0, TrustRegionVI(max_kl=max_kl))
    assert info["accepted"] == 1.0 and 0 < info["kl"] <= max_kl
    for i, b in enumerate(batches):
        th = [t[i] for t in theta]
        new = [m[i] for m in post.mu]
        obs, act, _, mask = _states(b)
        with torch.no_grad():
            m0, s0 = pol.mean_log_std(obs, dict(zip(names, th)))
            m1, s1 = pol.mean_log_std(obs, dict(zip(names, new)))
            kl = (kl_divergence(Normal(m0, s0.exp()), Normal(m1, s1.exp())).sum(-1) * mask).sum() / mask.sum()
            logp_b = Normal(m0, s0.exp()).log_prob(act).sum(-1)
            prec_p = [math.exp(-2.0) * torch.ones_like(t) for t in th]
            before = _objective_by_hand(pol, names, th, b, scale, logp_b, th, prec_p)
            after = _objective_by_hand(pol, names, new, b, scale, logp_b, th, prec_p)
        assert 0 < float(kl) <= max_kl
        assert float(kl) > max_kl / 20  # the step uses the region (α at its edge, at most a few halvings)
        assert float(after) < float(before)


def test_options_are_checked_by_name():
    for bad, word in ((dict(max_kl=0), "max_kl"), (dict(cg_iters=0), "cg_iters"),
                      (dict(ls_backtrack_ratio=1.0), "ls_backtrack_ratio"), (dict(lr=-1), "lr")):
        with pytest.raises(ValueError, match=word):
            TrustRegionVI(**bad)
