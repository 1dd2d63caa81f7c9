"""Gradient-estimation study (paper App. C.1) on the conjugate model of python_tests/conjugate.py:
linear-Gaussian regression with orthogonal features, so the exact posterior is a diagonal Gaussian
and ∇_Θ log p(D; Θ) is exact (autograd through the closed-form marginal likelihood).

For K VI steps (natural-gradient VI of gemext.vi, lr 0.02 for μ and ρ, 4 MC samples per step, β = 1,
from λ = Θ; μ steps above ≈0.045 diverge on this problem, as did 1 MC sample at lr 0.05) on
D = support ∪ query it reports, averaged over --repeats ε streams, the relative error
‖ĝ − ∇ log p(D; Θ)‖ / ‖∇ log p(D; Θ)‖ (over μ₀ and ρ₀ together) of
- `gem`: the Gradient-EM statistic ĝ(λ_K) (gemext.ops.gem_grad). This is *also* the ELBO gradient
  without back-propagation through VI: ELBO(λ, Θ) depends on Θ only through −KL(q_λ‖p_Θ), whose
  Θ-gradient at fixed λ is exactly ĝ(λ). The script checks the identity numerically.
- `elbo_bp`: d/dΘ ELBO(λ_K(Θ), Θ), back-propagated through the K unrolled VI steps (the
  differentiable VI of gemext.algorithms.elbo, same ε as the `gem` row); the ELBO at λ_K is
  evaluated in closed form (no MC noise in the outer objective).
and KL(q_λK ‖ p(θ | D)) to the exact posterior.

    python benchmarks/gradient_error_study.py --out gradstudy
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
from conjugate import exact_posterior, log_marginal, problem  # noqa: E402

from gemext import algorithms, ops, reference  # noqa: E402
from gemext.vi import GaussianLikelihood  # noqa: E402

STEPS = (1, 2, 5, 10, 50, 200)


def exact_elbo(phi, y, mu, rho, mu0, rho0, noise):
    """ELBO(λ, Θ) of y = Φθ + N(0, noise²) in closed form (differentiable in all four)."""
    var = torch.exp(2 * rho)
    resid = y - phi @ mu
    e_nll = (resid ** 2).sum() / (2 * noise ** 2) + (var * (phi ** 2).sum(0)).sum() / (2 * noise ** 2) \
        + len(y) * (math.log(noise) + 0.5 * math.log(2 * math.pi))
    return -(e_nll + reference.kl_terms(mu, rho, mu0, rho0).sum())


def one(K: int, seed: int, lr: float, problem_seed: int, rho_lr: float = 0.02, mc: int = 4) -> dict:
    phi_tr, y_tr, phi_val, y_val, mu0, rho0, noise = problem(problem_seed)
    phi, y = torch.cat([phi_tr, phi_val]), torch.cat([y_tr, y_val])
    d = phi.shape[1]
    learner = algorithms.create("abml", nn.Linear(d, 1, bias=False), likelihood=GaussianLikelihood(noise),
                                inner=dict(optimizer="ngvi", lr=lr, steps=K, mc_samples=mc, beta=1.0,
                                           optimizer_kwargs={"rho_lr": rho_lr}), seed=seed)
    learner.double()
    with torch.no_grad():
        learner.prior.mu0[0].copy_(mu0.view(1, -1))
        learner.prior.rho0[0].copy_(rho0.view(1, -1))
    x, yy = phi[None], y.view(1, -1, 1)
    state = learner.generator.get_state()
    # graph-free VI of gemext.vi (fused ops) → λ_K, then the Gradient-EM statistic
    prior = learner.prior.expand(1)
    post = learner._fit(x, yy, prior, prior, K).posterior
    m_k, r_k = post.mu[0].view(-1), post.rho[0].view(-1)
    g_mu, g_rho = ops.gem_grad(mu0, rho0, m_k.contiguous(), r_k.contiguous())
    gem = torch.cat([g_mu, g_rho])
    # ELBO gradient at fixed λ_K (no back-propagation): must equal ĝ
    m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
    nobp = torch.cat(torch.autograd.grad(exact_elbo(phi, y, m_k, r_k, m0, r0, noise), (m0, r0)))
    # ELBO gradient back-propagated through the same VI steps (same ε stream)
    learner.generator.set_state(state)
    M0 = mu0.view(1, -1).clone().requires_grad_(True)
    R0 = rho0.view(1, -1).clone().requires_grad_(True)
    mu_k, rho_k, _ = learner._vi(x, yy, [M0], [R0], K, create_graph=True)
    bp = torch.cat([g.view(-1) for g in torch.autograd.grad(
        exact_elbo(phi, y, mu_k[0].view(-1), rho_k[0].view(-1), M0.view(-1), R0.view(-1), noise), (M0, R0))])
    # exact
    m0, r0 = mu0.clone().requires_grad_(True), rho0.clone().requires_grad_(True)
    exact = torch.cat(torch.autograd.grad(log_marginal(phi, y, m0, r0, noise), (m0, r0)))
    em, er = exact_posterior(phi, y, mu0, rho0, noise)
    kl = float(reference.gaussian_kl(m_k, r_k, em, er))
    rel = lambda g: float((g - exact).norm() / exact.norm())  # noqa: E731
    return {"gem": rel(gem), "elbo_bp": rel(bp), "kl_to_exact": kl,
            "nobp_minus_gem": float((nobp - gem).abs().max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gradient_error_study")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.02, help="natural-gradient VI step of μ (stable below 2/(σ₀²·max ΦᵀΦ/noise²) ≈ 0.045 here)")
    ap.add_argument("--rho-lr", type=float, default=0.02, help="natural-gradient VI step of ρ")
    ap.add_argument("--mc", type=int, default=4, help="MC samples per VI step")
    ap.add_argument("--problem-seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for K in STEPS:
        res = [one(K, s, args.lr, args.problem_seed, args.rho_lr, args.mc) for s in range(args.repeats)]
        row = {"steps": K}
        for key in ("gem", "elbo_bp", "kl_to_exact"):
            v = torch.tensor([r[key] for r in res], dtype=torch.float64)
            row[key] = float(v.mean())
            row[key + "_median"] = float(v.median())
            row[key + "_ci95"] = float(1.96 * v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
        row["nobp_minus_gem_max"] = max(r["nobp_minus_gem"] for r in res)
        rows.append(row)
        print(row, flush=True)
    with open(out / "gradient_error.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Conjugate model (problem seed {args.problem_seed}: 11 points, 4 weights, noise 0.3), VI = natural-gradient "
             f"VI lr {args.lr} (ρ: {args.rho_lr}), {args.mc} MC samples/step, β = 1; mean (median) over {args.repeats} ε streams.", "",
             "| VI steps | rel. error GEM = ELBO grad. w/o backprop | rel. error ELBO grad. with backprop | "
             "KL(q_K ‖ exact posterior) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['gem']:.3f} ± {r['gem_ci95']:.3f} ({r['gem_median']:.3f}) | "
                     f"{r['elbo_bp']:.3f} ± {r['elbo_bp_ci95']:.3f} ({r['elbo_bp_median']:.3f}) | "
                     f"{r['kl_to_exact']:.4f} ({r['kl_to_exact_median']:.4f}) |")
    lines.append("")
    lines.append(f"max |ELBO gradient without backprop − ĝ| over all runs: "
                 f"{max(r['nobp_minus_gem_max'] for r in rows):.2e}")
    (out / "gradient_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ks = [r["steps"] for r in rows]
    for key, label in (("gem", "Gradient-EM (= ELBO grad., no backprop)"), ("elbo_bp", "ELBO grad., backprop through VI")):
        axes[0].errorbar(ks, [r[key] for r in rows], yerr=[r[key + "_ci95"] for r in rows], marker="o", capsize=2,
                         label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="VI steps", ylabel="relative error of ∇Θ log p(D; Θ)")
    axes[0].legend(fontsize=7)
    axes[1].plot(ks, [r["kl_to_exact"] for r in rows], "o-")
    axes[1].set(xscale="log", yscale="log", xlabel="VI steps", ylabel="KL(q_K ‖ exact posterior)")
    fig.tight_layout()
    fig.savefig(out / "gradient_error.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
