"""gemext.ops against the float64 reference: values, gradients, torch.library contracts,
torch.compile, randomness, argument errors and (when a GPU is present) CUDA-vs-CPU parity.

Tolerances: float64 kernels agree with the reference to ~1e-12 relative; float32 kernels to
2e-5 of the magnitude of the formula's terms (`scale` below), since cancellation between terms
(e.g. σ²/σ₀² − 1 near 1) costs absolute, not relative, accuracy, and ε (a cosine times a radius)
is accurate to a few ulps of 1, not of itself.
"""
from __future__ import annotations

import pytest
import torch
from tolerances import RTOL, assert_close  # noqa: F401

from gemext import _C, ops
from gemext import reference as R

DTYPES = [torch.float32, torch.float64]
HAS_CUDA = torch.cuda.is_available() and _C.cuda
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or gemext built without CUDA)")


def make_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """n shapes with odd sizes, empties and scalars mixed in."""
    g = torch.Generator().manual_seed(seed)
    pool = [(0,), (1,), (3, 5), (7,), (2, 0, 3), (), (13, 3), (129,), (4, 1, 9)]
    return [pool[int(torch.randint(len(pool), (), generator=g))] for _ in range(n)]


def rand_lists(shapes, dtype, k: int, lo: float = -3.0, hi: float = 1.0, seed: int = 0):
    """k lists of tensors: even lists ~ N(0,1) (means), odd lists uniform in [lo, hi] (log-σ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(k):
        if j % 2 == 0:
            out.append([torch.randn(s, generator=g, dtype=dtype) for s in shapes])
        else:
            out.append([torch.empty(s, dtype=dtype).uniform_(lo, hi, generator=g) for s in shapes])
    return out


def f64(ts):
    return [t.double() for t in ts]



# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ntensors", [1, 200])
def test_sample(dtype, ntensors):
    mu, rho = rand_lists(make_shapes(ntensors), dtype, 2)
    theta = ops.sample(mu, rho, 11, 3)
    expected = R.sample(f64(mu), f64(rho), 11, 3)
    eps = R._noise_like(mu, 11, 3)  # ε is accurate to ~1 ulp absolute, not relative
    scale = [m.double().abs() + torch.exp(r.double()) * (e.double().abs() + 1) for m, r, e in zip(mu, rho, eps)]
    assert_close(theta, expected, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ntensors", [1, 200])
@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_elbo_backward(dtype, ntensors, beta):
    g, rho, mu, rho0, mu0 = rand_lists(make_shapes(ntensors), dtype, 5)
    d_mu, d_rho = ops.elbo_backward(g, mu, rho, mu0, rho0, 5, 9, beta)
    e_mu, e_rho = R.elbo_backward(f64(g), f64(mu), f64(rho), f64(mu0), f64(rho0), 5, 9, beta)
    eps = R._noise_like(mu, 5, 9)
    G, M, P, M0, P0, E = (f64(x) for x in (g, mu, rho, mu0, rho0, eps))
    s_mu = [gg.abs() + beta * (m - m0).abs() * torch.exp(-2 * p0) for gg, m, m0, p0 in zip(G, M, M0, P0)]
    s_rho = [gg.abs() * (e.abs() + 1) * torch.exp(p) + beta * (torch.exp(2 * (p - p0)) + 1)
             for gg, e, p, p0 in zip(G, E, P, P0)]
    assert_close(d_mu, e_mu, s_mu, dtype)
    assert_close(d_rho, e_rho, s_rho, dtype)
    # in-place form writes the same values into given buffers, also when they alias grad_theta
    out_mu, out_rho = [torch.full_like(t, 7.0) for t in mu], [torch.full_like(t, 7.0) for t in rho]
    ops.elbo_backward_(out_mu, out_rho, g, mu, rho, mu0, rho0, 5, 9, beta)
    assert all(torch.equal(a, b) for a, b in zip(out_mu + out_rho, d_mu + d_rho))
    g2 = [t.clone() for t in g]
    ops.elbo_backward_(g2, out_rho, g2, mu, rho, mu0, rho0, 5, 9, beta)
    assert all(torch.equal(a, b) for a, b in zip(g2, d_mu))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ntensors", [1, 200])
def test_gaussian_kl(dtype, ntensors):
    mu, rho, mu0, rho0 = rand_lists(make_shapes(ntensors), dtype, 4)
    kl = ops.gaussian_kl(mu, rho, mu0, rho0)
    expected = R.gaussian_kl(f64(mu), f64(rho), f64(mu0), f64(rho0))
    M, P, M0, P0 = f64(mu), f64(rho), f64(mu0), f64(rho0)
    scale = sum(((p0 - p).abs() + torch.exp(2 * (p - p0)) + (m - m0) ** 2 * torch.exp(-2 * p0) + 1).sum()
                for m, p, m0, p0 in zip(M, P, M0, P0))
    assert kl.dtype == dtype and kl.shape == ()
    assert abs(kl.double() - expected) <= RTOL[dtype] * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("ntensors", [1, 200])
def test_gem_grad(dtype, plus, ntensors):
    mu0, rho0, mu_a, rho_a, mu_b, rho_b = rand_lists(make_shapes(ntensors), dtype, 6)
    extra = (mu_b, rho_b) if plus else (None, None)
    g_mu, g_rho = ops.gem_grad(mu0, rho0, mu_a, rho_a, *extra)
    e_mu, e_rho = R.gem_grad(f64(mu0), f64(rho0), f64(mu_a), f64(rho_a),
                             *(f64(x) if x is not None else None for x in extra))
    M0, P0, MA, PA, MB, PB = (f64(x) for x in (mu0, rho0, mu_a, rho_a, mu_b, rho_b))
    inv = [torch.exp(-2 * p0) for p0 in P0]
    if plus:
        s_mu = [((a - m0).abs() + (b - m0).abs()) * i for a, b, m0, i in zip(MA, MB, M0, inv)]
        s_rho = [((a - m0) ** 2 + (b - m0) ** 2) * i + torch.exp(2 * (pa - p0)) + torch.exp(2 * (pb - p0))
                 for a, b, m0, i, pa, pb, p0 in zip(MA, MB, M0, inv, PA, PB, P0)]
    else:
        s_mu = [(a - m0).abs() * i for a, m0, i in zip(MA, M0, inv)]
        s_rho = [(a - m0) ** 2 * i + torch.exp(2 * (pa - p0)) + 1 for a, m0, i, pa, p0 in zip(MA, M0, inv, PA, P0)]
    assert_close(g_mu, e_mu, s_mu, dtype)
    assert_close(g_rho, e_rho, s_rho, dtype)
    # in place: buffers += weight * ĝ
    b_mu, b_rho = [torch.ones_like(t) for t in mu0], [torch.full_like(t, -2.0) for t in rho0]
    ops.gem_grad_(b_mu, b_rho, mu0, rho0, mu_a, rho_a, *extra, weight=-0.25)
    assert_close(b_mu, [1 - 0.25 * e for e in e_mu], [0.25 * s + 1 for s in s_mu], dtype)
    assert_close(b_rho, [-2 - 0.25 * e for e in e_rho], [0.25 * s + 2 for s in s_rho], dtype)


# ----------------------------------------------------------------------------- gem_grad_ over tasks
def _gem_scales(M0, P0, MA, PA, MB=None, PB=None):
    """Magnitudes of the terms of ĝ (float64; the prior broadcasts over a task dimension)."""
    inv = torch.exp(-2 * P0)
    if MB is None:
        return (MA - M0).abs() * inv, (MA - M0) ** 2 * inv + torch.exp(2 * (PA - P0)) + 1
    return (((MA - M0).abs() + (MB - M0).abs()) * inv,
            ((MA - M0) ** 2 + (MB - M0) ** 2) * inv + torch.exp(2 * (PA - P0)) + torch.exp(2 * (PB - P0)))


def _task_inputs(shapes, dtype, T, plus, seed=0):
    """Prior lists (μ₀, ρ₀) of `shapes` and posterior lists [μa, ρa(, μb, ρb)] of shapes (T, *shape)."""
    mu0, rho0 = rand_lists(shapes, dtype, 2, seed=seed)
    post = rand_lists([(T, *s) for s in shapes], dtype, 4 if plus else 2, seed=seed + 1)
    return mu0, rho0, post


def _opt(post, plus):
    """The (mu_b, rho_b) arguments: the posterior's λ_b lists, or None for GEM-BML."""
    return tuple(post[2:4]) if plus else (None, None)


