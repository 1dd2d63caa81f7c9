"""Meta-RL tasks: MuJoCo/point-robot environments, batched rollouts, Gaussian policy, PG/TRPO.

Importing this package registers the `gemext/` gymnasium environments.
"""
from __future__ import annotations

from .envs import (
                   ENV_IDS,
                   AntDirEnv,
                   AntVelEnv,
                   HalfCheetahDirEnv,
                   HalfCheetahVelEnv,
                   Nav2DEnv,
                   env_id,
                   register_envs,
                   sample_tasks,
)
from .optim import mean_kl, pg_surrogate, reinforce_step, trpo_step, trpo_surrogate
from .policy import GaussianMLPPolicy, gaussian_kl
from .rollouts import (
                   EpisodeBatch,
                   LinearFeatureBaseline,
                   RolloutCollector,
                   Sampler,
                   discounted_returns,
                   gae,
                   process,
                   weighted_normalize,
)

register_envs()

__all__ = [
    "ENV_IDS", "AntDirEnv", "AntVelEnv", "HalfCheetahDirEnv", "HalfCheetahVelEnv", "Nav2DEnv", "env_id",
    "register_envs", "sample_tasks", "mean_kl", "pg_surrogate", "reinforce_step",
    "trpo_step", "trpo_surrogate", "GaussianMLPPolicy", "gaussian_kl", "EpisodeBatch",
    "LinearFeatureBaseline", "RolloutCollector", "Sampler", "discounted_returns", "gae", "process",
    "weighted_normalize",
]
