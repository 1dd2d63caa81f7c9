"""The Gradient-EM theorem and the VI loop against the exact conjugate model."""
from __future__ import annotations

import copy

import pytest
import torch

from gemext import ops
from gemext.gaussian import Posterior
from gemext.reference import conjugate_problem as problem
from gemext.reference import exact_posterior, log_marginal
from gemext.vi import CategoricalLikelihood, DataTerm, GaussianLikelihood, VIConfig, fit


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


# ----------------------------------------------------------------------------- von
def _von_cfg(steps, **kw):
    return VIConfig(steps=steps, optimizer="von", mc_samples=kw.pop("mc_samples", 1), beta=kw.pop("beta", 1.0),
                    batch_size=kw.pop("batch_size", None), lr=kw.pop("lr", None), optimizer_kwargs=kw)


def _conjugate_tasks(seeds):
    """A stacked batch of conjugate problems (same prior) as (DataTerm, prior, exact λ per task)."""
    from gemext.algorithms.base import FunctionalNet
    probs = [problem(seed=s) for s in seeds]
    mu0, rho0, noise = probs[0][4], probs[0][5], probs[0][6]
    phis = [torch.cat([p[0], p[2]]) for p in probs]
    ys = [torch.cat([p[1], p[3]]) for p in probs]
    lin = torch.nn.Linear(len(mu0), 1, bias=False).double()
    net = FunctionalNet(lin, ["weight"], vectorize=True)
    term = DataTerm(net, GaussianLikelihood(noise).double(), torch.stack(phis), torch.stack(ys).unsqueeze(-1),
                    ["weight"])
    T = len(seeds)
    prior = Posterior(["weight"], [mu0.view(1, 1, -1).expand(T, 1, -1).contiguous()],
                      [rho0.view(1, 1, -1).expand(T, 1, -1).contiguous()])
    exact = [exact_posterior(ph, yy, mu0, rho0, noise) for ph, yy in zip(phis, ys)]
    return term, prior, exact, (mu0, rho0, noise, phis, ys)


def test_von_one_step_lands_on_the_exact_posterior_of_every_task():
    # linear-Gaussian: a full Newton step with the exact GGN and the control variate is exact,
    # whatever ε was drawn; the GEM statistic is then the exact marginal-likelihood gradient
    term, prior, exact, (mu0, rho0, noise, phis, ys) = _conjugate_tasks([0, 4, 5])
    q = fit(term, term.x.shape[1], prior, prior, _von_cfg(1), torch.Generator().manual_seed(0)).posterior
    for t, (em, er) in enumerate(exact):
        torch.testing.assert_close(q.mu[0][t, 0], em, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(q.rho[0][t, 0], er, rtol=0, atol=1e-7)
        g = ops.gem_grad(mu0, rho0, q.mu[0][t, 0].contiguous(), q.rho[0][t, 0].contiguous())
        e = _grads(lambda m, r, t=t: log_marginal(phis[t], ys[t], m, r, noise), mu0, rho0)
        torch.testing.assert_close(torch.cat(g), torch.cat(e), rtol=1e-6, atol=1e-7)
    assert float((exact[0][0] - mu0).abs().max()) > 0.3  # far from the start: the check can fail
    # without the control variate one sample's noise stays in the mean
    q = fit(term, term.x.shape[1], prior, prior, _von_cfg(1, control_variate=False),
            torch.Generator().manual_seed(0)).posterior
    assert float((q.mu[0][0, 0] - exact[0][0]).abs().max()) > 1e-3


def _dense_von_reference(net, lik_sigma, x, y, mu, rho, mu0, rho0, eps, beta, lr, cv):
    """One von step in float64 with dense matrices: θ = μ + σε, g = ∇nll(θ), G = JᵀJ/s² at θ,
    μ' = μ − lr·(β/σ₀² + G)⁻¹(g [− G(θ−μ)] + β(μ−μ₀)/σ₀²), ρ' = −½ log(β/σ₀² + diag G)."""
    from torch.func import functional_call
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]

    def f(flat):
        params, pos = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[pos:pos + s.numel()].reshape(s)
            pos += s.numel()
        return functional_call(net, params, (x,)).reshape(-1)
    theta = mu + torch.exp(rho) * eps
    J = torch.autograd.functional.jacobian(f, theta)
    r = f(theta) - y.reshape(-1)
    g = J.T @ r / lik_sigma**2
    G = J.T @ J / lik_sigma**2
    if cv:
        g = g - G @ (theta - mu)
    p0 = beta * torch.exp(-2 * rho0)
    step = torch.linalg.solve(torch.diag(p0) + G, g + p0 * (mu - mu0))
    return mu - lr * step, -0.5 * torch.log(p0 + torch.diagonal(G))