TASK_SHAPES = make_shapes(12, seed=7) + [(2, 1029), (3, 0), ()]  # odd sizes, empties, scalars, > 1 block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("T", [1, 7])
def test_gem_grad_task_sum_matches_reference(dtype, plus, T):
    """Posteriors [T, *prior]: g += weight·Σ_t ĝ(prior, posterior_t), against the float64 reference
    (the prior broadcast over T, ĝ per task, summed over dim 0)."""
    mu0, rho0, post = _task_inputs(TASK_SHAPES, dtype, T, plus, seed=11)
    b_mu, b_rho = [torch.full_like(t, 0.5) for t in mu0], [torch.full_like(t, -2.0) for t in rho0]
    ops.gem_grad_(b_mu, b_rho, mu0, rho0, post[0], post[1], *_opt(post, plus), weight=-0.25)
    e_mu, e_rho = [torch.full_like(t, 0.5) for t in f64(mu0)], [torch.full_like(t, -2.0) for t in f64(rho0)]
    P = [f64(x) for x in post]
    R.gem_grad_(e_mu, e_rho, f64(mu0), f64(rho0), P[0], P[1], *_opt(P, plus), weight=-0.25)
    scales = [_gem_scales(*xs) for xs in zip(f64(mu0), f64(rho0), *P)]  # [T, *shape] each
    s_mu = [0.25 * sm.sum(0) + 0.5 for sm, _ in scales]
    s_rho = [0.25 * sr.sum(0) + 2.0 for _, sr in scales]
    assert_close(b_mu, e_mu, s_mu, dtype)
    assert_close(b_rho, e_rho, s_rho, dtype)
    # a single Tensor (not a list) works the same way
    i = TASK_SHAPES.index((2, 1029))
    one_mu, one_rho = torch.full_like(mu0[i], 0.5), torch.full_like(rho0[i], -2.0)
    ops.gem_grad_(one_mu, one_rho, mu0[i], rho0[i], post[0][i], post[1][i],
                  *(x[i] if x is not None else None for x in _opt(post, plus)), weight=-0.25)
    assert torch.equal(one_mu, b_mu[i]) and torch.equal(one_rho, b_rho[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", [False, True])
def test_gem_grad_task_sum_equals_same_shape_calls(dtype, plus):
    """The reduced call is the sum of T same-shape calls: exactly the per-task ĝ added in the order
    t = 0 .. T-1 in the dtype (weight 1, zero buffers), for any thread count; with a weight and
    non-zero buffers, T in-place same-shape calls to rounding; with T = 1, bitwise the same-shape
    call on the only slice."""
    T = 7
    shapes = TASK_SHAPES + [(70_001,)]  # 7 x 70k element-steps: several chunks, run in parallel
    mu0, rho0, post = _task_inputs(shapes, dtype, T, plus, seed=3)
    per_task = [ops.gem_grad(mu0, rho0, *[[p[t] for p in x] for x in post]) for t in range(T)]
    expect = [[per_task[0][k][i].clone() for i in range(len(shapes))] for k in (0, 1)]
    for t in range(1, T):
        for k in (0, 1):
            expect[k] = [e + g for e, g in zip(expect[k], per_task[t][k])]
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            b_mu, b_rho = [torch.zeros_like(t) for t in mu0], [torch.zeros_like(t) for t in rho0]
            ops.gem_grad_(b_mu, b_rho, mu0, rho0, post[0], post[1], *_opt(post, plus))
            for k, got in enumerate((b_mu, b_rho)):
                for i, (a, e) in enumerate(zip(got, expect[k])):
                    assert torch.equal(a, e), (threads, k, i)
    finally:
        torch.set_num_threads(old)
    # weight and accumulation into non-zero buffers: T same-shape gem_grad_ calls, to rounding
    b_mu, b_rho = [torch.full_like(t, 0.5) for t in mu0], [torch.full_like(t, -2.0) for t in rho0]
    s_mu, s_rho = [t.clone() for t in b_mu], [t.clone() for t in b_rho]
    ops.gem_grad_(b_mu, b_rho, mu0, rho0, post[0], post[1], *_opt(post, plus), weight=-0.3)
    for t in range(T):
        sl = [[p[t] for p in x] for x in post]
        ops.gem_grad_(s_mu, s_rho, mu0, rho0, sl[0], sl[1], *_opt(sl, plus), weight=-0.3)
    scales = [_gem_scales(*xs) for xs in zip(f64(mu0), f64(rho0), *(f64(x) for x in post))]
    assert_close(b_mu, f64(s_mu), [0.3 * sm.sum(0) + 0.5 for sm, _ in scales], dtype)
    assert_close(b_rho, f64(s_rho), [0.3 * sr.sum(0) + 2.0 for _, sr in scales], dtype)
    # T = 1: bitwise the element-wise call
    one = [[p[:1].contiguous() for p in x] for x in post]
    sl = [[p[0] for p in x] for x in post]
    r_mu, r_rho = [torch.full_like(t, 0.5) for t in mu0], [torch.full_like(t, -2.0) for t in rho0]
    s_mu, s_rho = [t.clone() for t in r_mu], [t.clone() for t in r_rho]
    ops.gem_grad_(r_mu, r_rho, mu0, rho0, one[0], one[1], *_opt(one, plus), weight=-0.3)
    ops.gem_grad_(s_mu, s_rho, mu0, rho0, sl[0], sl[1], *_opt(sl, plus), weight=-0.3)
    assert all(torch.equal(a, b) for a, b in zip(r_mu + r_rho, s_mu + s_rho))


def test_gem_grad_task_sum_refuses_bad_shapes():
    a, b = torch.zeros(4, 3), torch.zeros(2)
    s = lambda *shape: torch.zeros(shape)  # noqa: E731
    cases = [  # (g_mu0, g_rho0, mu0, rho0, mu_a, rho_a[, mu_b, rho_b]), message
        ((a, a, a, a, s(7, 4, 4), s(7, 4, 4)),
         r"gem_grad_: mu_a has shape \(7, 4, 4\) but mu0 has \(4, 3\); expected \(4, 3\) or "
         r"\(T, 4, 3\) with a leading task dimension T"),
        ((a, a, a, a, s(2, 7, 4, 3), s(2, 7, 4, 3)), r"mu_a has shape \(2, 7, 4, 3\) but mu0 has \(4, 3\)"),
        ((a, a, a, a, s(4, 3, 7), s(4, 3, 7)), r"mu_a has shape \(4, 3, 7\) but mu0 has \(4, 3\)"),
        ((s(), s(), s(), s(), s(3), s(3, 1)),
         r"rho_a has shape \(3, 1\) but mu0 has \(\); expected \(\) or \(T,\) with a leading task"),
        ((a, a, a, a, s(7, 4, 3), a),
         r"rho_a has no task dimension \(shape \(4, 3\)\) but mu_a has a task dimension T = 7 "
         r"\(shape \(7, 4, 3\)\); every posterior tensor must have the same leading task dimension"),
        (([a, b], [a, b], [a, b], [a, b], [s(7, 4, 3), s(5, 2)], [s(7, 4, 3), s(5, 2)]),
         r"mu_a\[1\] has a task dimension T = 5 \(shape \(5, 2\)\) but mu_a\[0\] has a task dimension T = 7"),
        (([a, b], [a, b], [a, b], [a, b], [s(7, 4, 3), b], [s(7, 4, 3), b]),
         r"mu_a\[1\] has no task dimension \(shape \(2,\)\) but mu_a\[0\] has a task dimension T = 7"),
        ((a, a, a, a, s(7, 4, 3), s(7, 4, 3), s(6, 4, 3), s(6, 4, 3)),
         r"mu_b has a task dimension T = 6 \(shape \(6, 4, 3\)\) but mu_a has a task dimension T = 7"),
        ((a, a, a, a, s(0, 4, 3), s(0, 4, 3)),
         r"gem_grad_: mu_a has shape \(0, 4, 3\): a task dimension of size 0; T must be >= 1"),
        ((s(7, 4, 3), a, a, a, s(7, 4, 3), s(7, 4, 3)),  # outputs and prior keep the prior's shape
         r"g_mu0 has shape \(7, 4, 3\) but mu0 has \(4, 3\)$"),
        ((a, a, a, s(7, 4, 3), s(7, 4, 3), s(7, 4, 3)), r"rho0 has shape \(7, 4, 3\) but mu0 has \(4, 3\)$"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ops.gem_grad_(*args)
    # the functional (differentiable) gem_grad has no task sum: posteriors keep the prior's shape
    with pytest.raises(ValueError, match=r"gem_grad: mu_a has shape \(7, 4, 3\) but mu0 has \(4, 3\)$"):
        ops.gem_grad(a, a, s(7, 4, 3), s(7, 4, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_rho_stays_finite(dtype):
    """ρ, ρ₀ in [−20, 10]: σ²/σ₀² reaches e^60, 1/σ₀² e^40; nothing may overflow."""
    shapes = [(1000,), (37,)]
    mu, rho, mu0, rho0, mu_b, rho_b = rand_lists(shapes, dtype, 6, lo=-20.0, hi=10.0, seed=3)
    for t in (rho, rho0):
        t[0][:4] = torch.tensor([-20.0, 10.0, -20.0, 10.0], dtype=dtype)
    rho0[0][:4] = torch.tensor([10.0, -20.0, -20.0, 10.0], dtype=dtype)
    outs = [*ops.gem_grad(mu0, rho0, mu, rho, mu_b, rho_b), *ops.gem_grad(mu0, rho0, mu, rho),
            *ops.elbo_backward(mu_b, mu, rho, mu0, rho0, 1, 2), ops.sample(mu, rho, 1, 2),
            [ops.gaussian_kl(mu, rho, mu0, rho0)]]
    assert all(torch.isfinite(t).all() for ts in outs for t in ts)
    kl = ops.gaussian_kl(mu, rho, mu0, rho0).double()
    expected = R.gaussian_kl(f64(mu), f64(rho), f64(mu0), f64(rho0))
    assert abs(kl - expected) <= 1e-5 * expected
    g_mu, g_rho = ops.gem_grad(mu0, rho0, mu, rho)
    e_mu, e_rho = R.gem_grad(f64(mu0), f64(rho0), f64(mu), f64(rho))
    for a, e in zip(g_mu + g_rho, e_mu + e_rho):
        assert ((a.double() - e).abs() <= 1e-5 * (e.abs() + 1)).all()


def test_single_tensor_and_empty_inputs():
    mu = torch.randn(4, 3)
    assert isinstance(ops.sample(mu, mu, 1, 0), torch.Tensor)
    d_mu, d_rho = ops.elbo_backward(mu, mu, mu, mu, mu, 1, 0)
    assert isinstance(d_mu, torch.Tensor) and d_rho.shape == (4, 3)
    assert ops.sample([], [], 1, 0) == []
    assert ops.gem_grad([], [], [], []) == ([], [])
    assert ops.gaussian_kl([], [], [], []).item() == 0.0
    ops.gem_grad_([], [], [], [], [], [])
    e = torch.empty(0, 5)
    assert ops.sample(e, e, 1, 0).shape == (0, 5)
    assert ops.gaussian_kl([e], [e], [e], [e]).item() == 0.0


def test_kl_is_independent_of_thread_count():
    mu, rho, mu0, rho0 = rand_lists([(300_001,), (77_777,)], torch.float32, 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gaussian_kl(mu, rho, mu0, rho0)
        torch.set_num_threads(2)
        two = ops.gaussian_kl(mu, rho, mu0, rho0)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


# ----------------------------------------------------------------------------- randomness
def test_seed_offset_and_global_indexing():
    mu, rho = rand_lists([(5, 7), (1,), (130,)], torch.float32, 2)
    a = ops.sample(mu, rho, 42, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, ops.sample(mu, rho, 42, 0)))
    for seed, offset in [(43, 0), (42, 1), (42 + 2**32, 0), (42, 2**32)]:
        b = ops.sample(mu, rho, seed, offset)
        assert not torch.equal(a[2], b[2]), (seed, offset)
    # a list is one stream over the concatenation of its tensors
    flat = ops.sample(torch.cat([m.reshape(-1) for m in mu]), torch.cat([r.reshape(-1) for r in rho]), 42, 0)
    assert torch.equal(torch.cat([x.reshape(-1) for x in a]), flat)


def test_new_seed_reproducible():
    torch.manual_seed(3)
    s1 = ops.new_seed()
    torch.manual_seed(3)
    assert ops.new_seed() == s1 and 0 <= s1 < 2**63
    assert ops.new_seed(torch.Generator().manual_seed(1)) == ops.new_seed(torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- autograd
def _grad_inputs(shapes, k, seed=0):
    return [[t.requires_grad_() for t in ts] for ts in rand_lists(shapes, torch.float64, k, seed=seed)]


def test_gradcheck_sample():
    mu, rho = _grad_inputs([(3, 2), (5,)], 2)
    assert torch.autograd.gradcheck(lambda *x: tuple(ops.sample(list(x[:2]), list(x[2:]), 7, 1)),
                                    (*mu, *rho))


def test_gradcheck_gaussian_kl():
    mu, rho, mu0, rho0 = _grad_inputs([(3, 2), (5,)], 4)
    assert torch.autograd.gradcheck(
        lambda *x: ops.gaussian_kl(list(x[0:2]), list(x[2:4]), list(x[4:6]), list(x[6:8])),
        (*mu, *rho, *mu0, *rho0))


@pytest.mark.parametrize("plus", [False, True])
def test_gradcheck_gem_grad(plus):
    lists = _grad_inputs([(3, 2), (4,)], 6 if plus else 4)

    def fn(*x):
        ls = [list(x[2 * i:2 * i + 2]) for i in range(len(lists))]
        g_mu, g_rho = ops.gem_grad(*ls)
        return (*g_mu, *g_rho)

    flat = [t for ts in lists for t in ts]
    assert torch.autograd.gradcheck(fn, flat)
    assert torch.autograd.gradgradcheck(fn, flat)


def test_sample_backward_matches_elbo_backward_without_prior_term():
    mu, rho = rand_lists([(6,), (9, 2)], torch.float64, 2)
    mu = [m.requires_grad_() for m in mu]
    rho = [r.requires_grad_() for r in rho]
    g = [torch.randn_like(m) for m in mu]
    theta = ops.sample(mu, rho, 3, 4)
    torch.autograd.backward(theta, g)
    d_mu, d_rho = ops.elbo_backward(g, mu, rho, mu, rho, 3, 4, beta=0.0)
    for a, b in zip([m.grad for m in mu] + [r.grad for r in rho], d_mu + d_rho):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- torch.library
def _opcheck_cases():
    f = torch.float64
    mu, rho, mu0, rho0, ma, ra = rand_lists([(3, 2), (5,)], f, 6)
    rg = lambda ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    out = lambda: [torch.zeros_like(t) for t in mu]  # noqa: E731
    G = torch.ops.gemext
    return {
        "sample": (G.sample.default, (rg(mu), rg(rho), 3, 1)),
        "reparam_grad": (G.reparam_grad.default, (mu, rho, 3, 1)),
        "elbo_backward": (G.elbo_backward.default, (mu, mu, rho, mu0, rho0, 3, 1, 0.5)),
        "elbo_backward_": (G.elbo_backward_.default, (out(), out(), mu, mu, rho, mu0, rho0, 3, 1, 0.5)),
        "gaussian_kl": (G.gaussian_kl.default, (rg(mu), rg(rho), rg(mu0), rg(rho0))),
        "gaussian_kl_backward": (G.gaussian_kl_backward.default,
                                 (mu, rho, mu0, rho0, torch.tensor(1.5, dtype=f))),
        "gem_grad": (G.gem_grad.default, (rg(mu0), rg(rho0), rg(mu), rg(rho), [], [])),
        "gem_grad_plus": (G.gem_grad.default, (rg(mu0), rg(rho0), rg(mu), rg(rho), rg(ma), rg(ra))),
        "gem_grad_": (G.gem_grad_.default, (out(), out(), mu0, rho0, mu, rho, ma, ra, -0.5)),
        "gem_grad_tasks": (G.gem_grad_.default, (out(), out(), mu0, rho0, *[[torch.stack([t, 2 * t, t - 1]) for t in x]
                                                                             for x in (mu, rho, ma, ra)], -0.5)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    mu, rho, mu0, rho0 = rand_lists([(4, 3), (7,)], torch.float32, 4)
    buf_mu, buf_rho = [torch.zeros_like(t) for t in mu], [torch.zeros_like(t) for t in mu]

    def step(mu, rho, mu0, rho0, buf_mu, buf_rho):
        theta = ops.sample(mu, rho, 5, 0)
        loss_grad = [2 * t for t in theta]
        d_mu, d_rho = ops.elbo_backward(loss_grad, mu, rho, mu0, rho0, 5, 0, 0.5)
        ops.gem_grad_(buf_mu, buf_rho, mu0, rho0, d_mu, d_rho, weight=-0.5)
        return ops.gaussian_kl(mu, rho, mu0, rho0) + sum(t.sum() for t in theta)

    eager_bufs = [[torch.zeros_like(t) for t in mu] for _ in range(2)]
    expected = step(mu, rho, mu0, rho0, *eager_bufs)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(mu, rho, mu0, rho0, buf_mu, buf_rho)
    torch.testing.assert_close(got, expected)
    for a, b in zip(buf_mu + buf_rho, eager_bufs[0] + eager_bufs[1]):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    a, b = torch.zeros(4, 3), torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"gem_grad: rho0\[1\] has shape \(4, 5\) but mu0\[1\] has \(4, 3\)"):
        ops.gem_grad([a, a], [a, b], [a, a], [a, a])
    with pytest.raises(ValueError, match="rho has 1 tensors but mu has 2"):
        ops.sample([a, a], [a], 1, 0)
    with pytest.raises(TypeError, match=r"rho0 has dtype torch.float64 but mu has torch.float32"):
        ops.gaussian_kl(a, a, a, a.double())
    with pytest.raises(TypeError, match=r"mu has dtype torch.int64"):
        ops.sample(a.long(), a.long(), 1, 0)
    with pytest.raises(ValueError, match=r"mu0\[0\] is not contiguous"):
        ops.gem_grad([torch.zeros(3, 4).t()], [a], [a], [a])
    with pytest.raises(TypeError, match=r"rho\[1\] is int"):
        ops.sample([a, a], [a, 3], 1, 0)
    with pytest.raises(TypeError, match="mu must be a Tensor or a list"):
        ops.sample("x", a, 1, 0)
    with pytest.raises(TypeError, match="rho must be a Tensor like mu"):
        ops.sample(a, [a], 1, 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        ops.sample(a, a, -1, 0)
    with pytest.raises(ValueError, match="offset must be in"):
        ops.sample(a, a, 0, 2**63)
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.sample(a, a, 1.5, 0)
    with pytest.raises(TypeError, match="beta must be a real number"):
        ops.elbo_backward(a, a, a, a, a, 1, 0, beta="1")
    with pytest.raises(ValueError, match="mu_b and rho_b must be given together"):
        ops.gem_grad(a, a, a, a, mu_b=a)
    with pytest.raises(ValueError, match=r"g_rho0 has shape \(4, 5\) but mu0 has \(4, 3\)"):
        ops.gem_grad_(a, b, a, a, a, a)
    with pytest.raises(ValueError, match="is on meta but mu is on cpu"):
        ops.sample(a, torch.zeros(4, 3, device="meta"), 1, 0)


# ----------------------------------------------------------------------------- CUDA parity
def _to(ts, device):
    return [t.to(device) for t in ts]


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bitwise(dtype):
    """Same element-wise maths with explicit fma on both sides: bitwise-equal ε and results."""
    shapes = make_shapes(200, seed=5) + [(1 << 17,), (3, 50_001)]
    g, rho, mu, rho0, mu0, rho_b = rand_lists(shapes, dtype, 6, seed=4)
    # a view at an odd element offset exercises the unaligned (scalar) path
    base = torch.randn(1001, dtype=dtype)
    g.append(base[1:])
    mu.append(base[1:] * 0.5)
    rho.append(-base[1:].abs())
    mu0.append(torch.zeros(1000, dtype=dtype))
    rho0.append(torch.zeros(1000, dtype=dtype))
    rho_b.append(torch.ones(1000, dtype=dtype))
    cpu = [ops.sample(mu, rho, 9, 2), *ops.elbo_backward(g, mu, rho, mu0, rho0, 9, 2, 0.5),
           *ops.gem_grad(mu0, rho0, mu, rho), *ops.gem_grad(mu0, rho0, mu, rho, g, rho_b)]
    d = "cuda"
    gpu = [ops.sample(_to(mu, d), _to(rho, d), 9, 2),
           *ops.elbo_backward(_to(g, d), _to(mu, d), _to(rho, d), _to(mu0, d), _to(rho0, d), 9, 2, 0.5),
           *ops.gem_grad(_to(mu0, d), _to(rho0, d), _to(mu, d), _to(rho, d)),
           *ops.gem_grad(_to(mu0, d), _to(rho0, d), _to(mu, d), _to(rho, d), _to(g, d), _to(rho_b, d))]
    for k, (a, b) in enumerate(zip(cpu, gpu)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y.cpu()), (k, i)
    # gem_grad_ summed over a leading task dimension (one thread per element, t in order): the
    # last tensor's posteriors at an odd element offset, and numel % 4 != 0, take the scalar path
    T = 5
    post = rand_lists([(T, *s.shape) for s in mu0], dtype, 4, seed=6)

    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)

    for plus in (False, True):
        res = []
        for dev in ("cpu", d):
            p = [[t.to(dev) for t in x[:-1]] + [misaligned(x[-1].to(dev))] for x in post]
            b_mu = [t.to(dev, copy=True) for t in g]
            b_rho = [t.to(dev, copy=True) for t in rho_b]
            ops.gem_grad_(b_mu, b_rho, _to(mu0, dev), _to(rho0, dev), p[0], p[1], *_opt(p, plus), weight=-0.3)
            res.append([t.cpu() for t in b_mu + b_rho])
        for i, (x, y) in enumerate(zip(*res)):
            assert torch.equal(x, y), (plus, i)
    kl_c = ops.gaussian_kl(mu, rho, mu0, rho0)
    kl_g = ops.gaussian_kl(_to(mu, d), _to(rho, d), _to(mu0, d), _to(rho0, d))
    # the reduction order differs (CPU chunks vs CUDA blocks); both accumulate in float64
    torch.testing.assert_close(kl_g.cpu(), kl_c, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    kl_g2 = ops.gaussian_kl(_to(mu, d), _to(rho, d), _to(mu0, d), _to(rho0, d))
    assert torch.equal(kl_g, kl_g2)  # deterministic on the GPU


@cuda_only
def test_cuda_autograd_inplace_and_long_lists():
    d, f = "cuda", torch.float64
    mu, rho, mu0, rho0 = (_to(x, d) for x in rand_lists(make_shapes(600, seed=2), f, 4))
    mu = [m.requires_grad_() for m in mu]
    kl = ops.gaussian_kl(mu, rho, mu0, rho0)  # 600 tensors: more than one launch
    expected = R.gaussian_kl(mu, rho, mu0, rho0)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    kl.backward()
    for m, m0, p0 in zip(mu, mu0, rho0):
        torch.testing.assert_close(m.grad, (m - m0).detach() * torch.exp(-2 * p0))
    buf = [torch.ones_like(t) for t in mu0]
    buf2 = [torch.ones_like(t) for t in mu0]
    ops.gem_grad_(buf, buf2, mu0, rho0, [m.detach() for m in mu], rho, weight=2.0)
    e_mu, e_rho = R.gem_grad(mu0, rho0, [m.detach() for m in mu], rho)
    for a, e in zip(buf + buf2, e_mu + e_rho):
        torch.testing.assert_close(a, 1 + 2 * e)
    # the same over a task dimension (T = 3), GEM-BML+: several launches, against the reference
    post = [_to(x, d) for x in rand_lists([(3, *t.shape) for t in mu0], f, 4, seed=8)]
    got = [[torch.ones_like(t) for t in mu0] for _ in range(2)]
    exp = [[torch.ones_like(t) for t in mu0] for _ in range(2)]
    ops.gem_grad_(*got, mu0, rho0, *post, weight=2.0)
    R.gem_grad_(*exp, mu0, rho0, *post, weight=2.0)
    for a, e in zip(got[0] + got[1], exp[0] + exp[1]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_inplace_ops_bump_version_counters():
    """The eager fast path (no dispatcher) must still tell autograd that buffers changed."""
    a = [torch.randn(3), torch.randn(4)]
    buf, buf2 = [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(4)]
    before = [t._version for t in buf + buf2]
    ops.gem_grad_(buf, buf2, a, a, a, a)
    ops.elbo_backward_(buf, buf2, a, a, a, a, a, 1, 0)
    assert all(t._version >= v + 2 for t, v in zip(buf + buf2, before))
