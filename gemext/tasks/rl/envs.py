"""Meta-RL task environments (MAML-RL / ProMP benchmarks) registered under `gemext/`.

Every environment carries a *task* (a small dict), exposes `sample_tasks(n, seed)` (seeded and
reproducible, independent of the environment's own state) and `set_task(task)`, and accepts
`task=` at construction, so `gymnasium.make("gemext/HalfCheetahVel-v0", task={"velocity": 1.0})`
works. Task rewards follow pytorch-maml-rl (Finn et al. 2017 / Deleu's port), which ProMP reuses:

- Nav2D: point robot, s' = s + clip(a, -0.1, 0.1), r = -‖s' - goal‖, goal ~ U[-0.5, 0.5]²,
  start at the origin, horizon 100. No early termination at the goal (MAML-RL stops within
  0.01 of it; pass `goal_tolerance=0.01` for that behaviour).
- HalfCheetahVel: r = -|v_x - v*| - 0.05‖a‖², v* ~ U[0, 2].   HalfCheetahDir: r = d·v_x - 0.05‖a‖²,
  d ∈ {-1, +1}.
- AntVel: r = -|v_x - v*| + 1 - 0.005‖a‖² - contact + 0.05, v* ~ U[0, 3].   AntDir:
  r = d·v_x - 0.005‖a‖² - contact + 0.05. contact = 5e-4·Σ clip(cfrc_ext, -1, 1)², which is
  exactly gymnasium Ant-v5's contact cost (`-info["reward_contact"]`), so it is reused.
  Ant keeps v5's termination when the torso leaves z ∈ [0.2, 1.0] (as MAML-RL).

v_x is gymnasium's `info["x_velocity"]` (finite difference of the torso x over one control step,
dt = 0.05). The action goes to the simulator unclipped (MuJoCo clamps it to ctrlrange) and the
control cost is charged on the action as given, as in MAML-RL: it keeps the Gaussian policy's
mean inside the actuator range.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ..._gym import GYM_IDS, register

Task = dict[str, Any]
SeedLike = int | np.random.Generator | torch.Generator | None

# Short task names (used by the CLI) -> registered environment ids.
ENV_IDS: dict[str, str] = {
    "nav2d": "gemext/Nav2D-v0",
    "halfcheetah-vel": "gemext/HalfCheetahVel-v0",
    "halfcheetah-dir": "gemext/HalfCheetahDir-v0",
    "ant-vel": "gemext/AntVel-v0",
    "ant-dir": "gemext/AntDir-v0",
}


def as_rng(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from an int seed, a numpy Generator (used as is) or a torch Generator
    (one 63-bit draw from it seeds numpy, so torch-seeded runs stay reproducible)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (), generator=seed)))
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, numpy/torch Generator or None, got {type(seed).__name__}")


def _check_n(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"sample_tasks: n must be a positive int, got {n!r}")
    return int(n)


def _require(task: Task, key: str, env: str) -> float:
    if not isinstance(task, dict) or key not in task:
        raise ValueError(f"{env}: task must be a dict with key {key!r}, got {task!r}")
    return task[key]


class Nav2DEnv(gym.Env):
    """MAML's 2-D point robot navigating to a goal (see module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task | None = None, goal_tolerance: float | None = None) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = spaces.Box(-0.1, 0.1, (2,), np.float32)
        self.goal_tolerance = goal_tolerance
        self._state = np.zeros(2, dtype=np.float64)
        self.set_task(task if task is not None else {"goal": np.zeros(2)})

    @staticmethod
    def sample_tasks(n: int, seed: SeedLike = None) -> list[Task]:
        goals = as_rng(seed).uniform(-0.5, 0.5, size=(_check_n(n), 2))
        return [{"goal": g} for g in goals]

    def set_task(self, task: Task) -> None:
        goal = np.asarray(_require(task, "goal", "Nav2D"), dtype=np.float64)
        if goal.shape != (2,):
            raise ValueError(f"Nav2D: task['goal'] must have shape (2,), got {goal.shape}")
        self.task = {"goal": goal}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = np.zeros(2, dtype=np.float64)
        return self._state.astype(np.float32), {}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -0.1, 0.1)
        self._state = self._state + a
        dist = float(np.linalg.norm(self._state - self.task["goal"]))
        terminated = self.goal_tolerance is not None and dist < self.goal_tolerance
        return self._state.astype(np.float32), -dist, terminated, False, {"distance": dist}


