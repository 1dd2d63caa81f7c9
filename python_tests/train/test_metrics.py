"""Classification metrics against torchmetrics and hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from gemext import metrics


def _random_predictions(n: int = 2000, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # sharpened softmax: confidences spread over the whole range, never exactly on a bin edge
    probs = torch.softmax(3 * torch.randn(n, classes, generator=g), -1)
    labels = torch.where(torch.rand(n, generator=g) < 0.6, probs.argmax(-1),
                         torch.randint(0, classes, (n,), generator=g))
    return probs, labels


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_calibration_errors_match_torchmetrics(n_bins):
    from torchmetrics.classification import MulticlassCalibrationError

    probs, labels = _random_predictions()
    for norm, fn in [("l1", metrics.expected_calibration_error), ("max", metrics.max_calibration_error)]:
        ref = MulticlassCalibrationError(num_classes=5, n_bins=n_bins, norm=norm)(probs, labels)
        assert fn(probs, labels, n_bins=n_bins) == pytest.approx(float(ref), abs=1e-6)


def test_perfect_and_hand_computed_calibration():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    # bins of width 0.5: (0.5, 1] holds all four, conf mean 0.7375, accuracy 3/4
    assert metrics.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(abs(0.75 - 0.7375))
    assert metrics.accuracy(probs, labels) == 0.75
    onehot = torch.eye(3)
    assert metrics.expected_calibration_error(onehot, torch.arange(3)) == 0.0
    assert metrics.max_calibration_error(onehot, torch.arange(3)) == 0.0


def test_brier_nll_accuracy_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1])
    assert metrics.brier_score(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.81 + 0.64)) / 2)
    assert metrics.categorical_nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    assert metrics.accuracy(torch.log(probs), labels) == 0.5  # logits work too
    # a leading task dimension is flattened
    assert metrics.accuracy(probs[None].expand(3, -1, -1), labels.expand(3, -1)) == 0.5
    assert math.isfinite(metrics.categorical_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def test_reliability_data_and_plot(tmp_path):
    probs, labels = _random_predictions(500)
    data = metrics.reliability_data(probs, labels, n_bins=10)
    assert set(data) == {"edges", "confidence", "accuracy", "count"}
    assert len(data["edges"]) == 11 and len(data["count"]) == 10
    assert sum(data["count"]) == 500
    conf = probs.max(-1).values
    assert data["count"][9] == int(((conf > 0.9) & (conf <= 1.0)).sum())
    ece = sum(abs(a - c) * n for a, c, n in zip(data["accuracy"], data["confidence"], data["count"])) / 500
    assert ece == pytest.approx(metrics.expected_calibration_error(probs, labels, n_bins=10))
    out = tmp_path / "rel.png"
    metrics.plot_reliability(data, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.accuracy(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="probs must be"):
        metrics.brier_score(torch.rand(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.expected_calibration_error(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), n_bins=0)


# ----------------------------------------------------------------------------- regression metrics
def test_mean_ci95_is_normal_approximation():
    from gemext.metrics import mean_ci95

    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m, h = mean_ci95(v)
    assert m == pytest.approx(2.5) and h == pytest.approx(1.96 * float(v.std()) / 2)
    assert math.isnan(mean_ci95([3.0])[1])
    with pytest.raises(ValueError, match="no values"):
        mean_ci95([])


def test_gaussian_nll_matches_torch_distributions():
    from gemext.metrics import gaussian_nll

    g = torch.Generator().manual_seed(0)
    mean, std, y = torch.randn(50, generator=g), torch.rand(50, generator=g) + 0.1, torch.randn(50, generator=g)
    expected = -torch.distributions.Normal(mean.double(), std.double()).log_prob(y.double())
    torch.testing.assert_close(gaussian_nll(mean, std, y), expected)


def test_interval_coverage_counts_points_inside_the_central_interval():
    from gemext.metrics import interval_coverage

    mean, std = torch.zeros(4), torch.ones(4)
    y = torch.tensor([0.0, 1.6, 1.7, -1.64])  # the 90% interval is ±1.6449
    assert interval_coverage(mean, std, y) == pytest.approx(0.75)
    assert interval_coverage(mean, std, y, level=0.5) == pytest.approx(0.25)  # ±0.6745
    big = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    assert interval_coverage(torch.zeros_like(big), torch.ones_like(big), big) == pytest.approx(0.9, abs=0.005)
    with pytest.raises(ValueError, match="level"):
        interval_coverage(mean, std, y, level=1.0)
