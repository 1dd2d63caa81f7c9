"""The catalogue learners (maml, fomaml, imaml, abml, pmaml-elbo, kl-chaser, bmaml) against
independent computations, and a smoke test of the interface over every registered name."""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from gemext import algorithms, ops, reference
from gemext.algorithms.chaser import svgd_direction
from gemext.linalg import conjugate_gradient
from gemext.reference import conjugate_problem as problem
from gemext.reference import exact_posterior, log_marginal
from gemext.tasks import Task
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.vi import GaussianLikelihood

D64 = torch.float64


def _batch(n=3, seed=0, dtype=torch.float32) -> Task:
    b = SinusoidTasks("finn").sample(n, torch.Generator().manual_seed(seed))
    return Task(*(t.to(dtype) for t in (b.x_support, b.y_support, b.x_query, b.y_query)))


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(3)
    layers = [nn.Linear(1, 4)]
    if kind == "bn":
        layers.append(nn.BatchNorm1d(4))
    elif kind == "bn-batchstats":
        layers.append(nn.BatchNorm1d(4, track_running_stats=False))
    layers += [nn.Tanh(), nn.Linear(4, 1)]
    return nn.Sequential(*layers).double()


# ------------------------------------------------------------------------------------- MAML
@pytest.mark.parametrize("kind", ["plain", "bn", "bn-batchstats"])
def test_maml_meta_gradient_matches_finite_differences(kind):
    b = _batch(2, dtype=D64)
    learner = algorithms.create("maml", _tiny(kind), inner_steps=2, lr=0.03).double()
    learner.meta_backward(b)
    T, n_q = len(b), b.x_query.shape[1]

    def loss(l) -> float:
        return l.meta_backward(b)["nll_query"] * n_q  # = mean over tasks of the summed query NLL

    grads = [p.grad.clone() for p in learner.theta0]
    for i, p in enumerate(learner.theta0):
        for j in range(min(2, p.numel())):
            vals = []
            for s in (1.0, -1.0):
                with torch.no_grad():
                    p.view(-1)[j] += s * 1e-6
                vals.append(loss(learner))
                with torch.no_grad():
                    p.view(-1)[j] -= s * 1e-6
            fd = (vals[0] - vals[1]) / 2e-6
            assert abs(grads[i].view(-1)[j].item() - fd) < 1e-5 * (1 + abs(fd)), (kind, i, j, grads[i].view(-1)[j], fd)
    assert T == 2


def test_maml_on_an_mlp_batched_autograd_equals_vmap_grad():
    # the MLP path (plain autograd through the batched unrolled steps) against vmap(grad)
    b = _batch(3, dtype=D64)
    grads = []
    for mlp in (True, False):
        learner = algorithms.create("maml", _tiny("plain"), inner_steps=3, lr=0.03).double()
        assert learner.forward_net.mlp is not None
        if not mlp:
            learner.forward_net.mlp = None
        stats = learner.meta_backward(b)
        grads.append(([p.grad.clone() for p in learner.theta0], stats["nll_query"]))
    for a, c in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-12)


def _manual_first_order(model: nn.Module, b: Task, steps: int, lr: float) -> list[torch.Tensor]:
    """FOMAML by hand: SGD on 2·Σ(y − f)² (σ = 0.5) with detached gradients, query gradient at φ_K."""
    out = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(len(b)):
        net = copy.deepcopy(model)
        for _ in range(steps):
            g = torch.autograd.grad(2 * (net(b.x_support[t]) - b.y_support[t]).pow(2).sum(), list(net.parameters()))
            with torch.no_grad():
                for p, gi in zip(net.parameters(), g):
                    p -= lr * gi
        g = torch.autograd.grad(2 * (net(b.x_query[t]) - b.y_query[t]).pow(2).sum(), list(net.parameters()))
        for o, gi in zip(out, g):
            o += gi / len(b)
    return out


