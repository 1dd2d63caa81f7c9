"""Meta-test metrics: means with 95% confidence intervals, predictive NLL, interval coverage,
and (for classification) accuracy, calibration errors and reliability data."""
from __future__ import annotations

import math
from collections.abc import Sequence

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


# ----------------------------------------------------------------------------- classification
def _check_probs(probs: torch.Tensor, labels: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to [n, C] probabilities and [n] labels, validating shapes and the label range."""
    if probs.dim() < 1 or probs.shape[:-1] != labels.shape:
        raise ValueError(f"{fn}: probs must be [..., C] with labels [...], got {tuple(probs.shape)} "
                         f"and {tuple(labels.shape)}")
    p, y = probs.reshape(-1, probs.shape[-1]).double(), labels.reshape(-1).long()
    if p.shape[0] == 0:
        raise ValueError(f"{fn}: no predictions")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"{fn}: labels must lie in [0, {p.shape[1]}), got [{int(y.min())}, {int(y.max())}]")
    return p, y


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of argmax(scores) == labels; scores are logits or probabilities [..., C]."""
    s, y = _check_probs(scores, labels, "accuracy")
    return float((s.argmax(-1) == y).double().mean())


def _bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int, fn: str):
    """Top-label confidence bins of equal width, right-closed ((i/B, (i+1)/B], 0 in the first):
    per-bin mean confidence, accuracy and count."""
    if n_bins < 1:
        raise ValueError(f"{fn}: n_bins must be >= 1, got {n_bins}")
    p, y = _check_probs(probs, labels, fn)
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp(min=1)
    return conf_sum / safe, acc_sum / safe, count


def _ece(conf: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> float:
    return float(((acc - conf).abs() * count).sum() / count.sum().clamp(min=1))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: Σ_b (n_b/n)·|acc_b − conf_b| over equal-width top-label confidence bins."""
    return _ece(*_bins(probs, labels, n_bins, "expected_calibration_error"))


def max_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """MCE: max over non-empty bins of |acc_b − conf_b|."""
    conf, acc, count = _bins(probs, labels, n_bins, "max_calibration_error")
    return float((acc - conf).abs()[count > 0].max())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score: mean over points of Σ_c (p_c − 1[y = c])², in [0, 2]."""
    p, y = _check_probs(probs, labels, "brier_score")
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float((p - onehot).pow(2).sum(-1).mean())


def categorical_nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean −log p(y) of the true labels (probabilities clamped at eps so a confident miss is finite)."""
    p, y = _check_probs(probs, labels, "categorical_nll")
    return float(-p.gather(1, y[:, None]).clamp(min=eps).log().mean())


def reliability_data(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean `confidence`, `accuracy` and `count` (empty bins: count 0, conf/acc 0) and
    the `edges` (n_bins + 1), the input of `plot_reliability`."""
    conf, acc, count = _bins(probs, labels, n_bins, "reliability_data")
    return {"edges": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist(),
            "confidence": conf.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}


def plot_reliability(data: dict[str, list[float]], path: str, title: str = "Reliability diagram") -> None:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal) as a PNG."""
    from .plots import new_figure

    edges = data["edges"]
    width = [b - a for a, b in zip(edges[:-1], edges[1:])]
    count = torch.tensor(data["count"], dtype=torch.float64)
    conf, acc = torch.tensor(data["confidence"]), torch.tensor(data["accuracy"])
    ece = _ece(conf, acc, count)
    fig = new_figure((4.5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1], data["accuracy"], width=width, align="edge", edgecolor="k", label="accuracy")
    top.bar(edges[:-1], (conf - acc).tolist(), bottom=data["accuracy"], width=width, align="edge",
            color="tab:red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title} (ECE {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], data["count"], width=width, align="edge", edgecolor="k", color="gray")
    bottom.set(xlabel="confidence", ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
