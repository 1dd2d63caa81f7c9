"""gemext.ops.von_step_ (one variational online Newton step, in place) against the float64
reference: values with and without curv/correction/starts, the regenerated ε, NaN propagation,
argument errors, torch.library contracts, torch.compile and (with a GPU) CUDA-vs-CPU parity.

Tolerances as in test_ops.py: float64 to ~1e-12 relative; float32 to 2e-5 of the magnitude of
the formula's terms (`_scales`), since ε is accurate to a few ulps of 1, not of itself, and the
curvature estimate carries that absolute error into h' and both denominators.
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
SEED, OFFSET = 17, 5
# (lr, beta, h_decay, damping): a damped EMA step, and a full replacement of h without damping
HYPERS = [(0.1, 0.5, 0.3, 1e-3), (1.0, 0.2, 1.0, 0.0)]


def make_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """n shapes with odd sizes, empties and scalars mixed in."""
    g = torch.Generator().manual_seed(seed)
    pool = [(0,), (1,), (3, 5), (7,), (2, 0, 3), (), (13, 3), (129,), (4, 1, 9)]
    return [pool[int(torch.randint(len(pool), (), generator=g))] for _ in range(n)]


class State:
    """Inputs of one call: ρ, ρ₀ uniform in [-3, 1], h and curv in [0, 2), the rest ~ N(0, 1)."""

    def __init__(self, shapes, dtype, seed: int = 0, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)

        def normal():
            return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]

        def uniform(lo, hi):
            return [torch.empty(s, dtype=dtype).uniform_(lo, hi, generator=g).to(device)
                    for s in shapes]

        self.mu, self.grad, self.mu0, self.correction = normal(), normal(), normal(), normal()
        self.rho, self.rho0 = uniform(-3.0, 1.0), uniform(-3.0, 1.0)
        self.h, self.curv = uniform(0.0, 2.0), uniform(0.0, 2.0)

    def clone(self, device=None) -> State:
        new = object.__new__(State)
        for k, v in vars(self).items():
            setattr(new, k, [t.clone() if device is None else t.to(device) for t in v])
        return new

    def call(self, curv: bool, corr: bool, hyper, seed=SEED, offset=OFFSET, starts=None,
             single: bool = False) -> None:
        """ops.von_step_ on these tensors (updates mu, rho, h)."""
        pick = (lambda ts: ts[0]) if single else (lambda ts: ts)
        ops.von_step_(pick(self.mu), pick(self.rho), pick(self.h), pick(self.grad),
                      pick(self.curv) if curv else None, pick(self.mu0), pick(self.rho0), seed,
                      offset, *hyper, correction=pick(self.correction) if corr else None,
                      starts=starts)


def f64(ts):
    return [t.double() for t in ts]


def _expected(s: State, curv: bool, corr: bool, hyper, starts=None):
    """Reference (μ', ρ', h') in float64 with the kernels' ε for the op's dtype, and the scales."""
    eps = f64(R._noise_like(s.mu, SEED, OFFSET, starts))
    mu, rho, h, g, c, mu0, rho0, cor = (f64(x) for x in (s.mu, s.rho, s.h, s.grad, s.curv, s.mu0,
                                                         s.rho0, s.correction))
    lr, beta, decay, damping = hyper
    out = R.von_step(mu, rho, h, g, c if curv else None, mu0, rho0, SEED, OFFSET, *hyper,
                     correction=cor if corr else None, eps=eps)
    scales = [[], [], []]
    for i in range(len(mu)):
        c_scale = c[i] if curv else g[i].abs() * (eps[i].abs() + 1) * torch.exp(-rho[i])
        s_h = (1 - decay) * h[i] + decay * c_scale
        lam0 = beta * torch.exp(-2 * rho0[i])
        prec = lam0 + out[2][i]
        den = lam0 + damping + (0 if corr else out[2][i])
        num = g[i].abs() + lam0 * (mu[i] - mu0[i]).abs() + (cor[i].abs() if corr else 0)
        scales[0].append(mu[i].abs() + lr * num / den * (1 + (0 if corr else s_h / den)))
        scales[1].append(1 + out[1][i].abs() + s_h / prec)
        scales[2].append(s_h)
    return out, scales



# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["single", "list", "starts"])
@pytest.mark.parametrize("curv", [False, True], ids=["estimate", "curv"])
@pytest.mark.parametrize("corr", [False, True], ids=["plain", "correction"])
@pytest.mark.parametrize("hyper", HYPERS, ids=["ema", "replace"])
def test_von_step_matches_reference(dtype, layout, curv, corr, hyper):
    shapes = [(13, 3)] if layout == "single" else make_shapes(200)
    # starts: a shard of a larger batch, at offsets that are not multiples of 4
    starts = [1001 + 37 * i for i in range(len(shapes))] if layout == "starts" else None
    s = State(shapes, dtype)
    (e_mu, e_rho, e_h), (s_mu, s_rho, s_h) = _expected(s, curv, corr, hyper, starts)
    read_only = s.clone()
    s.call(curv, corr, hyper, starts=starts, single=layout == "single")
    assert_close(s.h, e_h, s_h, dtype)
    assert_close(s.rho, e_rho, s_rho, dtype)
    assert_close(s.mu, e_mu, s_mu, dtype)
    for k in ("grad", "curv", "mu0", "rho0", "correction"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(s, k), getattr(read_only, k))), k


