"""Drift maths (PSI on fixed bins with a missing bin, KS), the bounded window, the status
thresholds, the alert history kept in the shared state and the retrain decision."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

import models.registry
import training.pipeline
import training.report
from churn.cli import app
from core.settings import load_settings
from core.timeutil import DAY_MS
from events.log import events_frame
from features import offline
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.drift import (
    SEGMENTS,
    Thresholds,
    column_drift,
    ks,
    live_shares,
    psi,
    reference_shares,
    segment_masks,
    snapshot_drift,
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
from monitoring.performance_state import PerformancePublisher
from monitoring.prediction_log import day_of, read_snapshot
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from stream.snapshot import DailySnapshots, InMemoryActivity
from tests.support import DictRedis, StandInModel, gauge_series, random_events, wire_frame
from training import dataset
from training.performance import realized
from training.reference import distribution, references

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


def test_snapshot_drift_reports_every_reference_feature_and_the_score() -> None:
    ref = {
        "features": {"f0": distribution(normal(5000, seed=1)), "f1": distribution(normal(5000, seed=2))},
        "score": distribution(np.linspace(0, 1, 1000)),
    }
    matrix = np.column_stack([normal(3000, seed=3), normal(3000, 2.0, seed=4)])
    report = snapshot_drift(ref, ["f0", "f1", "absent"], np.column_stack([matrix, np.zeros(3000)]),
                            np.full(3000, 0.5), TH, now=123.0, as_of_ms=86_400_000)  # fmt: skip
    assert report.rows == 3000
    assert set(report.features) == {"f0", "f1"}  # a feature without a reference is skipped
    assert report.features["f0"].status == "ok"
    assert report.features["f1"].status == "alert"
    assert report.score is not None
    assert report.score.status == "alert"  # every score is 0.5
    assert report.segments == {}  # a reference without segments: none judged
    assert json.loads(json.dumps(report.to_dict()))["features"]["f0"]["status"] == "ok"


def segment_rows(n: int, seed: int, paid_shift: float = 0.0) -> np.ndarray:
    """Rows of (x, level_paid, days_since_registration): x shifted by `paid_shift` for paid users."""
    rng = np.random.default_rng(seed)
    paid = (rng.random(n) < 0.4).astype(float)
    days = rng.choice([10.0, 100.0, 400.0], n)
    return np.column_stack([rng.normal(0, 1, n) + paid * paid_shift, paid, days])


FEATURES3 = ("x", "level_paid", "days_since_registration")


def test_segments_are_judged_against_their_own_reference_and_small_ones_are_not_judged() -> None:
    reference_rows = segment_rows(20_000, seed=1)
    reference = references(reference_rows, FEATURES3, reference_rows[:, 0])
    assert set(reference["segments"]) == set(SEGMENTS)
    assert reference["segments"]["level_paid"]["count"] == int(reference_rows[:, 1].sum())
    live = segment_rows(20_000, seed=2, paid_shift=1.0)  # only paid users moved
    report = snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=0.0, min_segment_rows=100)
    assert report.segments["level_paid"].features["x"].status == "alert"
    assert report.segments["level_free"].features["x"].status == "ok"
    assert all(s.judged for s in report.segments.values())
    # Below the minimum, a segment is measured and shown, never given a status above "ok".
    few = snapshot_drift(reference, FEATURES3, live[:150], live[:150, 0], TH, now=0.0, min_segment_rows=100)
    small = [name for name, s in few.segments.items() if s.rows < 100]
    assert small
    for name in small:
        assert not few.segments[name].judged
        assert all(d.status == "ok" for d in few.segments[name].features.values())
    masks = segment_masks(live, FEATURES3)
    assert (masks["level_free"] | masks["level_paid"]).all()
    bands = masks["tenure_under_30d"].astype(int) + masks["tenure_30_to_180d"] + masks["tenure_180d_plus"]
    assert (bands == 1).all()  # every row with a registration is in exactly one band


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


def of_model(report: dict[str, Any], version: str) -> dict[str, Any]:
    return {**report, "model": {"name": "churn", "version": version}}


def test_a_promoted_model_starts_its_own_alert_run_and_the_old_report_does_not_retrain() -> None:
    """v1 held a feature at alert level for a day, and `--if-drift` retrained and promoted v2.
    Until v2's first snapshot, the state is v1's: it must not retrain (and promote) again at
    every check. v2's first report starts its own run: no retrain before it is sustained."""
    held = with_alert_history(of_model(state({"a": 0.4}, 0.05, at=0.0), "1"), None)
    held = with_alert_history(of_model(state({"a": 0.4}, 0.05, at=1440 * 60.0), "1"), held)
    now = 1441 * 60.0
    assert retrain_decision(held, 30, now, champion="1")[0] is True
    go, why = retrain_decision(held, 30, now, champion="2")
    assert not go
    assert "not of the champion v2" in why
    first_of_v2 = with_alert_history(of_model(state({"a": 0.4}, 0.05, at=now), "2"), held)
    assert first_of_v2["features"]["a"]["alert_since"] == now  # not v1's 0.0
    assert retrain_decision(first_of_v2, 30, now + 60, champion="2")[0] is False


