"""gemext's learners against the peers a user would otherwise reach for, per meta-iteration: time and
peak memory on sinusoid (the `finn` MLP, meta-batch 25) and Omniglot 5-way 1-shot shapes (Conv4,
meta-batch 4, synthetic images), at k = 1, 5, 20 inner steps.

Peers: second-order MAML with the `higher` library (a per-task innerloop_ctx, as its examples) and
plain per-task PyTorch loops of gemext's algorithms (what a user without a meta-learning library
writes): `plain-maml` (functional_call + autograd.grad with create_graph; gemext.bench_memory) and,
on sinusoid, `plain-gem-bml+` (natural-gradient VI per task with autograd through θ = μ + σε and the
KL, at the gemext learner's inner lr and β) and `plain-reptile` (SGD per task on the support, then
the query points), both from the gemext learner's μ₀, ρ₀ and step. learn2learn is not measured: it
does not build on Python 3.11 (its Cython extension fails to compile), the interpreter this project
targets. gemext learners run with their training presets (`gemext train`'s defaults for the task).
Every point is a fresh process (gemext.bench_memory's measurement), one thread by default; ratios
are against higher's MAML and against the plain loop of the same algorithm, at the same task and k,
measured in the same run.

    python benchmarks/bench_peers.py --out benchmarks/out/peers [--tasks sinusoid,omniglot] [--steps 1,5,20]
        [--device cuda]
    python benchmarks/bench_peers.py --out benchmarks/out/plain --tasks sinusoid --steps 10 \\
        --algos gem-bml+,reptile,plain-gem-bml+,plain-reptile   # against the plain loops alone

Writes peers.csv, peers.md (table) and peers.png (time per meta-iteration vs k).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

import torch
from common import fresh_process, run_worker, stamp, write_csv
from torch.func import functional_call

from gemext import bench_memory

ALGOS = ("gem-bml+", "gem-bml", "maml", "fomaml", "reptile", "imaml", "higher-maml", "plain-maml")


# ----------------------------------------------------------------------------- plain loops (sinusoid)
class PlainLoop:
    """A gemext learner's algorithm as a per-task loop over the sinusoid MLP: μ₀ (and ρ₀) are copies
    of the learner's; meta_backward writes the meta-gradient into their .grad."""

    def __init__(self, learner, steps: int, noise: float = 0.5):
        from gemext.tasks.sinusoid import SinusoidTasks

        self.model = SinusoidTasks("finn").make_model()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.mu0 = [p.detach().clone().requires_grad_() for p in learner.prior.mu0]
        self.rho0 = [p.detach().clone().requires_grad_() for p in learner.prior.rho0]
        self.steps, self.lr, self.beta, self.noise = steps, learner.inner.lr, learner.inner.beta, noise

    def parameters(self):
        return self.mu0 + self.rho0

    def nll(self, theta, x, y):
        out = functional_call(self.model, dict(zip(self.names, theta)), (x,))
        return (0.5 * (y - out) ** 2 / self.noise**2).sum()


class PlainGEMBMLPlus(PlainLoop):
    def vi(self, x, y, pm, pr):
        from gemext.vi import NaturalGradientVI

        mu = [m.clone().requires_grad_() for m in pm]
        rho = [r.clone().requires_grad_() for r in pr]
        opt = NaturalGradientVI(mu + rho, lr=self.lr, rho_lr=0.01)
        for _ in range(self.steps):
            theta = [m + r.exp() * torch.randn_like(m) for m, r in zip(mu, rho)]
            kl = sum((r0 - r + ((2 * r).exp() + (m - m0) ** 2) / (2 * (2 * r0).exp()) - 0.5).sum()
                     for m, r, m0, r0 in zip(mu, rho, pm, pr))
            opt.zero_grad()
            (self.nll(theta, x, y) + self.beta * kl).backward()
            opt.step()
        return [m.detach() for m in mu], [r.detach() for r in rho]

    def meta_backward(self, batch) -> None:
        mu0, rho0 = [m.detach() for m in self.mu0], [r.detach() for r in self.rho0]
        g_mu, g_rho = [torch.zeros_like(m) for m in mu0], [torch.zeros_like(r) for r in rho0]
        T = batch.x_support.shape[0]
        for t in range(T):
            mt, rt = self.vi(batch.x_support[t], batch.y_support[t], mu0, rho0)
            ma, ra = self.vi(batch.x_query[t], batch.y_query[t], mt, rt)
            for i in range(len(mu0)):
                inv = torch.exp(-2 * rho0[i])
                g_mu[i] -= (ma[i] - mt[i]) * inv / T
                g_rho[i] -= ((ma[i] - mu0[i]) ** 2 + (2 * ra[i]).exp()
                             - (mt[i] - mu0[i]) ** 2 - (2 * rt[i]).exp()) * inv / T
        for p, g in zip(self.mu0 + self.rho0, g_mu + g_rho):
            p.grad = g


class PlainReptile(PlainLoop):
    def meta_backward(self, batch) -> None:
        T = batch.x_support.shape[0]
        g = [torch.zeros_like(m) for m in self.mu0]
        for t in range(T):
            theta = [m.detach().clone().requires_grad_() for m in self.mu0]
            opt = torch.optim.SGD(theta, lr=self.lr)
            for x, y in ((batch.x_support[t], batch.y_support[t]), (batch.x_query[t], batch.y_query[t])):
                for _ in range(self.steps):
                    opt.zero_grad()
                    self.nll(theta, x, y).backward()
                    opt.step()
            for i, m in enumerate(self.mu0):
                g[i] -= (theta[i].detach() - m.detach()) / T
        for p, gi in zip(self.mu0, g):
            p.grad = gi


