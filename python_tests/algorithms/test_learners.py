"""The learner interface and the GEM-BML / GEM-BML+ / Reptile meta-gradients against independent
computations (the exact conjugate model; a plain SGD loop for Reptile)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from gemext import algorithms
from gemext.reference import exact_posterior, log_marginal, orthogonal_features
from gemext.tasks import Task
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.vi import GaussianLikelihood


def _sinusoid_batch(n=4, seed=0):
    return SinusoidTasks("finn").sample(n, torch.Generator().manual_seed(seed))


def test_catalogue_names_and_errors():
    assert {"gem-bml", "gem-bml+", "reptile"} <= set(algorithms.names())
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        algorithms.create("nope", nn.Linear(1, 1))
    with pytest.raises(TypeError, match="nn.Module"):
        algorithms.create("gem-bml", "not a model")


def test_parameters_are_the_meta_parameters():
    model = SinusoidTasks("finn").make_model()
    n = sum(p.numel() for p in model.parameters())
    learner = algorithms.create("gem-bml+", model)
    assert sum(p.numel() for p in learner.parameters()) == 2 * n
    names = [k for k, _ in learner.named_parameters()]
    assert all(k.startswith("prior.") for k in names)


def _conjugate_task(seed=0, d=4, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    phi_tr, phi_val = orthogonal_features(6, d, g), orthogonal_features(5, d, g)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y_tr = phi_tr @ w + noise * torch.randn(6, generator=g, dtype=torch.float64)
    y_val = phi_val @ w + noise * torch.randn(5, generator=g, dtype=torch.float64)
    return phi_tr, y_tr, phi_val, y_val


@pytest.mark.parametrize("all_fit", ["joint", "sequential"])
@pytest.mark.parametrize("variant", ["gem-bml", "gem-bml+"])
def test_meta_gradient_matches_exact_marginal_likelihood(variant, all_fit):
    """With VI run to convergence, Θ.grad = −∇ log p(D_all) (GEM-BML) or −∇ log p(D_val | D_tr)."""
    d, noise = 4, 0.3
    phi_tr, y_tr, phi_val, y_val = _conjugate_task(d=d, noise=noise)
    torch.manual_seed(0)  # μ₀ = the model's init: fixed, so the outcome does not depend on test order
    model = nn.Linear(d, 1, bias=False).double()
    # (checked over inits 0-5 in both all_fit modes: the errors stay below 0.67× the tolerances;
    # they come from Adam's noisy fixed point in ρ, which 16 MC samples damp and longer runs do not)
    learner = algorithms.create(variant, model, likelihood=GaussianLikelihood(noise), sigma0=0.8,
                                inner=dict(optimizer="adam", lr=0.01, steps=400, mc_samples=16), seed=0,
                                all_fit=all_fit)
    learner.double()
    mu0 = learner.prior.mu0[0].detach().view(-1).clone()
    rho0 = learner.prior.rho0[0].detach().view(-1).clone()
    task = Task(phi_tr[None], y_tr.view(1, -1, 1), phi_val[None], y_val.view(1, -1, 1))
    learner.meta_backward(task)
    m, r = mu0.clone().requires_grad_(), rho0.clone().requires_grad_()
    phi_all, y_all = torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val])
    target = log_marginal(phi_all, y_all, m, r, noise)
    if variant == "gem-bml+":
        target = target - log_marginal(phi_tr, y_tr, m, r, noise)
    e_mu, e_rho = torch.autograd.grad(target, (m, r))
    g_mu = -learner.prior.mu0[0].grad.view(-1)
    g_rho = -learner.prior.rho0[0].grad.view(-1)
    scale_mu, scale_rho = e_mu.abs().max(), e_rho.abs().max()
    # VI noise (Adam's last steps, 4 MC samples) limits the agreement; a wrong statistic (sign,
    # missing 1/σ₀², GEM-BML vs GEM-BML+) is off by the gradient's own scale
    assert (g_mu - e_mu).abs().max() < 0.15 * scale_mu + 0.03, (g_mu, e_mu)
    assert (g_rho - e_rho).abs().max() < 0.2 * scale_rho + 0.05, (g_rho, e_rho)
    # sanity of the oracle: the exact posterior itself satisfies the identity
    post = exact_posterior(phi_all, y_all, mu0, rho0, noise)
    assert torch.isfinite(post[0]).all()


def test_reptile_gradient_is_minus_sgd_displacement():
    torch.manual_seed(0)
    batch = _sinusoid_batch(3)
    model = SinusoidTasks("finn").make_model()
    reference = copy.deepcopy(model)
    learner = algorithms.create("reptile", model, sigma0=1.0, inner=dict(optimizer="sgd", lr=0.003, steps=3))
    learner.meta_backward(batch)
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for t in range(3):
        net = copy.deepcopy(reference)
        opt = torch.optim.SGD(net.parameters(), lr=0.003)
        for x, y in ((batch.x_support[t], batch.y_support[t]), (batch.x_query[t], batch.y_query[t])):
            for _ in range(3):  # Gaussian likelihood with σ = 0.5: −log p = 2·Σ(y − f)² + const
                opt.zero_grad()
                (2 * (net(x) - y).pow(2).sum()).backward()
                opt.step()
        for e, p0, p in zip(expected, reference.parameters(), net.parameters()):
            e -= (p.detach() - p0.detach()) / 3
    for e, p in zip(expected, learner.prior.mu0):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    assert learner.prior.rho0[0].grad is None  # C₀ is fixed


def test_vectorised_and_looped_inner_loops_agree(device):
    batch = _sinusoid_batch(4).to(device)
    model = SinusoidTasks("finn").make_model()
    grads = []
    for vec in (True, False):
        # SGD, not Adam: Adam's m/√v turns float rounding in near-zero gradients into O(lr) steps
        learner = algorithms.create("gem-bml+", copy.deepcopy(model), vectorize=vec, seed=3,
                                    inner_steps=3, inner=dict(optimizer="sgd", lr=1e-3)).to(device)
        learner.meta_backward(batch)
        grads.append([p.grad.clone() for p in learner.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gem_bml_plus_differs_from_gem_bml_by_support_statistic():
    batch = _sinusoid_batch(2)
    out = {}
    for v in ("gem-bml", "gem-bml+"):
        torch.manual_seed(0)
        learner = algorithms.create(v, SinusoidTasks("finn").make_model(), seed=1, inner_steps=2)
        learner.meta_backward(batch)
        out[v] = learner.prior.mu0[0].grad.clone()
    assert not torch.allclose(out["gem-bml"], out["gem-bml+"])


def test_adapt_predicts_mean_and_std(device):
    learner = algorithms.create("gem-bml+", SinusoidTasks("finn").make_model(), inner_steps=2).to(device)
    b = _sinusoid_batch(1).to(device)
    pred = learner.adapt((b.x_support[0], b.y_support[0]))
    out = pred.predict(b.x_query[0])
    mean, std = out.mean, out.std
    assert out.probs is None and mean.shape == b.y_query[0].shape and std.shape == mean.shape
    assert (std > 0).all()
    # reptile: a point estimate; std is the likelihood noise only
    r = algorithms.create("reptile", SinusoidTasks("finn").make_model(), inner_steps=2).to(device)
    std = r.adapt((b.x_support[0], b.y_support[0])).predict(b.x_query[0]).std
    torch.testing.assert_close(std, torch.full_like(std, 0.5))


def test_bad_task_input_is_named():
    learner = algorithms.create("gem-bml+", SinusoidTasks("finn").make_model(), inner_steps=1)
    b = _sinusoid_batch(2)
    bad = Task(b.x_support.clone(), b.y_support.clone(), b.x_query, b.y_query)
    bad.y_support[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="y_support contains NaN"):
        learner.meta_backward(bad)
    with pytest.raises(ValueError, match="support set is empty"):
        learner.meta_backward(Task(b.x_support[:, :0], b.y_support[:, :0], b.x_query, b.y_query))
    with pytest.raises(ValueError, match="x_query holds 1 tasks"):
        learner.meta_backward(Task(b.x_support, b.y_support, b.x_query[:1], b.y_query))
    with pytest.raises(ValueError, match=r"x_support points have shape \(1,\) but x_query points \(2,\)"):
        learner.meta_backward(Task(b.x_support, b.y_support, b.x_query.repeat(1, 1, 2), b.y_query))
    with pytest.raises(ValueError, match="support: x contains NaN"):
        learner.adapt((torch.full((3, 1), float("nan")), torch.zeros(3, 1)))
    with pytest.raises(TypeError, match="tasks must be"):
        learner.meta_backward("tasks")


def test_frozen_parameters_stay_fixed_and_learned_noise_is_bayesian():
    model = SinusoidTasks("finn").make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    learner = algorithms.create("gem-bml+", model, likelihood=GaussianLikelihood(0.5, learn=True), inner_steps=2)
    assert "model.0.weight" not in learner.prior.names
    assert "likelihood.log_sigma" in learner.prior.names
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    for i in range(3):
        opt.zero_grad()
        learner.meta_backward(_sinusoid_batch(2, seed=i))
        opt.step()
    assert torch.equal(learner.net.model[0].weight, frozen)
    i = learner.prior.names.index("likelihood.log_sigma")
    assert learner.prior.mu0[i].grad is not None and learner.prior.mu0[i].grad.abs() > 0


def test_batchnorm_model_runs_with_looped_inner_loop():
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    learner = algorithms.create("gem-bml+", model, inner_steps=2)
    assert not learner.forward_net.vectorize  # running statistics are mutated: loop over tasks
    stats = learner.meta_backward(_sinusoid_batch(2))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_learn_sigma_false_meta_learns_the_mean_only():
    learner = algorithms.create("gem-bml+", SinusoidTasks("finn").make_model(), inner_steps=2, learn_sigma=False)
    learner.meta_backward(_sinusoid_batch(2))
    assert all(not r.requires_grad and r.grad is None for r in learner.prior.rho0)
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in learner.prior.mu0)


def test_sigma0_range_bounds_the_learned_prior_std():
    import math

    from gemext import algorithms
    learner = algorithms.create("gem-bml+", torch.nn.Linear(3, 1), sigma0=0.05, sigma0_range=(0.01, 0.05))
    with torch.no_grad():
        learner.prior.rho0[0].fill_(2.0)
        learner.prior.rho0[1].fill_(-9.0)
        learner.prior.rho0[1][0] = math.nan
    learner.prior.clamp_()
    torch.testing.assert_close(learner.prior.rho0[0].exp(), torch.full((1, 3), 0.05))
    assert math.isnan(float(learner.prior.rho0[1].detach()[0]))  # NaN stays visible to the guards
    with pytest.raises(ValueError, match="sigma0_range"):
        algorithms.create("gem-bml+", torch.nn.Linear(3, 1), sigma0=0.05, sigma0_range=(0.1, 1.0))
    for bad in ("grow", (0.01,), 0.05):
        with pytest.raises(ValueError, match="sigma0_range"):
            algorithms.create("gem-bml+", torch.nn.Linear(3, 1), sigma0=0.05, sigma0_range=bad)
    shrink = algorithms.create("gem-bml", torch.nn.Linear(3, 1), sigma0=0.04, sigma0_range="shrink")
    torch.testing.assert_close(shrink.prior.rho0_range.exp(), torch.tensor([0.004, 0.04]))
    with pytest.raises(ValueError, match="point posteriors"):
        algorithms.create("reptile", torch.nn.Linear(3, 1), inner=dict(optimizer="von"))


def test_gem_learners_default_to_von_and_the_sinusoid_preset_bounds_sigma0():
    import math

    from gemext.train import RunConfig, build
    from gemext.vi import VariationalOnlineNewton
    assert algorithms.create("gem-bml+", nn.Linear(2, 1)).inner.optimizer_class() is VariationalOnlineNewton
    assert algorithms.create("gem-bml", nn.Linear(2, 1), inner=dict(steps=2)).inner.optimizer == "von"
    assert algorithms.create("gem-bml+", nn.Linear(2, 1), inner=dict(optimizer="adam")).inner.optimizer == "adam"
    assert algorithms.create("reptile", nn.Linear(2, 1)).inner.optimizer == "adam"  # point posteriors
    _, learner, _ = build(RunConfig(task="sinusoid", algo="gem-bml+", out="unused"))
    assert learner.inner.optimizer == "von" and learner.inner.lr == 1.0 and learner.inner.beta == 1.0
    lo, hi = learner.prior.rho0_range.tolist()
    assert math.isclose(math.exp(hi), 0.02, rel_tol=1e-6) and math.isclose(math.exp(lo), 0.002, rel_tol=1e-6)
    assert all(r.requires_grad for r in learner.prior.rho0)  # σ₀ is learned (within its range)


# ------------------------------------------------------------------ drop-in on unusual models
class _TiedMLP(nn.Module):
    """`dec` reuses `enc`'s weight (a tie), as weight-tied autoencoders and language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.dec = nn.Linear(1, 1), nn.Linear(1, 8), nn.Linear(8, 1)
        self.out = nn.Linear(1, 1)
        self.out.weight = self.enc.weight

    def forward(self, x):
        return self.out(self.dec(torch.tanh(self.mid(self.enc(x)))))


