"""Meta-RL tasks: environments, rollouts, GAE/baseline, policy, REINFORCE and TRPO (each against an
independent reference computed here)."""
from __future__ import annotations

import importlib.util
import math
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


def test_fewer_episodes_than_copies_step_only_their_copies():
    """3 episodes on a sync pool of 5 are the 3 episodes of a pool of 3 (same reset seeds, same noise
    draws), and the 2 spare copies are never stepped; the async pool, which steps every worker, agrees."""
    task = {"goal": np.array([0.2, 0.4])}
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(8,))
    out = []
    for n, mode in ((3, "sync"), (5, "sync"), (5, "async")):
        with rl.RolloutCollector("nav2d", num_envs=n, mode=mode, horizon=10, seed=0) as col:
            out.append(col.collect(pol, None, task, 3, torch.Generator().manual_seed(1)))
            if mode == "sync":
                assert [e._elapsed_steps for e in col.envs.envs] == [10] * 3 + [None] * (n - 3)
    assert out[0].rewards.shape == (10, 3) and out[0].num_steps == 30
    for other in out[1:]:
        torch.testing.assert_close(other.rewards, out[0].rewards)
        torch.testing.assert_close(other.actions, out[0].actions)


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
def test_episodes_that_end_early_stop_their_copy_and_match_the_async_pool():
    """Ant episodes end when the ant falls: the sync collector steps only live copies, the async pool
    steps every worker on; their recorded episodes are the same."""
    task = rl.sample_tasks("ant-vel", 1, 0)[0]
    pol = rl.GaussianMLPPolicy(105, 8, hidden=(8,), init_log_std=1.0)
    out = []
    for mode in ("sync", "async"):
        with rl.RolloutCollector("ant-vel", num_envs=3, mode=mode, horizon=120, seed=0) as col:
            out.append(col.collect(pol, None, task, 3, torch.Generator().manual_seed(2)))
            if mode == "sync":  # each copy stepped exactly its episode's length
                assert [e._elapsed_steps for e in col.envs.envs] == out[0].mask.sum(0).int().tolist()
    lengths = out[0].mask.sum(0)
    assert lengths.min() < lengths.max()  # the episodes end at different steps
    for key in ("observations", "actions", "rewards", "mask"):
        torch.testing.assert_close(getattr(out[0], key), getattr(out[1], key))


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


@needs_mujoco
def test_mujoco_ids_expose_the_task_api_on_unwrapped_quietly():
    code = ("import gemext, gymnasium as gym; e = gym.make('gemext/HalfCheetahVel-v0'); u = e.unwrapped; "
            "u.set_task({'velocity': 1.5}); e.reset(seed=0); _, r, _, _, info = e.step(e.action_space.sample()); "
            "assert u.task == {'velocity': 1.5} and r == info['reward_task'] and u.data.qpos.shape == (9,); "
            "assert e.spec.id == 'gemext/HalfCheetahVel-v0'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "deprecated" not in proc.stderr, proc.stderr
