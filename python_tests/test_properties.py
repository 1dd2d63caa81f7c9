"""Property-based tests (hypothesis) of the fused ops and the task samplers: random shapes, dtypes,
empty tensors, non-contiguous views, NaN/Inf, extreme ρ, noise start indices. Every generated input
either gives what gemext.reference computes (inputs left untouched) or raises the documented
TypeError/ValueError naming the argument. The number of generated inputs is printed at the end
(run with -s) and written to $GEMEXT_PROPERTY_COUNT when set."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemext import ops, reference
from gemext.tasks import Task, as_batch
from gemext.tasks.sinusoid import PRESETS, SinusoidTasks
from gemext.vi import RHO_MAX, RHO_MIN, clamp_rho_

torch.set_num_threads(1)
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TRIED: Counter = Counter()
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    total = sum(TRIED.values())
    print(f"\nproperty tests: {total} generated inputs ({dict(TRIED)})")
    if os.environ.get("GEMEXT_PROPERTY_COUNT"):
        with open(os.environ["GEMEXT_PROPERTY_COUNT"], "w") as f:
            json.dump({"total": total, **TRIED}, f)


shapes_st = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@st.composite
def lists_of(draw, k: int, lo: float, hi: float, special: bool = False):
    """k lists of same-shaped tensors, one dtype; values in [lo, hi], optionally with NaN/±Inf."""
    shapes, dtype = draw(shapes_st), draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ts = []
        for s in shapes:
            t = lo + (hi - lo) * torch.rand(s, generator=g, dtype=torch.float64)
            if special and t.numel():
                mask = torch.rand(s, generator=g) < 0.2
                pick = torch.randint(0, 3, s, generator=g)
                t = torch.where(mask, torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[pick], t)
            ts.append(t.to(dtype))
        out.append(ts)
    return out


def _close(got, ref, dtype, what: str) -> None:
    """Equal NaN pattern; elsewhere equal within tolerance relative to the tensor's magnitude."""
    for a, b in zip(got, ref):
        a, b = a.double(), b.double()
        assert torch.equal(a.isnan(), b.isnan()), what
        fin = b.isfinite()
        assert torch.equal(a[~fin & ~b.isnan()], b[~fin & ~b.isnan()]), what  # same infinities
        if fin.any():
            scale = 1.0 + float(b[fin].abs().max())
            torch.testing.assert_close(a[fin], b[fin], rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=what)


def _unchanged(before, after) -> bool:
    return all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(before, after))


@SETTINGS
@given(lists_of(2, RHO_MIN, RHO_MAX), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), st.data())
def test_sample_matches_reference_with_random_starts(lists, seed, offset, data):
    TRIED["sample"] += 1
    mu, rho = lists
    mu = [m * 50 for m in mu]
    starts = data.draw(st.none() | st.lists(st.integers(0, 2**40), min_size=len(mu), max_size=len(mu)))
    before = [t.clone() for t in mu + rho]
    got = ops.sample(mu, rho, seed, offset, starts)
    ref = reference.sample([t.double() for t in mu], [t.double() for t in rho], seed, offset, starts)
    _close(got, ref, mu[0].dtype, "sample")
    assert _unchanged(before, mu + rho)


@SETTINGS
@given(lists_of(5, RHO_MIN, RHO_MAX), st.integers(0, 2**62), st.floats(0, 10))
def test_elbo_backward_and_kl_match_reference_in_the_safe_rho_range(lists, seed, beta):
    TRIED["elbo_backward+kl"] += 1
    g, mu, rho, mu0, rho0 = lists
    dtype = mu[0].dtype
    d_mu, d_rho = ops.elbo_backward(g, mu, rho, mu0, rho0, seed, 3, beta)
    ref = reference.elbo_backward(*([t.double() for t in ts] for ts in lists), seed, 3, beta)
    # finite everywhere inside [RHO_MIN, RHO_MAX]: the documented safe range (gemext.vi)
    assert all(bool(t.isfinite().all()) for t in d_mu + d_rho)
    _close(d_mu, ref[0], dtype, "elbo_backward mu")
    # dρ = gεσ + β(σ²/σ₀² − 1) cancels: compare against the size of its terms
    for a, b, gt, r, r0 in zip(d_rho, ref[1], g, rho, rho0):
        r, r0 = r.double(), r0.double()
        terms = 6 * gt.double().abs() * r.exp() + beta * (2 * (r - r0)).exp() + beta  # |ε| < 6
        scale = 1 + (float(terms.max()) if terms.numel() else 0.0)
        torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    kl = ops.gaussian_kl(mu, rho, mu0, rho0)
    kl_ref = reference.gaussian_kl(*([t.double() for t in ts] for ts in (mu, rho, mu0, rho0)))
    terms = sum(float(reference.kl_terms(*(t.double() for t in xs)).abs().sum()) for xs in zip(mu, rho, mu0, rho0))
    assert math.isfinite(float(kl)) and abs(float(kl) - float(kl_ref)) <= TOL[dtype] * (1 + terms)


