"""Meta-RL tasks: environments, rollouts, GAE/baseline, policy, REINFORCE and TRPO (each against an
independent reference computed here)."""
from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import gemext.tasks.rl as rl
from gemext.tasks.rl import EpisodeBatch

HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
needs_mujoco = pytest.mark.skipif(not HAS_MUJOCO, reason="mujoco not installed (pip install 'gymnasium[mujoco]')")


# ---------------------------------------------------------------- environments
def test_nav2d_dynamics_and_reward_exact():
    env = gym.make("gemext/Nav2D-v0", task={"goal": np.array([0.3, -0.2])})
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, [0.0, 0.0])
    pos = np.zeros(2)
    for a in ([0.5, 0.05], [-0.02, -3.0], [0.07, 0.1]):
        obs, r, term, trunc, _ = env.step(np.array(a))
        pos = pos + np.clip(a, -0.1, 0.1)
        np.testing.assert_allclose(obs, pos, atol=1e-7)
        assert r == pytest.approx(-math.hypot(pos[0] - 0.3, pos[1] + 0.2), abs=1e-12)
        assert not term and not trunc
    assert env.spec.max_episode_steps == 100
    steps = 3
    while not trunc:
        *_, term, trunc, _ = env.step(np.zeros(2))
        steps += 1
    assert steps == 100 and not term


@pytest.mark.parametrize("name,key,lo,hi", [("nav2d", "goal", -0.5, 0.5), ("halfcheetah-vel", "velocity", 0, 2),
                                            ("ant-vel", "velocity", 0, 3), ("halfcheetah-dir", "direction", -1, 1),
                                            ("ant-dir", "direction", -1, 1)])
def test_task_sampling_reproducible(name, key, lo, hi):
    a, b, c = (rl.sample_tasks(name, 50, s) for s in (3, 3, 4))
    va, vb, vc = (np.array([t[key] for t in x]) for x in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)
    assert va.min() >= lo and va.max() <= hi
    if key == "direction":
        assert set(va.tolist()) == {-1.0, 1.0}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    np.testing.assert_array_equal([t[key] for t in rl.sample_tasks(name, 5, g1)],
                                  [t[key] for t in rl.sample_tasks(name, 5, g2)])


def test_bad_task_inputs_are_named():
    with pytest.raises(ValueError, match="unknown RL task"):
        rl.sample_tasks("nav3d", 2)
    with pytest.raises(ValueError, match="positive int"):
        rl.sample_tasks("nav2d", 0)
    with pytest.raises(ValueError, match="goal"):
        rl.Nav2DEnv(task={"velocity": 1.0})


@needs_mujoco
def test_halfcheetah_reward_matches_recomputation_from_qpos():
    env = gym.make("gemext/HalfCheetahVel-v0", task={"velocity": 1.3})
    denv = gym.make("gemext/HalfCheetahDir-v0", task={"direction": -1})
    env.reset(seed=1)
    denv.reset(seed=1)
    rng = np.random.default_rng(0)
    base = env.unwrapped
    for _ in range(5):
        a = rng.normal(size=6) * 1.5  # partly outside [-1, 1]: cost is on the action as given
        x0 = base.data.qpos[0]
        _, r, *_ = env.step(a)
        _, rd, *_ = denv.step(a)
        v = (base.data.qpos[0] - x0) / 0.05
        assert r == pytest.approx(-abs(v - 1.3) - 0.05 * np.sum(a**2), rel=1e-9)
        assert rd == pytest.approx(-v - 0.05 * np.sum(a**2), rel=1e-9)  # same seed, same state


@needs_mujoco
def test_ant_reward_matches_recomputation_from_cfrc_ext():
    env = gym.make("gemext/AntVel-v0", task={"velocity": 2.0})
    env.reset(seed=2)
    base = env.unwrapped
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.uniform(-1, 1, size=8)
        x0 = base.data.body(1).xpos[0]
        _, r, *_ = env.step(a)
        v = (base.data.body(1).xpos[0] - x0) / base.dt
        contact = 5e-4 * np.sum(np.clip(base.data.cfrc_ext, -1, 1) ** 2)
        assert r == pytest.approx(1 - abs(v - 2.0) - 0.005 * np.sum(a**2) - contact + 0.05, rel=1e-9)