class ConstantModel:
    meta: dict[str, Any]

    def __init__(self, reference: dict[str, Any]) -> None:
        self.meta = {"reference": reference}

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return np.full(len(matrix), 0.5)

    def tier(self, probability: float) -> str:
        return "low"


def test_publisher_sets_gauges_and_writes_the_state() -> None:
    reference_rows = segment_rows(5000, seed=1)
    reference = references(reference_rows, FEATURES3, reference_rows[:, 0])
    live = segment_rows(500, seed=2, paid_shift=3.0)
    metrics, client = Metrics(), DictRedis()
    publisher = DriftPublisher(TH, metrics, client, "p:")
    first = publisher.publish(snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=10.0, as_of_ms=86_400_000,
                                             min_segment_rows=180), "churn-lightgbm", "3")  # fmt: skip
    second = publisher.publish(snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=20.0,
                                              min_segment_rows=180), "churn-lightgbm", "3")  # fmt: skip
    assert first is not None
    assert second is not None
    stored = read_drift(client, "p:")
    assert stored is not None
    assert stored == json.loads(json.dumps(second))
    assert stored["features"]["x"]["alert_since"] == 10.0
    assert stored["segments"]["level_paid"]["features"]["x"]["alert_since"] == 10.0
    assert stored["model"] == {"name": "churn-lightgbm", "version": "3"}
    registry = metrics.registry
    assert registry.get_sample_value("churn_feature_psi", {"feature": "x"}) == pytest.approx(
        stored["features"]["x"]["psi"]
    )
    assert registry.get_sample_value("churn_drift_window_rows") == 500
    # The alert rules read the configured levels from here.
    assert registry.get_sample_value("churn_drift_psi_threshold", {"level": "alert"}) == TH.alert
    assert registry.get_sample_value("churn_drift_psi_threshold", {"level": "warn"}) == TH.warn
    assert registry.get_sample_value("churn_snapshot_as_of_seconds") == 86_400
    assert (registry.get_sample_value("churn_segment_feature_psi_max", {"segment": "level_paid"}) or 0) > 0.25
    assert (registry.get_sample_value("churn_segment_feature_psi_max", {"segment": "level_free"}) or 1) < 0.25
    unjudged = [name for name, seg in stored["segments"].items() if not seg["judged"]]
    assert unjudged  # 500 rows over three tenure bands: ~167 each, under 180
    for name in unjudged:  # no gauge an alert could read
        assert registry.get_sample_value("churn_segment_feature_psi_max", {"segment": name}) is None
    assert "level_paid/x" in sustained_alerts(stored, 0, now=20.0)


DRIFT_GAUGES = (
    "churn_feature_psi", "churn_feature_ks_statistic", "churn_feature_ks_pvalue", "churn_score_psi",
    "churn_drift_window_rows", "churn_snapshot_as_of_seconds", "churn_segment_feature_psi_max",
    "churn_segment_score_psi",
)  # fmt: skip


def test_every_scorer_and_a_restarted_one_show_the_latest_snapshot_whoever_took_it() -> None:
    """Scorer A takes day 1 (x drifted) and day 2 (no drift, one feature without values);
    scorer B took day 1 itself and skips day 2. Its gauges must follow day 2, with no series
    left for what day 2 could not compute, and a restarted scorer must show day 2 at once."""
    reference_rows = segment_rows(5000, seed=1)
    reference = references(reference_rows, FEATURES3, reference_rows[:, 0])
    drifted = segment_rows(500, seed=2, paid_shift=3.0)
    calm = segment_rows(500, seed=3)
    calm[:, 2] = np.nan  # days_since_registration missing for every user: no KS that day
    client = DictRedis()
    a, b, restarted = (DriftPublisher(TH, Metrics(), client, "p:") for _ in range(3))
    day1 = snapshot_drift(reference, FEATURES3, drifted, drifted[:, 0], TH, now=10.0, as_of_ms=86_400_000)
    day2 = snapshot_drift(reference, FEATURES3, calm, calm[:, 0], TH, now=20.0, as_of_ms=2 * 86_400_000)
    a.publish(day1)
    b.publish(day1)
    assert b.metrics.registry.get_sample_value("churn_feature_psi", {"feature": "x"}) > 0.25  # type: ignore[operator]
    a.publish(day2)
    b.mirror()
    restarted.mirror()
    for name in DRIFT_GAUGES:
        assert gauge_series(b.metrics, name) == gauge_series(a.metrics, name), name
        assert gauge_series(restarted.metrics, name) == gauge_series(a.metrics, name), name
    assert b.metrics.registry.get_sample_value("churn_feature_psi", {"feature": "x"}) < 0.1  # type: ignore[operator]
    assert b.metrics.registry.get_sample_value("churn_snapshot_as_of_seconds") == 2 * 86_400
    gone = {"feature": "days_since_registration"}
    assert b.metrics.registry.get_sample_value("churn_feature_ks_statistic", gone) is None  # not day 1's


