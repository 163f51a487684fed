"""Shadow scoring (issue #22): the agreement figures, the prediction log's `role` contract (old
files without it read as served), and a processor with a distinct challenger, which scores in
shadow and changes nothing that is served."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

from core.timeutil import ms_to_iso
from features import spec
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel, in_canary, prediction_id, shadow_of
from monitoring.agreement import agreement, spearman
from monitoring.drift import Thresholds
from monitoring.drift_state import DriftPublisher
from monitoring.metrics import Metrics
from monitoring.performance_state import PerformancePublisher, read_performance
from monitoring.prediction_log import read_log, read_snapshot, with_role, write_labels, write_snapshot
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore, RiskRow
from stream.snapshot import DailySnapshots, InMemoryActivity
from tests.support import DictRedis, StandInModel, gauge_series, random_events
from training.reference import references

DAY = 86_400_000


def test_agreement_of_a_model_with_itself_is_total() -> None:
    p = np.array([0.1, 0.7, 0.4, 0.9])
    tiers = ["low", "high", "medium", "high"]
    figures = agreement(p, p.copy(), tiers, list(tiers))
    assert (figures.rows, figures.same_tier, figures.spearman, figures.mean_abs_delta) == (4, 1.0, 1.0, 0.0)


def test_agreement_counts_tiers_ranks_and_mean_delta() -> None:
    served = np.array([0.1, 0.2, 0.3, 0.4])
    shadow = np.array([0.8, 0.6, 0.4, 0.2])  # the opposite ranking
    figures = agreement(served, shadow, ["low", "low", "medium", "high"], ["high", "low", "medium", "low"])
    assert figures.same_tier == 0.5
    assert figures.spearman == pytest.approx(-1.0)
    assert figures.mean_abs_delta == pytest.approx((0.7 + 0.4 + 0.1 + 0.2) / 4)
    # Ties take their mean rank (Spearman is Pearson on ranks): [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
    ranks = np.array([1, 2.5, 2.5, 4])
    assert spearman(np.array([0.1, 0.5, 0.5, 0.9]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        np.corrcoef(ranks, [1, 2, 3, 4])[0, 1]
    )


def test_agreement_without_rows_or_with_a_constant_side_is_nan_not_an_error() -> None:
    empty = agreement(np.empty(0), np.empty(0), [], [])
    assert empty.rows == 0
    assert all(math.isnan(v) for v in empty.figures().values())
    constant = agreement(np.array([0.5, 0.5]), np.array([0.1, 0.9]), ["low", "low"], ["low", "high"])
    assert math.isnan(constant.spearman)
    assert constant.same_tier == 0.5
    with pytest.raises(ValueError, match="one row per user"):
        agreement(np.array([0.1]), np.array([0.1, 0.2]), ["low"], ["low", "low"])


def test_shadow_of_is_the_other_model_only_when_the_challenger_is_distinct() -> None:
    champion, challenger = LoadedModel(StandInModel(), "m", "1"), LoadedModel(StandInModel(), "m", "2")
    assert shadow_of(champion, champion, challenger) is challenger
    assert shadow_of(challenger, champion, challenger) is champion  # a canary user: the champion in shadow
    assert shadow_of(champion, champion, None) is None
    assert shadow_of(champion, champion, LoadedModel(StandInModel(), "m", "1")) is None


def _old_snapshot(root: Path, as_of: int) -> None:
    """A snapshot as logged before shadow scoring: no `role` column."""
    write_snapshot(
        root,
        as_of,
        pl.DataFrame(
            {"user_id": ["a", "b"], "as_of": [as_of, as_of], "churn_probability": [0.2, 0.8],
             "risk_tier": ["low", "high"], "model_version": ["1", "1"], "prediction_id": ["x", "y"]}
        ),
    )  # fmt: skip


def test_a_log_without_the_role_column_reads_as_all_served(tmp_path: Path) -> None:
    as_of = 1_767_225_600_000
    _old_snapshot(tmp_path, as_of)
    served = read_snapshot(tmp_path, as_of)
    assert served is not None
    assert served["role"].to_list() == ["served", "served"]
    shadow = read_snapshot(tmp_path, as_of, role="shadow")
    assert shadow is not None
    assert shadow.is_empty()
    write_labels(tmp_path, as_of, pl.DataFrame({"user_id": ["a", "b"], "churned": [False, True]}), {})
    log = read_log(tmp_path)
    assert log["role"].to_list() == ["served", "served"]
    assert log["churned"].to_list() == [False, True]
    assert read_log(tmp_path, role="shadow").is_empty()
    assert with_role(served).equals(served)


class ThreeDayModel(StandInModel):
    meta: ClassVar[dict[str, Any]] = {"horizon_days": 3, "metrics": {}, "data_window": {}}
    horizon_days = 3


class ReversedModel(ThreeDayModel):
    """A deliberately different challenger: risk falls with the first feature."""

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return 1 / (1 + matrix[:, 0] / 100)


def _run(
    root: Path, challenger: LoadedModel | None, canary: float = 0.0, champion_model: Any = None
) -> tuple[dict[str, RiskRow], Metrics, Any]:
    """Streams 12 days of 30 users (one partition) through a processor with the champion v1
    (`champion_model`, by default a `ThreeDayModel`; and `challenger`); returns the served risk
    rows, the metrics and the Redis stand-in."""
    events = random_events(11, users=30, days=12, per_user=100)
    msgs = [Message(e.to_json(), "events", 0, i, e.ts) for i, e in enumerate(events)]
    metrics, client, risks, states = Metrics(), DictRedis(), InMemoryRiskStore(), InMemoryStateStore()
    snapshots = DailySnapshots(
        InMemoryActivity(), states, OnlineEngine(), DriftPublisher(Thresholds(), metrics, client, "p:"),
        PerformancePublisher(metrics, client, "p:", 0.7), root, lookback_days=5,
    )  # fmt: skip
    champion = LoadedModel(champion_model or ThreeDayModel(), "m", "1")
    p = BatchProcessor(
        OnlineEngine(), states, InMemoryFeatureStore(), risks, metrics, lambda: champion,
        wall_clock_ms=lambda: 0, snapshots=snapshots, challenger=lambda: challenger, canary_percent=canary,
    )  # fmt: skip
    for start in range(0, len(msgs), 250):
        p.process(msgs[start : start + 250])
    return risks.rows, metrics, client


@pytest.mark.parametrize("canary", [0.0, 50.0])
def test_a_distinct_challenger_scores_in_shadow_and_changes_nothing_served(tmp_path: Path, canary: float) -> None:
    alone, _, _ = _run(tmp_path / "alone", LoadedModel(ThreeDayModel(), "m", "1"), canary)  # the same version
    challenger = LoadedModel(ReversedModel(), "m", "2")
    served, metrics, client = _run(tmp_path / "shadow", challenger, canary)
    if canary == 0:
        assert served == alone  # risk rows, tiers and prediction ids: the serving model's only
    else:  # the canary's users are served by the challenger, the others exactly as without it
        assert {u: r for u, r in served.items() if not in_canary(u, canary)} == {
            u: r for u, r in alone.items() if not in_canary(u, canary)
        }
        assert {r.model_version for u, r in served.items() if in_canary(u, canary)} == {"2"}
    scored = metrics.users_scored_total._value.get()
    assert metrics.shadow_rows_total.labels("scorer")._value.get() == scored > 0

    log = read_log(tmp_path / "shadow", role=None)
    dates = log["as_of"].unique().sort().to_list()
    assert len(dates) >= 5
    for as_of in dates:
        day = log.filter(pl.col("as_of") == as_of)
        on_served, on_shadow = (day.filter(pl.col("role") == r).sort("user_id") for r in ("served", "shadow"))
        assert on_served["user_id"].to_list() == on_shadow["user_id"].to_list()  # one row of each per user
        for row_served, row_shadow in zip(
            on_served.iter_rows(named=True), on_shadow.iter_rows(named=True), strict=True
        ):
            user = row_served["user_id"]
            version = "2" if in_canary(user, canary) else "1"
            assert row_served["model_version"] == version
            assert row_shadow["model_version"] == ("1" if version == "2" else "2")
            for row in (row_served, row_shadow):
                assert row["prediction_id"] == prediction_id(row["model_version"], user, as_of, as_of)
        if canary == 0:  # the served rows are those a run without the challenger logs
            with_shadow, alone_day = read_snapshot(tmp_path / "shadow", as_of), read_snapshot(tmp_path / "alone", as_of)
            assert with_shadow is not None
            assert alone_day is not None
            assert with_shadow.equals(alone_day)
    # The agreement gauges describe the latest snapshot.
    latest = log.filter(pl.col("as_of") == dates[-1])
    on_served, on_shadow = (latest.filter(pl.col("role") == r).sort("user_id") for r in ("served", "shadow"))
    figures = agreement(
        on_served["churn_probability"].to_numpy(), on_shadow["churn_probability"].to_numpy(),
        on_served["risk_tier"].to_list(), on_shadow["risk_tier"].to_list(),
    )  # fmt: skip
    assert metrics.shadow_agreement.labels("same_tier")._value.get() == figures.same_tier
    assert metrics.shadow_agreement.labels("mean_abs_delta")._value.get() == pytest.approx(figures.mean_abs_delta)
    assert figures.mean_abs_delta > 0
    if canary == 0:  # the reversed model ranks the users the other way round
        assert metrics.shadow_agreement.labels("spearman")._value.get() == pytest.approx(-1.0)
    # Realized figures per model, over every user it scored; the served figures over served rows only.
    state = json.loads(client.get("p:performance"))
    labelled = [entry for entry in state["days"].values() if entry.get("realized")]
    assert labelled
    assert all(set(entry["models"]) == {"1", "2"} for entry in labelled)
    assert {entry["models"]["1"]["role"] for entry in labelled} == {"served"}
    assert all(entry["models"]["2"]["realized"]["rows"] == entry["realized"]["rows"] for entry in labelled)
    version_of = {s.labels["version"] for s in next(iter(metrics.model_realized.collect())).samples}
    assert version_of == {"1", "2"}


def _with_reference(model: Any) -> Any:
    """Returns `model` with a training reference in its meta (so snapshots compute its drift)."""
    matrix = np.random.default_rng(5).gamma(2.0, 40.0, (2000, len(spec.MODEL_FEATURES)))
    model.meta = {**model.meta, "reference": references(matrix, spec.MODEL_FEATURES, model.predict(matrix))}
    return model


PER_MODEL_SERIES = (
    "churn_model_score_psi", "churn_model_feature_psi_max", "churn_model_expected_performance",
    "churn_model_realized_performance", "churn_shadow_agreement", "churn_shadow_snapshot_rows",
)  # fmt: skip


def test_a_restarted_scorer_shows_the_per_model_and_shadow_figures_of_the_latest_snapshot(tmp_path: Path) -> None:
    """Only the overall drift and performance gauges came back from Redis at a scorer's start:
    the per-model ones (served and shadow) and the shadow agreement stayed absent until its next
    daily snapshot, and a scorer that skipped a snapshot kept the ones it took itself."""
    challenger = LoadedModel(_with_reference(ReversedModel()), "m", "2")
    _, metrics, client = _run(tmp_path, challenger, champion_model=_with_reference(ThreeDayModel()))
    restarted = Metrics()
    snapshots = DailySnapshots(
        InMemoryActivity(), InMemoryStateStore(), OnlineEngine(), DriftPublisher(Thresholds(), restarted, client, "p:"),
        PerformancePublisher(restarted, client, "p:", 0.7), tmp_path, lookback_days=5,
    )  # fmt: skip
    snapshots.show_latest()
    for name in PER_MODEL_SERIES:
        assert gauge_series(metrics, name), name  # the run published it
        assert gauge_series(restarted, name) == gauge_series(metrics, name), name
    versions = {labels[:2] for labels in gauge_series(restarted, "churn_model_score_psi")}
    assert versions == {("served", "1"), ("shadow", "2")}


def test_a_per_model_gauge_keeps_one_version_per_role() -> None:
    metrics = Metrics()
    gauge = metrics.model_expected

    def series() -> set[tuple[str, str, str]]:
        return {(s.labels["role"], s.labels["version"], s.labels["metric"]) for f in gauge.collect() for s in f.samples}

    metrics.set_model_figures(gauge, "served", "1", {"roc_auc": 0.7, "brier": float("nan")})
    metrics.set_model_figures(gauge, "shadow", "2", {"roc_auc": 0.6})
    assert series() == {("served", "1", "roc_auc"), ("shadow", "2", "roc_auc")}
    metrics.set_model_figures(gauge, "served", "2", {"roc_auc": 0.6})  # v2 promoted: v1's series go
    assert series() == {("served", "2", "roc_auc"), ("shadow", "2", "roc_auc")}
    metrics.set_model_figures(gauge, "shadow", None, {})  # no challenger any more
    assert series() == {("served", "2", "roc_auc")}


class OneDayModel(StandInModel):
    meta: ClassVar[dict[str, Any]] = {"horizon_days": 1, "metrics": {}, "data_window": {}}
    horizon_days = 1


@pytest.mark.parametrize("first_horizon", [3, 1])
def test_each_snapshot_is_labelled_once_with_the_horizon_and_champion_that_took_it(
    tmp_path: Path, first_horizon: int
) -> None:
    """A promotion mid-stream changes H (3 -> 1 days, or 1 -> 3). Every snapshot whose own
    horizon has passed is labelled with it, none is skipped or labelled with the new H, and the
    model that served it is "served" in its realized figures after it was replaced."""
    models = {1: LoadedModel(OneDayModel(), "m", "1"), 3: LoadedModel(ThreeDayModel(), "m", "3")}
    first, second = models[first_horizon], models[4 - first_horizon]
    serving = [first]
    events = random_events(11, users=30, days=12, per_user=100)
    msgs = [Message(e.to_json(), "events", 0, i, e.ts) for i, e in enumerate(events)]
    metrics, client = Metrics(), DictRedis()
    snapshots = DailySnapshots(
        InMemoryActivity(), InMemoryStateStore(), OnlineEngine(), DriftPublisher(Thresholds(), metrics, client, "p:"),
        PerformancePublisher(metrics, client, "p:", 0.7), tmp_path, lookback_days=5,
    )  # fmt: skip
    p = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), metrics,
        lambda: serving[0], wall_clock_ms=lambda: 0, snapshots=snapshots,
    )  # fmt: skip
    for start in range(0, len(msgs), 250):
        if start >= len(msgs) // 2:
            serving[0] = second  # promoted
        p.process(msgs[start : start + 250])

    log = read_log(tmp_path, role=None)
    taken = sorted(log["as_of"].unique().to_list())
    champions = {row["as_of"]: row["champion_version"] for row in log.iter_rows(named=True)}
    assert set(champions.values()) == {"1", "3"}
    for as_of in taken:
        horizon = int(champions[as_of])  # the version names its horizon here
        performance = tmp_path / f"date={ms_to_iso(as_of)[:10]}" / "performance.json"
        if as_of + horizon * DAY > taken[-1]:
            assert not performance.exists()
            continue
        labelled = json.loads(performance.read_text())
        assert labelled["horizon_days"] == horizon
        assert labelled["by_model"][champions[as_of]]["role"] == "served"


def test_a_snapshot_taken_again_after_redis_was_lost_is_labelled_again(tmp_path: Path) -> None:
    """Redis is lost while the prediction log stays: the scorer replays from the start and takes
    every snapshot again (here served by a new champion v2). Each one is labelled again, with
    the rows it now holds, and its realized figures reach the new Redis; the labels of the
    replaced snapshot (of v1's rows) are not kept."""
    events = random_events(11, users=30, days=12, per_user=100)
    msgs = [Message(e.to_json(), "events", 0, i, e.ts) for i, e in enumerate(events)]

    def stream(model: LoadedModel, client: DictRedis) -> None:
        metrics = Metrics()
        snapshots = DailySnapshots(
            InMemoryActivity(), InMemoryStateStore(), OnlineEngine(),
            DriftPublisher(Thresholds(), metrics, client, "p:"), PerformancePublisher(metrics, client, "p:", 0.7),
            tmp_path, lookback_days=5,
        )  # fmt: skip
        p = BatchProcessor(
            OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), metrics,
            lambda: model, wall_clock_ms=lambda: 0, snapshots=snapshots,
        )  # fmt: skip
        for start in range(0, len(msgs), 250):
            p.process(msgs[start : start + 250])

    stream(LoadedModel(ThreeDayModel(), "m", "1"), DictRedis())
    labelled_before = sorted(p.parent.name for p in tmp_path.glob("date=*/performance.json"))
    assert labelled_before
    fresh = DictRedis()
    stream(LoadedModel(ReversedModel(), "m", "2"), fresh)

    labelled_after = sorted(p.parent.name for p in tmp_path.glob("date=*/performance.json"))
    assert labelled_after == labelled_before
    for day in labelled_after:
        assert set(json.loads((tmp_path / day / "performance.json").read_text())["by_model"]) == {"2"}
    state = read_performance(fresh, "p:")
    assert state is not None
    realized_days = {day for day, entry in state["days"].items() if entry.get("realized")}
    assert realized_days == {day.removeprefix("date=") for day in labelled_after}
