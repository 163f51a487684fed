"""Realized and expected performance of a snapshot; the degraded-retrain decision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from monitoring.performance_state import degraded_decision
from training import metrics
from training.performance import expected, expected_auc, realized


def brute_expected_auc(p: np.ndarray) -> float:
    right = pairs = 0.0
    for i, j in itertools.permutations(range(len(p)), 2):
        weight = p[i] * (1 - p[j])  # i churns, j stays
        pairs += weight
        right += weight * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
    return right / pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_auc_is_the_expectation_over_pairs_ties_included(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(40), 1)  # many ties
    assert expected_auc(p) == pytest.approx(brute_expected_auc(p), abs=1e-12)


def test_expected_figures_match_the_realized_mean_when_labels_follow_the_probabilities() -> None:
    rng = np.random.default_rng(3)
    p = rng.beta(1, 6, 4000)
    tiers = np.where(p > 0.3, "high", np.where(p > 0.1, "medium", "low")).tolist()
    draws = [realized(rng.random(len(p)) < p, p, tiers) for _ in range(200)]
    implied = expected(p, tiers)
    for name in ("roc_auc", "high_precision", "high_recall"):
        assert np.mean([d[name] for d in draws]) == pytest.approx(implied[name], abs=0.01), name
    assert implied["predicted_rate"] == pytest.approx(p.mean())


def test_realized_uses_the_evaluation_metrics() -> None:
    y = np.array([1, 0, 1, 0, 0, 1], bool)
    p = np.array([0.9, 0.8, 0.4, 0.3, 0.2, 0.7])
    tiers = ["high", "high", "low", "low", "low", "medium"]
    figures = realized(y, p, tiers)
    assert figures["roc_auc"] == metrics.roc_auc(y, p)
    assert figures["pr_auc"] == metrics.average_precision(y, p)
    assert figures["high_precision"] == 0.5
    assert figures["high_recall"] == pytest.approx(1 / 3)
    assert figures["observed_rate"] == 0.5
    assert np.isnan(realized(np.zeros(3, bool), np.ones(3) / 2, ["low"] * 3)["roc_auc"])


def test_degraded_decision_needs_the_latest_days_all_below_the_floor() -> None:
    def state(*aucs: float | None) -> dict:
        days = {f"2026-02-{i + 10}": {"expected": {}, "realized": {"roc_auc": a}} for i, a in enumerate(aucs)}
        days["2026-02-30"] = {"expected": {"roc_auc": 0.8}}  # not labelled yet
        return {"days": days}

    assert degraded_decision(None, 0.7, 2)[0] is False
    assert degraded_decision({"days": {}}, 0.7, 2)[0] is False
    assert degraded_decision(state(0.8, 0.65), 0.7, 2)[0] is False
    go, why = degraded_decision(state(0.8, 0.65, 0.6), 0.7, 2)
    assert go
    assert "0.650" in why
    assert "0.600" in why
    assert degraded_decision(state(0.6, None), 0.7, 2)[0] is False


def test_degraded_decision_counts_only_the_champions_labelled_days() -> None:
    """After a promotion, the replaced model's labelled days keep arriving for H days: they must
    not retrain again at every check (until the new champion's own days are labelled)."""
    days = {
        "2026-02-10": {"model_version": "1", "realized": {"roc_auc": 0.60}},
        "2026-02-11": {"model_version": "1", "realized": {"roc_auc": 0.61}},
        "2026-02-12": {"model_version": "2", "expected": {"roc_auc": 0.8}},  # not labelled yet
    }
    assert degraded_decision({"days": days}, 0.7, 2, champion="1")[0] is True
    go, why = degraded_decision({"days": days}, 0.7, 2, champion="2")
    assert not go
    assert "scored by the champion v2" in why
    days["2026-02-12"]["realized"] = {"roc_auc": 0.65}
    days["2026-02-13"] = {"model_version": "2", "realized": {"roc_auc": 0.66}}
    assert degraded_decision({"days": days}, 0.7, 2, champion="2")[0] is True  # its own days count