class _ExplicitTie(nn.Module):
    """The same function with one weight used twice by hand (parameters in the same order, so the
    fused kernels draw the same noise for them)."""

    def __init__(self, tied: _TiedMLP) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.w = nn.Parameter(tied.enc.weight.detach().clone())
        self.enc.b = nn.Parameter(tied.enc.bias.detach().clone())
        self.mid, self.dec = copy.deepcopy(tied.mid), copy.deepcopy(tied.dec)
        self.out = nn.Module()
        self.out.b = nn.Parameter(tied.out.bias.detach().clone())

    def forward(self, x):
        h = torch.tanh(self.mid(nn.functional.linear(x, self.enc.w, self.enc.b)))
        return nn.functional.linear(self.dec(h), self.enc.w, self.out.b)


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "abml"])
def test_tied_weights_stay_tied_with_one_meta_parameter(algo):
    torch.manual_seed(0)
    tied = _TiedMLP().double()
    ref = _ExplicitTie(tied).double()
    b = _sinusoid_batch(3)
    b = Task(*(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query)))
    opts = dict(inner_steps=2) if algo != "abml" else dict(inner=dict(optimizer="ngvi", steps=2))
    learners = [algorithms.create(algo, m, seed=3, **opts).double() for m in (tied, ref)]
    assert tied.out.weight is tied.enc.weight  # the learner's model keeps the tie
    names = learners[0].prior.names if algo != "maml" else learners[0].names
    assert sum("weight" in n and ("enc" in n or "out" in n) for n in names) == 1  # one meta-parameter
    for L in learners:
        L.meta_backward(b)
    # map the tied learner's meta-parameters onto the explicit model's (w, b_enc, b_out, mid, dec)
    order = {"model.enc.weight": "model.enc.w", "model.enc.bias": "model.enc.b", "model.out.bias": "model.out.b"}
    ref_names = learners[1].prior.names if algo != "maml" else learners[1].names
    grads = [[p.grad for p in L.parameters()] for L in learners]
    n = len(names)
    for i, name in enumerate(names):
        j = ref_names.index(order.get(name, name))
        for k in range(len(grads[0]) // n):  # μ₀ (and ρ₀) blocks
            torch.testing.assert_close(grads[0][k * n + i], grads[1][k * n + j], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "bmaml"])
