"""Drift maths (PSI on fixed bins with a missing bin, KS), the bounded window, the status
thresholds, the alert history kept in the shared state and the retrain decision."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import training.pipeline
import training.report
from churn.cli import app
from core.settings import load_settings
from features import spec
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.drift import (
    DriftWindow,
    Thresholds,
    column_drift,
    ks,
    live_shares,
    psi,
    reference_shares,
    seconds_since,
)
from monitoring.drift_state import (
    DriftPublisher,
    drift_key,
    read_drift,
    retrain_decision,
    sustained_alerts,
    with_alert_history,
)
from monitoring.metrics import Metrics
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from tests.support import StandInModel, random_events
from training.reference import distribution

TH = Thresholds(0.1, 0.25)


def normal(n: int, shift: float = 0.0, seed: int = 0, missing: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(shift, 1.0, n)
    values[rng.random(n) < missing] = np.nan
    return values


def test_identical_distributions_have_psi_and_ks_near_zero() -> None:
    ref = distribution(normal(20_000, seed=1))
    drift = column_drift(ref, normal(20_000, seed=2), TH)
    assert drift.psi < 0.01
    assert drift.ks_statistic < 0.05
    assert drift.ks_pvalue > 0.001
    assert drift.status == "ok"


def test_a_shift_of_one_sd_is_large_on_both_measures() -> None:
    ref = distribution(normal(20_000, seed=1))
    drift = column_drift(ref, normal(20_000, shift=1.0, seed=2), TH)
    assert drift.psi > 0.5  # ~1.0 for a one-sd shift of a normal on deciles
    assert drift.ks_statistic > 0.3
    assert drift.ks_pvalue < 1e-10
    assert drift.status == "alert"


def test_psi_matches_a_hand_computed_value() -> None:
    expected, actual = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    by_hand = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert psi(expected, actual) == pytest.approx(by_hand)
    assert psi(expected, expected) == 0.0


def test_bins_are_the_references_fixed_edges() -> None:
    ref = distribution(np.arange(1000, dtype=float))
    # The reference's own shares are ~10% per decile; live values land in the same bins.
    assert reference_shares(ref) == pytest.approx([0.1] * 10 + [0.0], abs=0.002)
    assert live_shares(np.arange(1000, dtype=float), ref["edges"]) == pytest.approx(reference_shares(ref), abs=1e-9)
    # Values beyond the reference's range fall in the open end bins, never outside.
    shares = live_shares(np.array([-1e9, 1e9, np.nan, np.nan]), ref["edges"])
    assert shares[0] == shares[-2] == 0.25
    assert shares[-1] == 0.5


def test_missing_values_are_their_own_bin() -> None:
    ref = distribution(normal(20_000, seed=1, missing=0.2))
    assert reference_shares(ref)[-1] == pytest.approx(0.2, abs=0.01)
    assert reference_shares(ref).sum() == pytest.approx(1.0)
    same = column_drift(ref, normal(20_000, seed=2, missing=0.2), TH)
    more_missing = column_drift(ref, normal(20_000, seed=2, missing=0.6), TH)
    assert same.psi < 0.01
    assert more_missing.psi > 0.25  # only the missing share moved
    # KS ignores missing values: the present ones still match.
    assert more_missing.ks_statistic < 0.05


def test_all_missing_and_empty_bins_stay_finite() -> None:
    ref = distribution(normal(5000, seed=1))
    all_missing = column_drift(ref, np.full(100, np.nan), TH)
    assert np.isfinite(all_missing.psi)
    assert all_missing.status == "alert"
    assert np.isnan(all_missing.ks_statistic)
    one_bin = column_drift(ref, np.full(100, 50.0), TH)  # every live value in the top bin
    assert np.isfinite(one_bin.psi)
    assert one_bin.psi > 1
    assert ks([], np.ones(3)) != ks([], np.ones(3))  # (nan, nan)
    # A reference feature that was never present: its only non-empty bin is "missing".
    never = distribution(np.full(50, np.nan))
    assert column_drift(never, np.full(10, np.nan), TH).psi == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("value", "status"), [(0.0, "ok"), (0.099, "ok"), (0.1, "warn"), (0.24, "warn"), (0.25, "alert")]
)
def test_status_thresholds(value: float, status: str) -> None:
    assert TH.status(value) == status


def window_of(size: int, features: int = 3) -> DriftWindow:
    return DriftWindow([f"f{i}" for i in range(features)], size)


def test_window_memory_is_bounded_and_keeps_the_latest_users() -> None:
    window = window_of(100)
    nbytes = window._matrix.nbytes
    for start in range(0, 10_000, 250):
        users = [f"u{i}" for i in range(start, start + 250)]
        window.add(users, np.ones((250, 3)) * start, np.full(250, 0.5), [start] * 250)
    assert len(window) == 100
    assert window._matrix.nbytes == nbytes
    assert len(window._slot) == 100
    matrix, _ = window.rows()
    assert matrix.shape == (100, 3)
    assert set(window._slot) == {f"u{i}" for i in range(9900, 10_000)}


def test_window_keeps_one_row_per_user_and_drops_the_churned() -> None:
    window = window_of(10)
    window.add(["a", "b"], np.array([[1.0, 1, 1], [2, 2, 2]]), np.array([0.1, 0.2]), [1, 2])
    window.add(["a"], np.array([[5.0, 5, 5]]), np.array([0.9]), [3])  # a's newer row replaces the old
    matrix, scores = window.rows()
    assert len(window) == 2
    assert sorted(matrix[:, 0].tolist()) == [2.0, 5.0]
    assert sorted(scores.tolist()) == [0.2, 0.9]
    window.discard(["a", "nobody"])
    assert len(window) == 1
    window.add(["c"], np.zeros((1, 3)), None, [4])  # the freed slot is reused without corruption
    assert len(window) == 2


def test_window_leaves_out_users_inactive_longer_than_max_age_and_recomputes_request_features() -> None:
    day = 86_400_000
    window = DriftWindow(["x", "seconds_since_last_event"], 10, max_age_ms=28 * day, request_features={
        "seconds_since_last_event": seconds_since
    })  # fmt: skip
    window.add(["old", "mid", "new"], np.zeros((3, 2)), None, [0, 20 * day, 30 * day])
    matrix, _ = window.rows()
    # "old" is 30 days behind the watermark (the latest event, "new"'s): out.
    assert sorted(matrix[:, 1].tolist()) == [0.0, 10 * day / 1000]


def test_compute_reports_every_reference_feature_and_rescores() -> None:
    ref = {
        "features": {"f0": distribution(normal(5000, seed=1)), "f1": distribution(normal(5000, seed=2))},
        "score": distribution(np.linspace(0, 1, 1000)),
    }
    window = window_of(3000, features=2)
    window.add([str(i) for i in range(3000)], np.column_stack([normal(3000, seed=3), normal(3000, 2.0, seed=4)]),
               np.full(3000, 0.5), list(range(3000)))  # fmt: skip
    report = window.compute(ref, TH, now=123.0)
    assert report.rows == 3000
    assert report.features["f0"].status == "ok"
    assert report.features["f1"].status == "alert"
    assert report.score is not None
    assert report.score.status == "alert"  # every recorded score is 0.5
    rescored = window.compute(ref, TH, now=123.0, rescore=lambda m: np.random.default_rng(0).random(len(m)))
    assert rescored.score is not None
    assert rescored.score.status == "ok"
    assert json.loads(json.dumps(report.to_dict()))["features"]["f0"]["status"] == "ok"


def state(psis: dict[str, float], score: float, at: float) -> dict[str, Any]:
    entries = {name: {"psi": v, "status": TH.status(v)} for name, v in psis.items()}
    return {"computed_at": at, "rows": 10, "features": entries, "score": {"psi": score, "status": TH.status(score)}}


def test_alert_since_is_kept_while_alerting_and_cleared_after() -> None:
    first = with_alert_history(state({"a": 0.3, "b": 0.05}, 0.3, at=100.0), None)
    assert first["features"]["a"]["alert_since"] == 100.0
    assert first["features"]["b"]["alert_since"] is None
    assert first["score"]["alert_since"] == 100.0
    second = with_alert_history(state({"a": 0.4, "b": 0.3}, 0.05, at=200.0), first)
    assert second["features"]["a"]["alert_since"] == 100.0
    assert second["features"]["b"]["alert_since"] == 200.0
    assert second["score"]["alert_since"] is None
    third = with_alert_history(state({"a": 0.2, "b": 0.3}, 0.05, at=300.0), second)
    assert third["features"]["a"]["alert_since"] is None  # warn breaks the run


def test_retrain_decision_needs_sustained_alerts() -> None:
    history = with_alert_history(state({"a": 0.3, "b": 0.05}, 0.05, at=0.0), None)
    history = with_alert_history(state({"a": 0.3, "b": 0.05}, 0.05, at=20 * 60.0), history)
    assert sustained_alerts(history, 30, now=20 * 60.0) == {}
    go, why = retrain_decision(history, 30, now=20 * 60.0)
    assert not go
    assert "(a) for 20.0 min" in why
    go, why = retrain_decision(history, 30, now=31 * 60.0)
    assert go
    assert "a 31.0 min" in why
    assert retrain_decision(None, 30, now=0)[0] is False
    calm = with_alert_history(state({"a": 0.05}, 0.05, at=0.0), None)
    assert retrain_decision(calm, 0, now=10)[0] is False


class DictRedis:
    """The two Redis calls the drift state uses."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()


