"""Monitoring on the real services: Prometheus scrapes a running scorer and API, every dashboard
panel returns data, every alert rule loads; drift is seen where the simulator shifts behaviour.

One small champion is trained per module (tmp MLflow store). The scorer check streams a
simulated log whose second half drifts through Kafka into `churn consume` and reads the drift
gauges back from Prometheus; the false-alarm rate and the time to cross are measured on the
drift window directly, on larger populations (rows from the offline engine, which equals the
online one by the parity invariant), where a real stream would take too long for a test.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from confluent_kafka import Producer

from bench.harness import free_port, train_small_champion, wait_for
from core.kafka import kafka_config
from core.settings import Settings, load_settings
from events.log import load_events, write_partitioned
from features import spec
from features.feast_repo import apply_repo
from infra import local as infra
from models.artifact import ChurnModel, load_artifact
from monitoring.drift import DriftReport, DriftWindow, Thresholds, seconds_since
from sim.simulator import SimConfig, simulate
from tests.support import ROOT
from training import dataset

CHURN = str(Path(sys.executable).parent / "churn")
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
START = datetime(2026, 1, 1, tzinfo=UTC)
DRIFT_AT = datetime(2026, 2, 1, tzinfo=UTC)  # day 31 of 40: after the 28-day windows have filled
DRIFT_STRENGTH = 2.0  # 1 / 2 the actions per session, adverts x 3, errors x 5 (sim/simulator.py)
# What the simulator's drift shifts (fewer actions per session, more adverts) and crosses "alert"
# within 9 days, and what it leaves alone (the session timeline, registration, level). Errors
# shift too but are rare: the mostly-zero error features have few reference bins and move less.
AFFECTED = ("adverts_per_song_7d", "adverts_per_song_28d", "events_in_current_session", "songs_1h")
UNAFFECTED = ("sessions_24h", "sessions_7d", "sessions_28d", "days_since_registration", "level_paid")
TH = Thresholds(0.1, 0.25)


@dataclass(frozen=True)
class Champion:
    tracking_uri: str
    model: ChurnModel


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's MLflow store: known before the champion exists, so the scorer and API can
    start (and poll for a champion) while it trains."""
    return tmp_path_factory.mktemp("champion")


@pytest.fixture(scope="module")
def champion(mlflow_root: Path) -> Champion:
    """A small real champion (~30 s, `bench.harness.train_small_champion`)."""
    uri = f"sqlite:///{mlflow_root / 'mlflow.db'}"
    trained = train_small_champion(load_settings(state_dir=mlflow_root / "state", mlflow_tracking_uri=uri), mlflow_root)
    assert trained.promoted, trained.reasons
    return Champion(uri, load_artifact(trained.artifact_dir))


# --- the real scorer and API scraped by the real Prometheus ----------------------------------


