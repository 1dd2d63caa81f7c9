"""Distributed meta-training (gemext.distributed): rank-count invariance, dead and hung ranks,
resume after a kill, agreed stop on SIGTERM, checkpoint refusal, noise start indices.

Tolerance (documented in gemext/distributed.py and benchmarks/RESULTS.md): a 2-rank run equals the
1-rank run up to float32 summation order of the meta-gradient (each rank sums its tasks, then the
ranks' sums are added): per step ≈ 1 ulp of the gradient; after the 12 Adam steps here the prior
differs by < TOL_THETA absolute. Runs of the same world size (uninterrupted vs killed + resumed)
are bitwise equal."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from gemext import ops, reference
from gemext import runs as gemext_runs
from gemext.distributed import DistContext, shard_bounds
from gemext.train import RunConfig, load_checkpoint, train
from gemext.vi import task_starts

torch.set_num_threads(1)
TOL_THETA = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GEMEXT_DIST_TIMEOUT": "20", "PYTHONUNBUFFERED": "1"}
# The trajectory runs use natural-gradient VI. With the default von VI a few weights get meta-gradients
# that are pure float-summation noise (a weight the data barely move, divided by σ₀² = 4e-4), and
# meta-Adam turns that noise into ±lr steps, so 1 and 2 ranks end up ~lr apart on those weights; the
# sharded von fits themselves are bitwise equal (test_sharded_von_fit_is_bitwise_the_full_batch_fit).
NGVI = {"inner": {"optimizer": "ngvi"}, "lr": 1.25, "beta": 0.1, "sigma": 0.5}
RUN = dict(task="sinusoid", algo="gem-bml+", iterations=12, meta_batch=6, checkpoint_every=3, log_every=3,
           algo_options={"inner_steps": 2, **NGVI})
CLI = ["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "12", "--meta-batch", "6",
       "--checkpoint-every", "3", "--log-every", "3", "--inner-steps", "2", "--no-eval", "--no-progress",
       "--options", json.dumps(NGVI)]
posix = pytest.mark.skipif(os.name != "posix", reason="signals and torchrun workers are POSIX here")

# A worker for torchrun: train() with a fault injected into rank 1 after iteration `at`.
WORKER = """
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
from gemext.train import Interrupted, RunConfig, train
cfg, action, at = RunConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
def hook(i):
    if int(os.environ["RANK"]) == 1 and i == at:
        if action == "hang":
            time.sleep(3600)
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[action])
try:
    train(cfg, progress=False, on_iteration=hook)
except Interrupted as e:
    print(f"rank {os.environ['RANK']} interrupted at {e.iteration}", flush=True)
    sys.exit(128 + e.signum)