def test_state_dict_holds_frozen_parameters_and_the_learner_pickles(algo, tmp_path):
    def model(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        m[0].bias.requires_grad_(False)  # frozen: not meta-learned, but it shapes every prediction
        return m
    a = algorithms.create(algo, model(0), seed=1)
    b = algorithms.create(algo, model(1), seed=1)  # freshly initialised elsewhere
    assert any(k.endswith("model.0.bias") for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.linspace(-5, 5, 7).unsqueeze(-1)
    support = (x, torch.sin(x))
    for L in (a, b):
        L.generator.manual_seed(5)
    out_a, out_b = (L.adapt(support, steps=1).predict(x) for L in (a, b))
    torch.testing.assert_close(vars(out_a), vars(out_b), rtol=0, atol=0)
    torch.save(a, tmp_path / "learner.pt")
    c = torch.load(tmp_path / "learner.pt", weights_only=False)
    c.generator.manual_seed(5)
    torch.testing.assert_close(vars(c.adapt(support, steps=1).predict(x)), vars(out_a), rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "imaml", "abml", "bmaml"])
def test_dropout_models_train_vectorised_with_per_task_masks(algo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1))
    learner = algorithms.create(algo, model, inner_steps=1, seed=0)
    assert learner.forward_net.vectorize
    stats = learner.meta_backward(_sinusoid_batch(3))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    if algo == "bmaml":  # particles: no single set of weights to feed below
        return
    # per-task randomness: the same input and weights in every task give different dropout masks
    theta = [p.detach().unsqueeze(0).expand(4, *p.shape) for p in
             (learner.prior.mu0 if hasattr(learner, "prior") else learner.parameters())
             ][: len(learner.forward_net.names)]
    x = torch.ones(4, 5, 1)
    torch.manual_seed(1)
    out = learner.forward_net(theta, x)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("algo", ["gem-bml+", "maml"])
