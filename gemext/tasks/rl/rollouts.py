"""Batched rollouts with gymnasium.vector, discounted returns, GAE and MAML-RL's linear baseline.

Batches are time-major like MAML-RL: `observations[t, i]` is step t of episode i; `mask[t, i]` is
1 where that step happened (episodes that terminate early are zero-padded to the horizon).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from .envs import Task, default_horizon, env_id, register_envs
from .policy import GaussianMLPPolicy, Params


@dataclass
class EpisodeBatch:
    """K episodes of one task: time-major tensors [T, K, ...]; `advantages`/`returns` after `process`."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    returns: Tensor | None = None
    advantages: Tensor | None = None

    @property
    def num_episodes(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_steps(self) -> int:
        """Environment steps actually taken (padding excluded)."""
        return int(self.mask.sum().item())

    def episode_returns(self) -> Tensor:
        """Undiscounted return of each episode: [K]."""
        return (self.rewards * self.mask).sum(0)

    def concat(self, other: EpisodeBatch) -> EpisodeBatch:
        """Episodes of both batches side by side (padded to the longer horizon), unprocessed."""
        return _combine([self, other], lambda xs: torch.cat(xs, dim=1), with_processed=False)


def stack(batches: list[EpisodeBatch]) -> EpisodeBatch:
    """Batches of several tasks (same episode count) stacked on a new leading task dimension
    [T_tasks, H, K, ...], padded to the longest horizon; used to vmap over the tasks."""
    if len({b.num_episodes for b in batches}) != 1:
        raise ValueError("stack: every batch needs the same number of episodes, "
                         f"got {[b.num_episodes for b in batches]}")
    return _combine(batches, torch.stack, with_processed=True)


def _combine(batches: list[EpisodeBatch], join, with_processed: bool) -> EpisodeBatch:
    h = max(len(b.rewards) for b in batches)

    def field(name: str) -> Tensor | None:
        xs = [getattr(b, name) for b in batches]
        if any(x is None for x in xs):
            return None
        return join([torch.cat([x, x.new_zeros((h - len(x),) + x.shape[1:])]) for x in xs])

    names = ["observations", "actions", "rewards", "mask"] + (["returns", "advantages"] if with_processed else [])
    return EpisodeBatch(*(field(n) for n in names))


def _check_tm(rewards: Tensor, mask: Tensor, name: str) -> None:
    if rewards.dim() != 2 or rewards.shape != mask.shape:
        raise ValueError(f"{name}: rewards and mask must both be [T, K], got {tuple(rewards.shape)} and "
                         f"{tuple(mask.shape)}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 0.99, lam: float = 1.0) -> Tensor:
    """Generalised advantage estimation, A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γV_{t+1}m_{t+1} − V_t.

    V is taken as 0 after the end of an episode (termination or horizon, as MAML-RL does), and
    padded steps get advantage 0. With values = 0 and λ = 1 this is the discounted return.
    """
    _check_tm(rewards, mask, "gae")
    if values.shape != rewards.shape:
        raise ValueError(f"gae: values must have shape {tuple(rewards.shape)}, got {tuple(values.shape)}")
    v = values * mask
    v_next = torch.cat([v[1:], torch.zeros_like(v[:1])])
    deltas = (rewards + gamma * v_next - v) * mask
    adv = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(len(deltas) - 1, -1, -1):
        running = deltas[t] + gamma * lam * running
        adv[t] = running
    return adv


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.99) -> Tensor:
    """R_t = Σ_k γ^k r_{t+k} within each episode (0 on padding)."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)


class LinearFeatureBaseline:
    """MAML-RL's LinearFeatureBaseline: V(s_t) = w·[s, s², t/100, (t/100)², (t/100)³, 1].

    `fit` solves the ridge-regularised normal equations (float64) on one batch's discounted
    returns; as in MAML-RL the ridge coefficient grows ×10 while the system is singular.
    """

    def __init__(self, reg_coeff: float = 1e-5) -> None:
        if reg_coeff < 0:
            raise ValueError(f"LinearFeatureBaseline: reg_coeff must be >= 0, got {reg_coeff}")
        self.reg_coeff = reg_coeff
        self.weights: Tensor | None = None

    @staticmethod
    def features(observations: Tensor, mask: Tensor) -> Tensor:
        """[T, K, 2·obs_dim + 4] features, zero on padded steps (so padding does not enter the fit)."""
        m = mask.unsqueeze(-1).to(torch.float64)
        obs = observations.to(torch.float64)
        t = torch.arange(len(obs), dtype=torch.float64).view(-1, 1, 1).expand_as(m) / 100.0
        return torch.cat([obs, obs**2, t, t**2, t**3, torch.ones_like(m)], dim=-1) * m

    def fit(self, batch: EpisodeBatch, returns: Tensor) -> LinearFeatureBaseline:
        x = self.features(batch.observations, batch.mask).flatten(0, 1)
        y = returns.to(torch.float64).reshape(-1, 1)
        xtx, xty = x.T @ x, x.T @ y
        eye = torch.eye(len(xtx), dtype=torch.float64)
        reg = self.reg_coeff
        for _ in range(5):
            w, info = torch.linalg.solve_ex(xtx + reg * eye, xty)
            if info.item() == 0 and torch.isfinite(w).all():
                self.weights = w.squeeze(1)
                return self
            reg = reg * 10 if reg > 0 else 1e-8
        raise RuntimeError("LinearFeatureBaseline.fit: normal equations singular even with ridge "
                           f"{reg / 10:g}; are the observations finite?")

    def predict(self, batch: EpisodeBatch) -> Tensor:
        if self.weights is None:
            raise RuntimeError("LinearFeatureBaseline.predict called before fit")
        return (self.features(batch.observations, batch.mask) @ self.weights).to(batch.rewards.dtype)


def weighted_normalize(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean)/std over the valid (mask = 1) entries; padded entries stay 0."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    std = torch.sqrt((((x - mean) * mask) ** 2).sum() / n)
    return (x - mean) * mask / (std + eps)


def process(batch: EpisodeBatch, gamma: float = 0.99, gae_lambda: float = 1.0,
            baseline: LinearFeatureBaseline | None = None, normalize: bool = True) -> EpisodeBatch:
    """Fill `returns` (discounted) and `advantages` (GAE on a baseline fitted to this batch, then
    normalised over valid steps as MAML-RL does). `baseline=None` uses a fresh linear baseline."""
    returns = discounted_returns(batch.rewards, batch.mask, gamma)
    baseline = (baseline or LinearFeatureBaseline()).fit(batch, returns)
    adv = gae(batch.rewards, baseline.predict(batch), batch.mask, gamma, gae_lambda)
    if normalize:
        adv = weighted_normalize(adv, batch.mask)
    return replace(batch, returns=returns, advantages=adv)


class RolloutCollector:
    """Runs K episodes of a task with a policy parameter set on a pool of vectorised envs.

    The pool (`num_envs` copies of `env`, `mode` "sync" = SyncVectorEnv in this process,
    "async" = AsyncVectorEnv with one worker process per copy) is built once and reused across
    tasks: `collect` sets the task on every copy, then runs ⌈K/num_envs⌉ waves of episodes (in sync
    mode only the copies of live episodes are stepped).
    Action noise comes from `generator`; MuJoCo reset noise from `rng`, a numpy stream seeded by
    `seed` (a caller may replace it, e.g. to restart the meta-test's stream).
    """

    def __init__(self, env: str, num_envs: int = 20, mode: str = "sync", horizon: int | None = None,
                 seed: int | None = None, **env_kwargs: Any) -> None:
        register_envs()
        if mode not in ("sync", "async"):
            raise ValueError(f"RolloutCollector: mode must be 'sync' or 'async', got {mode!r}")
        if num_envs < 1:
            raise ValueError(f"RolloutCollector: num_envs must be >= 1, got {num_envs}")
        self.env_id = env_id(env)
        self.horizon = int(horizon or default_horizon(env))
        self.num_envs, self.mode = int(num_envs), mode
        make = lambda: gym.make(self.env_id, max_episode_steps=self.horizon, disable_env_checker=True, **env_kwargs)
        cls = gym.vector.SyncVectorEnv if mode == "sync" else gym.vector.AsyncVectorEnv
        # copy=False: we copy each observation into a tensor immediately.
        self.envs = cls([make] * self.num_envs, copy=False)
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        self.act_dim = int(np.prod(self.envs.single_action_space.shape))
        self.rng = np.random.default_rng(seed)
        self.total_steps = 0

    def make_policy(self, hidden: tuple[int, ...] = (100, 100), **kwargs: Any) -> GaussianMLPPolicy:
        return GaussianMLPPolicy(self.obs_dim, self.act_dim, hidden, **kwargs)

    def collect(self, policy: GaussianMLPPolicy, params: Params | None, task: Task, num_episodes: int,
                generator: torch.Generator | None = None, deterministic: bool = False) -> EpisodeBatch:
        """Roll out `num_episodes` episodes of `task` with π(·; params) (the module's own
        parameters when `params` is None). Returns an unprocessed EpisodeBatch."""
        if num_episodes < 1:
            raise ValueError(f"collect: num_episodes must be >= 1, got {num_episodes}")
        if policy.obs_dim != self.obs_dim or policy.act_dim != self.act_dim:
            raise ValueError(f"collect: policy is {policy.obs_dim}->{policy.act_dim} but {self.env_id} is "
                             f"{self.obs_dim}->{self.act_dim}")
        self.envs.call("set_task", task)
        threads = torch.get_num_threads()
        # The per-step policy forward is tiny: OpenMP fork/join costs more than it saves, and on a
        # busy 2-core machine a descheduled worker thread stalls every step (measured 10x slower).
        torch.set_num_threads(1)
        try:
            waves = [self._wave(min(self.num_envs, num_episodes - start), policy, params, generator, deterministic)
                     for start in range(0, num_episodes, self.num_envs)]
        finally:
            torch.set_num_threads(threads)
        length = max(int(w[3].sum(0).max()) for w in waves)  # drop all-padding tail steps
        cat = lambda i: torch.cat([w[i] for w in waves], dim=1)[:length]
        batch = EpisodeBatch(cat(0), cat(1), cat(2), cat(3))
        self.total_steps += batch.num_steps
        return batch

    def _wave(self, m: int, policy: GaussianMLPPolicy, params: Params | None, generator: torch.Generator | None,
              deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """m episodes on the first m copies. In sync mode each live copy is stepped by itself, so a copy
        whose episode has ended (Ant falls) or that the wave does not need costs nothing; in async mode
        the whole pool steps together (spare and finished copies step on, their data masked)."""
        h, seed, shape = self.horizon, int(self.rng.integers(2**31 - 1)), self.envs.single_action_space.shape
        obs_buf = torch.zeros(h, m, self.obs_dim)
        act_buf = torch.zeros(h, m, self.act_dim)
        rew_buf = torch.zeros(h, m)
        mask = torch.zeros(h, m)
        copies = self.envs.envs[:m] if self.mode == "sync" else None
        obs = np.zeros((m, self.obs_dim), dtype=np.float32)
        if copies is not None:  # the seeds a vector env's reset(seed) gives its copies
            for i, env in enumerate(copies):
                obs[i] = np.ravel(env.reset(seed=seed + i)[0])
        else:
            obs[:] = np.asarray(self.envs.reset(seed=seed)[0]).reshape(self.num_envs, -1)[:m]
        alive = np.ones(m, dtype=bool)
        spare = torch.zeros(self.num_envs - m, self.act_dim)
        for t in range(h):
            o = torch.from_numpy(obs.copy())
            a = policy.act(o, params, generator, deterministic)
            live = torch.from_numpy(alive.astype(np.float32))
            obs_buf[t], act_buf[t], mask[t] = o * live[:, None], a * live[:, None], live
            rew, done = np.zeros(m, dtype=np.float32), np.zeros(m, dtype=bool)
            if copies is not None:
                actions = a.numpy()
                for i in np.flatnonzero(alive):
                    ob, rew[i], term, trunc, _ = copies[i].step(actions[i].reshape(shape))
                    obs[i], done[i] = np.ravel(ob), term or trunc
            else:
                ob, r, term, trunc, _ = self.envs.step(torch.cat([a, spare]).numpy().reshape((self.num_envs,) + shape))
                obs[:] = np.asarray(ob).reshape(self.num_envs, -1)[:m]
                rew[:], done[:] = np.asarray(r)[:m], (np.asarray(term) | np.asarray(trunc))[:m]
            rew_buf[t] = torch.from_numpy(rew) * live
            alive &= ~done
            if not alive.any():
                break
        return obs_buf, act_buf, rew_buf, mask

    def close(self) -> None:
        self.envs.close()

    def __enter__(self) -> RolloutCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sampler:
    """The rollouts of a run: `episodes` episodes per task by default, collected by `collector` with
    `policy` acting under the action noise of `generator`, and processed (returns and GAE
    advantages with gamma, gae_lambda). Its random streams (`generator`, the collector's reset seeds)
    are explicit, so a checkpoint saves them and the meta-test restarts them."""

    def __init__(self, collector: RolloutCollector, policy: GaussianMLPPolicy, generator: torch.Generator,
                 episodes: int = 20, gamma: float = 0.99, gae_lambda: float = 1.0) -> None:
        self.collector, self.policy, self.generator = collector, policy, generator
        self.episodes, self.gamma, self.gae_lambda = episodes, gamma, gae_lambda

    @property
    def horizon(self) -> int:
        return self.collector.horizon

    def rollouts(self, params: Params, task: Task, episodes: int | None = None) -> EpisodeBatch:
        batch = self.collector.collect(self.policy, params, task, episodes or self.episodes, self.generator)
        return process(batch, self.gamma, self.gae_lambda)

    def reseed(self, seed: int) -> None:
        """Restart both random streams from `seed` (the meta-test's rollouts are the same for every run)."""
        self.generator.manual_seed(seed)
        self.collector.rng = np.random.default_rng(seed)

    def rng_state(self) -> dict:
        return {"actions": self.generator.get_state(), "resets": self.collector.rng.bit_generator.state,
                "env_steps": self.collector.total_steps}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["actions"])
        self.collector.rng.bit_generator.state = state["resets"]
        self.collector.total_steps = state["env_steps"]


def mean_returns(batches: list[EpisodeBatch]) -> Tensor:
    """Mean undiscounted episode return of each task's batch: [T]."""
    return torch.stack([b.episode_returns().mean() for b in batches])