def test_von_full_coupling_matches_a_dense_newton_step_on_a_nonlinear_model():
    from gemext.algorithms.base import FunctionalNet
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    names = [n for n, _ in model.named_parameters()]
    T, N, s = 2, 4, 0.3
    x = torch.randn(T, N, 2, dtype=torch.float64)
    y = torch.randn(T, N, 1, dtype=torch.float64)
    term = DataTerm(FunctionalNet(model, names, True), GaussianLikelihood(s).double(), x, y, names)
    mu = [p.detach().unsqueeze(0).repeat(T, *[1] * p.dim()) for p in model.parameters()]
    mu = [m + 0.1 * torch.randn_like(m) for m in mu]
    rho = [torch.full_like(m, -1.0) + 0.2 * torch.randn_like(m) for m in mu]
    mu0 = [m + 0.05 * torch.randn_like(m) for m in mu]
    rho0 = [torch.full_like(m, -0.5) for m in mu]
    prior, init = Posterior(names, mu0, rho0), Posterior(names, mu, rho)
    for cv, lr, beta in ((True, 1.0, 1.0), (False, 0.5, 0.3)):
        gen = torch.Generator().manual_seed(3)
        seed = ops.new_seed(torch.Generator().manual_seed(3))
        q = fit(term, N, prior, init, _von_cfg(1, lr=lr, beta=beta, control_variate=cv, backtrack=0), gen).posterior
        eps = ops.sample([torch.zeros_like(m) for m in mu], [torch.zeros_like(r) for r in rho], seed, 0)
        flat = lambda ts, t: torch.cat([v[t].reshape(-1) for v in ts])  # noqa: E731
        for t in range(T):
            em, er = _dense_von_reference(model, s, x[t], y[t], flat(mu, t), flat(rho, t), flat(mu0, t),
                                          flat(rho0, t), flat(eps, t), beta, lr, cv)
            torch.testing.assert_close(flat(q.mu, t), em, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(flat(q.rho, t), er, rtol=1e-7, atol=1e-9)
        # the diagonal rule differs on this coupled model: the comparison can fail
        qd = fit(term, N, prior, init, _von_cfg(1, lr=lr, beta=beta, control_variate=cv, coupling="diag", backtrack=0),
                 torch.Generator().manual_seed(3)).posterior
        assert float((flat(qd.mu, 0) - flat(q.mu, 0)).abs().max()) > 1e-3


@pytest.mark.parametrize("arch", ["layernorm", "mlp"])
@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_pointwise_and_mlp_rows_equal_the_batched_rows(kind, arch):
    # the per-point pullback (a pointwise model) and the hand-written MLP pullback against one
    # backward per row over all points: value, gradient and rows, with a learned noise scale (its
    # zero rows, its own gradient) and a minibatch of the points
    from gemext.algorithms.base import FunctionalNet, is_pointwise, mlp_plan
    from gemext.algorithms.functional import ModelAndLikelihood
    torch.manual_seed(0)
    nn = torch.nn
    out = 2 if kind == "gaussian" else 3
    if arch == "layernorm":
        model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, out))
    else:  # consecutive activations, a Linear without bias, an activation after the last Linear
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.ReLU(inplace=True),
                              nn.Softplus(), nn.Linear(5, out), nn.Sigmoid())
    model = model.double()
    assert is_pointwise(model)
    lik = (GaussianLikelihood(0.3, learn=True) if kind == "gaussian" else CategoricalLikelihood()).double()
    net = ModelAndLikelihood(model, lik)
    names = [n for n, _ in net.named_parameters()]
    plan = mlp_plan(model, names, "model.")
    assert (plan is not None) == (arch == "mlp")
    T, N = 4, 6
    x = torch.randn(T, N, 3, dtype=torch.float64)
    y = torch.randn(T, N, out, dtype=torch.float64) if kind == "gaussian" else torch.randint(0, out, (T, N))
    theta = [p.detach().unsqueeze(0) + 0.1 * torch.randn(T, *p.shape, dtype=torch.float64)
             for p in net.parameters()]
    index = torch.tensor([0, 2, 3, 5])
    results = []
    for pointwise, mlp in ((False, None), (True, None), (True, plan)):
        fwd = FunctionalNet(net, names, True, pointwise=pointwise, mlp=mlp)
        assert fwd.pointwise == pointwise
        term = DataTerm(fwd, lik, x, y, names)
        results.append(term.value_grad_rows(theta, index, torch.Generator().manual_seed(3)))
    if plan is not None:  # the MLP rows written into a caller's block (`out`): every entry of it
        block = torch.full_like(results[-1][2], float("nan"))
        again = term.value_grad_rows(theta, index, torch.Generator().manual_seed(3), block)[2]
        assert again.data_ptr() == block.data_ptr() and torch.equal(again, results[-1][2])
    for _v, _g, r, d in results:  # the diagonal each path gives is that of its rows
        torch.testing.assert_close(d, (r * r).sum(1), rtol=1e-10, atol=1e-12)
    v0, g0, r0, _ = results[0]
    assert r0.shape == (T, len(index) * (out if kind == "gaussian" else 1), sum(t[0].numel() for t in theta))
    assert float(r0.abs().max()) > 0.1
    for v1, g1, r1, _ in results[1:]:
        assert v0 == pytest.approx(v1, rel=1e-12)
        for a, b in zip(g0, g1):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r0, r1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_rows_by_chunks_equal_rows_at_once(vectorize, monkeypatch):
    # the general path (BatchNorm couples the points) pulls its cotangents back CHUNK at a time
    import gemext.vi.terms as terms
    from gemext.algorithms.base import FunctionalNet
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(),
                          nn.Linear(6, 2)).double()
    names = [n for n, _ in model.named_parameters()]
    T, N = 3, 7
    x, y = torch.randn(T, N, 3, dtype=torch.float64), torch.randn(T, N, 2, dtype=torch.float64)
    theta = [p.detach().unsqueeze(0) + 0.1 * torch.randn(T, *p.shape, dtype=torch.float64) for p in model.parameters()]
    term = DataTerm(FunctionalNet(model, names, vectorize), GaussianLikelihood(0.3).double(), x, y, names)
    results = []
    for chunk in (1000, 3):
        monkeypatch.setattr(terms, "CHUNK", chunk)
        results.append(term.value_grad_rows(theta, None, None))
    (v0, g0, r0, d0), (v1, g1, r1, d1) = results
    assert r0.shape == (T, N * 2, sum(t[0].numel() for t in theta))
    assert v0 == v1
    for a, b in zip(g0 + [r0, d0], g1 + [r1, d1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _small_conv(batch_norm: bool):
    from gemext.tasks.vision import Conv4
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=3, image_size=16).double()
    if not batch_norm:  # the same net with its BatchNorms taken out
        model.features = torch.nn.Sequential(*[m for m in model.features if not isinstance(m, torch.nn.BatchNorm2d)])
    return model


@pytest.mark.parametrize("batch_norm", [True, False])
def test_held_statistics_rows_are_the_per_point_jacobians_at_fixed_statistics(batch_norm):
    # rows of a forward that is pointwise once BatchNorm's batch statistics are fixed, tasks looped:
    # against each point's Jacobian by jacrev of the same net with each BatchNorm replaced by a
    # fixed affine map of the statistics a forward hook saw; the gradient against the general path
    # (the model's own backward through the statistics), which also gives the rows without BatchNorm
    from gemext.algorithms.base import FunctionalNet, is_pointwise
    nn = torch.nn
    model = _small_conv(batch_norm)
    assert is_pointwise(model, batch_norm=True) and is_pointwise(model) == (not batch_norm)
    lik = GaussianLikelihood(0.3).double()
    names = [n for n, _ in model.named_parameters()]
    T, N = 2, 4
    x, y = torch.randn(T, N, 1, 16, 16, dtype=torch.float64), torch.randn(T, N, 3, dtype=torch.float64)
    theta = [p.detach().unsqueeze(0) + 0.1 * torch.randn(T, *p.shape, dtype=torch.float64) for p in model.parameters()]
    held = DataTerm(FunctionalNet(model, names, False, held_stats=True), lik, x, y, names)
    general = DataTerm(FunctionalNet(model, names, False), lik, x, y, names)
    v1, g1, r1, d1 = held.value_grad_rows(theta, None, None)
    v0, g0, r0, _ = general.value_grad_rows(theta, None, None)
    assert v1 == pytest.approx(v0, rel=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d1, (r1 * r1).sum(1), rtol=1e-10, atol=1e-12)
    if not batch_norm:  # exact without BatchNorm, as is the pointwise path with its tasks looped
        torch.testing.assert_close(r1, r0, rtol=1e-10, atol=1e-12)
        looped = DataTerm(FunctionalNet(model, names, False, pointwise=True), lik, x, y, names)
        v2, g2, r2, _ = looped.value_grad_rows(theta, None, None)
        assert v2 == pytest.approx(v0, rel=1e-12)
        for a, b in zip(g2 + [r2], g0 + [r0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:  # the statistics' share of the Jacobian is what the held rows leave out
        assert float((r1 - r0).norm()) > 0.1 * float(r0.norm())

    class Fixed(nn.Module):
        def __init__(self, bn, mean, var):
            super().__init__()
            self.bn, self.mean, self.var = bn, mean, var

        def forward(self, z):
            s = (1, -1, 1, 1)
            return (z - self.mean.reshape(s)) / torch.sqrt(self.var.reshape(s) + self.bn.eps) * \
                self.bn.weight.reshape(s) + self.bn.bias.reshape(s)

    for t in range(T):
        params = {n: th[t] for n, th in zip(names, theta)}
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, seen=seen: seen.append((i[0].mean((0, 2, 3)),
                                                                                i[0].var((0, 2, 3), unbiased=False))))
                 for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        torch.func.functional_call(model, params, (x[t],))
        for h in hooks:
            h.remove()
        fixed = copy.deepcopy(model)
        bns = iter(seen)
        for i, m in enumerate(fixed.features):
            if isinstance(m, nn.BatchNorm2d):
                fixed.features[i] = Fixed(m, *next(bns))
        fparams = {n.replace(".weight", ".bn.weight").replace(".bias", ".bn.bias")
                   if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d) else n: p
                   for n, p in params.items()}
        for n in range(N):
            jac = torch.func.jacrev(lambda p, f=fixed, xn=x[t, n:n + 1]: torch.func.functional_call(f, p, (xn,))[0])(
                fparams)
            rows = torch.cat([j.reshape(3, -1) for j in jac.values()], 1) * torch.exp(-lik.log_sigma)  # point n
            torch.testing.assert_close(r1[t, 3 * n:3 * n + 3], rows, rtol=1e-9, atol=1e-12)


def test_pointwise_models_are_recognised():
    from gemext.algorithms.base import is_pointwise
    nn = torch.nn
    assert is_pointwise(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)))
    for model in (nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4, track_running_stats=False)),
                  nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.1)),
                  nn.Sequential(nn.Linear(2, 4), nn.Softmax(0)),
                  nn.Sequential(nn.Flatten(0), nn.Linear(2, 4))):
        assert not is_pointwise(model), model

    class Custom(nn.Linear):  # a subclass may mix the points in its forward
        pass
    assert not is_pointwise(nn.Sequential(Custom(2, 2)))
    # the MLP plan: Linear and element-wise activations only, every Linear weight in θ
    from gemext.algorithms.base import mlp_plan
    mlp = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    assert mlp_plan(mlp, ["0.weight", "0.bias", "2.weight", "2.bias"]) == \
        [("linear", 0, 1), ("act", mlp[1]), ("linear", 2, 3)]
    assert mlp_plan(mlp, ["0.weight", "0.bias", "2.weight"]) is None  # a fixed bias
    assert mlp_plan(nn.Sequential(nn.Linear(1, 4), nn.LayerNorm(4)), ["0.weight", "0.bias", "1.weight",
                                                                      "1.bias"]) is None
    assert mlp_plan(Custom(2, 2), ["weight", "bias"]) is None
    tied = nn.Linear(4, 4)  # one module at two places: its weight is named once, so no plan
    twice = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), tied, nn.Tanh(), tied, nn.Linear(4, 1))
    assert mlp_plan(twice, [n for n, _ in twice.named_parameters()]) is None