# ---------------------------------------------------------------- returns, GAE, baseline
def _random_batch(t=12, k=5, obs_dim=3, seed=0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, 3, 7, 1, t - 1][:k])
    mask = (torch.arange(t)[:, None] < lengths[None, :]).float()
    obs = torch.randn(t, k, obs_dim, generator=g) * mask[..., None]
    rew = torch.randn(t, k, generator=g) * mask
    return EpisodeBatch(obs, torch.randn(t, k, 1, generator=g) * mask[..., None], rew, mask)


def test_gae_and_returns_match_float64_loop():
    b = _random_batch()
    values = torch.randn(b.rewards.shape, generator=torch.Generator().manual_seed(5))
    gamma, lam = 0.9, 0.7
    adv = rl.gae(b.rewards.double(), values.double(), b.mask.double(), gamma, lam)
    ret = rl.discounted_returns(b.rewards.double(), b.mask.double(), gamma)
    for i in range(b.num_episodes):
        n = int(b.mask[:, i].sum())
        r, v = b.rewards[:n, i].double().tolist(), values[:n, i].double().tolist() + [0.0]
        for t in range(n):
            expect_a = sum((gamma * lam) ** (k - t) * (r[k] + gamma * v[k + 1] - v[k]) for k in range(t, n))
            expect_r = sum(gamma ** (k - t) * r[k] for k in range(t, n))
            assert adv[t, i].item() == pytest.approx(expect_a, abs=1e-12)
            assert ret[t, i].item() == pytest.approx(expect_r, abs=1e-12)
        assert torch.all(adv[n:, i] == 0) and torch.all(ret[n:, i] == 0)


def test_linear_baseline_matches_ridge_least_squares():
    b = _random_batch(t=30, obs_dim=2)
    ret = rl.discounted_returns(b.rewards, b.mask, 0.99)
    bl = rl.LinearFeatureBaseline(reg_coeff=1e-3).fit(b, ret)
    rows, ys = [], []
    for i in range(b.num_episodes):
        for t in range(int(b.mask[:, i].sum())):
            o = b.observations[t, i].double().numpy()
            s = t / 100.0
            rows.append(np.concatenate([o, o**2, [s, s**2, s**3, 1.0]]))
            ys.append(ret[t, i].item())
    x, y = np.array(rows), np.array(ys)
    w = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ y)
    np.testing.assert_allclose(bl.weights.numpy(), w, rtol=1e-8, atol=1e-10)
    pred = bl.predict(b)
    assert torch.all(pred[b.mask == 0] == 0)
    processed = rl.process(b, gamma=0.99)
    valid = processed.advantages[b.mask == 1]
    assert valid.mean().abs() < 1e-5 and valid.std(unbiased=False) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- policy
def test_policy_log_prob_entropy_match_torch_distributions_and_vmap():
    torch.manual_seed(0)
    pol = rl.GaussianMLPPolicy(3, 2, hidden=(8, 8), init_log_std=-0.3)
    obs, act = torch.randn(4, 5, 3), torch.randn(4, 5, 2)
    mean, log_std = pol(obs)
    ref = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(pol.log_prob(obs, act), ref.log_prob(act).sum(-1))
    torch.testing.assert_close(pol.entropy(obs), ref.entropy().sum(-1))
    # batched parameter sets through torch.func.vmap give the per-set results
    stacked = {k: torch.stack([v, v + 0.1]) for k, v in pol.params().items()}
    out = torch.func.vmap(lambda p: pol.log_prob(obs, act, p))(stacked)
    shifted = {k: v + 0.1 for k, v in pol.params().items()}
    torch.testing.assert_close(out[1], pol.log_prob(obs, act, shifted))
    with pytest.raises(ValueError, match="obs last dim"):
        pol(torch.randn(2, 4))


