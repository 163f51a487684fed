"""Shadow scoring on the real Kafka, Redis and MLflow (issue #22): a champion and a deliberately
different challenger; the challenger's scores reach the prediction log as shadow rows, the
agreement gauges leave the values an identical challenger gives, and nothing served changes."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from bench.harness import ScorerProcess, wait_for
from core.settings import Settings
from infra.local import prometheus_targets_dir
from models.artifact import ChurnModel
from monitoring.metrics import Metrics
from monitoring.prediction_log import read_log
from serving.app import create_app
from stream.topics import delete_topics, ensure_topics
from tests.support import (
    SHADOW_ONLY_SERIES,
    Deployment,
    drained,
    panel_expressions,
    produce_paced,
    query,
    random_events,
    record_figures,
    register_challenger,
    register_champion,
    small_model,
)


def _deploy(settings: Settings, tmp_path: Path, name: str, topic: str, challenger: ChurnModel | None) -> Deployment:
    """A deployment on its own events topic (its own tier-change topic too: that one is named
    after the events topic) with the champion `small_model()` and, if given, `challenger`."""
    folder = tmp_path / f"registry-{name}"
    uri = register_champion(folder, settings, small_model())
    if challenger is not None:
        assert register_challenger(folder, settings, challenger) == "2"
    d = Deployment(settings, uri, tmp_path, name, f"{topic}-{name}")
    ensure_topics(d.settings)
    return d


def _agreement(metrics: Metrics) -> dict[str, float]:
    return {m: metrics.shadow_agreement.labels(m)._value.get() for m in ("same_tier", "spearman", "mean_abs_delta")}


@pytest.mark.soak  # three deployments of the same stream: minutes
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_different_challenger_in_shadow_is_logged_moves_the_agreement_and_changes_nothing_served(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    events = random_events(21, users=60, days=4, per_user=80)  # three midnights: three snapshots
    users = sorted({e.user_id for e in events})
    alone = _deploy(settings, tmp_path, f"sa{unique}", topic, None)  # the champion only
    same = _deploy(settings, tmp_path, f"sb{unique}", topic, small_model())  # an identical challenger (v2)
    different = small_model(rounds=3, tiers={"high": 0.5, "medium": 0.2})  # fewer trees, other cut points
    shadow = _deploy(settings, tmp_path, f"sc{unique}", topic, different)
    deployments = (alone, same, shadow)
    target = prometheus_targets_dir(settings) / f"shadow-{unique}.json"
    scorer: ScorerProcess | None = None
    try:
        for d in (alone, same):
            produce_paced(d.settings, events, rate=1_000_000)
        alone_metrics = alone.run_uninterrupted(idle_s=1.0)
        same_metrics = same.run_uninterrupted(idle_s=1.0)
        # The different challenger through a real `churn consume` process, read on its /metrics
        # and through the real Prometheus (which scrapes it every second while the events flow).
        # Its own state folder is not the one Prometheus watches: a target file there (removed after).
        port = shadow.settings.scorer_metrics_port
        target.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"service": "shadow-test"}}]))
        scorer = shadow.start_scorer()
        instance = f'instance="127.0.0.1:{port}"'
        wait_for(lambda: query(settings, f"up{{{instance}}} == 1"), 30, "Prometheus to scrape the scorer", every=0.2)
        produce_paced(shadow.settings, events, rate=1_000)
        wait_for(lambda: drained(shadow.settings), 300, "the shadow deployment's scorer to apply the topic")
        # The snapshots come after the batch's save: wait for the last one the champion-only run took.
        last = read_log(alone.settings.predictions_dir).filter(pl.col("as_of") == pl.col("as_of").max())
        wait_for(
            lambda: (
                scorer.value("churn_shadow_snapshot_rows") == last.height
                and read_log(shadow.settings.predictions_dir)["as_of"].max() == last["as_of"][0]
            ),
            120,
            "the last snapshot, with its shadow rows",
        )
        samples = scorer.samples()
        # The panels only a shadow model feeds (test_monitoring.py checks the others) answer a
        # number through Prometheus.
        panels = [(t, e) for _, t, e in panel_expressions() if any(s in e for s in SHADOW_ONLY_SERIES)]
        assert len(panels) >= 3
        for title, expr in panels:
            wait_for(
                lambda e=expr: any(not math.isnan(float(r["value"][1])) for r in query(settings, e)),  # type: ignore[misc]
                30,
                f"Prometheus to answer the panel {title!r}",
            )
        exported = {
            m: samples[("churn_shadow_agreement", frozenset({("metric", m)}))]
            for m in ("same_tier", "spearman", "mean_abs_delta")
        }
        wait_for(  # the latest snapshot's figures, once Prometheus has scraped them
            lambda: (
                {
                    r["metric"]["metric"]: float(r["value"][1])
                    for r in query(settings, f"churn_shadow_agreement{{{instance}}}")
                }
                == exported
            ),
            30,
            "Prometheus to hold the latest agreement figures",
        )
        scorer.proc.send_signal(signal.SIGTERM)
        assert scorer.proc.wait(60) == 0

        def value(name: str, **labels: str) -> float:
            return samples[(name, frozenset(labels.items()))]

        # Nothing served changes: the risk rows (probability, tier, model, event time) and the
        # served rows of the prediction log are the champion-only run's.
        assert shadow.final_state(users).risks == alone.final_state(users).risks
        assert {r[3] for r in alone.final_state(users).risks if r is not None} == {"1"}
        logged = read_log(shadow.settings.predictions_dir, role=None)
        served = logged.filter(pl.col("role") == "served")
        assert served.drop("role", "churned").equals(read_log(alone.settings.predictions_dir).drop("role", "churned"))
        # The challenger's scores are in the log as shadow rows: one per served row, same users.
        shadow_rows = logged.filter(pl.col("role") == "shadow")
        assert set(shadow_rows["model_version"].to_list()) == {"2"}
        assert set(served["model_version"].to_list()) == {"1"}
        assert shadow_rows.select("as_of", "user_id").equals(served.select("as_of", "user_id"))
        assert shadow_rows["as_of"].n_unique() >= 2
        # The champion-only run has no shadow at all.
        assert alone_metrics.shadow_rows_total.labels("scorer")._value.get() == 0
        assert read_log(alone.settings.predictions_dir, role="shadow").is_empty()

        # Agreement: an identical challenger agrees totally; the different one does not.
        identical = _agreement(same_metrics)
        assert identical["same_tier"] == 1.0
        assert identical["mean_abs_delta"] == 0.0
        assert identical["spearman"] == pytest.approx(1.0)
        moved = {m: value("churn_shadow_agreement", metric=m) for m in identical}
        assert moved["mean_abs_delta"] > 0
        assert moved["same_tier"] < 1 or moved["spearman"] < 1
        # Live: every user the scorer scored was scored in shadow too.
        scored = value("churn_users_scored_total")
        assert value("churn_shadow_scored_total", component="scorer") == scored > 0
        assert value("churn_shadow_abs_delta_total", component="scorer") > 0
        assert same_metrics.shadow_abs_delta_total.labels("scorer")._value.get() == 0
        assert (
            same_metrics.shadow_same_tier_total.labels("scorer")._value.get()
            == same_metrics.shadow_rows_total.labels("scorer")._value.get()
        )

        # The API serves the champion's answer and shows the challenger's beside it.
        with TestClient(create_app(alone.settings)) as api_alone, TestClient(create_app(shadow.settings)) as api:
            for user in users[:10]:
                plain, beside = api_alone.get(f"/users/{user}/risk").json(), api.get(f"/users/{user}/risk").json()
                assert plain["shadow"] is None
                assert beside["shadow"]["model"]["version"] == "2"
                assert {k: v for k, v in beside.items() if k not in ("shadow", "stored_risk")} == {
                    k: v for k, v in plain.items() if k not in ("shadow", "stored_risk")
                }
        cpu = {stage: value("churn_scorer_stage_cpu_seconds_total", stage=stage) for stage in ("score", "shadow")}
        record_figures(settings, "shadow", {"agreement": moved, "identical": identical, "cpu_seconds": cpu})
    finally:
        if scorer is not None and scorer.proc.poll() is None:  # a failed wait: never left running
            scorer.proc.kill()
            scorer.proc.wait()
        target.unlink(missing_ok=True)
        for d in deployments:
            d.cleanup()
            name = d.settings.events_topic
            delete_topics(settings, [name, f"{name}.dlq", f"{name}.changes", f"{name}.changes.dlq"])