def test_large_tensors_and_thread_count():
    """Several CPU chunks and the OpenMP path: same bits with 1 and 2 threads, and the reference."""
    s = State([(300_001,), (77_777,)], torch.float32, seed=3)
    one, two = s.clone(), s.clone()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one.call(False, False, HYPERS[0])
        torch.set_num_threads(2)
        two.call(False, False, HYPERS[0])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one.mu + one.rho + one.h, two.mu + two.rho + two.h):
        assert torch.equal(a, b)
    (e_mu, e_rho, e_h), (s_mu, s_rho, s_h) = _expected(s, False, False, HYPERS[0])
    assert_close(one.h, e_h, s_h, torch.float32)
    assert_close(one.rho, e_rho, s_rho, torch.float32)
    assert_close(one.mu, e_mu, s_mu, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("starts", [None, [3, 1000, 2**40 + 1]])
def test_regenerated_eps_is_the_eps_of_sample(dtype, starts):
    """With ρ = 0, h = 0, h_decay = 1 and g = ±1, h' = max(±ε, 0) exactly, so two calls reveal
    ε bit for bit; it must be the ε that ops.sample drew for the same (seed, offset, starts)."""
    shapes = [(5, 7), (1,), (130,)]
    zeros = [torch.zeros(sh, dtype=dtype) for sh in shapes]
    theta = ops.sample(zeros, zeros, 99, 2**33 + 7, starts)  # μ = 0, σ = 1: θ = ε exactly
    h_pos, h_neg = [], []
    for sign, out in ((1.0, h_pos), (-1.0, h_neg)):
        mu, rho, h = ([torch.zeros(sh, dtype=dtype) for sh in shapes] for _ in range(3))
        g = [torch.full(sh, sign, dtype=dtype) for sh in shapes]
        ops.von_step_(mu, rho, h, g, None, zeros, zeros, 99, 2**33 + 7, lr=0.5, beta=1.0,
                      h_decay=1.0, damping=0.0, starts=starts)
        out += h
    for e, hp, hn in zip(theta, h_pos, h_neg):
        assert (hp >= 0).all() and (hn >= 0).all()
        assert torch.equal(hp - hn, e)
    # and a different offset gives different noise
    mu, rho, h = ([torch.zeros(130, dtype=dtype)] for _ in range(3))
    ops.von_step_(mu, rho, h, [torch.ones(130, dtype=dtype)], None, [torch.zeros(130, dtype=dtype)],
                  [torch.zeros(130, dtype=dtype)], 99, 2**33 + 8, 0.5, 1.0, 1.0, 0.0)
    assert not torch.equal(h[0], h_pos[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curv", [False, True], ids=["estimate", "curv"])
@pytest.mark.parametrize("corr", [False, True], ids=["plain", "correction"])
def test_nan_propagates(dtype, curv, corr):
    """A NaN in any input reaches exactly the outputs whose formula reads it, element by element
    (no fast-math: max(NaN, 0) stays NaN), and never a neighbouring element."""
    n = 40
    s = State([(n,)], dtype, seed=7)
    names = ["mu", "rho", "h", "grad", "curv", "mu0", "rho0", "correction"]
    for k, name in enumerate(names):  # NaN in element 4k+1 of input `name`
        getattr(s, name)[0][4 * k + 1] = float("nan")
    expected, _ = _expected(s, curv, corr, HYPERS[0])
    s.call(curv, corr, HYPERS[0])
    got = (s.mu[0], s.rho[0], s.h[0])
    for out, a, e in zip(("mu", "rho", "h"), got, expected):
        assert torch.equal(torch.isnan(a), torch.isnan(e[0])), out
        ok = ~torch.isnan(e[0])
        assert torch.allclose(a[ok].double(), e[0][ok], rtol=1e-4, atol=1e-5), out
    nan = {out: set(torch.nonzero(torch.isnan(a)).flatten().tolist()) for out, a in
           zip(("mu", "rho", "h"), got)}
    el = {name: 4 * k + 1 for k, name in enumerate(names)}
    # h' reads h and c; c reads curv, or g and ρ (through ε/σ)
    c_inputs = ["curv"] if curv else ["grad", "rho"]
    assert nan["h"] == {el[x] for x in ["h"] + c_inputs}
    assert nan["rho"] == {el[x] for x in ["h", "rho0"] + c_inputs}
    mu_inputs = ["mu", "grad", "mu0", "rho0"] + (["correction"] if corr else ["h"] + c_inputs)
    assert nan["mu"] == {el[x] for x in mu_inputs}


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    a, b = torch.zeros(4, 3), torch.zeros(4, 5)
    ok = dict(seed=1, offset=0, lr=0.1, beta=1.0, h_decay=0.5, damping=0.0)

    def call(mu=a, rho=a, h=a, grad=a, curv=None, mu0=a, rho0=a, **kw):
        args = {**ok, **kw}
        ops.von_step_(mu, rho, h, grad, curv, mu0, rho0, args.pop("seed"), args.pop("offset"),
                      args.pop("lr"), args.pop("beta"), args.pop("h_decay"), args.pop("damping"),
                      **args)

    with pytest.raises(TypeError, match=r"von_step_: h has dtype torch.int64 but mu has torch.float32"):
        call(h=a.long())
    with pytest.raises(TypeError, match=r"von_step_: mu has dtype torch.float16; expected"):
        call(mu=a.half())
    with pytest.raises(TypeError, match=r"correction has dtype torch.float64 but mu has torch.float32"):
        call(correction=a.double())
    with pytest.raises(ValueError, match=r"von_step_: curv has shape \(4, 5\) but mu has \(4, 3\)"):
        call(curv=b)
    with pytest.raises(ValueError, match=r"von_step_: rho0\[1\] has shape \(4, 5\) but mu\[1\] has \(4, 3\)"):
        call(mu=[a, a], rho=[a, a], h=[a, a], grad=[a, a], mu0=[a, a], rho0=[a, b])
    with pytest.raises(ValueError, match="von_step_: grad has 1 tensors but mu has 2"):
        call(mu=[a, a], rho=[a, a], h=[a, a], grad=[a], mu0=[a, a], rho0=[a, a])
    with pytest.raises(ValueError, match=r"von_step_: correction is not contiguous"):
        call(correction=torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match=r"von_step_: h is not contiguous"):
        call(h=torch.zeros(3, 4).t())
    with pytest.raises(TypeError, match="von_step_: curv must be a Tensor like mu"):
        call(curv=[a])
    for name, bad in [("h_decay", 0.0), ("h_decay", 1.5), ("h_decay", float("nan")),
                      ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("beta", -0.5),
                      ("damping", -1e-8)]:
        with pytest.raises(ValueError, match=f"von_step_: {name} must be"):
            call(**{name: bad})
    with pytest.raises(TypeError, match="von_step_: lr must be a real number"):
        call(lr="0.1")
    with pytest.raises(ValueError, match=r"von_step_: seed must be in \[0, 2\*\*63\)"):
        call(seed=-1)
    with pytest.raises(TypeError, match="von_step_: offset must be an int"):
        call(offset=0.5)
    with pytest.raises(ValueError, match="von_step_: starts has 2 entries but there are 1 tensors"):
        call(mu=[a], rho=[a], h=[a], grad=[a], mu0=[a], rho0=[a], starts=[0, 12])


def test_rejected_call_leaves_state_untouched():
    s = State([(6,), (9,)], torch.float32)
    before = s.clone()
    with pytest.raises(ValueError, match="h_decay"):
        ops.von_step_(s.mu, s.rho, s.h, s.grad, None, s.mu0, s.rho0, 1, 0, 0.1, 1.0, 0.0, 0.0)
    for k in vars(s):
        assert all(torch.equal(x, y) for x, y in zip(getattr(s, k), getattr(before, k))), k


def test_empty_list_and_version_counters():
    ops.von_step_([], [], [], [], None, [], [], 1, 0, 0.1, 1.0, 0.5, 0.0)
    s = State([(3,), (4,)], torch.float32)
    mutated, read = s.mu + s.rho + s.h, s.grad + s.mu0 + s.rho0
    before = [t._version for t in mutated + read]
    s.call(False, False, HYPERS[0])  # eager fast path: no dispatcher, the versions still move
    after = [t._version for t in mutated + read]
    assert all(a > b for a, b in zip(after[:len(mutated)], before))
    assert after[len(mutated):] == before[len(mutated):]


# ----------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("variant", ["estimate", "curv", "correction", "curv+correction", "starts"])
def test_opcheck(variant):
    s = State([(3, 2), (5,)], torch.float64)
    curv = s.curv if "curv" in variant else []
    corr = s.correction if "correction" in variant else []
    args = (s.mu, s.rho, s.h, s.grad, curv, s.mu0, s.rho0, corr, 3, 1, 0.1, 0.5, 0.3, 1e-3)
    if variant == "starts":
        args += ([5, 1],)
    torch.library.opcheck(torch.ops.gemext.von_step_.default, args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    s = State([(4, 3), (7,)], torch.float32, seed=2)
    eager = s.clone()

    def step(mu, rho, h, mu0, rho0):
        theta = ops.sample(mu, rho, 5, 0)
        grad = [2 * t for t in theta]  # ∂/∂θ of Σθ²
        ops.von_step_(mu, rho, h, grad, None, mu0, rho0, 5, 0, 0.1, 0.5, 0.3, 1e-3)
        return sum(t.sum() for t in theta)

    expected = step(eager.mu, eager.rho, eager.h, eager.mu0, eager.rho0)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s.mu, s.rho, s.h, s.mu0, s.rho0)
    torch.testing.assert_close(got, expected)
    for a, b in zip(s.mu + s.rho + s.h, eager.mu + eager.rho + eager.h):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- CUDA parity
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curv", [False, True], ids=["estimate", "curv"])
@pytest.mark.parametrize("corr", [False, True], ids=["plain", "correction"])
def test_cuda_matches_cpu_bitwise(dtype, curv, corr):
    """Same element-wise maths with explicit fma on both sides: bitwise-equal results, on the
    aligned vector path, the scalar path (odd starts, an unaligned view) and in long lists."""
    shapes = make_shapes(300, seed=5) + [(1 << 17,), (3, 50_001)]  # 300 tensors: two launches
    cpu = State(shapes, dtype, seed=4)
    view = torch.randn(1001, dtype=dtype)[1:]  # odd element offset: not 16-byte aligned
    cpu.mu.append(view)
    for name in ("rho", "h", "grad", "curv", "mu0", "rho0", "correction"):
        getattr(cpu, name).append(getattr(cpu, name)[-1][0, :1000].clone())
    starts_list = [None, [7 + 11 * i for i in range(len(cpu.mu))]]
    for starts in starts_list:
        c = cpu.clone()
        g = cpu.clone("cuda")
        g.mu[-1] = torch.randn(1001, dtype=dtype, device="cuda")[1:]
        g.mu[-1].copy_(c.mu[-1])
        c.call(curv, corr, HYPERS[0], starts=starts)
        g.call(curv, corr, HYPERS[0], starts=starts)
        for name in ("mu", "rho", "h"):
            for i, (x, y) in enumerate(zip(getattr(c, name), getattr(g, name))):
                assert torch.equal(x, y.cpu()), (name, i, starts is None)