# ---------------------------------------------------------------- REINFORCE and TRPO
def test_reinforce_gradient_unbiased_on_gaussian_bandit():
    # 1-D bandit: a ~ N(μ, σ²), r(a) = −(a − c)², J = −(μ − c)² − σ², so ∂J/∂μ = −2(μ − c) and
    # ∂J/∂log σ = −2σ². The policy's mean for obs = 0 is its last bias plus a constant, so the
    # gradient of −pg_surrogate w.r.t. that bias estimates ∂J/∂μ.
    torch.manual_seed(0)
    pol = rl.GaussianMLPPolicy(1, 1, hidden=(4,), init_log_std=math.log(0.7))
    params = pol.params()
    mu, sigma, c = pol(torch.zeros(1, 1))[0].item(), 0.7, 0.4
    g = torch.Generator().manual_seed(1)
    n, reps, grads = 64, 600, []
    obs = torch.zeros(1, n, 1)
    for _ in range(reps):
        a = pol.act(obs, params, g)
        r = -((a - c) ** 2).squeeze(-1)
        b = EpisodeBatch(obs, a, r, torch.ones(1, n), advantages=r + 0.3)  # constant baseline: no bias
        gr = torch.autograd.grad(rl.pg_surrogate(pol, params, b), [params["mean.2.bias"], params["log_std"]])
        grads.append(-torch.cat(gr))
    grads = torch.stack(grads).double()
    est, se = grads.mean(0), grads.std(0) / math.sqrt(reps)
    exact = torch.tensor([-2 * (mu - c), -2 * sigma**2], dtype=torch.float64)
    assert torch.all((est - exact).abs() < 4 * se), (est, exact, se)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    from gemext.linalg import conjugate_gradient  # TRPO's use: one flat system, early stop on the residual

    x = conjugate_gradient(lambda v: [(a @ v[0][0]).unsqueeze(0)], [b.unsqueeze(0)], 20, residual_tol=1e-20)[0][0]
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_trpo_step_on_quadratic_matches_closed_form():
    # loss = gᵀx, KL(x) = ½ (x−x0)ᵀ F (x−x0): TRPO's step is −√(2δ / gᵀF⁻¹g) F⁻¹g exactly.
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    f = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]], dtype=torch.float64)
    x0 = [torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)]
    delta = 0.02
    new, info = rl.trpo_step(x0, lambda p: g @ p[0], lambda p: 0.5 * (p[0] - x0[0]) @ f @ (p[0] - x0[0]),
                             max_kl=delta, damping=0.0, cg_iters=3)
    nat = torch.linalg.solve(f, g)
    expect = x0[0] - math.sqrt(2 * delta / (g @ nat)) * nat
    torch.testing.assert_close(new[0], expect)
    assert info["accepted"] == 1.0 and info["backtracks"] == 0.0
    assert info["kl"] == pytest.approx(delta, rel=1e-6)


def test_trpo_step_on_policy_respects_kl_and_improves():
    torch.manual_seed(0)
    pol = rl.GaussianMLPPolicy(3, 2, hidden=(16, 16))
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(10, 8, 3, generator=g)
    act = pol.act(obs, None, g)
    b = EpisodeBatch(obs, act, torch.zeros(10, 8), torch.ones(10, 8),
                     advantages=(act[..., 0] - act[..., 1]))  # prefers larger a0 − a1
    old = {k: v.detach() for k, v in pol.params().items()}
    old_logp = pol.log_prob(obs, act).detach()
    delta = 0.01
    new, info = rl.trpo_step(old, lambda p: rl.trpo_surrogate(pol, p, b, old_logp),
                             lambda p: rl.mean_kl(pol, p, b, old), max_kl=delta, damping=1e-3)
    assert info["accepted"] == 1.0
    kl = rl.mean_kl(pol, new, b, old).item()
    assert 0 < kl <= delta
    assert rl.trpo_surrogate(pol, new, b, old_logp).item() < rl.trpo_surrogate(pol, old, b, old_logp).item()
    with pytest.raises(ValueError, match="max_kl"):
        rl.trpo_step(old, lambda p: 0, lambda p: 0, max_kl=0.0)