def test_a_late_per_model_record_never_rewrites_a_newer_snapshot_s_state() -> None:
    """Scorer A publishes day 1 and, before it records day 1's per-model figures, scorer B
    publishes day 2: A's record must not bring day 1's state back, and day 2's state shows no
    per-model figures of day 1."""
    reference_rows = segment_rows(5000, seed=1)
    reference = references(reference_rows, FEATURES3, reference_rows[:, 0])
    live = segment_rows(500, seed=2)
    client = DictRedis()
    a, b = (DriftPublisher(TH, Metrics(), client, "p:") for _ in range(2))
    day1 = snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=10.0, as_of_ms=86_400_000)
    day2 = snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=20.0, as_of_ms=2 * 86_400_000)
    a.publish(day1, "m", "1")
    b.publish(day2, "m", "1")
    a.publish_model(day1, "served", "1")
    a.publish_agreement(None, 86_400_000)
    state = read_drift(client, "p:")
    assert state is not None
    assert state["as_of_ms"] == 2 * 86_400_000
    assert "models" not in state
    b.publish_model(day2, "served", "1")
    state = read_drift(client, "p:")
    assert state is not None
    assert state["models"]["served"]["version"] == "1"


def test_a_scorer_that_finds_the_snapshot_taken_shows_the_taker_s_figures(tmp_path: Any) -> None:
    reference_rows = segment_rows(5000, seed=1)
    reference = references(reference_rows, FEATURES3, reference_rows[:, 0])
    live = segment_rows(500, seed=2, paid_shift=3.0)
    client, activity = DictRedis(), InMemoryActivity()
    taker = DriftPublisher(TH, Metrics(), client, "p:")
    taker.publish(snapshot_drift(reference, FEATURES3, live, live[:, 0], TH, now=10.0, as_of_ms=86_400_000))
    activity.mark_taken(86_400_000)
    metrics = Metrics()
    other = DailySnapshots(
        activity, InMemoryStateStore(), OnlineEngine(), DriftPublisher(TH, metrics, client, "p:"),
        PerformancePublisher(metrics, client, "p:", 0.7), tmp_path, lookback_days=5,
    )  # fmt: skip
    other.take(86_400_000, LoadedModel(FirstFeatureModel(), "m", "1"))
    for name in DRIFT_GAUGES:
        assert gauge_series(metrics, name) == gauge_series(taker.metrics, name), name
    assert metrics.registry.get_sample_value("churn_snapshot_as_of_seconds") == 86_400


def test_a_realized_figure_that_cannot_be_computed_has_no_series_and_scorers_follow_the_latest() -> None:
    client = DictRedis()
    a, b = (PerformancePublisher(Metrics(), client, "p:", 0.7) for _ in range(2))
    for publisher in (a, b):
        publisher.realized(86_400_000, {"roc_auc": 0.61, "brier": 0.2, "rows": 100, "churners": 9})
    # Day 2's labelled snapshot has no churners: no ROC-AUC, not day 1's under day 2's as-of.
    a.realized(2 * 86_400_000, {"roc_auc": float("nan"), "brier": 0.1, "rows": 90, "churners": 0})
    b.mirror()
    for publisher in (a, b):
        registry = publisher.metrics.registry
        assert registry.get_sample_value("churn_realized_performance", {"metric": "roc_auc"}) is None
        assert registry.get_sample_value("churn_realized_performance", {"metric": "brier"}) == 0.1
        assert registry.get_sample_value("churn_realized_as_of_seconds") == 2 * 86_400


class FirstFeatureModel(StandInModel):
    meta: ClassVar[dict[str, Any]] = {"horizon_days": 3, "metrics": {}, "data_window": {}}
    horizon_days = 3


