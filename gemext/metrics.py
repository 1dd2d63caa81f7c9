"""Meta-test metrics: means with 95% confidence intervals, predictive NLL, interval coverage,
and (for classification) accuracy, calibration errors and reliability data."""
from __future__ import annotations

import math
from typing import Sequence

import torch

_Z90 = 1.6448536269514722  # standard-normal 95th percentile: the central 90% interval is mean ± z·std


def mean_ci95(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, 1.96·s/√n)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95: no values")
    if v.numel() == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))


def gaussian_nll(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point negative log density of y under N(mean, std²)."""
    var = std.double().pow(2)
    return 0.5 * (math.log(2 * math.pi) + var.log() + (y.double() - mean.double()).pow(2) / var)


def interval_coverage(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor, level: float = 0.9) -> float:
    """Fraction of y inside the central `level` Gaussian predictive interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval_coverage: level must be in (0, 1), got {level}")
    z = _Z90 if level == 0.9 else math.sqrt(2.0) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))
    return float(((y - mean).abs() <= z * std).double().mean())