def prom(settings: Settings, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{settings.prometheus_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def query(settings: Settings, expr: str) -> list[dict[str, Any]]:
    return list(prom(settings, "/api/v1/query", query=expr)["result"])


def panel_expressions() -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for path in DASHBOARDS:

        def walk(panels: list[dict[str, Any]], name: str = path.name) -> None:
            for panel in panels:
                walk(panel.get("panels", []))
                out.extend((name, panel.get("title", ""), t["expr"]) for t in panel.get("targets", []) if t.get("expr"))

        walk(json.loads(path.read_text())["panels"])
    return out


@pytest.fixture
def deployment(
    settings: Settings, mlflow_root: Path, topic: str, unique: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A scorer and an API on their own topic, group, Feast project and Redis prefix, scraped by
    the local Prometheus through a file_sd target file (removed afterwards)."""

    scorer_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "CHURN_EVENTS_TOPIC": topic,
        "CHURN_DLQ_TOPIC": f"{topic}.dlq",
        "CHURN_SCORER_GROUP": f"scorer-{unique}",
        "CHURN_FEAST_PROJECT": f"m{unique}",
        "CHURN_FEAST_REPO": str(tmp_path / "feast"),
        "CHURN_REDIS_PREFIX": f"test:{unique}:",
        "CHURN_MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_root / 'mlflow.db'}",
        "CHURN_MODEL_POLL_SECONDS": "2",
        "CHURN_SCORER_METRICS_PORT": str(scorer_port),
        "CHURN_API_PORT": str(api_port),
        "CHURN_DRIFT_EVERY_SECONDS": "2",
        "CHURN_MAX_BATCH_EVENTS": "5000",
        "CHURN_API_OPEN": "true",  # a test API on loopback, open on purpose
    }
    run_settings = load_settings(
        events_topic=topic, feast_project=f"m{unique}", feast_repo=tmp_path / "feast", redis_prefix=f"test:{unique}:",
        kafka_port=settings.kafka_port, redis_port=settings.redis_port, state_dir=settings.state_dir,
        prometheus_port=settings.prometheus_port, api_port=api_port,
    )  # fmt: skip
    apply_repo(run_settings)
    infra.reload_prometheus(settings)  # the rules file may be newer than the running Prometheus
    target = infra.prometheus_targets_dir(settings) / f"monitoring-{unique}.json"
    target.write_text(
        json.dumps([{"targets": [f"127.0.0.1:{scorer_port}", f"127.0.0.1:{api_port}"], "labels": {"test": unique}}])
    )
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("scorer", "api")}
    procs = {
        "scorer": subprocess.Popen([CHURN, "consume"], env=env, stdout=logs["scorer"], stderr=subprocess.STDOUT),
        "api": subprocess.Popen([CHURN, "serve"], env=env, stdout=logs["api"], stderr=subprocess.STDOUT),
    }
    try:
        yield {"settings": run_settings, "env": env, "api": f"http://127.0.0.1:{api_port}", "test": unique,
               "procs": procs, "logs": tmp_path}  # fmt: skip
    finally:
        target.unlink(missing_ok=True)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs.values():
            log.close()


def produce_log(settings: Settings, topic: str, events: pl.DataFrame) -> None:
    producer = Producer(kafka_config(settings, **{"linger.ms": 20, "enable.idempotence": True}))
    lines = events.write_ndjson().splitlines()
    for line, user in zip(lines, events["userId"].to_list(), strict=True):
        while True:
            try:
                producer.produce(topic, value=line.encode(), key=user.encode())
                break
            except BufferError:
                producer.poll(0.1)
    producer.produce(topic, value=b"{not json", key=b"bad")  # one dead letter, so the DLQ path is live
    assert producer.flush(60) == 0


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def api_traffic(base: str, users: list[str], stop: threading.Event) -> None:
    """Risk requests (known and unknown users) until stopped, so the API's series move."""
    i = 0
    while not stop.is_set():
        get(f"{base}/users/{users[i % len(users)]}/risk")
        get(f"{base}/users/nobody-{i}/risk")
        i += 1
        stop.wait(0.05)


def test_prometheus_scrapes_scorer_and_api_every_panel_has_data_and_drift_is_seen(
    settings: Settings, deployment: dict[str, Any], champion: Champion
) -> None:
    # `deployment` first: its processes start up while the champion trains; they poll for it.
    base, unique = deployment["api"], deployment["test"]
    began = time.monotonic()
    logs = deployment["logs"]
    wait_for(lambda: get(f"{base}/health/live")[0] == 200, 120, "the API to start", log=logs / "api.log")
    status, body = get(f"{base}/monitoring/drift")
    assert status == 503
    assert "no drift report yet" in body["detail"]

    sim = simulate(
        SimConfig(users=300, days=40, seed=5, churn_level=3.0, drift_at=DRIFT_AT, drift_strength=DRIFT_STRENGTH)
    )
    users = sorted(set(sim.events["userId"].to_list()) - {""})
    stop = threading.Event()
    traffic = threading.Thread(target=api_traffic, args=(base, users, stop), daemon=True)
    started = time.monotonic()
    produce_log(settings, deployment["settings"].events_topic, sim.events)
    traffic.start()
    try:
        # The scorer has consumed the whole log once its lag is 0 and its last report saw the end.
        up = f'up{{test="{unique}"}}'
        wait_for(lambda: len([r for r in query(settings, up) if r["value"][1] == "1"]) == 2, 30, "both targets up")
        consumed = f'sum(churn_events_consumed_total{{test="{unique}"}})'
        wait_for(lambda: (q := query(settings, consumed)) and float(q[0]["value"][1]) >= sim.events.height, 150,
                 "the scorer to consume the log", log=logs / "scorer.log")  # fmt: skip
        print(f"\nstreamed {sim.events.height} events in {time.monotonic() - started:.1f} s"
              f" ({started - began:.1f} s for the API and champion to be ready)")  # fmt: skip
        time.sleep(5)  # a drift report on the final window, and a scrape of it

        # Every panel of every dashboard returns data (at least one sample, and a number).
        empty, nan = [], []
        for board, title, expr in panel_expressions():
            result = query(settings, expr)
            if not result:
                empty.append((board, title, expr))
            elif all(math.isnan(float(r["value"][1])) for r in result):
                nan.append((board, title, expr))
        assert not empty, f"panels without data: {empty}"
        assert not nan, f"panels with only NaN: {nan}"
    finally:
        stop.set()
        traffic.join(10)

    # Every alert rule is loaded and evaluates without error.
    rules_file = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    expected = {r["alert"] for g in rules_file["groups"] for r in g["rules"]}

    def loaded() -> dict[str, str]:
        groups = prom(settings, "/api/v1/rules")["groups"]
        return {r["name"]: r["health"] for g in groups for r in g["rules"]}

    health: dict[str, str] = {}

    def all_ok() -> bool:
        health.update(loaded())
        return all(health.get(a) == "ok" for a in expected)

    wait_for(all_ok, 30, "every alert rule to be loaded with health ok")
    assert expected <= set(health)

    # Drift through the real scorer's gauges, as scraped: the final window is 9 days into drift.
    psi = {
        r["metric"]["feature"]: float(r["value"][1]) for r in query(settings, f'churn_feature_psi{{test="{unique}"}}')
    }
    # max: the API exports the drift gauges too (same Metrics class), never set, at 0.
    score_psi = float(query(settings, f'max(churn_score_psi{{test="{unique}"}})')[0]["value"][1])
    shown = {f: round(psi[f], 3) for f in AFFECTED + UNAFFECTED}
    print("scorer PSI (Prometheus):", shown, "score", round(score_psi, 3))
    assert set(psi) == set(spec.MODEL_FEATURES)
    for feature in AFFECTED:
        assert psi[feature] > TH.alert, (feature, psi[feature])
    for feature in UNAFFECTED:
        assert psi[feature] < TH.alert, (feature, psi[feature])
    assert score_psi > 0.05

    # The same report is in Redis for the API and `churn retrain --if-drift`.
    status, drift = get(f"{base}/monitoring/drift")
    assert status == 200
    assert drift["features"]["adverts_per_song_7d"]["status"] == "alert"
    assert drift["features"]["adverts_per_song_7d"]["alert_since"] is not None
    assert drift["rows"] > 100
    retrain = subprocess.run(
        [CHURN, "retrain", "--if-drift", "--sustained-minutes", "60", "--events", "/nonexistent"],
        env=deployment["env"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert retrain.returncode == 0, retrain.stderr
    assert retrain.stdout.startswith("not retraining:"), retrain.stdout
    assert "< 60 min" in retrain.stdout, retrain.stdout


# --- drift on the window, larger populations -------------------------------------------------


def daily_reports(model: ChurnModel, events: pl.DataFrame, tmp: Path, first_day: datetime) -> dict[str, DriftReport]:
    """Returns {date: report} of a window holding the day's active users as of each UTC midnight."""
    write_partitioned(events, tmp)
    frame, _ = dataset.build(load_events(tmp), dataset.GridConfig(7, 24, 28))
    reports = {}
    for (as_of,), part in sorted(frame.group_by("as_of"), key=lambda kv: kv[0]):
        day = datetime.fromtimestamp(as_of / 1000, UTC)
        if day < first_day:
            continue
        window = DriftWindow(spec.MODEL_FEATURES, 5000, request_features={"seconds_since_last_event": seconds_since})
        matrix = dataset.feature_matrix(part)
        window.add(part["user_id"].to_list(), matrix, model.predict(matrix), part["last_event_ms"].to_list())
        reports[day.date().isoformat()] = window.compute(model.meta["reference"], TH, now=time.time())
    return reports


def test_drift_window_alerts_on_shifted_features_only(champion: Champion, tmp_path: Path) -> None:
    population = SimConfig(users=1200, days=40, seed=4, churn_level=3.0)
    # From day 29: the 28-day windows (and the 7d-vs-21d trends) have filled, as in the reference.
    first = datetime(2026, 1, 29, tzinfo=UTC)
    calm = daily_reports(champion.model, simulate(population).events, tmp_path / "calm", first)
    drifted_events = simulate(replace(population, drift_at=DRIFT_AT, drift_strength=DRIFT_STRENGTH)).events
    drifted = daily_reports(champion.model, drifted_events, tmp_path / "drift", first)

    # No drift: nothing reaches "warn". The false-alarm rate is over every feature and window.
    features = len(spec.MODEL_FEATURES)
    warned = {(d, f): r.features[f].psi for d, r in calm.items() for f in r.features if r.features[f].status != "ok"}
    rate = len(warned) / (features * len(calm))
    calm_max = max(r.features[f].psi for r in calm.values() for f in r.features)
    calm_score = max(r.score.psi for r in calm.values() if r.score)
    print(f"\nno drift: {len(warned)} of {features * len(calm)} feature-windows at warn+ ({rate:.2%}),"
          f" max PSI {calm_max:.3f}, score PSI max {calm_score:.3f}")  # fmt: skip
    assert rate == 0.0, warned

    # Drift from DRIFT_AT: the shifted features cross "alert"; the untouched ones stay below it.
    crossed = {}
    for feature in AFFECTED:
        days = [d for d, r in drifted.items() if r.features[feature].status == "alert"]
        crossed[feature] = days[0] if days else None
    last = drifted[max(drifted)]
    print("drift: first day at alert", crossed)
    print("drift: final PSI", {f: round(last.features[f].psi, 3) for f in AFFECTED + UNAFFECTED},
          "score", round(last.score.psi if last.score else math.nan, 3))  # fmt: skip
    assert all(d is not None and d >= DRIFT_AT.date().isoformat() for d in crossed.values()), crossed
    for report in drifted.values():
        for feature in UNAFFECTED:
            assert report.features[feature].status != "alert", (feature, report.features[feature])
    before = drifted[max(d for d in drifted if d < DRIFT_AT.date().isoformat())]
    assert last.score is not None
    assert before.score is not None
    assert last.score.psi > 2 * before.score.psi  # the score moves with its inputs