@SETTINGS
@given(lists_of(6, -3, 1, special=True), st.booleans())
def test_gem_grad_propagates_nan_inf_like_the_reference(lists, plus):
    TRIED["gem_grad(nan/inf)"] += 1
    mu0, rho0, ma, ra, mb, rb = lists
    dtype = mu0[0].dtype
    got = ops.gem_grad(mu0, rho0, ma, ra, mb if plus else None, rb if plus else None)
    d = [[t.double() for t in ts] for ts in lists]
    ref = reference.gem_grad(*d[:4], d[4] if plus else None, d[5] if plus else None)
    # the kernel forms σ²/σ₀² as exp(2(ρ−ρ₀)): where an input is not finite, compare NaN-ness of the
    # finite-input elements only (inf−inf vs inf/inf orderings legitimately differ)
    ok = [torch.stack([t[i].double().isfinite() for t in lists]).all(0) if lists[0][i].numel() else
          torch.zeros(lists[0][i].shape, dtype=torch.bool) for i in range(len(mu0))]
    _close([a[m] for a, m in zip(got[0] + got[1], ok + ok)], [b[m] for b, m in zip(ref[0] + ref[1], ok + ok)],
           dtype, "gem_grad")


@SETTINGS
@given(lists_of(2, -90, 90), st.integers(0, 2**62))
def test_extreme_rho_sample_never_invents_nan(lists, seed):
    """σ = exp(ρ) under/overflows to 0 / inf for extreme ρ; θ is then μ or ±inf, never NaN."""
    TRIED["sample(extreme rho)"] += 1
    mu, rho = lists
    theta = ops.sample(mu, rho, seed, 0)
    assert not any(bool(t.isnan().any()) for t in theta)
    clamped = [r.clone() for r in rho]
    clamp_rho_(clamped)
    assert all(bool(((c >= RHO_MIN) & (c <= RHO_MAX)).all()) for c in clamped)
    assert all(torch.equal(c[(r >= RHO_MIN) & (r <= RHO_MAX)], r[(r >= RHO_MIN) & (r <= RHO_MAX)])
               for c, r in zip(clamped, rho))


def test_clamp_keeps_nan_for_the_guards():
    r = torch.tensor([math.nan, -1e9, 1e9, 0.5])
    clamp_rho_([r])
    assert r.isnan()[0] and r[1:].tolist() == [RHO_MIN, RHO_MAX, 0.5]


bad_tensor_st = st.sampled_from(["int", "half", "bf16", "noncontig", "shape", "device", "notensor", "len"])


@SETTINGS
@given(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3),
       st.sampled_from(DTYPES), bad_tensor_st, st.integers(0, 4), st.sampled_from(["sample", "elbo_backward",
                                                                                    "gaussian_kl", "gem_grad_"]))