def test_single_and_stacked_supports_are_unambiguous(algo):
    learner = algorithms.create(algo, SinusoidTasks("finn").make_model(), inner_steps=1, seed=0)
    b = _sinusoid_batch(3)
    learner.meta_backward(b)  # the learner now knows its inputs: one dimension per point
    assert int(learner.input_rank) == 1

    def predict(support, x):
        learner.generator.manual_seed(0)
        return learner.adapt(support).predict(x).mean
    one = predict((b.x_support[0], b.y_support[0]), b.x_query[0])
    # an unstacked Task is one task, exactly as its (x, y) pair
    torch.testing.assert_close(predict(b[0], b.x_query[0]), one, rtol=0, atol=0)
    # a stacked Task is a batch, task 0 of which is the same task
    batch = predict(b, b.x_query)
    assert batch.shape == b.y_query.shape
    with pytest.raises(ValueError, match="stacked batch of tasks: pass it as a gemext.tasks.Task"):
        learner.adapt((b.x_support, b.y_support))  # a stacked (x, y) pair used to be pooled into one task
    with pytest.raises(ValueError, match="1 dimension.*per point"):
        learner.adapt(Task(*(t.unsqueeze(0) for t in (b.x_support, b.y_support, b.x_query, b.y_query))))
    # the rank travels with the learner's state
    other = algorithms.create(algo, SinusoidTasks("finn").make_model(), inner_steps=1)
    other.load_state_dict(learner.state_dict())
    assert int(other.input_rank) == 1


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, *, scale):  # a required keyword argument
        return scale * self.body(x)


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "abml", "bmaml"])
def test_forward_keyword_arguments_reach_every_call(algo):
    torch.manual_seed(0)
    learner = algorithms.create(algo, _Scaled(), inner_steps=1, forward_kwargs={"scale": 0.0}, seed=0)
    learner.meta_backward(_sinusoid_batch(2))
    b = _sinusoid_batch(1)
    mean = learner.adapt((b.x_support[0], b.y_support[0])).predict(b.x_query[0]).mean
    assert torch.equal(mean, torch.zeros_like(mean))  # scale 0 was applied