PLAIN = {"plain-gem-bml+": PlainGEMBMLPlus, "plain-reptile": PlainReptile}


def worker(spec: dict) -> dict:
    """One plain-loop point in this fresh process, measured as gemext.bench_memory measures its own."""
    if spec.get("keep_freed_memory"):
        from gemext.allocator import keep_freed_memory
        keep_freed_memory()
    learner, batch = bench_memory.make_point({**spec, "algo": spec["algo"].removeprefix("plain-")})
    peer = PLAIN[spec["algo"]](learner, spec["inner_steps"])
    return bench_memory.time_and_memory(peer, batch, spec["device"], spec["repeats"])


# ----------------------------------------------------------------------------- the comparison
def unavailable(algo: str, task: str) -> str | None:
    if algo in PLAIN:
        return None if task == "sinusoid" else "its plain loop is written for the sinusoid MLP"
    return bench_memory.peer_unavailable(algo) if algo in bench_memory.PEERS else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default="sinusoid,omniglot")
    ap.add_argument("--steps", default="1,5,20")
    ap.add_argument("--algos", default=",".join(ALGOS), help=f"gemext learners and peers ({', '.join(ALGOS[-2:])}, "
                    f"{', '.join(PLAIN)})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every point this many times, interleaved, and report the median (shared machines)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where every point runs (peak memory: RSS on cpu, allocated device memory on cuda)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="every measuring process (peers too) keeps freed memory, as `gemext train` does")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every measuring process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for task in args.tasks.split(","):
        base = {"task": task, "device": args.device, "repeats": args.repeats, "ways": 5, "shots": 1, "query": 15,
                "meta_batch": 25 if task == "sinusoid" else 4, "presets": True, "options": {},
                "keep_freed_memory": args.keep_freed_memory}
        algos = []
        for algo in args.algos.split(","):
            reason = unavailable(algo, task)
            if reason:
                print(f"skipping {algo} on {task}: {reason}", flush=True)
            else:
                algos.append(algo)
        points: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):  # every point once per round: slow drifts of a shared machine hit all alike
            for k in (int(s) for s in args.steps.split(",")):
                for algo in algos:
                    spec = {**base, "algo": algo, "inner_steps": k}
                    res = fresh_process(__file__, spec) if algo in PLAIN else bench_memory.run_point(spec)
                    if "error" in res:
                        raise SystemExit(f"{algo} on {task}, k={k}: {res['error']}")
                    points.setdefault((algo, k), []).append(res)
                    print(f"{task:>9} {algo:>14} k={k:<3} round {rnd + 1}: {1e3 * res['time_per_iter_s']:10.1f} ms "
                          f"{res['peak_mem_mb']:8.1f} MB", flush=True)
        for (algo, k), results in sorted(points.items(), key=lambda kv: (algos.index(kv[0][0]), kv[0][1])):
            rows.append({"task": task, "algo": algo, "inner_steps": k,
                         "time_per_iter_s": statistics.median(r["time_per_iter_s"] for r in results),
                         "peak_mem_mb": max(r["peak_mem_mb"] for r in results)})
    write_csv(out / "peers.csv", rows, ["task", "algo", "inner_steps", "time_per_iter_s", "peak_mem_mb"])
    time_of = {(r["task"], r["algo"], r["inner_steps"]): r["time_per_iter_s"] for r in rows}

    def speedup(peer: str | None, r: dict) -> str:
        h, t = time_of.get((r["task"], peer, r["inner_steps"])), r["time_per_iter_s"]
        return f"{h / t:.1f}×" if h and t and math.isfinite(t) else "—"

    lines = [f"{stamp(args.device)}; device {args.device}; {args.threads} thread(s); median of {args.repeats} "
             "meta-iterations after a warm-up, each point in a fresh process"
             f"{f', median over {args.rounds} interleaved rounds' if args.rounds > 1 else ''}"
             f"{', freed memory kept (glibc)' if args.keep_freed_memory else ''}.", "",
             "| task | algorithm | k | ms / meta-iteration | peak MB | speed-up vs higher MAML | vs its plain loop |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        plain = None if r["algo"].startswith(("plain-", "higher-")) else f"plain-{r['algo']}"
        lines.append(f"| {r['task']} | {r['algo']} | {r['inner_steps']} | {1e3 * r['time_per_iter_s']:.1f} | "
                     f"{r['peak_mem_mb']:.1f} | {speedup('higher-maml', r)} | {speedup(plain, r)} |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, out / "peers.png")


def _plot(rows: list[dict], path: Path) -> None:
    from gemext.plots import new_figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = new_figure((5 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for algo in dict.fromkeys(r["algo"] for r in rows if r["task"] == task):
            pts = [r for r in rows if r["task"] == task and r["algo"] == algo]
            ax.plot([r["inner_steps"] for r in pts], [1e3 * r["time_per_iter_s"] for r in pts], marker="o", label=algo,
                    ls="--" if algo.startswith(("higher-", "plain-")) else "-")
        ax.set(xlabel="inner steps k", ylabel="ms per meta-iteration", title=task, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__" and not run_worker(worker):
    main()