"""


def _theta(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["learner"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _torchrun(n: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    # cwd outside the source tree: `-m gemext` must import the installed package, not ./gemext
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())


def _worker(tmp: Path, out: Path, action: str, at: int, **kw) -> list[str]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return [str(script), json.dumps({**RUN, "out": str(out), **kw}), action, str(at)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted 1-rank (in process) and 2-rank (torchrun, CLI) runs of the same config."""
    base = tmp_path_factory.mktemp("runs")
    train(RunConfig(**RUN, out=str(base / "one")), progress=False)
    proc = _torchrun(2, ["-m", "gemext", *CLI, "--out", str(base / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"one": base / "one", "two": base / "two"}


# ----------------------------------------------------------------------------- noise indexing
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_starts_reproduce_slices_of_the_full_batch(dtype):
    T, shapes = 7, [(3, 5), (11,), (2, 2, 3)]
    g = torch.Generator().manual_seed(0)
    mu = [torch.randn(T, *s, generator=g, dtype=dtype) for s in shapes]
    rho = [0.3 * torch.randn(T, *s, generator=g, dtype=dtype) for s in shapes]
    gt = [torch.randn(T, *s, generator=g, dtype=dtype) for s in shapes]
    full = ops.sample(mu, rho, 123, 2)
    full_mu, full_rho = ops.elbo_backward(gt, mu, rho, rho, mu, 9, 1, 0.5)
    for lo, hi in [(0, 3), (3, 7), (1, 2), (5, 6), (2, 7)]:
        part = lambda ts, lo=lo, hi=hi: [t[lo:hi].contiguous() for t in ts]  # noqa: E731
        starts = task_starts(part(mu), (lo, T))
        got = ops.sample(part(mu), part(rho), 123, 2, starts=starts)
        assert all(torch.equal(a[lo:hi], b) for a, b in zip(full, got)), (lo, hi)
        d_mu, d_rho = ops.elbo_backward(part(gt), part(mu), part(rho), part(rho), part(mu), 9, 1, 0.5, starts)
        assert all(torch.equal(a[lo:hi], b) for a, b in zip(full_mu + full_rho, d_mu + d_rho))
        out_mu, out_rho = [torch.empty_like(t) for t in part(mu)], [torch.empty_like(t) for t in part(mu)]
        ops.elbo_backward_(out_mu, out_rho, part(gt), part(mu), part(rho), part(rho), part(mu), 9, 1, 0.5, starts)
        assert all(torch.equal(a, b) for a, b in zip(out_mu + out_rho, d_mu + d_rho))
        ref = reference.sample([t.double() for t in part(mu)], [t.double() for t in part(rho)], 123, 2, starts)
        tol = 2e-6 if dtype == torch.float32 else 1e-12
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_misaligned_starts_on_the_vectorised_threaded_path():
    """Starts that are not multiples of 4 over > 2 chunks (AVX2 Philox, OpenMP path)."""
    x = torch.randn(200_003)
    full = ops.sample(x, x, 9, 0)
    for s in (1, 2, 3, 1001, 65_537):
        assert torch.equal(ops.sample(x[s:].contiguous(), x[s:].contiguous(), 9, 0, starts=[s]), full[s:])
    mu, rho = x[:1001].clone().requires_grad_(), (0.1 * x[:1001]).requires_grad_()
    ops.sample(mu, rho, 9, 0, starts=[3]).sum().backward()  # the backward regenerates the same ε
    eps = reference.normal(9, 0, 1001, torch.float32, start=3).float()
    torch.testing.assert_close(rho.grad, eps * rho.detach().exp(), rtol=2e-5, atol=2e-5)


def test_starts_errors_name_the_argument():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="starts has 1 entries but there are 2 tensors"):
        ops.sample([a, a], [a, a], 1, 0, starts=[0])
    with pytest.raises(TypeError, match=r"starts\[0\] must be an int"):
        ops.sample([a], [a], 1, 0, starts=[0.5])
    with pytest.raises(ValueError, match=r"starts\[1\] must be in \[0, 2\*\*63\)"):
        ops.elbo_backward([a, a], [a, a], [a, a], [a, a], [a, a], 1, 0, 1.0, starts=[0, -1])
    with pytest.raises(ValueError, match="task_range"):
        task_starts([torch.zeros(3, 2)], (2, 4))


def test_shard_bounds_cover_the_batch_contiguously():
    for total in range(1, 12):
        for world in range(1, total + 1):
            bounds = [shard_bounds(total, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(b[0] == a[1] for a, b in zip(bounds, bounds[1:]))
            assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    with pytest.raises(ValueError, match="at least one task per rank"):
        shard_bounds(3, 0, 4)


def test_single_process_context_is_a_no_op():
    ctx = DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    stats, bad, stop, spent = ctx.step([p], {"a": 1.0}, 4, 4, False, False, 1)
    assert stats == {"a": 1.0} and bad == 0 and not stop and not spent and torch.equal(p.grad, torch.full((3,), 2.0))
    assert ctx.step([p], {"a": 1.0}, 4, 4, False, False, 2, spent=True)[3]


# ----------------------------------------------------------------------------- every learner
def _spawn_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from gemext import distributed
    ctx = distributed.setup("cpu")
    try:
        result = {}
        for algo, grads, stats in _meta_steps(ctx):
            result[algo] = (grads, stats)
        # non-finite agreement: only rank 1's step failed, only rank 0 was signalled
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        ctx._stat_keys = None
        result["guard"] = ctx.step([p], {"nll": 1.0}, 1, 2, local_bad=rank == 1, stop=rank == 0, iteration=1)
        # the time budget: rank 0's clock decides for every rank, the others' is ignored
        result["spent"] = [ctx.step([p], {"nll": 1.0}, 1, 2, False, False, 2 + r, spent=rank == r)[3] for r in (0, 1)]
        if ctx.is_main:
            torch.save(result, out)
    except BaseException:
        ctx.close(clean=False)  # the peer may be gone: no closing barrier
        raise
    ctx.close()


def _meta_steps(ctx: DistContext):
    """One meta-gradient per algorithm on the same 4 tasks, sharded over ctx's ranks."""
    from gemext import algorithms
    from gemext.train import build, meta_step
    for algo in algorithms.names():
        torch.manual_seed(0)
        cfg = RunConfig(task="sinusoid", algo=algo, meta_batch=4, inner_steps=2, out="unused")
        family, learner, T = build(cfg)
        batch = family.sample(T, torch.Generator().manual_seed(1))
        ctx._stat_keys = None  # a context serves one run (one learner); here each algorithm is one
        # the training loop's own meta-step; lr 0 leaves Θ alone so the gradients can be compared
        out = meta_step(learner, torch.optim.SGD(learner.parameters(), lr=0.0), batch, ctx, iteration=1)
        assert out.stepped, algo
        yield algo, [None if p.grad is None else p.grad.clone() for p in learner.parameters()], out.stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_learner_two_ranks_match_one(tmp_path):
    """The all-reduced meta-gradient of 2 ranks (2 + 2 tasks) equals the 1-rank one on 4 tasks."""
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_spawn_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two.pop("guard") == ({"nll": 1.0}, 1, True, False)  # every rank skips and stops together
    assert two.pop("spent") == [True, False]
    for algo, grads, stats in _meta_steps(DistContext()):
        g2, s2 = two[algo]
        assert len(grads) == len(g2), algo
        for a, b in zip(grads, g2):
            assert (a is None) == (b is None), algo
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, algo=algo: f"{algo}: {m}")
        assert s2.keys() == stats.keys(), algo
        for k in stats:
            assert abs(s2[k] - stats[k]) <= 1e-5 * max(1.0, abs(stats[k])), (algo, k)


# ----------------------------------------------------------------------------- torchrun runs
def test_two_ranks_match_one_rank_within_tolerance(runs):
    assert _max_diff(_theta(runs["one"]), _theta(runs["two"])) < TOL_THETA
    one = (runs["one"] / "log.csv").read_text().splitlines()
    two = (runs["two"] / "log.csv").read_text().splitlines()
    assert one[0] == two[0] and len(one) == len(two) == 5  # same columns, rows 3, 6, 9, 12
    files = sorted(p.name for p in runs["two"].iterdir())
    assert files == [".lock", "checkpoint.pt", "checkpoint.pt.prev", "config.json", "log.csv", "metrics.json"]


def _two_ranks(args: list[str], timeout: float = 90, **env_extra: str) -> tuple[list[int], str, float]:
    """Both ranks as plain processes (no torchrun agent that could stop rank 0 first): their exit
    codes, rank 0's stderr and rank 0's wall time."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", **env_extra}
    procs = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout)
        elapsed = time.monotonic() - t0
        try:
            procs[1].wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a hung rank: killed below
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [p.returncode for p in procs], err, elapsed


@posix
def test_killed_rank_fails_fast_and_resume_reproduces_the_run(runs, tmp_path):
    out = tmp_path / "cut"
    codes, err, elapsed = _two_ranks(_worker(tmp_path, out, "kill", 7))
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0 and elapsed < 60, (codes, elapsed)
    assert "rank 0/2: all-reduce of meta-iteration 8 failed" in err, err[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 6  # lost: iterations 7, 8 only
    proc = _torchrun(2, ["-m", "gemext", *CLI, "--out", str(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _max_diff(_theta(out), _theta(runs["two"])) == 0.0  # same world size: bitwise
    assert _max_diff(_theta(out), _theta(runs["one"])) < TOL_THETA


@posix
def test_finished_two_rank_jobs_shut_down_cleanly(tmp_path):
    """Short 2-rank CLI jobs, back to back: every one exits 0 with rank 0's files written. A process
    group left alive after destroy_process_group (gemext.distributed warns about it) let its gloo
    threads die during interpreter shutdown and abort a rank now and then; the warning makes that
    cause fail every run here, not just the unlucky ones."""
    args = ["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "2", "--meta-batch", "2",
            "--inner-steps", "1", "--no-eval", "--no-progress"]
    for i in range(7):  # about a minute here
        out = tmp_path / f"run{i}"
        proc = _torchrun(2, ["-m", "gemext", *args, "--out", str(out)])
        assert proc.returncode == 0, (i, proc.stderr[-3000:])
        assert "outlived destroy_process_group" not in proc.stderr, (i, proc.stderr[-3000:])
        assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.json", "log.csv",
                                                         "metrics.json"]
        assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2


@posix
def test_hung_rank_times_out_with_a_clear_error(tmp_path):
    """A rank that stops responding (alive, no traffic): the others give up after the timeout."""
    codes, err, elapsed = _two_ranks(_worker(tmp_path, tmp_path / "hang", "hang", 4), GEMEXT_DIST_TIMEOUT="4")
    assert codes[0] != 0 and elapsed < 60, (codes, elapsed)
    assert "PeerFailure: rank 0/2: all-reduce of meta-iteration 5 failed" in err, err[-3000:]
    assert "GEMEXT_DIST_TIMEOUT" in err


@posix
def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path):
    out = tmp_path / "term"
    proc = _torchrun(2, _worker(tmp_path, out, "term", 5, iterations=1000, checkpoint_every=1000))
    assert proc.returncode != 0
    # rank 1's flag travels in iteration 6's buffer: both ranks stop after it, rank 0 checkpoints
    assert "rank 0 interrupted at 6" in proc.stdout and "rank 1 interrupted at 6" in proc.stdout, proc.stdout
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 6


# A worker whose clock runs at a different speed on each rank: rank 0's one second per meta-step,
# rank 1's a hundred (alone, it would find a budget spent after its first step).
CLOCK_WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
import gemext.train as T
now, real_step, rate = [0.0], T.meta_step, 1.0 if os.environ["RANK"] == "0" else 100.0
def ticking_step(*args, **kwargs):
    now[0] += rate
    return real_step(*args, **kwargs)
T._clock, T.meta_step = (lambda: now[0]), ticking_step
seen = []
T.train(T.RunConfig(**json.loads(sys.argv[1])), progress=False, on_iteration=seen.append)
print(f"rank {os.environ['RANK']} trained {seen[-1]}", flush=True)
"""


@posix
def test_two_ranks_stop_by_the_time_budget_on_rank_0s_clock(tmp_path):
    out, script = tmp_path / "budget", tmp_path / "clock_worker.py"
    script.write_text(CLOCK_WORKER)
    proc = _torchrun(2, [str(script), json.dumps({**RUN, "out": str(out), "iterations": 100, "time_budget": 4.5})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 trained 5" in proc.stdout and "rank 1 trained 5" in proc.stdout, proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 5 and metrics["stopped_by"] == "time_budget"
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 5


def test_prior_rho_is_clamped_after_each_meta_step(tmp_path):
    from gemext.vi import RHO_MAX, RHO_MIN
    opts = {**RUN.get("algo_options", {}), "sigma0_range": None}  # unbounded: only the safe range clamps
    run = train(RunConfig(**{**RUN, "iterations": 3, "meta_lr": 50.0, "algo_options": opts}, out=str(tmp_path / "r")),
                progress=False)
    rho0 = [v for k, v in _theta(run).items() if ".rho0." in k]
    assert rho0 and all(bool(((r >= RHO_MIN) & (r <= RHO_MAX)).all()) for r in rho0)
    assert any(bool(((r == RHO_MIN) | (r == RHO_MAX)).any()) for r in rho0)  # the clamp was needed


# ----------------------------------------------------------------------------- checkpoints
def test_corrupt_wrong_version_or_foreign_checkpoint_is_refused(runs, tmp_path):
    import shutil
    run = tmp_path / "r"
    shutil.copytree(runs["one"], run)
    cfg = RunConfig(**{**RUN, "iterations": 15}, out=str(run))
    good = (run / "checkpoint.pt").read_bytes()
    ckpt = load_checkpoint(run / "checkpoint.pt")
    envelope = torch.load(run / "checkpoint.pt", weights_only=True)

    (run / "checkpoint.pt").write_bytes(good[: len(good) // 3])  # truncated: the .prev is offered
    with pytest.raises(ValueError, match=r"corrupt.*checkpoint.pt.prev \(iteration 9\) is good.*mv "):
        train(cfg, resume=True, progress=False)
    (run / "checkpoint.pt.prev").write_bytes(b"junk")  # both bad: no advice
    with pytest.raises(ValueError, match="corrupt") as info:
        train(cfg, resume=True, progress=False)
    assert ".prev" not in str(info.value)

    torch.save({**envelope, "version": 99}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="format version 99.*newer gemext"):
        train(cfg, resume=True, progress=False)
    torch.save({**envelope, "version": 2}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="format version 2.*earlier gemext.*train the run again"):
        train(cfg, resume=True, progress=False)

    other = {k: (torch.zeros(7, 3) if k.endswith("mu0.0") else v) for k, v in ckpt["learner"].items()}
    gemext_runs.atomic_save({**ckpt, "learner": other}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit this run's model"):
        train(cfg, resume=True, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["learner"]["prior.mu0.0"].shape == (7, 3)


def test_sharded_von_fit_is_bitwise_the_full_batch_fit():
    """Tasks k.. of a meta-batch fitted as a shard (task_range: the full batch's noise) get exactly
    the posteriors they get in the full batch (shards of two or more tasks): von's per-task solves
    and step halvings never depend on which other tasks share the batch."""
    from gemext.train import build
    _, learner, _ = build(RunConfig(task="sinusoid", algo="gem-bml+", out="unused", meta_batch=6,
                                    algo_options={"inner_steps": 3}))
    family = build(RunConfig(task="sinusoid", algo="gem-bml+", out="unused"))[0]
    b = family.sample(6, torch.Generator().manual_seed(1))
    state = learner.generator.get_state()
    full = learner._fit(b.x_support, b.y_support, learner.prior.expand(6), learner.prior.expand(6), 3).posterior
    for lo in (0, 2, 4, 5):
        learner.generator.set_state(state)
        part = learner._fit(b.x_support[lo:], b.y_support[lo:], learner.prior.expand(6 - lo),
                            learner.prior.expand(6 - lo), 3, task_range=(lo, 6)).posterior
        for a, c in zip(full.mu + full.rho, part.mu + part.rho):
            if lo < 5:
                assert torch.equal(a[lo:], c), lo
            else:  # a one-task batch takes other BLAS paths: equal up to rounding
                torch.testing.assert_close(c, a[lo:], rtol=1e-5, atol=1e-6)
    assert not torch.equal(full.mu[0][0], full.mu[0][1])  # tasks differ: the check can fail