class _GRURegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.out = nn.GRU(1, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x):  # x: [N, steps, 1] sequences
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "abml"])
def test_recurrent_models_fall_back_to_the_task_loop(algo):
    """torch.func has no batching rule for nn.GRU: 'auto' loops over tasks (as for BatchNorm), and
    vectorize=True is refused with the reason instead of a raw vmap error."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b = Task(torch.randn(2, 6, 4, 1, generator=g), torch.randn(2, 6, 1, generator=g),
             torch.randn(2, 5, 4, 1, generator=g), torch.randn(2, 5, 1, generator=g))
    learner = algorithms.create(algo, _GRURegressor(), inner_steps=1)
    assert not learner.forward_net.vectorize
    stats = learner.meta_backward(b)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    with pytest.raises(ValueError, match="cannot vmap GRU"):
        algorithms.create(algo, _GRURegressor(), inner_steps=1, vectorize=True)
    bn = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="BatchNorm1d updates its running statistics"):
        algorithms.create(algo, bn, inner_steps=1, vectorize=True)


class _Counting(nn.Module):
    """A forward that mutates a registered buffer in place (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.body(x)


@pytest.mark.parametrize("algo", ["gem-bml+", "gem-bml", "maml"])
def test_a_forward_that_mutates_a_buffer_is_named_with_the_fix(algo):
    """Not detected up front (any in-place update may be one): the vmapped inner loop's raw
    torch.func error becomes one that names the cause and vectorize=False, which then works."""
    torch.manual_seed(0)
    learner = algorithms.create(algo, _Counting(), inner_steps=1)
    with pytest.raises(RuntimeError, match=r"forward mutates a tensor in place \(a buffer.*vectorize=False"):
        learner.meta_backward(_sinusoid_batch(2))
    learner = algorithms.create(algo, _Counting(), inner_steps=1, vectorize=False)
    stats = learner.meta_backward(_sinusoid_batch(2))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert learner.net.model.calls > 0


@pytest.mark.parametrize("variant", ["gem-bml", "gem-bml+"])
def test_joint_all_fit_gives_the_exact_mean_gradient_on_correlated_features(variant):
    """Correlated features: the exact posterior has a full covariance, which a diagonal q cannot
    hold, but the μ₀ part of the statistic needs only the exact posterior MEANS (Fisher's identity:
    ∂ log p(D)/∂μ₀ = (m − μ₀)/σ₀²), and one coupled von step lands on them for a linear model.
    all_fit="joint" refits support ∪ query against the prior Θ, so it is exact; the sequential fit
    uses the diagonal support posterior as the query's prior and is not (it is the
    orthogonal-feature case only)."""
    d, noise, n_tr, n_val = 6, 0.3, 4, 5  # fewer points than weights, as a few-shot network
    g = torch.Generator().manual_seed(4)
    phi_tr = torch.randn(n_tr, d, generator=g, dtype=torch.float64)
    phi_val = torch.randn(n_val, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y_tr = phi_tr @ w + noise * torch.randn(n_tr, generator=g, dtype=torch.float64)
    y_val = phi_val @ w + noise * torch.randn(n_val, generator=g, dtype=torch.float64)
    task = Task(phi_tr[None], y_tr.view(1, -1, 1), phi_val[None], y_val.view(1, -1, 1))
    errors = {}
    for mode in ("joint", "sequential"):
        torch.manual_seed(0)
        learner = algorithms.create(variant, nn.Linear(d, 1, bias=False).double(), likelihood=GaussianLikelihood(noise),
                                    sigma0=0.8, inner=dict(optimizer="von", steps=2), seed=0, all_fit=mode)
        learner.double()
        mu0 = learner.prior.mu0[0].detach().view(-1).clone()
        rho0 = learner.prior.rho0[0].detach().view(-1).clone()
        learner.meta_backward(task)
        m, r = mu0.clone().requires_grad_(), rho0.clone().requires_grad_()
        target = log_marginal(torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val]), m, r, noise)
        if variant == "gem-bml+":
            target = target - log_marginal(phi_tr, y_tr, m, r, noise)
        (e_mu,) = torch.autograd.grad(target, m)
        g_mu = -learner.prior.mu0[0].grad.view(-1)
        errors[mode] = float((g_mu - e_mu).norm() / e_mu.norm())
    assert errors["joint"] < 1e-6, errors
    assert errors["sequential"] > 0.05, errors  # the loss the joint fit removes (and the test's power)