class ConstantModel:
    meta: dict[str, Any]

    def __init__(self, reference: dict[str, Any]) -> None:
        self.meta = {"reference": reference}

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return np.full(len(matrix), 0.5)

    def tier(self, probability: float) -> str:
        return "low"


def test_publisher_sets_gauges_and_writes_the_state() -> None:
    ref = {"features": {"f0": distribution(normal(5000, seed=1))}, "score": distribution(np.linspace(0, 1, 500))}
    window = DriftWindow(["f0"], 500)
    window.add([str(i) for i in range(500)], normal(500, 3.0).reshape(-1, 1), None, list(range(500)))
    metrics, client = Metrics(), DictRedis()
    clock = iter([10.0, 20.0])
    publisher = DriftPublisher(window, TH, metrics, client, "p:", clock=lambda: next(clock))
    assert publisher.publish(None) is None  # no model, nothing to compare
    first = publisher.publish(ConstantModel(ref), "churn-lightgbm", "3")
    second = publisher.publish(ConstantModel(ref), "churn-lightgbm", "3")
    assert first is not None
    assert second is not None
    stored = read_drift(client, "p:")
    assert stored is not None
    assert stored == json.loads(json.dumps(second))
    assert stored["features"]["f0"]["alert_since"] == 10.0
    assert stored["model"] == {"name": "churn-lightgbm", "version": "3"}
    registry = metrics.registry
    assert registry.get_sample_value("churn_feature_psi", {"feature": "f0"}) == pytest.approx(
        stored["features"]["f0"]["psi"]
    )
    assert (registry.get_sample_value("churn_feature_ks_statistic", {"feature": "f0"}) or 0) > 0.5
    assert registry.get_sample_value("churn_drift_window_rows") == 500
    assert (registry.get_sample_value("churn_score_psi") or 0) > 0.25