def test_fomaml_equals_maml_without_second_order_term():
    b = _batch(3, dtype=D64)
    model = _tiny("plain")
    expected = _manual_first_order(model, b, 3, 0.02)
    fo = algorithms.create("fomaml", copy.deepcopy(model), inner_steps=3, lr=0.02).double()
    fo.meta_backward(b)
    for p, e in zip(fo.theta0, expected):
        # rtol: the likelihood's log σ buffer is log(0.5) rounded to float32
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)
    so = algorithms.create("maml", copy.deepcopy(model), inner_steps=3, lr=0.02).double()
    so.meta_backward(b)
    assert not torch.allclose(so.theta0[0].grad, fo.theta0[0].grad)  # the dropped term is real


def test_imaml_conjugate_gradient_matches_closed_form_implicit_gradient():
    g = torch.Generator().manual_seed(0)
    d, s, lam = 4, 0.7, 2.0
    x_tr, x_val = torch.randn(1, 8, d, generator=g, dtype=D64), torch.randn(1, 6, d, generator=g, dtype=D64)
    w = torch.randn(d, 1, generator=g, dtype=D64)
    y_tr, y_val = x_tr @ w, x_val @ w + 0.1
    model = nn.Linear(d, 1, bias=False).double()
    learner = algorithms.create("imaml", model, likelihood=GaussianLikelihood(s), inner_steps=400, lr=0.02,
                                reg=lam, cg_steps=d).double()
    theta = learner.theta0[0].detach().view(-1).clone()
    learner.meta_backward(Task(x_tr, y_tr, x_val, y_val))
    X, Xv = x_tr[0], x_val[0]
    H = X.T @ X / s**2
    phi = torch.linalg.solve(H + lam * torch.eye(d, dtype=D64), X.T @ y_tr[0].view(-1) / s**2 + lam * theta)
    grad_val = Xv.T @ (Xv @ phi - y_val[0].view(-1)) / s**2
    expected = torch.linalg.solve(torch.eye(d, dtype=D64) + H / lam, grad_val)
    torch.testing.assert_close(learner.theta0[0].grad.view(-1), expected, rtol=1e-7, atol=1e-9)
    # ... which is the true derivative of the validation loss at the exact proximal solution
    th = theta.clone().requires_grad_(True)
    ph = torch.linalg.solve(H + lam * torch.eye(d, dtype=D64), X.T @ y_tr[0].view(-1) / s**2 + lam * th)
    (auto,) = torch.autograd.grad(0.5 * (Xv @ ph - y_val[0].view(-1)).pow(2).sum() / s**2, th)
    torch.testing.assert_close(expected, auto)


def test_conjugate_gradient_solves_batched_spd_systems():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, 5, generator=g, dtype=D64)
    A = a @ a.transpose(1, 2) + torch.eye(5, dtype=D64)
    b = torch.randn(3, 5, generator=g, dtype=D64)
    (x,) = conjugate_gradient(lambda p: [(A @ p[0].unsqueeze(-1)).squeeze(-1)], [b], steps=5)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


# ------------------------------------------------------------------------------ ELBO gradient
def _mlp(theta, x):
    w1, b1, w2, b2 = theta
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _eps(seed, offset, like):
    flat = reference.normal(seed, offset, sum(t.numel() for t in like), D64)
    out, pos = [], 0
    for t in like:
        out.append(flat[pos:pos + t.numel()].view(t.shape))
        pos += t.numel()
    return out


def _kl(mu, rho, mu0, rho0):
    return sum((r0 - r + (torch.exp(2 * r) + (m - m0) ** 2) / (2 * torch.exp(2 * r0)) - 0.5).sum()
               for m, r, m0, r0 in zip(mu, rho, mu0, rho0))