def test_all_fit_option_is_checked():
    with pytest.raises(ValueError, match="all_fit must be 'sequential' or 'joint'"):
        algorithms.create("gem-bml+", nn.Linear(2, 1), all_fit="both")


class _Custom(nn.Module):  # a forward the learner cannot see into
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("algo", ["gem-bml+", "maml"])
def test_a_task_on_a_fresh_learner_is_read_from_the_model_or_refused(algo):
    """Before the learner has seen data, an unstacked Task [N, 1] was read as N one-point tasks and
    fixed the learner's point rank at 0, breaking every later (x, y) call."""
    b = _sinusoid_batch(3)

    def fresh(model=None):
        torch.manual_seed(0)
        return algorithms.create(algo, model or SinusoidTasks("finn").make_model(), inner_steps=1, seed=0)

    def predict(learner, support, x):
        learner.generator.manual_seed(0)
        return learner.adapt(support).predict(x).mean
    one = predict(fresh(), (b.x_support[0], b.y_support[0]), b.x_query[0])
    learner = fresh()  # an MLP's first Linear reads points of >= 1 dimension: [N, 1] is one task
    torch.testing.assert_close(predict(learner, b[0], b.x_query[0]), one, rtol=0, atol=0)
    torch.testing.assert_close(predict(learner, (b.x_support[0], b.y_support[0]), b.x_query[0]), one, rtol=0, atol=0)
    learner.meta_backward(b)
    assert int(learner.input_rank) == 1
    # a stacked Task is still a batch on a fresh learner, and it fixes nothing a later call needs
    learner = fresh()
    assert predict(learner, b, b.x_query).shape == b.y_query.shape
    torch.testing.assert_close(predict(learner, (b.x_support[0], b.y_support[0]), b.x_query[0]), one,
                               rtol=0, atol=0)
    # a model that does not say what a point is: [N, 1] is ambiguous, refused until the rank is known
    learner = fresh(_Custom())
    with pytest.raises(ValueError, match=r"ambiguous .* Pass one task as an \(x, y\) pair"):
        learner.adapt(b[0])
    learner.adapt((b.x_support[0], b.y_support[0]))
    assert learner.adapt(b[0]).predict(b.x_query[0]).mean.shape == b.y_query[0].shape
    # a convolution reads [C, H, W] points: one task [N, C, H, W], a batch [T, N, C, H, W]
    def conv():
        return fresh(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1)))
    x, y = torch.randn(5, 1, 4, 4), torch.randn(5, 1)
    assert conv().adapt(Task(x, y, x, y)).predict(x).mean.shape == (5, 1)
    assert conv().adapt(Task(*(t.unsqueeze(0) for t in (x, y, x, y)))).predict(x.unsqueeze(0)).mean.shape == (1, 5, 1)
    with pytest.raises(ValueError, match=r"first layer \(Conv2d\) reads points of 3 dimension"):
        conv().adapt(Task(x[0], y, x[0], y))