class RecordingSnapshots(DailySnapshots):
    """The real snapshot, also keeping the rows each one saw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, tuple[list[str], np.ndarray]] = {}

    def take(
        self, as_of_ms: int, loaded: LoadedModel | None, challenger: LoadedModel | None = None, canary: float = 0.0
    ) -> None:
        self.seen[as_of_ms] = self.rows(as_of_ms)
        super().take(as_of_ms, loaded, challenger, canary)


def _arrival(events: list[Any], partition_of: dict[str, int], ahead: dict[int, int]) -> list[Message]:
    """Returns the events as Kafka messages in arrival order, partition p running `ahead[p]` ms
    ahead of event time (a replayed backlog), offsets counted per partition."""
    arrival = sorted(events, key=lambda e: e.ts - ahead[partition_of[e.user_id]])  # stable: ties keep order
    offsets = dict.fromkeys(ahead, 0)
    msgs = []
    for e in arrival:
        partition = partition_of[e.user_id]
        msgs.append(Message(e.to_json(), "events", partition, offsets[partition], e.ts))
        offsets[partition] += 1
    return msgs


def test_daily_snapshots_are_the_training_observation_points(tmp_path: Any) -> None:
    """Three partitions, one running two days ahead of the others (a replayed backlog), batches
    of every size spanning several midnights: each snapshot holds exactly the users and rows
    `training.dataset` builds for that midnight (offline engine)."""
    events = random_events(5, users=30, days=12, per_user=120)
    partition_of = {u: int(u[1:]) % 3 for u in {e.user_id for e in events}}
    ahead = {0: 2 * 86_400_000, 1: 0, 2: 3_600_000}
    msgs = _arrival(events, partition_of, ahead)
    states = InMemoryStateStore()
    metrics, client = Metrics(), DictRedis()
    snapshots = RecordingSnapshots(
        InMemoryActivity(), states, OnlineEngine(), DriftPublisher(TH, metrics, client, "p:"),
        PerformancePublisher(metrics, client, "p:", 0.7), tmp_path / "predictions", lookback_days=5,
    )  # fmt: skip
    model = LoadedModel(FirstFeatureModel(), "m", "1")
    p = BatchProcessor(
        OnlineEngine(), states, InMemoryFeatureStore(), InMemoryRiskStore(), metrics, lambda: model,
        snapshots=snapshots,
    )  # fmt: skip
    start, sizes = 0, [1, 7, 300, 2000, 50, 5000]
    for n in range(len(msgs)):
        if start >= len(msgs):
            break
        size = sizes[n % len(sizes)]
        p.process(msgs[start : start + size])
        start += size

    log = events_frame(wire_frame(events))
    points, _ = dataset.observation_points(log, dataset.GridConfig(3, 24, 5))
    offline_rows = offline.compute(log, points.select("user_id", "as_of"))
    offline_rows = offline_rows.filter(pl.col("last_event_ms") >= pl.col("as_of") - 5 * 86_400_000)
    # A midnight is snapshotted once every partition passed it: the slowest ends first.
    slowest = min(max(e.ts for e in events if partition_of[e.user_id] == p) for p in ahead)
    midnights = sorted(t for t in offline_rows["as_of"].unique().to_list() if t < slowest)
    assert sorted(snapshots.seen) == midnights
    for as_of in midnights:
        users, matrix = snapshots.seen[as_of]
        expected = offline_rows.filter(pl.col("as_of") == as_of).sort("user_id")
        assert users == expected["user_id"].to_list(), as_of
        np.testing.assert_allclose(matrix, dataset.feature_matrix(expected), rtol=1e-12, equal_nan=True)
        logged = read_snapshot(tmp_path / "predictions", as_of)
        assert logged is not None
        assert logged["user_id"].to_list() == users
        np.testing.assert_allclose(logged["churn_probability"].to_numpy(), FirstFeatureModel().predict(matrix))

    # Realized figures: each snapshot H days old is labelled from the churns the stream carried.
    churn = {e.user_id: e.ts for e in reversed(events) if e.page == "Cancellation Confirmation"}
    raw = client.get("p:performance")
    assert raw is not None
    state_json = json.loads(raw)
    labelled = [d for d, entry in state_json["days"].items() if entry.get("realized")]
    assert labelled
    for as_of in midnights:
        if as_of + 3 * 86_400_000 > midnights[-1]:
            continue
        users, matrix = snapshots.seen[as_of]
        labels = np.array([as_of < churn.get(u, -1) <= as_of + 3 * 86_400_000 for u in users])
        probabilities = FirstFeatureModel().predict(matrix)
        tiers = [FirstFeatureModel().tier(float(x)) for x in probabilities]
        figures = state_json["days"][day_of(as_of)]["realized"]
        for name, value in realized(labels, probabilities, tiers).items():
            assert figures[name] == (None if np.isnan(value) else pytest.approx(value, abs=1e-12)), (as_of, name)


def test_retrain_command_trains_only_after_sustained_drift(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import time

    import redis
    from typer.testing import CliRunner

    client = DictRedis()
    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(lambda *a, **k: client))
    monkeypatch.setattr(models.registry, "champion_version", lambda settings, alias="champion": None)
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


def test_a_restart_while_one_partition_is_past_midnight_still_takes_that_midnight(tmp_path: Any) -> None:
    """Partition 0 replays two days ahead of partition 1; the scorer restarts halfway (a deploy,
    a crash). Before, the restart began at the first midnight after the shared watermark, which
    partition 0 had carried past midnights partition 1 had not reached: those were never taken,
    and their t - H labels never written."""
    events = random_events(5, users=30, days=8, per_user=80)
    partition_of = {u: int(u[1:]) % 2 for u in {e.user_id for e in events}}
    ahead = {0: 2 * DAY_MS, 1: 0}  # partition 0 replays two days ahead of partition 1
    msgs = _arrival(events, partition_of, ahead)
    states, risks, activity = InMemoryStateStore(), InMemoryRiskStore(), InMemoryActivity()  # all shared (Redis)
    metrics, client = Metrics(), DictRedis()
    root = tmp_path / "predictions"

    def scorer() -> BatchProcessor:  # a fresh process on the shared state
        snapshots = DailySnapshots(
            activity, states, OnlineEngine(), DriftPublisher(TH, metrics, client, "p:"),
            PerformancePublisher(metrics, client, "p:", 0.7), root, lookback_days=5,
        )  # fmt: skip
        model = LoadedModel(FirstFeatureModel(), "m", "1")
        return BatchProcessor(
            OnlineEngine(), states, InMemoryFeatureStore(), risks, metrics, lambda: model, snapshots=snapshots
        )

    half = len(msgs) // 2
    first = scorer()
    for i in range(0, half, 500):
        first.process(msgs[i : min(i + 500, half)])
    taken_before = set(activity.done)
    second = scorer()  # SIGTERM/SIGKILL + restart: nothing else changes
    for i in range(half, len(msgs), 500):
        second.process(msgs[i : i + 500])

    slowest = min(max(e.ts for e in events if partition_of[e.user_id] == p) for p in ahead)
    first_midnight = -(-min(e.ts for e in events) // DAY_MS) * DAY_MS
    midnights = set(range(first_midnight, slowest, DAY_MS))
    missing = sorted(midnights - activity.done)
    assert taken_before < activity.done
    assert missing == [], f"never snapshotted: {missing}; no prediction log for them: " + str(
        [read_snapshot(root, t) is None for t in missing]
    )


def test_midnights_passed_without_a_model_leave_no_kept_rows(tmp_path: Any) -> None:
    """Rows kept for a midnight live in Redis (`capture:<t>`, no TTL) until it is done with: a
    midnight passed before any model was registered (the demo) kept them for good."""
    events = random_events(5, users=30, days=6, per_user=60)
    partition_of = {u: int(u[1:]) % 2 for u in {e.user_id for e in events}}
    msgs = _arrival(events, partition_of, {0: 3_600_000, 1: 0})
    states, activity, metrics, client = InMemoryStateStore(), InMemoryActivity(), Metrics(), DictRedis()
    snapshots = DailySnapshots(
        activity, states, OnlineEngine(), DriftPublisher(TH, metrics, client, "p:"),
        PerformancePublisher(metrics, client, "p:", 0.7), tmp_path, lookback_days=5,
    )  # fmt: skip
    processor = BatchProcessor(
        OnlineEngine(), states, InMemoryFeatureStore(), InMemoryRiskStore(), metrics, lambda: None, snapshots=snapshots
    )
    for i in range(0, len(msgs), 200):
        processor.process(msgs[i : i + 200])
    # Every partition has an event past these midnights: each is done with (the open one keeps).
    passed = min(max(e.ts for e in events if partition_of[e.user_id] == p) for p in (0, 1))
    kept = {t: len(rows) for t, rows in activity.rows.items() if rows}
    assert [t for t in kept if t < passed - DAY_MS] == [], f"kept rows of midnights passed never dropped: {kept}"
    assert len({t for t in range(0, passed, DAY_MS) if t > min(e.ts for e in events)}) >= 3
