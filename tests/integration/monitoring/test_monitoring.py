"""Monitoring on the real services: every local process registers with the real Prometheus by
itself and is scraped within seconds; every dashboard panel returns data; the real scorer's daily
snapshots give no false drift on a calm stream, find the drift of a drifted one within one
event-time day, and their realized performance equals the offline computation.

One population (simulated), one champion trained on its first `TRAIN_DAYS` days (module scope).
The calm stream is the whole log (the scorer needs the 28-day history its rows summarise); the
snapshots judged are those after the training period. The drifted stream is the same population
with the simulator's drift from `DRIFT_AT`.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from confluent_kafka import Producer

from bench.harness import SMALL_TRAIN_OPTIONS, free_port, wait_for
from core.kafka import kafka_config
from core.settings import Settings, load_settings
from core.timeutil import DAY_MS
from events.log import load_events, write_partitioned
from features import spec
from features.feast_repo import apply_repo
from monitoring.prediction_log import read_drift_history, read_log
from sim.simulator import SimConfig, simulate
from tests.support import ROOT, SHADOW_ONLY_SERIES, panel_expressions, prom, query
from training.dataset import churn_times
from training.performance import realized
from training.pipeline import train

CHURN = str(Path(sys.executable).parent / "churn")
START = datetime(2026, 1, 1, tzinfo=UTC)
# The champion sees days [0, 45): its test-period observation points (the reference) have the full
# 28 days of history behind them, as in production. Snapshots from day 46 on are after its
# training period: 46, 47 and 48 (the log ends in day 48).
TRAIN_DAYS = 45
POPULATION = SimConfig(users=1200, days=49, start=START, seed=7, churn_level=3.0)
HORIZON_DAYS = SMALL_TRAIN_OPTIONS.horizon_days or 7
DRIFT_AT = START + timedelta(days=TRAIN_DAYS + 1)  # D: the snapshot at D has no drift yet, D + 1 has a day
# 1 / 7 the actions per session, adverts x 13, errors x 25 (sim/simulator.py). Strong, because
# the check is one event-day after D: at strength 2 the snapshot of D + 1 shows PSI ~0.07 (the
# 24 h windows hold a day of shorter sessions for the users active that day only), ~0.16 at D + 2.
DRIFT_STRENGTH = 12.0
# What the drift shifts within one day (the latest session and hour of every user active on day
# D), and what it leaves alone (the session timeline, registration, level).
SHIFTED = ("songs_1h", "events_1h", "events_in_current_session")
SEGMENT_ROWS = 400  # judged segments need this many rows on both sides (default 500: a bigger population)
UNTOUCHED = ("sessions_24h", "sessions_7d", "sessions_28d", "days_since_registration", "level_paid")


@dataclass(frozen=True)
class Champion:
    tracking_uri: str
    version: str


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("champion")


@pytest.fixture(scope="module")
def calm_events() -> pl.DataFrame:
    return simulate(POPULATION).events


@pytest.fixture(scope="module")
def champion(mlflow_root: Path, calm_events: pl.DataFrame) -> Champion:
    """A real champion trained on the population's first `TRAIN_DAYS` days (gates lowered)."""
    uri = f"sqlite:///{mlflow_root / 'mlflow.db'}"
    settings = load_settings(state_dir=mlflow_root / "state", mlflow_tracking_uri=uri)
    cut = int((START + timedelta(days=TRAIN_DAYS)).timestamp() * 1000)
    write_partitioned(calm_events.filter(pl.col("ts") < cut), mlflow_root / "events")
    gated = settings.model_copy(update={"gate_min_roc_auc": 0.5, "gate_min_pr_auc": 0.0})
    trained = train(gated, mlflow_root / "events", SMALL_TRAIN_OPTIONS)
    assert trained.promoted, trained.reasons
    assert trained.version is not None
    return Champion(uri, trained.version)


# --- helpers ---------------------------------------------------------------------------------


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


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
    assert producer.flush(120) == 0


def api_traffic(base: str, users: list[str], stop: threading.Event) -> None:
    """Risk requests (known and unknown users) until stopped, so the API's series move."""
    i = 0
    while not stop.is_set():
        get(f"{base}/users/{users[i % len(users)]}/risk")
        get(f"{base}/users/nobody-{i}/risk")
        i += 1
        stop.wait(0.05)


