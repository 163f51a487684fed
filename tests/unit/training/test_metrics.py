from __future__ import annotations

import numpy as np
import pytest

from models.calibration import apply as apply_calibration
from training import calibration, metrics, reference


def test_roc_auc_known_values() -> None:
    assert metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert metrics.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # ties count half
    assert np.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_average_precision_known_values() -> None:
    # scikit-learn's average_precision_score gives 0.8333... for this classic example.
    assert metrics.average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(
        0.8333333
    )
    assert metrics.average_precision(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2])) == pytest.approx(1.0)


def test_top_fraction_brier_log_loss() -> None:
    labels = np.array([1] + [0] * 9 + [1] * 0)
    scores = np.linspace(1, 0, 10)
    top = metrics.top_fraction(labels, scores, 0.1)
    assert top == {"precision": 1.0, "recall": 1.0, "lift": pytest.approx(10.0)}
    assert metrics.brier(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx((0.04 + 0.16) / 2)
    assert metrics.log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_roc_curve_ends_at_one_and_calibration_curve_counts() -> None:
    rng = np.random.default_rng(0)
    labels, scores = rng.random(500) < 0.2, rng.random(500)
    fpr, tpr = metrics.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores))
    curve = metrics.calibration_curve(labels, scores, bins=5)
    assert sum(curve["count"]) == 500


def test_isotonic_is_monotone_and_json_plain() -> None:
    rng = np.random.default_rng(1)
    raw = rng.random(2000)
    labels = rng.random(2000) < raw**2  # true probability is raw^2: raw is miscalibrated
    fitted = calibration.fit_isotonic(labels, raw)
    assert all(isinstance(v, float) for v in fitted["x"] + fitted["y"])
    out = calibration.apply(fitted, np.sort(raw))
    assert np.all(np.diff(out) >= 0)
    chosen = calibration.choose(labels, raw, np.arange(2000))
    assert chosen["method"] in ("isotonic", "platt")
    assert chosen["selection"][chosen["method"]]["brier"] < chosen["selection"]["none"]["brier"]


def test_reference_distribution_bins() -> None:
    values = np.r_[np.zeros(500), np.arange(500.0), [np.nan] * 10]
    dist = reference.distribution(values, sample_size=100)
    assert sum(dist["proportions"]) == pytest.approx(1.0)
    assert dist["missing"] == pytest.approx(10 / 1010)
    assert len(dist["sample"]) == 100
    assert np.allclose(reference.proportions_in(values, dist["edges"]), dist["proportions"])


def test_platt_never_reverses_the_ranking() -> None:
    """Scores that rank churners lowest on a small validation set: fitted freely, the slope went
    negative and the served model ranked every user backwards."""
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.02, 0.2, 300)
    labels = raw < 0.03  # the lowest scores churn
    fitted = calibration.fit_platt(labels, raw)
    assert fitted["a"] >= 0
    calibrated = apply_calibration(fitted, raw)
    assert np.all(np.diff(calibrated[np.argsort(raw)]) >= -1e-12)


def test_isotonic_never_serves_a_certainty() -> None:
    """The lowest-scored rows hold no churner and the highest only churners: pooled as they are,
    those blocks' rates were 0 and 1, and every user scored below the first breakpoint was served
    a probability of exactly 0."""
    rng = np.random.default_rng(5)
    raw = np.sort(rng.random(400))
    labels = np.r_[np.zeros(40, dtype=bool), rng.random(320) < raw[40:360], np.ones(40, dtype=bool)]
    fitted = calibration.fit_isotonic(labels, raw)
    served = apply_calibration(fitted, np.r_[0.0, raw, 1.0])
    assert 0.0 < served.min() <= 0.5 / 41  # at most the Jeffreys estimate of the first block
    assert served.max() < 1.0
    assert np.all(np.diff(served) >= 0)  # still non-decreasing ...
    assert fitted["y"][0] < fitted["y"][1]  # ... and no new ties
    assert fitted["y"][-2] < fitted["y"][-1]
    # Three certain non-churners below a block of 1 churner in 100: the Jeffreys estimate (1/8)
    # would rank them above that block; they get half its rate.
    few = calibration.fit_isotonic(np.r_[[0, 0, 0, 1], np.zeros(99)] > 0, np.linspace(0.0, 1.0, 103))
    assert few["y"] == pytest.approx([0.005, 0.01])
    # Mirrored at the top: one certain churner above a block of 99 churners in 100 stays above it.
    many = calibration.fit_isotonic(np.r_[np.ones(99), [0, 1]] > 0, np.linspace(0.0, 1.0, 101))
    assert many["y"] == pytest.approx([0.99, 0.995])
    # One block: all non-churners, or all churners.
    assert calibration.fit_isotonic(np.zeros(9, dtype=bool), np.linspace(0, 1, 9))["y"] == pytest.approx([0.05])
    assert calibration.fit_isotonic(np.ones(9, dtype=bool), np.linspace(0, 1, 9))["y"] == pytest.approx([0.95])