class _MujocoTaskEnv(gym.Wrapper, abc.ABC):
    """A gymnasium MuJoCo v5 env whose reward is recomputed for the current task.

    It is the environment the `gemext/` id names, so `env.unwrapped` (where gymnasium users look for
    an env's own API) is this object — `env.unwrapped.set_task(...)`, `.task`, `.sample_tasks` —,
    and the stock env's attributes (`.data`, `.model`, ...) are reachable through it. `info` holds
    the stock env's keys (`x_velocity`, `reward_ctrl`, ...) plus `reward_task`, the task reward."""

    task_key: str

    def __init__(self, base: gym.Env, task: Task | None) -> None:
        super().__init__(base)
        self.set_task(task if task is not None else self.sample_tasks(1, 0)[0])

    @property
    def unwrapped(self) -> gym.Env:
        return self

    @property
    def spec(self):  # gymnasium.make records the spec on `unwrapped`, i.e. here
        return self.__dict__.get("_spec") or self.env.spec

    @spec.setter
    def spec(self, value) -> None:
        self.__dict__["_spec"] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "env":  # never recurse during construction or unpickling
            raise AttributeError(name)
        return getattr(self.env.unwrapped, name)

    def set_task(self, task: Task) -> None:
        value = float(_require(task, self.task_key, type(self).__name__))
        self.task = {self.task_key: self._check_value(value)}

    def _check_value(self, value: float) -> float:
        return value

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        a = np.asarray(action, dtype=np.float64)
        reward = self.forward_reward(float(info["x_velocity"])) - self.cost(info, a)
        info["reward_task"] = reward
        return obs, reward, terminated, truncated, info

    @abc.abstractmethod
    def forward_reward(self, x_velocity: float) -> float:
        """The task term of the reward (velocity or direction task)."""

    @abc.abstractmethod
    def cost(self, info: dict, action: np.ndarray) -> float:
        """The robot's control (and contact) costs."""


class _VelocityTask:
    task_key = "velocity"
    max_velocity: float
    velocity_bonus: float  # MAML-RL's Ant adds +1 so that a good gait earns positive reward

    @classmethod
    def sample_tasks(cls, n: int, seed: SeedLike = None) -> list[Task]:
        return [{"velocity": float(v)} for v in as_rng(seed).uniform(0.0, cls.max_velocity, _check_n(n))]

    def forward_reward(self, x_velocity: float) -> float:
        return self.velocity_bonus - abs(x_velocity - self.task["velocity"])


class _DirectionTask:
    task_key = "direction"

    @staticmethod
    def sample_tasks(n: int, seed: SeedLike = None) -> list[Task]:
        return [{"direction": float(d)} for d in 2 * as_rng(seed).integers(0, 2, _check_n(n)) - 1]

    def _check_value(self, value: float) -> float:
        if value not in (-1.0, 1.0):
            raise ValueError(f"{type(self).__name__}: task['direction'] must be +1 or -1, got {value}")
        return value

    def forward_reward(self, x_velocity: float) -> float:
        return self.task["direction"] * x_velocity


_MUJOCO_NOISE = (b"compiler attribute 'settotalmass' is deprecated",)


def _quiet_mujoco(make: Callable[[], gym.Env]) -> gym.Env:
    """Build a stock MuJoCo env with the MuJoCo compiler's deprecation warnings about gymnasium's own
    model files filtered out of stderr (written by C code, so filtered at the file descriptor);
    any other output passes through."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            return make()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().splitlines(keepends=True):
                if line.strip() and not any(n in line for n in _MUJOCO_NOISE):
                    os.write(2, line)


class _Cheetah(_MujocoTaskEnv):
    def __init__(self, task: Task | None = None, **kwargs: Any) -> None:
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

        super().__init__(_quiet_mujoco(lambda: HalfCheetahEnv(**kwargs)), task)

    def cost(self, info: dict, action: np.ndarray) -> float:
        return 0.05 * float(np.sum(action**2))


class _Ant(_MujocoTaskEnv):
    def __init__(self, task: Task | None = None, **kwargs: Any) -> None:
        from gymnasium.envs.mujoco.ant_v5 import AntEnv

        super().__init__(_quiet_mujoco(lambda: AntEnv(**kwargs)), task)

    def cost(self, info: dict, action: np.ndarray) -> float:
        # ctrl 0.005‖a‖² + Ant-v5's contact cost (same formula as MAML-RL) - survive bonus 0.05.
        return 0.005 * float(np.sum(action**2)) - float(info["reward_contact"]) - 0.05


class HalfCheetahVelEnv(_VelocityTask, _Cheetah):
    max_velocity, velocity_bonus = 2.0, 0.0


class HalfCheetahDirEnv(_DirectionTask, _Cheetah):
    pass


class AntVelEnv(_VelocityTask, _Ant):
    max_velocity, velocity_bonus = 3.0, 1.0


class AntDirEnv(_DirectionTask, _Ant):
    pass


_REGISTRY = {env_id: (globals()[cls], horizon) for env_id, (cls, horizon) in GYM_IDS.items()}


def register_envs() -> None:
    """Register the `gemext/` environments with gymnasium (idempotent)."""
    register()


def env_id(name: str) -> str:
    """Registered id for a short task name (`nav2d`, `halfcheetah-vel`, ...) or an id itself."""
    if name in ENV_IDS:
        return ENV_IDS[name]
    if name in _REGISTRY:
        return name
    raise ValueError(f"unknown RL task {name!r}; expected one of {sorted(ENV_IDS)} or {sorted(_REGISTRY)}")


def env_class(name: str) -> type:
    return _REGISTRY[env_id(name)][0]


def default_horizon(name: str) -> int:
    return _REGISTRY[env_id(name)][1]


def sample_tasks(name: str, n: int, seed: SeedLike = None) -> list[Task]:
    """Seeded tasks for a task name or env id, without building an environment."""
    return env_class(name).sample_tasks(n, seed)