def test_learner_options_are_checked_at_construction():
    model = SinusoidTasks("finn").make_model
    for algo in ("gem-bml+", "abml"):
        for n in (0, -3):
            with pytest.raises(ValueError, match=re.escape(f"{algo}: option predict_samples must be an integer >= 1")):
                algorithms.create(algo, model(), predict_samples=n)
    for algo in ("gem-bml+", "maml", "bmaml"):
        with pytest.raises(ValueError, match="option vectorize must be True, False or 'auto', got 'no'"):
            algorithms.create(algo, model(), vectorize="no")
        for bad in ("gaussian", nn.MSELoss()):
            with pytest.raises(TypeError, match="option likelihood must be a gemext.vi.GaussianLikelihood"):
                algorithms.create(algo, model(), likelihood=bad)
    # errors name the user's option, not the inner VIConfig
    with pytest.raises(ValueError, match=re.escape("gem-bml+: option query_steps must be >= 0, got -2")):
        algorithms.create("gem-bml+", model(), query_steps=-2)
    with pytest.raises(ValueError, match="kl-chaser: option query_steps must be >= 0, got -2"):
        algorithms.create("kl-chaser", model(), query_steps=-2)
    with pytest.raises(ValueError, match=re.escape("gem-bml+: option inner_steps must be >= 0, got -1")):
        algorithms.create("gem-bml+", model(), inner_steps=-1)
    with pytest.raises(ValueError, match=r"option inner has unknown key\(s\) lrr; valid: steps, optimizer, lr"):
        algorithms.create("gem-bml+", model(), inner={"lrr": 1})
    with pytest.raises(ValueError, match="abml: option inner: mc_samples must be >= 1, got 0"):
        algorithms.create("abml", model(), inner={"mc_samples": 0})


def test_options_a_variant_ignores_are_refused():
    for name, ignored, users in [("maml", ("reg", "cg_steps"), "imaml"), ("fomaml", ("reg", "cg_steps"), "imaml"),
                                 ("reptile", ("beta", "learn_sigma", "sigma0_range", "predict_samples"),
                                  "gem-bml, gem-bml+")]:
        assert not set(ignored) & set(algorithms.option_names(name))
        for option in ignored:
            value = {"sigma0_range": "shrink"}.get(option, 1)
            with pytest.raises(ValueError, match=re.escape(f"{name}: option {option} is used only by {users}, not by")):
                algorithms.create(name, SinusoidTasks("finn").make_model(), **{option: value})
    assert {"reg", "cg_steps"} <= set(algorithms.option_names("imaml"))
    assert {"beta", "learn_sigma", "sigma0_range", "predict_samples"} <= set(algorithms.option_names("gem-bml"))
    algorithms.create("imaml", SinusoidTasks("finn").make_model(), reg=2.0, cg_steps=3)


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.body = kind, nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        out = self.body(x)
        return (out, out) if self.kind == "tuple" else {"out": out}