class Deployment:
    """A scorer, an API and an archiver (`churn consume`, `serve`, `archive`) on their own topic,
    groups, Feast project, Redis prefix and ports, in the test state folder: they register with
    the test Prometheus by themselves."""

    def __init__(self, settings: Settings, tracking_uri: str, topic: str, unique: str, folder: Path) -> None:
        self.ports = {"scorer": free_port(), "api": free_port(), "archiver": free_port()}
        self.folder = folder
        self.predictions = folder / "predictions"
        self.archive = folder / "events"
        self.env = {
            **os.environ,
            "CHURN_EVENTS_TOPIC": topic,
            "CHURN_DLQ_TOPIC": f"{topic}.dlq",
            "CHURN_SCORER_GROUP": f"scorer-{unique}",
            "CHURN_ARCHIVER_GROUP": f"archiver-{unique}",
            "CHURN_FEAST_PROJECT": f"m{unique}",
            "CHURN_FEAST_REPO": str(folder / "feast"),
            "CHURN_REDIS_PREFIX": f"test:{unique}:",
            "CHURN_MLFLOW_TRACKING_URI": tracking_uri,
            "CHURN_MODEL_POLL_SECONDS": "2",
            "CHURN_SCORER_METRICS_PORT": str(self.ports["scorer"]),
            "CHURN_ARCHIVER_METRICS_PORT": str(self.ports["archiver"]),
            "CHURN_API_PORT": str(self.ports["api"]),
            "CHURN_API_OPEN": "true",  # a test API on loopback, open on purpose
            "CHURN_PREDICTION_LOG_DIR": str(self.predictions),
            "CHURN_GATE_MIN_ROC_AUC": "0.5",
            # 1,200 simulated users: ~950 in a snapshot, the level segments ~430-500 rows each.
            "CHURN_DRIFT_MIN_SEGMENT_ROWS": str(SEGMENT_ROWS),
        }
        self.settings = load_settings(
            events_topic=topic, feast_project=f"m{unique}", feast_repo=folder / "feast", redis_prefix=f"test:{unique}:",
            kafka_port=settings.kafka_port, redis_port=settings.redis_port, state_dir=settings.state_dir,
            prometheus_port=settings.prometheus_port, api_port=self.ports["api"],
        )  # fmt: skip
        apply_repo(self.settings)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.launched: dict[str, float] = {}
        self.logs = {name: (folder / f"{name}.log").open("wb") for name in self.ports}

    def start(self, *names: str) -> None:
        commands = {"scorer": ["consume"], "api": ["serve"], "archiver": ["archive", "--out", str(self.archive)]}
        for name in names:
            self.launched[name] = time.monotonic()
            self.procs[name] = subprocess.Popen(
                [CHURN, *commands[name]], env=self.env, stdout=self.logs[name], stderr=subprocess.STDOUT
            )

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/metrics"

    def instance(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs.values():
            log.close()


@pytest.fixture
def deployment(settings: Settings, mlflow_root: Path, topic: str, unique: str, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment on the module's MLflow store: its processes start (seconds on a busy machine)
    while the champion trains, and poll for it."""
    deployed = Deployment(settings, f"sqlite:///{mlflow_root / 'mlflow.db'}", topic, unique, tmp_path)
    try:
        yield deployed
    finally:
        deployed.stop()


def consumed(settings: Settings, deployed: Deployment, metric: str, name: str) -> float:
    result = query(settings, f'sum({metric}{{instance="{deployed.instance(name)}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def serving_with_champion(deployed: Deployment, name: str) -> None:
    """Waits until the process serves metrics and has loaded the champion."""

    def loaded() -> bool:
        try:
            with urllib.request.urlopen(deployed.metrics_url(name), timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return False
        return any(line.startswith("churn_model_loaded{") and line.endswith(" 1.0") for line in text.splitlines())

    wait_for(loaded, 300, f"the {name} to load the champion", every=0.5, log=deployed.folder / f"{name}.log")


def stream_through(settings: Settings, deployed: Deployment, events: pl.DataFrame, *, archiver: bool) -> float:
    """Produces the log and waits until the scorer (and the archiver) consumed it; returns seconds."""
    started = time.monotonic()
    produce_log(settings, deployed.settings.events_topic, events)
    wait_for(lambda: consumed(settings, deployed, "churn_events_consumed_total", "scorer") >= events.height + 1, 600,
             "the scorer to consume the log", every=1, log=deployed.folder / "scorer.log")  # fmt: skip
    if archiver:
        logged_in = events.filter(pl.col("userId") != "").height  # guests are not archived
        wait_for(lambda: consumed(settings, deployed, "churn_archiver_events_total", "archiver") >= logged_in, 300,
                 "the archiver to archive the log", every=1, log=deployed.folder / "archiver.log")  # fmt: skip
    return time.monotonic() - started


def judged_reports(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scope, column, drift) for every column of the report, overall and per judged segment."""
    out = [("all", name, d) for name, d in report["features"].items()]
    out.append(("all", "score", report["score"]))
    for segment, part in report["segments"].items():
        if part["judged"]:
            out.extend((segment, name, d) for name, d in part["features"].items())
            out.append((segment, "score", part["score"]))
    return out


def after_training(history: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    first = (START + timedelta(days=TRAIN_DAYS + 1)).date().isoformat()
    return {day: report for day, report in history.items() if day >= first}


# --- the calm stream: registration, panels, no false drift, realized performance -------------


@pytest.mark.soak
@pytest.mark.timeout(1500)  # a real training run and a 1.1M-event stream; minutes on a busy machine
def test_processes_are_scraped_by_default_no_false_drift_and_realized_equals_offline(
    settings: Settings,
    deployment: Deployment,
    calm_events: pl.DataFrame,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Each process registers itself: up in Prometheus within 10 s of serving its metrics.
    deployment.start("scorer", "api", "archiver")
    request.getfixturevalue("champion")  # trains while the processes start
    delays = {}
    for name in ("scorer", "api", "archiver"):
        wait_for(lambda n=name: answers(deployment.metrics_url(n)), 300, f"the {name} to serve metrics",  # type: ignore[misc]
                 every=0.2, log=deployment.folder / f"{name}.log")  # fmt: skip
        serving = time.monotonic()
        up = f'up{{instance="{deployment.instance(name)}", service="{name}"}} == 1'
        wait_for(lambda e=up: query(settings, e), 10, f"Prometheus to scrape the {name}", every=0.2)  # type: ignore[misc]
        delays[name] = (round(time.monotonic() - serving, 1), round(time.monotonic() - deployment.launched[name], 1))
    print(f"\nup in Prometheus (s after serving, s after launch): {delays}")
    targets = prom(settings, "/api/v1/targets")["activeTargets"]
    ours = {t["labels"]["service"]: t["health"] for t in targets if t["labels"].get("instance") in
            {deployment.instance(n) for n in deployment.ports}}  # fmt: skip
    assert ours == {"scorer": "up", "api": "up", "archiver": "up"}
    serving_with_champion(deployment, "scorer")  # the first midnight of the stream is snapshotted

    users = sorted(set(calm_events["userId"].to_list()) - {""})
    stop = threading.Event()
    base = f"http://127.0.0.1:{deployment.ports['api']}"
    traffic = threading.Thread(target=api_traffic, args=(base, users, stop), daemon=True)
    traffic.start()
    try:
        seconds = stream_through(settings, deployment, calm_events, archiver=True)
        print(f"streamed {calm_events.height} events in {seconds:.1f} s")
        time.sleep(3)  # a scrape of the final gauges

        # Every panel of every dashboard returns data (at least one sample, and a number).
        empty, nan = [], []
        for board, title, expr in panel_expressions():
            if any(series in expr for series in SHADOW_ONLY_SERIES):  # no challenger here: see test_shadow.py
                continue
            result = query(settings, expr)
            if not result:
                empty.append((board, title, expr))
            elif all(math.isnan(float(r["value"][1])) for r in result):
                nan.append((board, title, expr))
        assert not empty, f"panels without data: {empty}"
        assert not nan, f"panels with only NaN: {nan}"
        # Every process exports the API's gauges (0 outside it): its per-worker panel shows the
        # API alone, not the scorer and the archiver as idle workers.
        for _, title, expr in panel_expressions():
            if "churn_api_requests_in_flight" in expr or "churn_api_in_flight_limit" in expr:
                shown = {r["metric"].get("instance") for r in query(settings, expr)}
                assert deployment.instance("api") in shown, (title, expr, shown)
                assert not shown & {deployment.instance("scorer"), deployment.instance("archiver")}, (title, shown)
    finally:
        stop.set()
        traffic.join(10)

    # No false drift: every snapshot after the training period, overall and per judged segment.
    history = after_training(read_drift_history(deployment.predictions))
    assert len(history) >= 3, sorted(history)
    warned = [(day, scope, column, round(d["psi"], 3)) for day, report in history.items()
              for scope, column, d in judged_reports(report) if d["status"] != "ok"]  # fmt: skip
    judged = {s for report in history.values() for s, part in report["segments"].items() if part["judged"]}
    worst = max((d["psi"], day, scope, column) for day, r in history.items() for scope, column, d in judged_reports(r))
    print(f"no drift: {len(history)} snapshots ({min(history)}..{max(history)}), rows "
          f"{[r['rows'] for r in history.values()]}, judged segments {sorted(judged)}, worst PSI {worst}")  # fmt: skip
    assert warned == [], warned
    assert "level_paid" in judged  # the per-segment check has teeth
    # The same, as the real Prometheus scraped the scorer's gauges (the latest snapshot).
    scorer = f'instance="{deployment.instance("scorer")}"'
    psi = {r["metric"]["feature"]: float(r["value"][1]) for r in query(settings, f"churn_feature_psi{{{scorer}}}")}
    assert set(psi) == set(spec.MODEL_FEATURES)
    assert max(psi.values()) < 0.1, psi
    segments = query(settings, f"churn_segment_feature_psi_max{{{scorer}}}")
    assert segments
    assert all(float(r["value"][1]) < 0.1 for r in segments), segments

    # No model, drift or performance rule fires or is pending for this healthy deployment (the
    # firehose of the replay may leave a lag or latency rule pending on a shared machine: shown).
    model_rules = {r["alert"] for g in yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
                   ["groups"] if g["name"] == "churn-model" for r in g["rules"]}  # fmt: skip
    alerts = prom(settings, "/api/v1/alerts")["alerts"]
    print("alerts pending or firing:", [(a["labels"]["alertname"], a["state"]) for a in alerts])
    assert [a for a in alerts if a["labels"]["alertname"] in model_rules] == []

    # Realized performance: the latest labelled snapshot equals the offline computation on the
    # same events: `churn score --as-of` that day over the archived log + labels from the log.
    status, performance = get(f"{base}/monitoring/performance")
    assert status == 200, performance
    day = performance["realized"]["date"]
    as_of = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)
    assert as_of == int((START + timedelta(days=POPULATION.days - 1 - HORIZON_DAYS)).timestamp() * 1000), day
    assert performance["expected_for_realized_day"] is not None  # expected beside realized
    assert performance["expected"]["date"] > day
    out = tmp_path / "offline.parquet"
    scored = subprocess.run(
        [CHURN, "score", "--events", str(deployment.archive), "--as-of", datetime.fromtimestamp(as_of / 1000, UTC)
         .isoformat(), "--active-days", "28", "--out", str(out)],
        env=deployment.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    offline = pl.read_parquet(out).sort("user_id")
    churned = churn_times(load_events(deployment.archive)).collect()
    labelled = offline.join(churned, on="user_id", how="left").with_columns(
        ((pl.col("churn_ms") > as_of) & (pl.col("churn_ms") <= as_of + HORIZON_DAYS * DAY_MS)).fill_null(False)
        .alias("churned")
    )  # fmt: skip
    figures = realized(labelled["churned"].to_numpy(), labelled["churn_probability"].to_numpy(),
                       labelled["risk_tier"].to_list())  # fmt: skip
    logged = read_log(deployment.predictions, date=day).sort("user_id")
    assert logged["user_id"].to_list() == offline["user_id"].to_list()  # the same population
    np.testing.assert_allclose(logged["churn_probability"].to_numpy(), offline["churn_probability"].to_numpy(),
                               rtol=0, atol=1e-9)  # fmt: skip
    assert logged["churned"].to_list() == labelled["churned"].to_list()
    stream_figures = performance["realized"]
    for name, value in figures.items():
        if math.isnan(value):
            assert stream_figures[name] is None, name
        else:
            assert abs(stream_figures[name] - value) <= 1e-9, (name, stream_figures[name], value)
    gauge = query(settings, f'churn_realized_performance{{{scorer}, metric="roc_auc"}}')
    assert abs(float(gauge[0]["value"][1]) - figures["roc_auc"]) <= 1e-9
    print(f"realized {day}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
          + "; expected that day: " + json.dumps(performance["expected_for_realized_day"]))  # fmt: skip

    # The prediction log is readable with `churn predictions`.
    user = logged["user_id"][0]
    history_of_user = subprocess.run([CHURN, "predictions", "--user", str(user)], env=deployment.env,
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
    assert history_of_user.returncode == 0, history_of_user.stderr
    assert day in history_of_user.stdout

    # Every alert rule is loaded and evaluates without error.
    rules_file = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    expected = {r["alert"] for g in rules_file["groups"] for r in g["rules"]}
    health = {r["name"]: r["health"] for g in prom(settings, "/api/v1/rules")["groups"] for r in g["rules"]}
    assert all(health.get(a) == "ok" for a in expected), health


# --- the drifted stream ----------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_drift_from_day_d_is_at_alert_within_one_day_and_only_on_shifted_features(
    settings: Settings, deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    deployment.start("scorer")
    request.getfixturevalue("champion")
    drifted = simulate(replace(POPULATION, drift_at=DRIFT_AT, drift_strength=DRIFT_STRENGTH)).events
    serving_with_champion(deployment, "scorer")
    seconds = stream_through(settings, deployment, drifted, archiver=False)
    print(f"\nstreamed {drifted.height} drifted events in {seconds:.1f} s")
    one_day = (DRIFT_AT + timedelta(days=1)).date().isoformat()
    # A batch counts its events before it takes the snapshots of the midnights it passed: the
    # last snapshots may land just after the count (a soak run read the history in between).
    wait_for(lambda: one_day in read_drift_history(deployment.predictions), 60,
             "the snapshot one day into the drift", log=deployment.folder / "scorer.log")  # fmt: skip
    history = after_training(read_drift_history(deployment.predictions))
    before = {d: r for d, r in history.items() if d <= DRIFT_AT.date().isoformat()}  # snapshot at D: no drift yet
    assert before
    assert one_day in history, sorted(history)
    for day, report in before.items():
        assert [(s, c) for s, c, d in judged_reports(report) if d["status"] != "ok"] == [], day
    first = history[one_day]
    print("one day into drift:", {f: round(first["features"][f]["psi"], 3) for f in SHIFTED + UNTOUCHED},
          "score", round(first["score"]["psi"], 3))  # fmt: skip
    for feature in SHIFTED:
        assert first["features"][feature]["status"] == "alert", (feature, first["features"][feature])
    for day, report in history.items():
        for feature in UNTOUCHED:
            assert report["features"][feature]["status"] == "ok", (day, feature, report["features"][feature])
    # The real Prometheus sees it: the scorer's gauges, and the drift rule pending or firing.
    scorer = f'instance="{deployment.instance("scorer")}"'

    def psi() -> dict[str, float]:
        return {r["metric"]["feature"]: float(r["value"][1]) for r in query(settings, f"churn_feature_psi{{{scorer}}}")}

    # The snapshot may be seconds old: Prometheus shows it from its next scrape.
    try:
        wait_for(lambda: all(psi().get(f, 0.0) >= 0.25 for f in SHIFTED), 30, "the shifted features' PSI in Prometheus")
    except TimeoutError:
        raise AssertionError(psi()) from None

    def drift_alerts() -> list[dict[str, Any]]:
        alerts = prom(settings, "/api/v1/alerts")["alerts"]
        return [
            a for a in alerts if a["labels"]["alertname"] == "ChurnFeatureDrift" and a["labels"]["feature"] in SHIFTED
        ]

    wait_for(drift_alerts, 15, "ChurnFeatureDrift to be pending or firing")
