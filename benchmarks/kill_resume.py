"""Kill/resume loop: SIGKILL a single-process CPU meta-training run at random moments, relaunch it
with resume each time, and check that the final Θ equals the uninterrupted run's bit for bit and that
no kill loses more than the checkpoint interval.

    python benchmarks/kill_resume.py --kills 20 --iterations 1500 --checkpoint-every 25

Prints one JSON object (kills, iterations lost per kill, max |ΔΘ|, wall times)."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The worker prints every finished iteration so the driver knows exactly how far it got.
WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from gemext.train import RunConfig, train
cfg = RunConfig(**json.loads(sys.argv[1]))
train(cfg, resume=sys.argv[2] == "1", progress=False, on_iteration=lambda i: print(i, flush=True))
"""


def _config(out: Path, args) -> dict:
    return dict(task="sinusoid", algo="gem-bml+", iterations=args.iterations, meta_batch=5, out=str(out),
                checkpoint_every=args.checkpoint_every, log_every=args.checkpoint_every,
                algo_options={"inner_steps": 2}, seed=args.seed)


def _launch(cfg: dict, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg), "1" if resume else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _checkpoint_iteration(out: Path) -> int:
    from gemext.train import load_checkpoint
    path = out / "checkpoint.pt"
    return load_checkpoint(path)["iteration"] if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume_"))

    t0 = time.perf_counter()
    ref = _launch(_config(root / "ref", args), False)
    ref.communicate()
    assert ref.returncode == 0, "the uninterrupted run failed"
    ref_wall = time.perf_counter() - t0

    out, lost, kills, launches = root / "cut", [], 0, 0
    t0 = time.perf_counter()
    while True:
        proc = _launch(_config(out, args), resume=(out / "checkpoint.pt").exists())
        launches += 1
        last = _checkpoint_iteration(out)
        if kills < args.kills:
            # kill after a random number of iterations of this launch (the iteration may be mid-way,
            # or in the middle of writing a checkpoint)
            target = last + rng.randint(1, 3 * args.checkpoint_every)
            for line in proc.stdout:
                last = int(line)
                if last >= min(target, args.iterations - 1):
                    break
            time.sleep(rng.uniform(0, 0.02))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            kept = _checkpoint_iteration(out)
            lost.append(last - kept)
            assert 0 <= last - kept <= args.checkpoint_every, (last, kept)
            continue
        proc.communicate()
        assert proc.returncode == 0, "the final resumed run failed"
        break
    cut_wall = time.perf_counter() - t0

    from gemext.train import load_checkpoint
    a = load_checkpoint(root / "ref" / "checkpoint.pt")["learner"]
    b = load_checkpoint(out / "checkpoint.pt")["learner"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(json.dumps({"kills": kills, "launches": launches, "iterations": args.iterations,
                      "checkpoint_every": args.checkpoint_every, "lost_per_kill": lost,
                      "max_lost": max(lost or [0]), "mean_lost": sum(lost) / max(1, len(lost)),
                      "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff,
                      "uninterrupted_wall_s": round(ref_wall, 1), "killed_total_wall_s": round(cut_wall, 1)}))


if __name__ == "__main__":
    main()
