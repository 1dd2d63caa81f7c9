"""Sinusoid regression (Finn et al. 2017) and its harder variant from the BMAML/GEM-BML papers.

Presets:
- `finn`: amplitude A ∈ [0.1, 5], phase ∈ [0, π], frequency 1, x ∈ [−5, 5], no noise,
  K = 10 support and 10 query points, 2×40 ReLU MLP, meta-batch 25, fresh tasks every draw.
- `bmaml` / `bmaml-100`: phase ∈ [0, 2π], frequency ∈ [0.5, 2], noise N(0, (0.01·A)²), and a
  finite pool of 1000 / 100 meta-train tasks (new x for every draw; meta-test tasks are fresh).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import Task


@dataclass(frozen=True)
class SinusoidConfig:
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    frequency: tuple[float, float] = (1.0, 1.0)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise: float = 0.0  # noise std as a fraction of the amplitude
    shots: int = 10
    query: int = 10
    train_pool: int | None = None  # finite number of meta-train tasks, None = unlimited
    meta_batch: int = 25
    hidden: int = 40
    layers: int = 2


PRESETS: dict[str, SinusoidConfig] = {
    "finn": SinusoidConfig(),
    "bmaml": SinusoidConfig(phase=(0.0, 2 * math.pi), frequency=(0.5, 2.0), noise=0.01, train_pool=1000),
    "bmaml-100": SinusoidConfig(phase=(0.0, 2 * math.pi), frequency=(0.5, 2.0), noise=0.01, train_pool=100),
}


def preset(name: str) -> SinusoidConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown sinusoid preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def _uniform(lo_hi: tuple[float, float], n: int, g: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class SinusoidTasks:
    """Task family: `sample(n, generator, split)` returns a stacked batch of n tasks with
    x, y of shape [n, points, 1]. The train pool (if finite) is drawn from `pool_seed`."""

    kind = "regression"

    def __init__(self, config: SinusoidConfig | str = "finn", pool_seed: int = 1234) -> None:
        self.config = preset(config) if isinstance(config, str) else config
        c = self.config
        self._pool = None
        if c.train_pool is not None:
            self._pool = self._draw_params(c.train_pool, torch.Generator().manual_seed(pool_seed))

    def _draw_params(self, n: int, g: torch.Generator) -> torch.Tensor:
        c = self.config
        return torch.stack([_uniform(c.amplitude, n, g), _uniform(c.phase, n, g), _uniform(c.frequency, n, g)], 1)

    def params(self, n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """[n, 3] task parameters (amplitude, phase, frequency)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split == "train" and self._pool is not None:
            return self._pool[torch.randint(len(self._pool), (n,), generator=generator)]
        return self._draw_params(n, generator)

    def function(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Noise-free y for task parameters p [n, 3] at x [n, m, 1]."""
        a, ph, f = (p[:, i].view(-1, 1, 1) for i in range(3))
        return a * torch.sin(f * x + ph)

    def sample(self, n: int, generator: torch.Generator, split: str = "train",
               shots: int | None = None, query: int | None = None) -> Task:
        c = self.config
        for name, v in (("n", n), ("shots", shots), ("query", query)):
            if v is None and name != "n":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"SinusoidTasks.sample: {name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"SinusoidTasks.sample: {name} must be >= 1, got {v}")
        k, q = shots or c.shots, query or c.query
        p = self.params(n, generator, split)
        lo, hi = c.x_range
        x = lo + (hi - lo) * torch.rand(n, k + q, 1, generator=generator, dtype=torch.float64)
        y = self.function(p, x)
        if c.noise > 0:
            y = y + c.noise * p[:, 0].view(-1, 1, 1) * torch.randn(y.shape, generator=generator, dtype=torch.float64)
        x, y = x.float(), y.float()
        return Task(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def make_model(self) -> nn.Module:
        c = self.config
        layers: list[nn.Module] = []
        width = 1
        for _ in range(c.layers):
            layers += [nn.Linear(width, c.hidden), nn.ReLU()]
            width = c.hidden
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def describe(self) -> dict:
        return asdict(self.config)