def test_bad_arguments_raise_the_documented_error_naming_it(shapes, dtype, kind, which, op):
    TRIED["bad argument"] += 1
    names = {"sample": ["mu", "rho"], "elbo_backward": ["grad_theta", "mu", "rho", "mu0", "rho0"],
             "gaussian_kl": ["mu", "rho", "mu0", "rho0"],
             "gem_grad_": ["g_mu0", "g_rho0", "mu0", "rho0", "mu_a", "rho_a"]}[op]
    args = [[torch.zeros(s, dtype=dtype) for s in shapes] for _ in names]
    i = which % len(names)
    if i == 0 and kind in ("shape", "len", "noncontig", "device"):
        i = 1  # the first argument is the reference the others are checked against
    bad = args[i]
    if kind == "int":
        bad[0] = bad[0].long()
    elif kind == "half":
        bad[0] = bad[0].half()
    elif kind == "bf16":
        bad[0] = bad[0].bfloat16()
    elif kind == "noncontig":
        bad[0] = (torch.zeros(*bad[0].shape, 2, dtype=dtype)[..., 0] if bad[0].numel() > 1
                  else bad[0].reshape(1).expand(2))  # one element: a size-1 dim is always contiguous
    elif kind == "shape":
        bad[0] = torch.zeros(bad[0].numel() + 1, dtype=dtype)
    elif kind == "device":
        bad[0] = bad[0].to("meta")
    elif kind == "notensor":
        bad[0] = bad[0].tolist()
    else:
        args[i] = bad[:-1] if len(bad) > 1 else bad + bad
    call = {"sample": lambda a: ops.sample(*a, 1, 0), "elbo_backward": lambda a: ops.elbo_backward(*a, 1, 0, 1.0),
            "gaussian_kl": lambda a: ops.gaussian_kl(*a), "gem_grad_": lambda a: ops.gem_grad_(*a)}[op]
    expected = TypeError if kind in ("int", "half", "bf16", "notensor") else ValueError
    with pytest.raises(expected) as info:
        call(args)
    assert names[i] in str(info.value) or names[0] in str(info.value), str(info.value)


@SETTINGS
@given(st.integers(0, 2**62), st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.integers(-5, -1),
                                        st.integers(2**63, 2**64)))
def test_bad_seed_offset_beta(seed, bad):
    TRIED["bad scalar"] += 1
    a = torch.zeros(3)
    with pytest.raises((TypeError, ValueError), match="offset"):
        ops.sample(a, a, seed, bad)
    with pytest.raises((TypeError, ValueError), match="seed"):
        ops.elbo_backward(a, a, a, a, a, bad, 0, 1.0)
    if not isinstance(bad, (int, float)):
        with pytest.raises(TypeError, match="beta"):
            ops.elbo_backward(a, a, a, a, a, seed, 0, bad)


# ----------------------------------------------------------------------------- task samplers
@SETTINGS
@given(st.integers(1, 40), st.sampled_from(sorted(PRESETS)), st.integers(0, 2**32), st.sampled_from(["train", "test"]),
       st.one_of(st.none(), st.integers(1, 12)), st.one_of(st.none(), st.integers(1, 12)))
def test_sinusoid_sampler_is_deterministic_and_well_formed(n, preset, seed, split, shots, query):
    TRIED["sinusoid sample"] += 1
    fam = SinusoidTasks(preset)
    c = fam.config
    b = fam.sample(n, torch.Generator().manual_seed(seed), split, shots, query)
    again = fam.sample(n, torch.Generator().manual_seed(seed), split, shots, query)
    k, q = shots or c.shots, query or c.query
    assert b.x_support.shape == (n, k, 1) and b.x_query.shape == (n, q, 1) and len(b) == n
    for name in ("x_support", "y_support", "x_query", "y_query"):
        t = getattr(b, name)
        assert t.dtype == torch.float32 and bool(t.isfinite().all()) and torch.equal(t, getattr(again, name))
    x = torch.cat([b.x_support, b.x_query], 1)
    assert bool(((x >= c.x_range[0]) & (x <= c.x_range[1])).all())
    bound = c.amplitude[1] * (1 + 6 * c.noise)  # |A sin| plus (at most) 6σ of noise
    assert float(torch.cat([b.y_support, b.y_query], 1).abs().max()) <= bound
    assert as_batch(b) is b and len(b[0:n]) == n


@SETTINGS
@given(st.one_of(st.integers(-3, 0), st.floats(0.5, 3), st.text(max_size=2), st.booleans()),
       st.sampled_from(["n", "shots", "query"]))
def test_sinusoid_sampler_rejects_bad_sizes(bad, which):
    TRIED["sinusoid bad size"] += 1
    args = {"n": 3, "shots": None, "query": None, which: bad}
    with pytest.raises((TypeError, ValueError), match=which):
        SinusoidTasks("finn").sample(args["n"], torch.Generator(), "train", args["shots"], args["query"])