class FirstFeatureModel(StandInModel):
    def tier(self, probability: float) -> str:
        return "low"


def test_batch_processor_feeds_the_window_with_what_it_scores() -> None:

    events = random_events(3, users=15, days=5, per_user=40)
    msgs = [Message(e.to_json(), "events", 0, i, e.ts) for i, e in enumerate(events)]
    window = DriftWindow(spec.MODEL_FEATURES, 100)
    risks = InMemoryRiskStore()
    model = LoadedModel(FirstFeatureModel(), "m", "1")
    p = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), risks, Metrics(), lambda: model, drift=window
    )
    for i in range(0, len(msgs), 97):
        p.process(msgs[i : i + 97])
    churned = {e.user_id for e in events if e.page == "Cancellation Confirmation"}
    assert len(window) == len({e.user_id for e in events if e.user_id} - churned)
    _, scores = window.rows()
    written = {u: r.churn_probability for u, r in risks.rows.items() if r.churn_probability is not None}
    assert set(written) == set(risks.rows) - churned  # cancelled users are marked, not scored
    assert sorted(scores.tolist()) == pytest.approx(sorted(written.values()))


def test_retrain_command_trains_only_after_sustained_drift(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import time

    import redis
    from typer.testing import CliRunner

    client = DictRedis()
    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(lambda *a, **k: client))
    calls: list[Any] = []

    def fake_train(settings: Any, events: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(events)
        return {}

    monkeypatch.setattr(training.pipeline, "train", fake_train)
    monkeypatch.setattr(training.report, "format_summary", lambda summary: "trained")
    runner = CliRunner()
    events = str(tmp_path / "log")

    result = runner.invoke(app, ["retrain", "--if-drift", "--events", events])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("not retraining: no drift report")
    assert calls == []

    now = time.time()
    drifted = with_alert_history(state({"adverts_per_song_7d": 0.5}, 0.05, at=now - 45 * 60), None)
    client.set(drift_key(load_settings().redis_prefix), json.dumps({**drifted, "computed_at": now}))
    result = runner.invoke(app, ["retrain", "--if-drift", "--sustained-minutes", "60", "--events", events])
    assert result.exit_code == 0, result.output
    assert "not retraining: 1 at alert level, the longest (adverts_per_song_7d) for 45.0 min < 60 min" in result.output
    assert calls == []

    result = runner.invoke(app, ["retrain", "--if-drift", "--sustained-minutes", "30", "--events", events])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("retraining: at alert level for at least 30 min: adverts_per_song_7d 45.0 min")
    assert "trained" in result.output
    assert len(calls) == 1

    result = runner.invoke(app, ["retrain", "--events", events])  # without --if-drift: always
    assert result.exit_code == 0, result.output
    assert len(calls) == 2