@pytest.mark.parametrize("variant,optimizer", [("abml", "sgd"), ("abml", "ngvi"), ("pmaml-elbo", "ngvi")])
def test_elbo_gradient_matches_unrolled_float64_vi(variant, optimizer):
    b = _batch(2, dtype=D64)
    s_lik, K, lr, beta, S = 0.5, 2, (0.003 if optimizer == "sgd" else 0.3), 0.7, 2
    learner = algorithms.create(variant, _tiny("plain"), sigma0=0.1, likelihood=GaussianLikelihood(s_lik),
                                inner=dict(optimizer=optimizer, lr=lr, steps=K, mc_samples=S, beta=beta,
                                           optimizer_kwargs={"rho_lr": lr} if optimizer == "ngvi" else {}), seed=5)
    learner.double()
    gen = torch.Generator().manual_seed(0)
    gen.set_state(learner.generator.get_state())
    learner.meta_backward(b)

    mu0 = [p.detach().clone().requires_grad_(True) for p in learner.prior.mu0]
    rho0 = [p.detach().clone().requires_grad_(True) for p in learner.prior.rho0]
    T = len(b)

    ls = float(learner.net.likelihood.log_sigma)  # log 0.5 as stored (a float32 buffer, then .double())

    def nll(theta, x, y):  # theta with a task dim; summed Gaussian NLL
        total = 0.0
        for t in range(T):
            f = _mlp([th[t] for th in theta], x[t])
            total = total + (0.5 * (y[t] - f) ** 2 * math.exp(-2 * ls) + ls + 0.5 * math.log(2 * math.pi)).sum()
        return total

    pm = [m.unsqueeze(0).expand(T, *m.shape) for m in mu0]
    pr = [r.unsqueeze(0).expand(T, *r.shape) for r in rho0]
    mu, rho = [m * 1 for m in pm], [r * 1 for r in pr]
    for _ in range(K):
        seed = ops.new_seed(gen)
        data = sum(nll([m + torch.exp(r) * e for m, r, e in zip(mu, rho, _eps(seed, s, mu))], b.x_support, b.y_support)
                   for s in range(S)) / S
        g = torch.autograd.grad(data + beta * _kl(mu, rho, pm, pr), mu + rho, create_graph=True)
        gm, gr = g[:4], g[4:]
        if optimizer == "sgd":
            mu, rho = [m - lr * x for m, x in zip(mu, gm)], [r - lr * x for r, x in zip(rho, gr)]
        else:
            # natural-gradient step, μ step capped at one posterior std and ρ step at 1/√2 (its Fisher
            # unit): NaturalGradientVI's trust region
            mu, rho = ([m - torch.clamp(lr * torch.exp(2 * r) * x, min=-torch.exp(r), max=torch.exp(r))
                        for m, r, x in zip(mu, rho, gm)],
                       [r - torch.clamp(0.5 * lr * x, min=-math.sqrt(0.5), max=math.sqrt(0.5))
                        for r, x in zip(rho, gr)])
    seed = ops.new_seed(gen)
    x, y = b.joint() if variant == "abml" else b.query
    loss = sum(nll([m + torch.exp(r) * e for m, r, e in zip(mu, rho, _eps(seed, s, mu))], x, y) for s in range(S)) / S
    if variant == "abml":
        loss = loss + beta * _kl(mu, rho, pm, pr)
    expected = torch.autograd.grad(loss / T, mu0 + rho0)
    got = [p.grad for p in list(learner.prior.mu0) + list(learner.prior.rho0)]
    for e, g_ in zip(expected, got):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)


def _unrolled_and_fused(sigma0: float, noise: float, inner: dict):
    """ABML on a tiny float64 net: its unrolled, differentiable VI (graph to Θ) and the graph-free
    gemext.vi.fit from the same generator state, 3 steps on 3 sinusoid tasks, same values.
    Returns (μ, ρ, last nll, fit result, prior)."""
    b = _batch(3, dtype=D64)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    learner = algorithms.create("abml", net, sigma0=sigma0, likelihood=GaussianLikelihood(noise),
                                inner=dict(steps=3, **inner), seed=1).double()
    state = learner.generator.get_state()
    mu, rho, last = learner._vi(b.x_support, b.y_support, list(learner.prior.mu0), list(learner.prior.rho0), 3,
                                create_graph=True)
    assert mu[0].requires_grad and rho[0].requires_grad
    mu, rho = [m.detach() for m in mu], [r.detach() for r in rho]
    learner.generator.set_state(state)
    prior = learner.prior.expand(3)
    res = learner._fit(b.x_support, b.y_support, prior, prior, 3)
    for got, ref in zip(mu + rho, res.posterior.mu + res.posterior.rho):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    return mu, rho, last, res, prior