def test_reinforce_step_is_sgd_on_the_surrogate():
    torch.manual_seed(0)
    b = _random_batch(obs_dim=3)
    b.actions = torch.randn(b.actions.shape[:2] + (2,))
    b = rl.process(b)
    pol = rl.GaussianMLPPolicy(3, 2, hidden=(8,))
    params = pol.params()
    new = rl.reinforce_step(pol, params, b, lr=0.1)
    grads = torch.autograd.grad(rl.pg_surrogate(pol, params, b), list(params.values()))
    for (k, v), gr in zip(params.items(), grads):
        torch.testing.assert_close(new[k], v.detach() - 0.1 * gr)
    assert not any(v.requires_grad for v in new.values())
    assert all(v.requires_grad for v in rl.reinforce_step(pol, params, b, 0.1, create_graph=True).values())


# ---------------------------------------------------------------- rollouts
def test_collector_nav2d_rewards_match_replay_and_are_reproducible():
    task = rl.sample_tasks("nav2d", 1, 0)[0]
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(8,))
    with rl.RolloutCollector("nav2d", num_envs=3, seed=0) as col:
        b1 = col.collect(pol, None, task, 5, torch.Generator().manual_seed(4))
        b2 = col.collect(pol, pol.params(), task, 5, torch.Generator().manual_seed(4))
    assert b1.observations.shape == (100, 5, 2) and b1.num_steps == 500
    torch.testing.assert_close(b1.rewards, b2.rewards)
    # replay the recorded actions by hand
    for i in range(5):
        pos = np.zeros(2)
        for t in range(100):
            np.testing.assert_allclose(b1.observations[t, i].numpy(), pos, atol=1e-5)
            pos = pos + np.clip(b1.actions[t, i].double().numpy(), -0.1, 0.1)
            assert b1.rewards[t, i].item() == pytest.approx(-np.linalg.norm(pos - task["goal"]), abs=1e-5)


def test_async_collector_matches_sync():
    task = {"goal": np.array([0.2, 0.4])}
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(8,))
    out = []
    for mode in ("sync", "async"):
        with rl.RolloutCollector("nav2d", num_envs=2, mode=mode, horizon=10, seed=0) as col:
            out.append(col.collect(pol, None, task, 3, torch.Generator().manual_seed(1)))
    assert out[0].rewards.shape == (10, 3)
    torch.testing.assert_close(out[0].rewards, out[1].rewards)