@SETTINGS
@given(st.sampled_from(["x_support", "y_support", "x_query", "y_query"]), st.sampled_from([math.nan, math.inf]),
       st.integers(1, 5))
def test_task_batches_with_nan_or_inf_are_refused_naming_the_field(field, value, n):
    TRIED["task nan/inf"] += 1
    b = SinusoidTasks("finn").sample(n, torch.Generator().manual_seed(n))
    t = getattr(b, field).clone()
    t.view(-1)[0] = value
    bad = Task(**{**{f: getattr(b, f) for f in ("x_support", "y_support", "x_query", "y_query")}, field: t})
    with pytest.raises(ValueError, match=f"tasks.{field} contains NaN or Inf"):
        as_batch(bad)


# ----------------------------------------------------------------------------- command line
INT_FLAGS = {("train", "--iterations"): 1, ("train", "--inner-steps"): 0, ("train", "--seed"): 0,
             ("train", "--ways"): 1, ("train", "--shots"): 1, ("train", "--meta-batch"): 1,
             ("train", "--log-every"): 1, ("train", "--checkpoint-every"): 1, ("train", "--eval-tasks"): 1,
             ("train", "--eval-steps"): 0, ("eval", "--tasks"): 1, ("eval", "--steps"): 0,
             ("bench", "--repeats"): 1}
BASE = {"train": ["train", "sinusoid", "--algo", "gem-bml+", "--no-progress"], "eval": ["eval", "."],
        "bench": ["bench", "memory", "--out", "unused"]}


class _Reached(Exception):
    pass


def _cli_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `gemext argv`; a bad input must never get as far as running."""
    import gemext.bench_memory
    import gemext.train
    from gemext import cli

    def reached(*a, **k):
        raise _Reached(argv)
    saved = gemext.train.train, gemext.train.evaluate, gemext.bench_memory.run
    gemext.train.train = gemext.train.evaluate = gemext.bench_memory.run = reached
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        gemext.train.train, gemext.train.evaluate, gemext.bench_memory.run = saved
    return code, capsys.readouterr().err


@SETTINGS
@given(flag=st.sampled_from(sorted(INT_FLAGS)), data=st.data())
def test_cli_int_flags_reject_bad_values_with_exit_2(flag, data, capsys):
    TRIED["cli bad flag"] += 1
    (cmd, name), least = flag, INT_FLAGS[flag]
    bad = data.draw(st.one_of(st.integers(-10**6, least - 1).map(str),
                              st.sampled_from(["", "x", "1.5", "1e3", "--", "0x"]),
                              st.text("abc!-", min_size=1, max_size=4)))
    code, err = _cli_exit(BASE[cmd] + [f"{name}={bad}"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("gemext") and "error:" in last and name in last, err


@SETTINGS
@given(argv=st.sampled_from([["train", "sinusoid", "--algo", "gem-bml+", "--meta-lr"],
                        ["bench", "memory", "--out", "x", "--inner-steps"],
                        ["train", "sinusoid", "--algo", "gem-bml+", "--options"],
                        ["train", "sinusoid", "--algo"], ["train", "sinusoid", "--algo", "gem-bml+", "--device"],
                        ["bench", "memory", "--out", "x", "--task"],
                        ["train", "sinusoid", "--algo", "gem-bml+", "--data-root"],
                        ["bench", "memory", "--out", "x", "--algos"]]),
       bad=st.sampled_from(["0", "-1", "nan", "inf", "x", "[1]", "1,,-2", "/no/such/dir", "nope", "-0.0"]))
def test_cli_other_flags_reject_bad_values_with_exit_2(argv, bad, capsys):
    TRIED["cli bad flag"] += 1
    if argv[-1] == "--options" and bad in ("0", "-1", "nan", "inf", "-0.0"):
        bad = "[" + bad  # JSON scalars are valid JSON: make it invalid
    if argv[-1] == "--inner-steps" and bad in ("0",):
        return  # a valid list
    code, err = _cli_exit(argv + [bad], capsys)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2 and last.startswith("gemext") and "error:" in last, (argv, bad, err)
