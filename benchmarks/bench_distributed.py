"""Distributed meta-training throughput: meta-iterations per second with 1 and 2 gloo processes (one
thread each) for the sinusoid MLP and the Omniglot Conv4 (one synthetic meta-batch of 28×28 episodes,
gemext.bench_memory's shapes; the learners with `gemext train`'s options), bytes all-reduced per
meta-step vs model size, and Θ agreement between world sizes.

    python benchmarks/bench_distributed.py [--iterations 5] [--write benchmarks/RESULTS.md]

Each configuration runs the training loop's own meta-step (gemext.train.meta_step: task slice,
meta_backward with the shard's noise range, DistContext.step, Adam) in fresh processes started by
torch.multiprocessing."""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
from common import command_line, stamp

CASES = {
    # name: (task, algo, meta-batch, inner steps)
    "sinusoid gem-bml+": ("sinusoid", "gem-bml+", 24, 5),
    "omniglot 5w1s gem-bml+": ("omniglot", "gem-bml+", 8, 2),
    "omniglot 5w1s maml": ("omniglot", "maml", 8, 2),
}


def _worker(rank: int, world: int, port: int, case: str, iterations: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from gemext import distributed
    from gemext.bench_memory import make_point
    from gemext.train import meta_step
    ctx = distributed.setup("cpu")
    torch.manual_seed(0)
    task, algo, T, steps = CASES[case]
    learner, batch = make_point({"task": task, "algo": algo, "inner_steps": steps, "meta_batch": T, "device": "cpu",
                                 "ways": 5, "shots": 1, "query": 15, "presets": True})
    opt = learner.meta_optimizer(1e-3)
    times = []
    for _ in range(iterations + 2):  # two warm-up iterations
        t0 = time.perf_counter()
        meta_step(learner, opt, batch, ctx)  # the training loop's own meta-step
        times.append(time.perf_counter() - t0)
    if ctx.is_main:
        prior = getattr(learner, "prior", None)  # GEM: Θ = (μ₀, ρ₀) is twice the model
        model = sum(p.numel() * p.element_size() for p in (prior.mu0 if prior is not None else learner.parameters()))
        theta = {k: v.clone() for k, v in learner.state_dict().items()}
        torch.save({"s_per_it": sorted(times[2:])[len(times[2:]) // 2], "bytes": ctx.bytes_per_step,
                    "model_bytes": model, "meta_bytes": sum(p.numel() * p.element_size() for p in learner.parameters()),
                    "theta": theta}, out)
    ctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: str, world: int, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r.pt")
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), case, iterations, out), nprocs=world)
        return torch.load(out, weights_only=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--write", default=None, help="RESULTS.md to update (its Distributed section)")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for case in CASES:
        res = {w: measure(case, w, args.iterations) for w in worlds}
        base = res[worlds[0]]
        for w, r in res.items():
            diff = max(float((r["theta"][k] - base["theta"][k]).abs().max()) for k in base["theta"])
            ips = 1 / r["s_per_it"]
            rows.append({"case": case, "world": w, "it_per_s": round(ips, 2),
                         "efficiency": round(ips / (w / base["s_per_it"]), 2),
                         "bytes_per_step": r["bytes"] if w > 1 else 0, "model_bytes": r["model_bytes"],
                         "meta_param_bytes": r["meta_bytes"], "max_dtheta_vs_1": diff})
            print(json.dumps(rows[-1]), flush=True)
    if args.write:
        _write(Path(args.write), rows, args)


def _write(path: Path, rows: list[dict], args) -> None:
    table = ["| case | processes | meta-it/s | scaling efficiency | bytes all-reduced / step | model bytes (fp32) "
             "| Θ bytes (μ₀, ρ₀) | max abs ΔΘ vs 1 process |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['case']} | {r['world']} | {r['it_per_s']} | {r['efficiency']} | {r['bytes_per_step']} "
                     f"| {r['model_bytes']} | {r['meta_param_bytes']} | {r['max_dtheta_vs_1']:.2e} |")
    text = path.read_text()
    marker = "\n<!-- bench_distributed -->\n"
    rerun = command_line(__file__, ["--iterations", str(args.iterations), "--write", args.write])
    block = (f"{marker}Measured {stamp()} (gloo, 1 thread per process, median of {args.iterations} iterations "
             f"after 2 warm-up):\n`{rerun}`\n\n" + "\n".join(table) + marker)
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n" + block
    path.write_text(text)


if __name__ == "__main__":
    main()