def test_an_mlp_fed_the_wrong_number_of_features_says_so():
    from gemext import algorithms
    from gemext.tasks.sinusoid import SinusoidTasks
    nn = torch.nn
    learner = algorithms.create("gem-bml+", nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)), inner_steps=1)
    assert learner.forward_net.mlp is not None
    batch = SinusoidTasks("finn").sample(2, torch.Generator().manual_seed(0))  # one feature per point
    with pytest.raises(ValueError, match="takes 2 features per point, its input has 1"):
        learner.meta_backward(batch)


def test_a_module_used_twice_keeps_its_tie_and_its_forward():
    # every learner's forward equals the model's own, and the tied weight stays one meta-parameter
    from gemext import algorithms
    nn = torch.nn
    torch.manual_seed(0)
    tied = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), tied, nn.Tanh(), tied, nn.Linear(4, 1))
    x = torch.randn(3, 5, 1)
    want = torch.stack([model(xi) for xi in x]).detach()
    learner = algorithms.create("gem-bml+", model, inner_steps=1)
    assert learner.prior.names == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias",
                                   "model.5.weight", "model.5.bias"]
    assert learner.forward_net.mlp is None and learner.forward_net.pointwise
    theta = [m.detach().unsqueeze(0).expand(3, *m.shape) for m in learner.prior.mu0]
    torch.testing.assert_close(learner.forward_net(theta, x), want)