def test_differentiable_von_follows_the_fused_fit():
    """The unrolled von of the ELBO-gradient learners is the update of gemext.vi.fit (same ε, GGN rows,
    control variate and backtracking), here without a graph on a nonlinear net, 2 MC samples."""
    _, _, last, res, _ = _unrolled_and_fused(0.1, 0.3, dict(optimizer="von", mc_samples=2))
    assert res.posterior.rho[0].std() > 0.05  # the variances moved, differently per weight
    assert last == pytest.approx(res.nll, rel=1e-12)


def test_unrolled_ngvi_is_the_optimizers_rule_with_its_trust_region():
    """The back-propagating learners' NGVI steps (without a graph) equal gemext.vi.fit with
    NaturalGradientVI, with steps large enough that both the μ and the ρ caps are active."""
    _, _, _, res, prior = _unrolled_and_fused(
        1.0, 0.1, dict(optimizer="ngvi", lr=1.0, optimizer_kwargs={"rho_lr": 1.0}))
    moved = torch.cat([(r - r0).flatten() for r, r0 in zip(res.posterior.rho, prior.rho)])
    assert moved.abs().max() > 0.999 * 3 * math.sqrt(0.5)  # 3 capped ρ steps on some weight: the cap is active


def _conjugate_setup(name: str, steps: int, mc: int = 1, **options):
    phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise = problem(0)
    learner = algorithms.create(name, nn.Linear(phi_tr.shape[1], 1, bias=False), likelihood=GaussianLikelihood(noise),
                                inner=dict(optimizer="von", steps=steps, mc_samples=mc), seed=2, **options).double()
    with torch.no_grad():
        learner.prior.mu0[0].copy_(mu0.view(1, -1))
        learner.prior.rho0[0].copy_(rho0.view(1, -1))
    task = Task(phi_tr[None], y_tr.view(1, -1, 1), phi_val[None], y_val.view(1, -1, 1))
    noise = math.exp(float(learner.net.likelihood.log_sigma))  # as stored
    return learner, task, (phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise)


