"""Fused gemext kernels vs eager PyTorch, torch._foreach_* and torch.compile.

Script mode (writes DIR/kernels.md and DIR/kernels.json, prints the table last):

    python benchmarks/bench_kernels.py --out benchmarks/out [--sizes 1e5,1e6,1e7]
        [--tensors 10,200] [--device cpu|cuda] [--ops sample,elbo_backward,gaussian_kl,gem_grad+,von_step]

pytest-benchmark mode: ``pytest benchmarks/bench_kernels.py`` (10^6 weights in 10 tensors).

For each op, N weights split over T float32 tensors, rows:
- eager:    gemext.reference formulas, writing into preallocated buffers where the op is in
            place; ε stored for elbo_backward and von_step (eager cannot regenerate Philox noise cheaply),
            torch.randn_like for sample;
- foreach:  the same maths with torch._foreach_* over the list;
- compile:  torch.compile(dynamic=True) of the eager per-tensor formula, writing into the
            preallocated outputs (compiled once, called per tensor from Python);
- fused:    gemext.ops (one call for the whole list).
Effective GB/s use the minimum bytes per weight (docs/DESIGN.md §5): sample 12, elbo_backward 28,
gaussian_kl 16, gem_grad+ in place 40, von_step in place (curvature estimated from ε, no
correction) 36. The reference bandwidth is STREAM triad a = b + s·c on
64M float32 (CPU) or tensor.copy_ (CUDA), alternated call by call with each timed op.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

# Inductor's background compile workers would compete with the timed kernels for the cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from common import machine  # noqa: E402

from gemext import ops  # noqa: E402
from gemext import reference as R  # noqa: E402

BYTES = {"sample": 12, "elbo_backward": 28, "gaussian_kl": 16, "gem_grad+": 40, "von_step": 36}
SEED, OFFSET, BETA, WEIGHT = 1234, 0, 0.5, -0.25
LR, H_DECAY, DAMPING = 0.1, 0.3, 1e-3  # von_step: repeated steps converge, so timing loops stay finite


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, budget_s: float = 1.0,
                min_reps: int = 5, max_reps: int = 50) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth_probe(device: str) -> tuple[str, int, Callable[[], object]]:
    """(name, bytes moved, call) of triad a = b + s·c (CPU, 64M float32) or of a
    device-to-device copy (CUDA)."""
    n = 64 * 2**20
    b, c = torch.randn(n, device=device), torch.randn(n, device=device)
    a = torch.empty_like(b)
    if device == "cuda":
        return "copy", 8 * n, lambda: a.copy_(b)
    return "triad", 12 * n, lambda: torch.add(b, c, alpha=3.0, out=a)


def paired_times(fn: Callable[[], object], ref: Callable[[], object], device: str,
                 budget_s: float = 1.0, min_reps: int = 5,
                 max_reps: int = 50) -> tuple[list[float], list[float]]:
    """Times of fn and of the bandwidth reference, alternated call by call. A shared host's
    memory bandwidth drifts by up to 2× within a minute here, so each op is compared with the
    reference measured beside it, not with one taken at the start of the run."""
    once = median_time(fn, device, budget_s=0.0, min_reps=1, max_reps=1)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    t_fn, t_ref = [], []
    for _ in range(reps):
        for f, acc in ((fn, t_fn), (ref, t_ref)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return t_fn, t_ref


# ----------------------------------------------------------------------------- workloads
def split_sizes(n: int, t: int) -> list[int]:
    return [n // t + (1 if i < n % t else 0) for i in range(t)]


class Workload:
    """Preallocated float32 inputs and output buffers for one (N, T) configuration."""

    def __init__(self, n: int, t: int, device: str):
        gen = torch.Generator(device=device).manual_seed(0)
        sizes = split_sizes(n, t)

        def lst(lo: float = -1.0, hi: float = 0.0, normal: bool = False) -> list[torch.Tensor]:
            if normal:
                return [torch.randn(s, device=device, generator=gen) for s in sizes]
            return [torch.empty(s, device=device).uniform_(lo, hi, generator=gen) for s in sizes]

        self.mu, self.mu0, self.mu_b, self.g = (lst(normal=True) for _ in range(4))
        self.rho, self.rho0, self.rho_b = lst(-3, -1), lst(-3, -1), lst(-3, -1)
        self.eps = lst(normal=True)
        self.out1, self.out2 = lst(), lst()
        # von_step updates its own copy of the posterior, so the other ops' inputs stay fixed
        self.v_mu, self.v_rho, self.v_h = ([t.clone() for t in self.mu], [t.clone() for t in self.rho],
                                           lst(0, 1))


def _eager(op: str, w: Workload) -> Callable[[], object]:
    if op == "sample":
        return lambda: [o.copy_(m + torch.exp(r) * torch.randn_like(m))
                        for o, m, r in zip(w.out1, w.mu, w.rho)]
    if op == "elbo_backward":
        return lambda: R.elbo_backward_(w.out1, w.out2, w.g, w.mu, w.rho, w.mu0, w.rho0, SEED,
                                        OFFSET, BETA, eps=w.eps)
    if op == "gaussian_kl":
        return lambda: R.gaussian_kl(w.mu, w.rho, w.mu0, w.rho0)
    if op == "von_step":
        return lambda: R.von_step_(w.v_mu, w.v_rho, w.v_h, w.g, None, w.mu0, w.rho0, SEED, OFFSET,
                                   LR, BETA, H_DECAY, DAMPING, eps=w.eps)
    return lambda: R.gem_grad_(w.out1, w.out2, w.mu0, w.rho0, w.mu, w.rho, w.mu_b, w.rho_b,
                               weight=WEIGHT)


def _foreach(op: str, w: Workload) -> Callable[[], object]:
    F = torch

    def sample():
        noise = [torch.randn_like(m) for m in w.mu]
        F._foreach_copy_(w.out1, F._foreach_add(w.mu, F._foreach_mul(F._foreach_exp(w.rho), noise)))

    def elbo():
        sig = F._foreach_exp(w.rho)
        inv0 = F._foreach_exp(F._foreach_mul(w.rho0, -2.0))
        d = F._foreach_mul(F._foreach_sub(w.mu, w.mu0), inv0)
        F._foreach_copy_(w.out1, F._foreach_add(w.g, d, alpha=BETA))
        ratio = F._foreach_mul(F._foreach_mul(sig, sig), inv0)
        F._foreach_sub_(ratio, 1.0)
        F._foreach_copy_(w.out2, F._foreach_add(F._foreach_mul(F._foreach_mul(w.g, w.eps), sig),
                                                ratio, alpha=BETA))

    def kl():
        inv0 = F._foreach_exp(F._foreach_mul(w.rho0, -2.0))
        d = F._foreach_sub(w.mu, w.mu0)
        t = F._foreach_add(F._foreach_exp(F._foreach_mul(w.rho, 2.0)), F._foreach_mul(d, d))
        t = F._foreach_mul(F._foreach_mul(t, inv0), 0.5)
        t = F._foreach_add(F._foreach_sub(t, w.rho), w.rho0)
        return torch.stack([x.sum() for x in t]).sum() - 0.5 * sum(x.numel() for x in w.mu)

    def gem():
        inv0 = F._foreach_exp(F._foreach_mul(w.rho0, -2.0))
        F._foreach_add_(w.out1, F._foreach_mul(F._foreach_sub(w.mu, w.mu_b), inv0), alpha=WEIGHT)
        da, db = F._foreach_sub(w.mu, w.mu0), F._foreach_sub(w.mu_b, w.mu0)
        t = F._foreach_sub(F._foreach_add(F._foreach_mul(da, da), F._foreach_exp(F._foreach_mul(w.rho, 2.0))),
                           F._foreach_add(F._foreach_mul(db, db), F._foreach_exp(F._foreach_mul(w.rho_b, 2.0))))
        F._foreach_add_(w.out2, F._foreach_mul(t, inv0), alpha=WEIGHT)

    def von():
        c = F._foreach_mul(F._foreach_mul(w.g, w.eps), F._foreach_exp(F._foreach_neg(w.v_rho)))
        F._foreach_clamp_min_(c, 0.0)
        F._foreach_mul_(w.v_h, 1 - H_DECAY)
        F._foreach_add_(w.v_h, c, alpha=H_DECAY)
        lam0 = F._foreach_mul(F._foreach_exp(F._foreach_mul(w.rho0, -2.0)), BETA)
        prec = F._foreach_add(lam0, w.v_h)
        num = F._foreach_add(w.g, F._foreach_mul(F._foreach_sub(w.v_mu, w.mu0), lam0))
        F._foreach_sub_(w.v_mu, F._foreach_div(F._foreach_mul(num, LR), F._foreach_add(prec, DAMPING)))
        F._foreach_copy_(w.v_rho, F._foreach_mul(F._foreach_log(prec), -0.5))

    return {"sample": sample, "elbo_backward": elbo, "gaussian_kl": kl, "gem_grad+": gem,
            "von_step": von}[op]


# per-tensor eager formulas, compiled once each (dynamic shapes) for the "compile" rows
def _sample_one(o, m, r):
    o.copy_(m + torch.exp(r) * torch.randn_like(m))


def _elbo_one(o1, o2, g, m, r, m0, r0, e):
    d_mu, d_rho = R.elbo_grads(g, m, r, m0, r0, e, BETA)
    o1.copy_(d_mu)
    o2.copy_(d_rho)


def _kl_one(m, r, m0, r0):
    return R.kl_terms(m, r, m0, r0).sum()


def _gem_one(o1, o2, m0, r0, ma, ra, mb, rb):
    g_mu, g_rho = R.gem_terms(m0, r0, ma, ra, mb, rb)
    o1.add_(g_mu, alpha=WEIGHT)
    o2.add_(g_rho, alpha=WEIGHT)


def _von_one(m, r, h, g, m0, r0, e):
    mu_new, rho_new, h_new = R.von_terms(m, r, h, g, None, m0, r0, e, LR, BETA, H_DECAY, DAMPING)
    m.copy_(mu_new)
    r.copy_(rho_new)
    h.copy_(h_new)


_COMPILED: dict[str, Callable] = {}


def _compiled(op: str, w: Workload) -> Callable[[], object]:
    one = {"sample": _sample_one, "elbo_backward": _elbo_one, "gaussian_kl": _kl_one,
           "gem_grad+": _gem_one, "von_step": _von_one}[op]
    fn = _COMPILED.setdefault(op, torch.compile(one, dynamic=True))
    if op == "sample":
        return lambda: [fn(*a) for a in zip(w.out1, w.mu, w.rho)]
    if op == "elbo_backward":
        return lambda: [fn(*a) for a in zip(w.out1, w.out2, w.g, w.mu, w.rho, w.mu0, w.rho0, w.eps)]
    if op == "gaussian_kl":
        return lambda: torch.stack([fn(*a) for a in zip(w.mu, w.rho, w.mu0, w.rho0)]).sum()
    if op == "von_step":
        return lambda: [fn(*a) for a in zip(w.v_mu, w.v_rho, w.v_h, w.g, w.mu0, w.rho0, w.eps)]
    return lambda: [fn(*a) for a in zip(w.out1, w.out2, w.mu0, w.rho0, w.mu, w.rho, w.mu_b, w.rho_b)]


def _fused(op: str, w: Workload) -> Callable[[], object]:
    if op == "sample":
        return lambda: ops.sample(w.mu, w.rho, SEED, OFFSET)
    if op == "elbo_backward":
        return lambda: ops.elbo_backward_(w.out1, w.out2, w.g, w.mu, w.rho, w.mu0, w.rho0, SEED,
                                          OFFSET, BETA)
    if op == "gaussian_kl":
        return lambda: ops.gaussian_kl(w.mu, w.rho, w.mu0, w.rho0)
    if op == "von_step":
        return lambda: ops.von_step_(w.v_mu, w.v_rho, w.v_h, w.g, None, w.mu0, w.rho0, SEED, OFFSET,
                                     LR, BETA, H_DECAY, DAMPING)
    return lambda: ops.gem_grad_(w.out1, w.out2, w.mu0, w.rho0, w.mu, w.rho, w.mu_b, w.rho_b,
                                 weight=WEIGHT)


IMPLS = {"eager": _eager, "foreach": _foreach, "compile": _compiled, "fused": _fused}


# ----------------------------------------------------------------------------- script mode
def run(sizes: list[int], tensors: list[int], device: str, op_names: list[str],
        impls: list[str]) -> dict:
    bw_name, bw_bytes, probe = bandwidth_probe(device)
    rows, all_ref = [], []
    for n in sizes:
        for t in tensors:
            w = Workload(n, t, device)
            for op in op_names:
                eager_t = None
                for impl in impls:
                    t_fn, t_ref = paired_times(IMPLS[impl](op, w), probe, device)
                    all_ref += t_ref
                    sec = statistics.median(t_fn)
                    eager_t = sec if impl == "eager" else eager_t
                    gbs = BYTES[op] * n / sec / 1e9
                    # per pair: this call's GB/s over the reference's right after it
                    pct = statistics.median(100 * BYTES[op] * n * tr / (bw_bytes * tf)
                                            for tf, tr in zip(t_fn, t_ref))
                    rows.append({"op": op, "weights": n, "tensors": t, "impl": impl,
                                 "median_ms": sec * 1e3, "gb_s": gbs,
                                 "speedup_vs_eager": (eager_t / sec) if eager_t else None,
                                 "pct_of_" + bw_name: pct,
                                 bw_name + "_gb_s": bw_bytes / statistics.median(t_ref) / 1e9})
                    print(f"{op:14s} N={n:.0e} T={t:<4d} {impl:8s} {sec * 1e3:9.3f} ms "
                          f"{gbs:7.1f} GB/s {pct:5.0f}% of {bw_name}", file=sys.stderr, flush=True)
            del w
    ref_gbs = sorted(bw_bytes / x / 1e9 for x in all_ref)
    return {"device": device, "machine": machine(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, bw_name + "_gb_s": statistics.median(ref_gbs),
            bw_name + "_range_gb_s": [ref_gbs[len(ref_gbs) // 20], ref_gbs[-1 - len(ref_gbs) // 20]],
            "bandwidth_kind": bw_name, "rows": rows}


def markdown(res: dict) -> str:
    kind = res["bandwidth_kind"]
    bw = res[kind + "_gb_s"]
    lo, hi = res[kind + "_range_gb_s"]
    lines = [f"{res['machine']}, {res['device']}, {res['threads']} threads, torch {res['torch']}; "
             f"{kind} bandwidth {bw:.1f} GB/s (median; 5–95%: {lo:.1f}–{hi:.1f}), measured "
             f"call by call beside each row; '% of {kind}' is the median of per-pair ratios", "",
             f"| op | weights | tensors | impl | median ms | GB/s | vs eager | % of {kind} |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        vs = r.get("speedup_vs_eager")  # absent when the eager impl was not measured
        lines.append(f"| {r['op']} | {r['weights']:.0e} | {r['tensors']} | {r['impl']} | "
                     f"{r['median_ms']:.3f} | {r['gb_s']:.1f} | {'—' if vs is None else f'{vs:.2f}×'} | "
                     f"{r['pct_of_' + kind]:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--sizes", default="1e5,1e6,1e7")
    p.add_argument("--tensors", default="10,200")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", default=",".join(BYTES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: torch's); 1 gives stable numbers on a loaded machine")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run([int(float(s)) for s in a.sizes.split(",")], [int(t) for t in a.tensors.split(",")],
              a.device, a.ops.split(","), a.impls.split(","))
    os.makedirs(a.out, exist_ok=True)
    table = markdown(res)
    with open(os.path.join(a.out, f"kernels_{a.device}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, f"kernels_{a.device}.md"), "w") as f:
        f.write(table)
    print(table)


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest

    @pytest.fixture(scope="module")
    def workload():
        return Workload(10**6, 10, "cpu")

    @pytest.mark.parametrize("impl", ["eager", "fused"])
    @pytest.mark.parametrize("op", list(BYTES))
    def test_kernel(benchmark, workload, op, impl):
        benchmark(IMPLS[impl](op, workload))
except ImportError:  # pragma: no cover - script mode needs no pytest
    pass


if __name__ == "__main__":
    main()
