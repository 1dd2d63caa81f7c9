"""Sinusoid meta-iteration time: gemext (tasks vectorised, fused ops) against a plain per-task
PyTorch loop of the same algorithm (what learn2learn/higher/TorchOpt users run, within ~10%).

    python benchmarks/bench_meta_iteration.py --out benchmarks/out [--steps 10] [--meta-batch 25]

Writes meta_iteration.md / .json and prints the table. Ratios compare runs in the same process;
both sides use one intra-op thread (the models are tiny)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call

from gemext.train import RunConfig, build
from gemext.vi import NaturalGradientVI


def plain_gem_bml_plus(model, mu0, rho0, batch, steps, lr, beta, noise=0.5, rho_lr=0.01):
    """GEM-BML+ written per task with autograd through θ = μ + σε and the KL (no fused ops)."""
    names = [n for n, _ in model.named_parameters()]
    g_mu = [torch.zeros_like(m) for m in mu0]
    g_rho = [torch.zeros_like(r) for r in rho0]
    T = batch.x_support.shape[0]

    def vi(x, y, pm, pr):
        mu = [m.clone().requires_grad_() for m in pm]
        rho = [r.clone().requires_grad_() for r in pr]
        opt = NaturalGradientVI(mu + rho, lr=lr, rho_lr=rho_lr)
        for _ in range(steps):
            theta = [m + r.exp() * torch.randn_like(m) for m, r in zip(mu, rho)]
            out = functional_call(model, dict(zip(names, theta)), (x,))
            nll = (0.5 * (y - out) ** 2 / noise**2).sum()
            kl = sum((r0 - r + ((2 * r).exp() + (m - m0) ** 2) / (2 * (2 * r0).exp()) - 0.5).sum()
                     for m, r, m0, r0 in zip(mu, rho, pm, pr))
            opt.zero_grad()
            (nll + beta * kl).backward()
            opt.step()
        return [m.detach() for m in mu], [r.detach() for r in rho]

    for t in range(T):
        mt, rt = vi(batch.x_support[t], batch.y_support[t], mu0, rho0)
        ma, ra = vi(batch.x_query[t], batch.y_query[t], mt, rt)
        for i in range(len(mu0)):
            inv = torch.exp(-2 * rho0[i])
            g_mu[i] -= (ma[i] - mt[i]) * inv / T
            g_rho[i] -= ((ma[i] - mu0[i]) ** 2 + (2 * ra[i]).exp()
                         - (mt[i] - mu0[i]) ** 2 - (2 * rt[i]).exp()) * inv / T
    return g_mu, g_rho


def plain_reptile(model, mu0, batch, steps, lr, noise=0.5):
    names = [n for n, _ in model.named_parameters()]
    g = [torch.zeros_like(m) for m in mu0]
    T = batch.x_support.shape[0]
    for t in range(T):
        theta = [m.clone().requires_grad_() for m in mu0]
        opt = torch.optim.SGD(theta, lr=lr)
        for x, y in ((batch.x_support[t], batch.y_support[t]), (batch.x_query[t], batch.y_query[t])):
            for _ in range(steps):
                out = functional_call(model, dict(zip(names, theta)), (x,))
                opt.zero_grad()
                (0.5 * (y - out) ** 2 / noise**2).sum().backward()
                opt.step()
        for i in range(len(mu0)):
            g[i] -= (theta[i].detach() - mu0[i]) / T
    return g


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for algo in ("gem-bml+", "reptile"):
        cfg = RunConfig(task="sinusoid", algo=algo, inner_steps=args.steps, out="/tmp/unused")
        family, learner, _ = build(cfg)
        batch = family.sample(args.meta_batch, torch.Generator().manual_seed(0))
        model = family.data.make_model()
        mu0 = [p.detach() for p in learner.prior.mu0]
        rho0 = [p.detach() for p in learner.prior.rho0]

        def fused(learner=learner, batch=batch):
            learner.zero_grad(set_to_none=True)
            learner.meta_backward(batch)
        if algo == "gem-bml+":
            inner = learner.inner
            plain = lambda model=model, mu0=mu0, rho0=rho0, batch=batch, inner=inner: plain_gem_bml_plus(  # noqa: E731
                model, mu0, rho0, batch, args.steps, inner.lr, inner.beta)
        else:
            plain = lambda model=model, mu0=mu0, batch=batch, learner=learner: plain_reptile(  # noqa: E731
                model, mu0, batch, args.steps, learner.inner.lr)
        t_fused, t_plain = _time(fused, args.repeats), _time(plain, max(2, args.repeats // 2))
        rows.append({"algo": algo, "meta_batch": args.meta_batch, "inner_steps": args.steps,
                     "plain_loop_s": t_plain, "gemext_s": t_fused, "speedup": t_plain / t_fused})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    lines = [f"Sinusoid `finn` meta-iteration, meta-batch {args.meta_batch}, {args.steps} inner steps "
             f"(support and query each), 1 thread, {cpu}, torch {torch.__version__}", "",
             "| algo | plain per-task loop (s) | gemext (s) | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| {r['algo']} | {r['plain_loop_s']:.4f} | {r['gemext_s']:.4f} | {r['speedup']:.1f}× |" for r in rows]
    (out / "meta_iteration.md").write_text("\n".join(lines) + "\n")
    (out / "meta_iteration.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