@pytest.mark.parametrize("pointwise", [False, True])
def test_categorical_ggn_rows_are_an_unbiased_fisher(pointwise):
    # E[RᵀR] over the sampled labels = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n (dense reference)
    from gemext.algorithms.base import FunctionalNet
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 4).double()
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    n_draws = 4000  # as many copies of the task, each with its own sampled labels
    term = DataTerm(FunctionalNet(model, names, True, pointwise=pointwise), CategoricalLikelihood(),
                    x.expand(n_draws, 5, 3), torch.zeros(n_draws, 5, dtype=torch.long), names)
    theta = [p.detach().unsqueeze(0).expand(n_draws, *p.shape) for p in model.parameters()]
    R = term.ggn_rows(theta, None, torch.Generator().manual_seed(0))  # [draws, 5, 16]
    acc = torch.einsum("tmi,tmj->ij", R, R)
    from torch.func import functional_call

    def f(flat):
        return functional_call(model, {"weight": flat[:12].reshape(4, 3), "bias": flat[12:]}, (x[0],))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    J = torch.autograd.functional.jacobian(f, flat)  # [5, 4, 16]
    p = f(flat).softmax(-1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    G = torch.einsum("nci,ncd,ndj->ij", J, H, J)
    torch.testing.assert_close(acc / n_draws, G, atol=0.03 * float(G.abs().max()), rtol=0)
    assert float(G.abs().max()) > 0.1


def test_von_options_and_errors():
    phi, y, _, _, mu0, rho0, noise = problem(seed=2)
    prior = Posterior(["w"], [mu0.unsqueeze(0)], [rho0.unsqueeze(0)])
    lik = GaussianLikelihood(noise)

    def nll(theta, index):  # a plain callable: no GGN factor
        return lik.nll(phi.unsqueeze(0) @ theta[0].unsqueeze(-1), y.view(1, -1, 1))
    with pytest.raises(TypeError, match="DataTerm"):
        fit(nll, len(y), prior, prior, _von_cfg(1))
    q = fit(nll, len(y), prior, prior, _von_cfg(3, curvature="reparam", coupling="diag", mc_samples=2),
            torch.Generator().manual_seed(0)).posterior
    assert all(torch.isfinite(t).all() for t in q.mu + q.rho)
    with pytest.raises(ValueError, match="point estimate"):
        fit(nll, len(y), prior, prior, _von_cfg(1, curvature="reparam", coupling="diag"), delta=True)
    for bad in ({"h_decay": 0.0}, {"coupling": "kfac"}, {"curvature": "hutchinson"}, {"damping": -1.0},
                {"curvature": "reparam"}, {"lr": 0.0}, {"bogus": 1}, {"backtrack": -1}):
        with pytest.raises(ValueError):
            _von_cfg(1, **bad)
    assert VIConfig(optimizer="von").lr == 1.0 and VIConfig(optimizer="adam").lr == 0.01


def test_von_minibatches_samples_and_learned_noise_move_toward_the_posterior():
    from gemext.algorithms.base import FunctionalNet
    term, prior, exact, _ = _conjugate_tasks([1, 2])
    cfg = _von_cfg(6, mc_samples=3, batch_size=7, h_decay=0.5, lr=0.7)
    q = fit(term, term.x.shape[1], prior, prior, cfg, torch.Generator().manual_seed(0)).posterior
    for t, (em, _er) in enumerate(exact):
        start = float((prior.mu[0][t, 0] - em).abs().max())
        assert float((q.mu[0][t, 0] - em).abs().max()) < 0.2 * start
    # a learned likelihood noise is a Bayesian parameter too: its Fisher (2 per output) sets its σ
    model = torch.nn.Linear(4, 1, bias=False).double()
    lik = GaussianLikelihood(0.3, learn=True).double()
    holder = torch.nn.ModuleDict({"model": model, "likelihood": lik})
    names = ["model.weight", "likelihood.log_sigma"]
    net = FunctionalNet(holder, names, True)
    net_fwd = lambda theta, x: net.__class__(model, ["weight"], True)([theta[0]], x)  # noqa: E731
    term2 = DataTerm(net_fwd, lik, term.x, term.y, names)
    T = term.x.shape[0]
    p2 = Posterior(names, [prior.mu[0], torch.full((T,), -1.0, dtype=torch.float64)],
                   [prior.rho[0], torch.full((T,), -1.0, dtype=torch.float64)])
    q2 = fit(term2, term.x.shape[1], p2, p2, _von_cfg(3), torch.Generator().manual_seed(0)).posterior
    n_out = term.y[0].numel()
    torch.testing.assert_close(q2.rho[1], -0.5 * torch.log(torch.exp(torch.tensor(2.0)) + 2.0 * n_out)
                               .expand(T).to(torch.float64))


def _objective_at_mean(term, mu, prior, beta=1.0):
    """nll(μ) + β‖μ − μ₀‖²/(2σ₀²) per task: what von's line search keeps from rising."""
    quad = sum(((m - m0) ** 2 * torch.exp(-2 * r0)).flatten(1).sum(1) for m, m0, r0 in zip(mu, prior.mu, prior.rho))
    return term.task_nll(mu, None) + 0.5 * beta * quad


def test_von_backtracking_never_raises_the_objective_at_the_mean():
    # a wide prior and a sharp likelihood on a tanh net: full Gauss-Newton steps overshoot
    from gemext.algorithms.base import FunctionalNet
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    names = [n for n, _ in model.named_parameters()]
    T, N = 6, 8
    x = torch.rand(T, N, 1, dtype=torch.float64) * 10 - 5
    y = 4 * torch.sin(2 * x + torch.rand(T, 1, 1, dtype=torch.float64) * 3)
    term = DataTerm(FunctionalNet(model, names, True), GaussianLikelihood(0.05).double(), x, y, names)
    mu0 = [p.detach().unsqueeze(0).repeat(T, *[1] * p.dim()) for p in model.parameters()]
    prior = Posterior(names, mu0, [torch.full_like(m, 0.0) for m in mu0])

    def merits(cfg):
        out = []
        fit(term, N, prior, prior, cfg, torch.Generator().manual_seed(0),
            callback=lambda k, q: out.append(_objective_at_mean(term, q.mu, prior)))
        return torch.stack(out)
    guarded = merits(_von_cfg(5))
    assert bool((guarded[1:] <= guarded[:-1] + 1e-9).all())
    free = merits(_von_cfg(5, backtrack=0))
    assert bool((free[1:] > free[:-1]).any())  # without it some step does overshoot: the check can fail


def _tanh_tasks(T, N, seed, spread=1.0):
    from gemext.algorithms.base import FunctionalNet
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    names = [n for n, _ in model.named_parameters()]
    x = (torch.rand(T, N, 1, dtype=torch.float64) * 2 - 1) * spread
    term = DataTerm(FunctionalNet(model, names, True), GaussianLikelihood(0.1).double(), x, torch.sin(3 * x), names)
    mu0 = [p.detach().unsqueeze(0).repeat(T, *[1] * p.dim()) for p in model.parameters()]
    return term, Posterior(names, mu0, [torch.full_like(m, -1.0) for m in mu0])


def test_a_differentiable_von_fit_is_the_fused_fit_with_a_graph():
    """differentiable=True builds the same update as a graph (θ = μ + σε and the per-weight update
    as torch composites, the rows held as data): the fused fit's posterior to rounding, carrying a
    gradient to the prior; the other optimizers refuse it."""
    term, prior = _tanh_tasks(3, 5, 0)
    prior = Posterior(prior.names, [m.requires_grad_(True) for m in prior.mu], prior.rho)
    fused = fit(term, 5, prior, prior, _von_cfg(3), torch.Generator().manual_seed(0)).posterior
    graph = fit(term, 5, prior, prior, _von_cfg(3), torch.Generator().manual_seed(0), differentiable=True).posterior
    for a, b in zip(fused.mu + fused.rho, graph.mu + graph.rho):
        torch.testing.assert_close(b.detach(), a, rtol=1e-9, atol=1e-10)
    (g,) = torch.autograd.grad(graph.mu[0].sum(), prior.mu[0])
    assert bool(g.abs().sum() > 0) and bool(torch.isfinite(g).all())
    with pytest.raises(ValueError, match="differentiable=True needs optimizer 'von'"):
        fit(term, 5, prior, prior, VIConfig(steps=1), differentiable=True)


def test_von_phases_are_profiler_ranges():
    term, prior = _tanh_tasks(2, 4, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fit(term, 4, prior, prior, _von_cfg(2), torch.Generator().manual_seed(0))
    seen = {e.key: e.count for e in prof.key_averages()}
    assert all(seen.get(f"von.{phase}") == 2 for phase in ("sample_terms", "solve", "update", "line_search"))


def test_backtracking_picks_what_a_halving_loop_picks():
    """The batched search (full step, then every halving of the failed tasks in one forward) takes,
    per task, the first fraction 1, 1/2, 1/4, ... whose objective does not rise, or undoes the step:
    checked against a plain halving loop on tasks that accept, halve to different depths and undo."""
    from gemext.vi import VonFit
    T, H = 12, 3
    term, prior = _tanh_tasks(T, 6, 1, spread=2.0)
    old = prior.mu
    # descent steps of growing length: short ones are accepted, long ones halved or undone
    theta = [m.clone().requires_grad_(True) for m in old]
    grads = torch.autograd.grad(term(theta, None), theta)
    scale = torch.logspace(-3, 1.5, T, dtype=torch.float64)
    step = [-g * scale.reshape(-1, *[1] * (g.dim() - 1)) for g in grads]
    search = VonFit(term, prior, prior, _von_cfg(1, backtrack=H))
    search.mu = [m + d for m, d in zip(old, step)]
    frac = search.line_search(old, None, 1.0)
    merit_old = _objective_at_mean(term, old, prior)
    want = torch.zeros(T, dtype=torch.float64)
    for t in range(T):  # the reference: one task at a time, one fraction at a time
        one = Posterior(prior.names, [m[t:t + 1] for m in old], [r[t:t + 1] for r in prior.rho])
        for f in [0.5 ** k for k in range(H + 1)]:
            trial = [m[t:t + 1] + f * d[t:t + 1] for m, d in zip(old, step)]
            value = float(_objective_at_mean(term.tasks(torch.tensor([t])), trial, one))
            if value <= float(merit_old[t]) + 1e-5 * abs(float(merit_old[t])):
                want[t] = f
                break
    torch.testing.assert_close(frac, want)
    assert {0.0, 1.0} < set(want.tolist()) and len(set(want.tolist())) >= 4  # every branch taken
    for m, m0, d in zip(search.mu, old, step):
        torch.testing.assert_close(m, m0 + want.reshape(-1, *[1] * (m.dim() - 1)) * d)
    torch.testing.assert_close(search.merit,
                               torch.where(want > 0, _objective_at_mean(term, search.mu, prior), merit_old))


def test_per_task_nll_splits_the_summed_nll_by_task():
    torch.manual_seed(0)
    out, y = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    lik = GaussianLikelihood(0.7)
    per = lik.nll(out, y, per_task=True)
    assert per.shape == (3,)
    torch.testing.assert_close(per.sum(), lik.nll(out, y))
    torch.testing.assert_close(per[1], lik.nll(out[1:2], y[1:2]))
    logits, labels = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    cat = CategoricalLikelihood()
    per = cat.nll(logits, labels, per_task=True)
    torch.testing.assert_close(per.sum(), cat.nll(logits, labels))
    torch.testing.assert_close(per[2], cat.nll(logits[2:], labels[2:]))


def test_rows_products_are_exact_and_do_not_depend_on_memory_alignment():
    """R v and Rᵀz of the von step: float64 values, a gradient, and the same bits for a task
    wherever its rows lie in memory (bmm's did not: 3e-5 on [25, 20, 1761])."""
    from gemext.vi.von import rows_t_times, rows_times
    g = torch.Generator().manual_seed(0)
    T, M, D = 5, 7, 1761
    R, v, z = torch.randn(T, M, D, generator=g), torch.randn(T, D, generator=g), torch.randn(T, M, generator=g)
    rv, rz = rows_times(R, v), rows_t_times(R, z)
    torch.testing.assert_close(rv.double(), torch.einsum("tmd,td->tm", R.double(), v.double()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rz.double(), torch.einsum("tmd,tm->td", R.double(), z.double()), rtol=1e-5, atol=1e-5)
    buf = torch.empty_like(R)  # the products in a caller's buffer: the same bits
    assert torch.equal(rows_times(R, v, buf), rv) and torch.equal(rows_t_times(R, z, buf), rz)

    def moved(x: torch.Tensor, k: int) -> torch.Tensor:  # the same values k floats further into memory
        out = torch.empty(x.numel() + k)[k:].view(x.shape)
        return out.copy_(x)

    for k in (1, 2, 3):
        for t in range(T):  # task t alone, at another alignment
            assert torch.equal(rows_times(moved(R[t:t + 1], k), moved(v[t:t + 1], k))[0], rv[t])
            assert torch.equal(rows_t_times(moved(R[t:t + 1], k), moved(z[t:t + 1], k))[0], rz[t])
    vg = v.clone().requires_grad_(True)  # differentiable without a buffer (the unrolled learners' graph mode)
    (gv,) = torch.autograd.grad(rows_times(R, vg).sum(), vg)
    torch.testing.assert_close(gv, R.sum(1))