def test_kl_chaser_through_von_is_the_exact_l2_gradient_on_the_conjugate_model():
    """von reaches the exact posterior in one step on a linear-Gaussian model, so back-propagating the
    chaser statistic through two von steps is ∇_Θ log p(D_val | D_tr; Θ) itself."""
    learner, task, (phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise) = _conjugate_setup("kl-chaser", 2)
    learner.meta_backward(task)
    got = torch.cat([-learner.prior.mu0[0].grad.view(-1), -learner.prior.rho0[0].grad.view(-1)])
    m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
    target = log_marginal(torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val]), m0, r0, noise) \
        - log_marginal(phi_tr, y_tr, m0, r0, noise)
    exact = torch.cat(torch.autograd.grad(target, (m0, r0)))
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("variant", ["abml", "pmaml-elbo"])
def test_elbo_gradient_through_von_on_the_conjugate_model(variant):
    """ABML / PMAML-ELBO with von: the meta-loss at λ_K = the exact support posterior λ*(Θ), with the
    learner's own ε, differentiated through the closed-form λ*(Θ)."""
    steps, S = 2, 3
    learner, task, (phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise) = _conjugate_setup(variant, steps, S)
    state = learner.generator.get_state()
    learner.meta_backward(task)
    got = [learner.prior.mu0[0].grad.view(-1), learner.prior.rho0[0].grad.view(-1)]
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    for _ in range(steps):
        ops.new_seed(gen)
    seed = ops.new_seed(gen)
    m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
    mu, rho = exact_posterior(phi_tr, y_tr, m0, r0, noise)
    phi, y = (torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val])) if variant == "abml" else (phi_val, y_val)
    like = [torch.zeros(1, 1, len(mu0), dtype=D64)]
    loss = 0.0
    for s in range(S):
        theta = mu + rho.exp() * learner._eps(like, seed, s)[0].view(-1)
        loss = loss + (0.5 * ((y - phi @ theta) / noise) ** 2 + math.log(noise) + 0.5 * math.log(2 * math.pi)).sum() / S
    if variant == "abml":
        loss = loss + _kl([mu], [rho], [m0], [r0])
    exact = torch.autograd.grad(loss, (m0, r0))
    for g_, e in zip(got, exact):
        torch.testing.assert_close(g_, e, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------ KL-chaser
def _conjugate_learner(first_order: bool, steps: int, mc: int, seed: int = 0):
    phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise = problem(seed)
    d = phi_tr.shape[1]
    learner = algorithms.create("kl-chaser", nn.Linear(d, 1, bias=False), likelihood=GaussianLikelihood(noise),
                                first_order=first_order,
                                inner=dict(optimizer="ngvi", lr=0.1, steps=steps, mc_samples=mc,
                                           optimizer_kwargs={"rho_lr": 0.1}),
                                seed=seed).double()
    with torch.no_grad():
        learner.prior.mu0[0].copy_(mu0.view(1, -1))
        learner.prior.rho0[0].copy_(rho0.view(1, -1))
    task = Task(phi_tr[None], y_tr.view(1, -1, 1), phi_val[None], y_val.view(1, -1, 1))
    return learner, task, (phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise)


def test_kl_chaser_statistic_is_exact_on_the_conjugate_model():
    """With exact posteriors: −∂KL(q_all‖q_tr)/∂λ_tr = gem_grad(λ_tr; λ_all) = ∇_λtr log p(D_val; λ_tr), and
    chained through the exact λ_tr(Θ) it is ∇_Θ log p(D_val | D_tr; Θ) (the backprop mode's target);
    the first-order mode's ĝ(λ_tr; λ_all) is what the identity Jacobian gives."""
    phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise = problem(0)
    m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
    mu_tr, rho_tr = exact_posterior(phi_tr, y_tr, m0, r0, noise)
    mu_all, rho_all = exact_posterior(phi_val, y_val, mu_tr.detach(), rho_tr.detach(), noise)
    g_mu, g_rho = ops.gem_grad(mu_tr.detach(), rho_tr.detach(), mu_all, rho_all)
    mt, rt = mu_tr.detach().clone().requires_grad_(True), rho_tr.detach().clone().requires_grad_(True)
    e_mu, e_rho = torch.autograd.grad(log_marginal(phi_val, y_val, mt, rt, noise), (mt, rt))
    torch.testing.assert_close(g_mu, e_mu)
    torch.testing.assert_close(g_rho, e_rho)
    chained = torch.autograd.grad((mu_tr, rho_tr), (m0, r0), (g_mu, g_rho))
    target = log_marginal(torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val]), m0, r0, noise) \
        - log_marginal(phi_tr, y_tr, m0, r0, noise)
    exact = torch.autograd.grad(target, (m0, r0))
    for c, e in zip(chained, exact):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("first_order", [True, False])
def test_kl_chaser_meta_gradient_on_the_conjugate_model(first_order):
    learner, task, (phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise) = _conjugate_learner(first_order, 100, 16)
    state = learner.generator.get_state()
    learner.meta_backward(task)
    got = torch.cat([-learner.prior.mu0[0].grad.view(-1), -learner.prior.rho0[0].grad.view(-1)])
    # the learner's own statistic, recomputed from its posteriors (same ε stream)
    learner.generator.set_state(state)
    mu_tr, rho_tr, lead = learner.posteriors(task)
    if first_order:
        g = reference.gem_grad(mu_tr[0].detach(), rho_tr[0].detach(), lead.mu[0], lead.rho[0])
        torch.testing.assert_close(got, torch.cat([g[0].view(-1), g[1].view(-1)]), rtol=1e-9, atol=1e-12)
        m0, r0 = mu0, rho0
        et, rt = exact_posterior(phi_tr, y_tr, m0, r0, noise)
        ea, ra = exact_posterior(phi_val, y_val, et, rt, noise)
        exact = torch.cat(reference.gem_grad(et, rt, ea, ra))
    else:
        m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
        target = log_marginal(torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val]), m0, r0, noise) \
            - log_marginal(phi_tr, y_tr, m0, r0, noise)
        exact = torch.cat(torch.autograd.grad(target, (m0, r0)))
    # converged VI (100 natural-gradient steps, 16 MC samples) against the exact quantity
    assert (got - exact).abs().max() < 0.1 * exact.abs().max() + 0.02, (got, exact)