def test_policy_from_a_generator_starts_as_nn_linear_does_and_leaves_the_global_stream():
    torch.manual_seed(5)
    expect = [p.detach().clone() for p in rl.GaussianMLPPolicy(2, 3, hidden=(8, 4)).parameters()]
    before = torch.get_rng_state()
    pol = rl.GaussianMLPPolicy(2, 3, hidden=(8, 4), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in zip(expect, pol.parameters()):
        assert torch.equal(a, b)


def _sampler(seed, **kw):
    col = rl.RolloutCollector("nav2d", num_envs=2, horizon=10, seed=seed)
    pol = col.make_policy((8,), generator=torch.Generator().manual_seed(seed))
    return rl.Sampler(col, pol, torch.Generator().manual_seed(seed + 1), episodes=3, **kw)


def test_sampler_rollouts_are_fixed_by_its_streams_alone():
    """Two samplers with alike streams roll out alike, whatever the global stream does; the rollouts
    advance the sampler's streams, never torch's global one; reseed and set_rng_state restart them."""
    task = rl.sample_tasks("nav2d", 1, 0)[0]
    a, b = _sampler(3), _sampler(3)
    state = a.rng_state()
    before = torch.get_rng_state()
    first = a.rollouts(a.policy.params(), task)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    torch.testing.assert_close(b.rollouts(b.policy.params(), task).actions, first.actions, rtol=0, atol=0)
    second = a.rollouts(a.policy.params(), task)
    assert not torch.equal(second.actions, first.actions)  # the streams moved on
    a.set_rng_state(state)
    torch.testing.assert_close(a.rollouts(a.policy.params(), task).rewards, first.rewards, rtol=0, atol=0)
    a.reseed(9)
    b.reseed(9)
    torch.testing.assert_close(a.rollouts(a.policy.params(), task, 2).actions,
                               b.rollouts(b.policy.params(), task, 2).actions, rtol=0, atol=0)
    assert a.collector.total_steps == 3 * 10 + 2 * 10 and a.horizon == 10  # counted from the restored state
    for s in (a, b):
        s.collector.close()


@needs_mujoco
def test_mujoco_smoke_collect_process_update():
    with rl.RolloutCollector("ant-dir", num_envs=2, horizon=15, seed=0) as col:
        pol = col.make_policy(hidden=(16,))
        b = rl.process(col.collect(pol, None, {"direction": 1.0}, 3, torch.Generator().manual_seed(0)))
    assert b.observations.shape[1:] == (3, col.obs_dim) and b.observations.shape[0] <= 15
    assert torch.isfinite(b.advantages).all()
    new = rl.reinforce_step(pol, pol.params(), b, lr=0.05)
    assert set(new) == set(pol.params())
    with rl.RolloutCollector("halfcheetah-vel", num_envs=2, horizon=5, seed=0) as col:
        b = col.collect(col.make_policy(hidden=(16,)), None, {"velocity": 0.5}, 2)
    assert b.num_steps == 10 and torch.isfinite(b.rewards).all()


# ---------------------------------------------------------------- meta-RL (gemext.families.rl, gemext.algorithms.rl)
TINY = dict(episodes=3, meta_batch=2, horizon=12, hidden=[8, 8], num_envs=3, eval_tasks=2, eval_episodes=3,
            eval_steps=1)
# GEM/Reptile: sigma0 0.1, since with 3 episodes of 12 steps the default 0.01 would make the inner SGD
# step's pull to the prior 0.1/36·1/0.01² ≈ 28 per step, which the GEM learners refuse (it diverges)
TINY_GEM = dict(sigma0=0.1)


def _run(tmp_path, algo, iterations=2, task="nav2d", **kw):
    from gemext.train import RunConfig

    opts = {**TINY, **({} if algo == "maml" else TINY_GEM), **kw}
    return RunConfig(task=task, algo=algo, iterations=iterations, out=str(tmp_path / algo), log_every=1,
                     checkpoint_every=1, meta_lr=1e-2, algo_options=opts)


@pytest.mark.parametrize("algo", ["gem-bml", "gem-bml+", "reptile", "maml"])
def test_train_eval_nav2d_end_to_end(tmp_path, algo, capsys):
    import json

    from gemext.train import evaluate, train

    run = train(_run(tmp_path, algo), progress=False)
    for f in ("config.json", "checkpoint.pt", "log.csv", "metrics.json"):
        assert (run / f).exists(), f
    capsys.readouterr()
    m = evaluate(run)
    assert f"meta-test {algo} (2 tasks, 1 updates): 2/2" in capsys.readouterr().err  # progress, also off a TTY
    assert {"task", "algo", "seed", "iterations", "wall_s", "return_by_step"} <= set(m)
    assert m["algo"] == algo and m["iterations"] == 2 and len(m["return_by_step"]) == 2
    assert all(math.isfinite(r) for r in m["return_by_step"])
    assert json.loads((run / "metrics.json").read_text())["return_by_step"] == m["return_by_step"]
    assert (run / "return_vs_steps.png").exists() and (run / "trajectories.png").exists()
    from gemext.families.rl import RLFamily
    assert set(RLFamily.eval_outputs) == {"return_vs_steps.png", "trajectories.png"}  # removed on a longer resume


@pytest.mark.parametrize("algo", ["gem-bml", "gem-bml+"])
def test_an_inner_sgd_step_that_overshoots_the_prior_is_refused(tmp_path, algo):
    """3 episodes of 12 steps with σ₀ 0.01: the KL term's SGD step pulls μ − μ₀ by 0.1/36·1e4 ≈ 28
    per step (its returns blew up to −1e22 at meta-test); refused with the numbers and the fixes.
    Reptile (no KL term) and the defaults (20 episodes of 100 steps: 0.5) are fine."""
    from gemext.train import train

    with pytest.raises(ValueError, match=r"= 27.8 per step, which must stay below 1.*raise episodes"):
        train(_run(tmp_path, algo, sigma0=0.01), progress=False)
    assert not (tmp_path / algo).exists()  # refused before the run folder was kept
    from gemext.families.rl import RLFamily, RLRunSettings
    from gemext.train import RunConfig
    d = RLFamily.learner_options_for(RunConfig(task="nav2d", algo=algo))
    assert d["inner_lr"] / (RLRunSettings().episodes * 100) * d["beta"] / d["sigma0"] ** 2 == pytest.approx(0.5)


def test_resume_compares_the_resolved_rl_settings(tmp_path):
    """An RL option spelled out at its default, or a meta-test-only one, is no change on --resume;
    a change of the trajectory is refused, naming the option."""
    from gemext.train import train

    run = _run(tmp_path, "gem-bml+", iterations=1)
    train(run, progress=False)
    more = _run(tmp_path, "gem-bml+", iterations=2, inner_steps=1, eval_tasks=3)
    train(more, resume=True, progress=False)
    other = _run(tmp_path, "gem-bml+", iterations=3, episodes=4)
    with pytest.raises(ValueError, match=r"algo_options\.episodes: 3 -> 4"):
        train(other, resume=True, progress=False)


def test_resume_continues_exactly(tmp_path):
    from gemext.train import load_checkpoint, train

    full = _run(tmp_path / "a", "gem-bml+")
    train(full, progress=False)
    part = _run(tmp_path / "b", "gem-bml+", )
    part.iterations = 1
    train(part, progress=False)
    part.iterations = 2
    train(part, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "a/gem-bml+/checkpoint.pt")["learner"]
    b = load_checkpoint(tmp_path / "b/gem-bml+/checkpoint.pt")["learner"]
    assert a.keys() == b.keys() and any(k.startswith("core.prior.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _build_rl(algo, options, meta_lr=1e-2):
    """(learner options, sampler, learner, family) of a small nav2d run (close the family when done)."""
    from gemext.train import RunConfig, open_family

    family = open_family(RunConfig(task="nav2d", algo=algo, out="unused", meta_lr=meta_lr, algo_options=options))
    return family.learner_options_for(family.config), family.sampler, family.build_learner(), family


def test_point_posterior_vi_step_equals_policy_gradient_step():
    # Reptile's inner fit (core VI loop, delta posterior, SGD lr = inner_lr / s on s·L_PG) must move
    # μ exactly like one REINFORCE step of size inner_lr, task by task (vmapped likelihood).
    opts, sampler, learner, family = _build_rl("reptile", dict(TINY))
    tasks = rl.sample_tasks("nav2d", 2, 1)
    mu0 = {n: m.detach() for n, m in zip(learner.names, learner.core.prior.mu0)}
    batches = [sampler.rollouts(mu0, t) for t in tasks]
    prior = learner.core.prior.expand(2)
    fitted = learner._fit(batches, prior, learner.core.start(prior), 1).posterior
    for i, b in enumerate(batches):
        expect = rl.reinforce_step(sampler.policy, mu0, b, opts["inner_lr"])
        for n, m in zip(learner.names, fitted.task(i).mu):
            torch.testing.assert_close(m, expect[n], rtol=1e-5, atol=1e-6)
    family.close()


@pytest.mark.parametrize("sigma0_range", ["shrink", None])
def test_gem_rl_learned_prior_std_stays_in_its_range(sigma0_range):
    """The RL meta-step clamps σ₀ into its range after each update (a large meta step would leave it)."""
    from gemext.train import meta_step

    opts, sampler, learner, family = _build_rl("gem-bml+", dict(TINY, **TINY_GEM, sigma0_range=sigma0_range), 0.5)
    opt = learner.meta_optimizer(0.5)
    for it in range(2):
        assert meta_step(learner, opt, rl.sample_tasks("nav2d", 2, it)).stepped
    s0 = torch.cat([r.detach().exp().flatten() for r in learner.core.prior.rho0])
    family.close()
    if sigma0_range == "shrink":
        assert float(s0.max()) <= opts["sigma0"] * (1 + 1e-6) and float(s0.min()) >= opts["sigma0"] / 10 * (1 - 1e-6)
    else:  # unbounded: the same steps leave (σ₀/10, σ₀)
        assert float(s0.max()) > opts["sigma0"] * 1.1 or float(s0.min()) < opts["sigma0"] / 10


def test_gem_rl_von_inner_fit_moves_mean_and_variance():
    von = dict(TINY, inner_optimizer="von", inner_lr=1.0, inner_options={"curvature": "reparam", "coupling": "diag"})
    _, sampler, learner, family = _build_rl("gem-bml+", von)
    tasks = rl.sample_tasks("nav2d", 2, 1)
    mu0 = {n: m.detach() for n, m in zip(learner.names, learner.core.prior.mu0)}
    batches = [sampler.rollouts(mu0, t) for t in tasks]
    prior = learner.core.prior.expand(2)
    post = learner._fit(batches, prior, prior, 1).posterior
    family.close()
    moved_mu = max(float((m - m0).abs().max()) for m, m0 in zip(post.mu, prior.mu))
    shrunk = min(float((r - r0).min()) for r, r0 in zip(post.rho, prior.rho))
    assert all(torch.isfinite(t).all() for t in post.mu + post.rho)
    assert moved_mu > 0 and shrunk < 0  # the data made some weights more certain
    assert all(bool((r <= r0 + 1e-6).all()) for r, r0 in zip(post.rho, prior.rho))  # never less certain


def test_maml_inner_step_is_differentiable_like_finite_differences():
    torch.manual_seed(0)
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(4,)).double()
    b, q = (rl.process(EpisodeBatch(torch.randn(6, 3, 2, dtype=torch.float64),
                                    torch.randn(6, 3, 2, dtype=torch.float64),
                                    torch.randn(6, 3, dtype=torch.float64), torch.ones(6, 3, dtype=torch.float64)))
            for _ in range(2))
    params = {k: v.detach().requires_grad_() for k, v in pol.named_parameters()}

    def outer(p):
        return rl.pg_surrogate(pol, rl.reinforce_step(pol, p, b, 0.5, create_graph=True), q)

    grads = torch.autograd.grad(outer(params), list(params.values()))
    d = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-6
    fd = (outer({k: v + eps * d[k] for k, v in params.items()})
          - outer({k: v - eps * d[k] for k, v in params.items()})) / (2 * eps)
    assert sum((g * d[k]).sum() for g, k in zip(grads, params)).item() == pytest.approx(fd.item(), rel=1e-5)


def test_rl_options_are_validated(tmp_path):
    from gemext.train import train

    with pytest.raises(ValueError, match="maml: unknown option.s. episodez; valid: .*episodes.*max_kl"):
        train(_run(tmp_path, "maml", episodez=3), progress=False)
    with pytest.raises(ValueError, match="not available for nav2d"):
        train(_run(tmp_path, "abml"), progress=False)
    with pytest.raises(ValueError, match="RL option episodes must be an integer >= 1, got 'x'"):
        train(_run(tmp_path, "maml", episodes="x"), progress=False)
    with pytest.raises(ValueError, match="RL option horizon must be an integer >= 1 or null"):
        train(_run(tmp_path, "maml", horizon=0), progress=False)
    with pytest.raises(ValueError, match="RL option vector must be 'sync' or 'async'"):
        train(_run(tmp_path, "maml", vector="threads"), progress=False)
    # a learner's option: typed by the registry; another learner's: refused naming who takes it
    with pytest.raises(TypeError, match="maml: option first_order must be bool, got int 1"):
        train(_run(tmp_path, "maml", first_order=1), progress=False)
    for algo, option, users in (("gem-bml+", "max_kl", "maml"), ("maml", "sigma0", "gem-bml, gem-bml+, reptile"),
                                ("reptile", "beta", "gem-bml, gem-bml+")):
        line = f"{algo}: option {option} is used only by {users}, not by {algo}; valid: "
        with pytest.raises(ValueError, match=re.escape(line)):
            train(_run(tmp_path, algo, **{option: 0.5}), progress=False)
    with pytest.raises(ValueError, match="option sampler is set by the task family"):
        train(_run(tmp_path, "maml", sampler=None), progress=False)
    with pytest.raises(ValueError, match="one policy-gradient step; inner_steps 2"):
        train(_run(tmp_path, "maml", inner_steps=2), progress=False)
    with pytest.raises(ValueError, match="gem-bml: option inner_lr must be > 0, got 0"):
        train(_run(tmp_path, "gem-bml", inner_lr=0), progress=False)
    assert not list(tmp_path.iterdir())  # every refusal came before a run folder was kept


def test_rl_learner_options_go_through_the_registry():
    """The RL learners' options are their keyword parameters, checked by the registry as every
    learner's are (before the learner is built: no sampler needed to be refused)."""
    from torch import nn

    from gemext import algorithms

    assert algorithms.option_names("maml", "rl") == [
        "cg_damping", "cg_iters", "first_order", "inner_lr", "inner_steps", "ls_backtrack_ratio", "ls_max_steps",
        "max_kl", "sampler", "seed"]
    assert set(algorithms.option_names("gem-bml+", "rl")) - set(algorithms.option_names("reptile", "rl")) == {
        "beta", "learn_sigma", "mc_samples", "sigma0_range"}
    with pytest.raises(ValueError, match="reptile: option mc_samples is used only by gem-bml, gem-bml\\+"):
        algorithms.create("reptile", nn.Linear(2, 2), domain="rl", mc_samples=2)
    with pytest.raises(ValueError, match="gem-bml: unknown option.s. max_kl; valid: beta"):
        algorithms.create("gem-bml", nn.Linear(2, 2), domain="rl", max_kl=0.1)
    with pytest.raises(TypeError, match="gem-bml: option sigma0 must be float, got str"):
        algorithms.create("gem-bml", nn.Linear(2, 2), domain="rl", sigma0="big")


def test_rl_family_splits_its_settings_from_the_learner_options(tmp_path):
    """learner_options_for gives every option of the run's learner (its defaults, the run's options
    and --inner-steps), the rest of --options (and --meta-batch) are the family's; config.json keeps
    the options as given and records the learner's under resolved."""
    import json

    from gemext.families.rl import RLFamily
    from gemext.train import RunConfig, train

    config = RunConfig(task="nav2d", algo="reptile", inner_steps=2, meta_batch=3,
                       algo_options={"episodes": 4, "sigma0": 0.5, "hidden": [8]})
    opts = RLFamily.learner_options_for(config)
    assert opts == {"inner_lr": 0.1, "inner_steps": 2, "query_steps": 1, "sigma0": 0.5, "inner_optimizer": "sgd",
                    "inner_options": None, "likelihood_scale": None}
    config = _run(tmp_path, "gem-bml+", iterations=1, inner_lr=0.05)
    config.meta_batch = 1  # the flag over the option
    cfg = json.loads((train(config, progress=False) / "config.json").read_text())
    assert cfg["algo_options"] == {**TINY, **TINY_GEM, "inner_lr": 0.05} and cfg["meta_batch"] == 1
    assert cfg["resolved"]["learner_options"] == {**RLFamily.learner_options_for(_run(tmp_path, "gem-bml+")),
                                                  "inner_lr": 0.05}
    assert cfg["resolved"]["meta_batch"] == 1


@needs_mujoco
def test_mujoco_meta_training_smoke(tmp_path):
    from gemext.train import evaluate, train

    run = train(_run(tmp_path, "gem-bml+", iterations=1, task="halfcheetah-dir", horizon=8), progress=False)
    assert len(evaluate(run, plots=False)["return_by_step"]) == 2


@needs_mujoco
def test_mujoco_ids_expose_the_task_api_on_unwrapped_quietly():
    code = ("import gemext, gymnasium as gym; e = gym.make('gemext/HalfCheetahVel-v0'); u = e.unwrapped; "
            "u.set_task({'velocity': 1.5}); e.reset(seed=0); _, r, _, _, info = e.step(e.action_space.sample()); "
            "assert u.task == {'velocity': 1.5} and r == info['reward_task'] and u.data.qpos.shape == (9,); "
            "assert e.spec.id == 'gemext/HalfCheetahVel-v0'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "deprecated" not in proc.stderr, proc.stderr