@pytest.mark.parametrize("algo", ["gem-bml+", "maml", "reptile"])
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_that_does_not_return_a_tensor_is_named(algo, kind):
    learner = algorithms.create(algo, _Returns(kind), inner_steps=1)
    with pytest.raises(TypeError, match=f"model must return a tensor, got {kind}"):
        learner.meta_backward(_sinusoid_batch(2))


def test_inputs_of_the_wrong_type_or_dtype_are_named():
    np = pytest.importorskip("numpy")
    b = _sinusoid_batch(2)
    learner = algorithms.create("gem-bml+", SinusoidTasks("finn").make_model().double(), inner_steps=1)
    with pytest.raises(TypeError, match=r"tasks.x_support has dtype torch.float32 but the model's weights are "
                                        r"torch.float64: convert it with .to\(torch.float64\)"):
        learner.meta_backward(b)
    d = Task(*(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query)))
    with pytest.raises(TypeError, match="tasks.x_query has dtype torch.float32"):
        learner.meta_backward(Task(d.x_support, d.y_support, b.x_query, d.y_query))
    learner.meta_backward(d)
    with pytest.raises(TypeError, match="support: x has dtype torch.float32"):
        learner.adapt((b.x_support[0], b.y_support[0]))
    pred = learner.adapt((d.x_support[0], d.y_support[0]))
    with pytest.raises(TypeError, match="predict: x has dtype torch.float32"):
        pred.predict(b.x_query[0])
    with pytest.raises(TypeError, match="predict: x: expected a torch.Tensor, got list"):
        pred.predict(d.x_query[0].tolist())
    with pytest.raises(TypeError, match="support: x: expected a torch.Tensor, got numpy.ndarray"):
        learner.adapt((np.asarray(d.x_support[0]), d.y_support[0]))
    with pytest.raises(TypeError, match="tasks.y_support: expected a torch.Tensor, got numpy.ndarray"):
        learner.meta_backward(Task(d.x_support, np.asarray(d.y_support), d.x_query, d.y_query))
    mlp = algorithms.create("maml", SinusoidTasks("finn").make_model(), inner_steps=1)
    with pytest.raises(TypeError, match=r"x_support has dtype torch.int64 but the model.s first layer \(Linear\)"):
        mlp.meta_backward(Task(b.x_support.long(), b.y_support, b.x_query.long(), b.y_query))
    # integer inputs are what an embedding reads
    emb = algorithms.create("maml", nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 1)), inner_steps=1)
    ids = torch.randint(0, 5, (2, 4))
    emb.meta_backward(Task(ids, torch.randn(2, 4, 1), ids, torch.randn(2, 4, 1)))


def test_von_on_a_model_without_cheap_curvature_rows_says_so_before_it_runs():
    # BatchNorm couples the points, so von's rows would take one backward per data point: the learner
    # warns at creation, naming the cheaper inner VI; the pointwise and MLP paths and NGVI do not warn
    import warnings

    from gemext.tasks.vision import Conv4
    from gemext.vi import CategoricalLikelihood

    def created(name, model, **kw):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            algorithms.create(name, model, likelihood=CategoricalLikelihood(), **kw)
        ours = [w for w in seen if "Gauss-Newton rows" in str(w.message)]
        assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]  # names the caller's line
        return [str(w.message) for w in ours]

    conv = lambda: Conv4(1, 3, hidden=4, image_size=16)
    for name in ("gem-bml+", "gem-bml"):
        (msg,) = created(name, conv())
        assert msg.startswith(f"{name}: the inner VI 'von'") and "optimizer='ngvi'" in msg
    assert created("abml", conv(), inner={"optimizer": "von"})
    assert not created("gem-bml+", conv(), inner={"optimizer": "ngvi"})
    assert not created("reptile", conv())
    pointwise_conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 14 * 14, 3))
    assert not created("gem-bml+", pointwise_conv)
    assert not created("gem-bml+", nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