# ------------------------------------------------------------------------------------------ BMAML
def test_svgd_direction_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    B, M, Dm = 2, 4, 3
    x, score = torch.randn(B, M, Dm, generator=g, dtype=D64), torch.randn(B, M, Dm, generator=g, dtype=D64)
    got = svgd_direction(x, score)
    for bi in range(B):
        d2 = [[float(((x[bi, j] - x[bi, m]) ** 2).sum()) for m in range(M)] for j in range(M)]
        h = statistics.median(d2[j][m] for j in range(M) for m in range(M) if j != m) / math.log(M + 1)
        for m in range(M):
            phi = torch.zeros(Dm, dtype=D64)
            for j in range(M):
                k = math.exp(-d2[j][m] / h)
                phi += k * score[bi, j] - 2 * (x[bi, j] - x[bi, m]) / h * k
            torch.testing.assert_close(got[bi, m], phi / M)


def test_bmaml_inner_step_is_svgd_on_the_log_likelihood():
    b = _batch(2, dtype=D64)
    learner = algorithms.create("bmaml", _tiny("plain"), particles=3, inner_steps=1, lr=0.01).double()
    start = [p.detach().unsqueeze(0).expand(2, *p.shape) for p in learner.particles]
    got = learner._svgd(start, b.x_support, b.y_support, 1, create_graph=False)
    for t in range(2):
        flat, score = [], []
        for m in range(3):
            th = [p[t, m].clone().requires_grad_(True) for p in start]
            ll = -(2 * (_mlp(th, b.x_support[t]) - b.y_support[t]).pow(2)).sum()
            score.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(ll, th)]))
            flat.append(torch.cat([p.reshape(-1) for p in th]).detach())
        x = torch.stack(flat)[None]
        new = x + 0.01 * svgd_direction(x, torch.stack(score)[None])
        torch.testing.assert_close(torch.cat([p[t].reshape(3, -1) for p in got], 1), new[0])


# ---------------------------------------------------------------------------------- every name
SMOKE_OPTIONS = {"bmaml": dict(particles=2)}


@pytest.mark.parametrize("name", algorithms.names())
def test_every_algorithm_smoke(name):
    b = _batch(3)
    opts = dict(inner_steps=2, seed=1, **SMOKE_OPTIONS.get(name, {}))
    learner = algorithms.create(name, SinusoidTasks("finn").make_model(), **opts)
    assert isinstance(learner.generator, torch.Generator) and learner.inner_steps == 2
    stats = learner.meta_backward(b)
    assert stats and all(math.isfinite(v) for v in stats.values())
    trainable = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    before = {n: p.grad.clone() for n, p in trainable}
    learner.meta_backward(b)  # accumulates
    assert any(not torch.equal(p.grad, before[n]) for n, p in trainable)
    out = learner.adapt((b.x_support[0], b.y_support[0])).predict(b.x_query[0])
    mean, std = out.mean, out.std
    assert mean.shape == b.y_query[0].shape == std.shape and (std > 0).all()
    path = learner.adapt_path(b, 2)
    assert len(path) == 3 and path[-1].predict(b.x_query).mean.shape == b.y_query.shape
    other = algorithms.create(name, SinusoidTasks("finn").make_model(), **{**opts, "seed": 7})
    other.load_state_dict(learner.state_dict())
    for p, q in zip(learner.parameters(), other.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", algorithms.names())
def test_every_algorithm_with_batchnorm_and_frozen_parameters(name, device):
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opts = dict(inner_steps=1, **SMOKE_OPTIONS.get(name, {}))
    learner = algorithms.create(name, model, **opts).to(device)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    opt.zero_grad()
    learner.meta_backward(_batch(2).to(device))
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.requires_grad)
    opt.step()
    b = _batch(2).to(device)
    learner.adapt(b).predict(b.x_query)
    assert torch.equal(learner.net.model[0].weight.cpu(), frozen)
