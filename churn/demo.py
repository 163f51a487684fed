"""`churn demo`: the whole system end to end on the local real services.

simulate history + a live tail -> produce history -> archiver and scorer consume it ->
train and promote the first model from the archive -> API up -> live producer at a modest
rate -> print where everything is and real risk answers -> run until Ctrl-C / --duration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from core.errors import InvalidInputError
from core.kafka import kafka_config
from core.redis import redis_client
from core.settings import Settings
from features.feast_repo import apply_repo
from sim.simulator import SimConfig, simulate
from stream.producer import publish_lines
from stream.risk_store import RedisRiskStore, RiskRow
from stream.topics import ensure_topics
from training.pipeline import TrainOptions, min_log_days, train

Say = Callable[[str], None]


def _churn(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "churn"), *args]


class Processes:
    """The background processes the demo started; stops them all on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            _churn(*args), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def check(self) -> None:
        for name, proc in self.running.items():
            if proc.poll() not in (None, 0):
                msg = f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}"
                raise RuntimeError(msg)

    def stop(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _lag(settings: Settings, group: str) -> int:
    """Returns how many messages of the events topic `group` has not committed yet."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka_config(settings, **{"group.id": group}))
    try:
        meta = consumer.list_topics(settings.events_topic, timeout=10)
        parts = [TopicPartition(settings.events_topic, p) for p in meta.topics[settings.events_topic].partitions]
        total = 0
        for tp in consumer.committed(parts, timeout=10):
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            total += high - (tp.offset if tp.offset >= 0 else 0)
        return total
    finally:
        consumer.close()


# Answers of a broker whose group coordinator is still starting: ask again later.
_COORDINATOR_WAITS = frozenset(
    (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE)
)


def _wait_for_groups(settings: Settings, say: Say, procs: Processes) -> None:
    started = time.monotonic()
    while True:
        procs.check()
        try:
            lags = {g: _lag(settings, g) for g in (settings.scorer_group, settings.archiver_group)}
        except KafkaException as exc:
            # A broker that just started has no group coordinator yet (NOT_COORDINATOR & co.).
            error = exc.args[0]
            if not (error.retriable() or error.code() in _COORDINATOR_WAITS):
                raise
            say(f"  waiting for Kafka's group coordinator: {error.str()}")
            time.sleep(5)
            continue
        scorer, archiver = lags[settings.scorer_group], lags[settings.archiver_group]
        say(f"  consuming history: scorer lag {scorer:,}, archiver lag {archiver:,}")
        if all(v == 0 for v in lags.values()):
            say(f"  history consumed in {time.monotonic() - started:.0f}s")
            return
        time.sleep(5)


def _prometheus_page(base: str, name: str) -> str:
    """Returns the URL of Prometheus's `name` page (targets, alerts): `/<name>` in the web UI of
    upstream builds, `/classic/<name>` in Debian's, which is built without that UI."""
    for path in (f"/{name}", f"/classic/{name}"):
        try:
            with urllib.request.urlopen(base + path, timeout=5):  # noqa: S310 - loopback URL
                return base + path
        except OSError:
            continue
    return base


def _get(url: str, key: str | None) -> Any:
    request = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})  # noqa: S310 - loopback URL
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.load(response)


def _scored_rows(settings: Settings) -> list[RiskRow]:
    """Returns the risk rows that carry a probability (cancelled users' rows do not)."""
    client = redis_client(settings)
    try:
        prefix = f"{settings.redis_prefix}risk:"
        # Keys are `<prefix>{<slot group>}<user_id>` (`core.redis.user_key`).
        keys = [k.decode().partition("}")[2] for k in client.scan_iter(f"{prefix}{{*", count=5000)]
        rows = RedisRiskStore(client, settings.redis_prefix).read(keys)
    finally:
        client.close()
    return [r for r in rows if r is not None and r.churn_probability is not None]


def _show_answers(settings: Settings, say: Say, wait_s: float = 60.0) -> None:
    # The history was consumed before a model existed: the first scores come with the live events.
    deadline = time.monotonic() + wait_s
    while not (rows := _scored_rows(settings)) and time.monotonic() < deadline:
        time.sleep(1)
    if not rows:
        say(f"  no scored user after {wait_s:.0f} s of live events")
        return
    rows.sort(key=lambda r: r.churn_probability or 0.0)
    key = settings.api_keys[0].get_secret_value() if settings.api_keys else None
    base = f"http://{settings.api_host}:{settings.api_port}"
    for label, row in (
        ("highest", rows[-1]),
        ("second highest", rows[-2] if len(rows) > 1 else rows[-1]),
        ("lowest", rows[0]),
    ):
        answer = _get(f"{base}/users/{row.user_id}/risk", key)
        reasons = ", ".join(f"{r['feature']}={r['value']:.3g} ({r['impact']:+.2f})" for r in answer["reasons"][:3])
        say(
            f"  {label} risk: GET /users/{row.user_id}/risk -> p={answer['churn_probability']:.3f} "
            f"tier={answer['risk_tier']} model v{answer['model']['version']} as_of={answer['as_of']}\n"
            f"      top reasons: {reasons}"
        )


DEMO_MIN_ROC_AUC = 0.6  # the demo's test ROC-AUC floor (see run_demo, step 4)
# `--drift`: the simulator's drift from the first live instant (1 / (1 + 0.5 s) the actions per
# session, adverts x (1 + s), errors x (1 + 2 s)); the history, the model and its reference are
# untouched. Strong enough for the snapshot one event-day in to be at alert (songs_1h, events_1h,
# events_in_current_session; at strength 2 it shows PSI ~0.07 after a day, measured).
DEMO_DRIFT_STRENGTH = 12.0


def run_demo(
    settings: Settings, *, users: int, days: int, rate: int, duration: float | None, say: Say, drift: bool = False
) -> None:
    """Runs the demo; returns when `duration` seconds of live scoring have passed or on Ctrl-C.
    With `drift`, the live part drifts from its first instant (see `DEMO_DRIFT_STRENGTH`).

    Raises:
        InvalidInputError: `days` is too short for the first training (`min_log_days`: it reads
            the history only, the live days come later).
    """
    needed = min_log_days(settings)
    if days < needed:
        msg = (
            f"--days {days}: the first training needs at least {needed} days of history with these"
            f" settings (a {settings.horizon_days}-day horizon, {settings.train_backtest_days}-day backtests)"
        )
        raise InvalidInputError(msg)
    t0 = time.monotonic()
    data = settings.data_dir / "demo"
    data.mkdir(parents=True, exist_ok=True)
    logs = settings.state_dir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(logs)
    try:
        say(f"[1/6] simulating {users:,} listeners x {days} days of history plus 2 live days")
        # The two live days end at today's UTC midnight, in the past: replayed faster than real
        # time, events dated after the wall clock would be dead-lettered by the scorer's guard
        # against future-dated events (`max_future_skew_seconds`), from whatever hour of the day
        # the demo started at (at 13:30 UTC, 2.3% of all events within 10 minutes, and the
        # dead-letter alert pending). The API's clock is the stream's (`CHURN_CLOCK=event`).
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        start = today - timedelta(days=days + 2)
        live_start = start + timedelta(days=days)
        sim = simulate(
            SimConfig(
                users=users, days=days + 2, start=start, seed=int(time.time()) % 10_000,
                drift_at=live_start if drift else None, drift_strength=DEMO_DRIFT_STRENGTH,
            )
        )  # fmt: skip
        cut = int(live_start.timestamp() * 1000)
        if drift:
            say(f"  drift injected from {live_start:%Y-%m-%d %H:%M} UTC (strength {DEMO_DRIFT_STRENGTH:g})")
        history = sim.events.filter(sim.events["ts"] < cut)
        live = sim.events.filter(sim.events["ts"] >= cut)
        live_path = data / "live.jsonl"
        live.write_ndjson(live_path)
        say(f"  {history.height:,} history events, {live.height:,} live events")

        say("[2/6] creating topics, applying the Feast repo, producing the history to Kafka")
        ensure_topics(settings)
        apply_repo(settings)
        report = publish_lines(settings, (line.encode() for line in history.write_ndjson().splitlines()))
        say(f"  sent {report.sent:,} events in {report.elapsed_seconds:.0f}s ({report.events_per_second:,.0f}/s)")

        say("[3/6] scorer and archiver consume the history (features only until a model exists)")
        archive = settings.data_dir / "events"
        procs.start("scorer", "consume")
        procs.start("archiver", "archive", "--out", str(archive))
        _wait_for_groups(settings, say, procs)

        say("[4/6] training the first model from the archived log and promoting it")
        # A few thousand simulated users give a noisy test ROC-AUC (0.57-0.74 measured over
        # seeds at 2,000 users, oracle 0.87): the demo's floor is lower than production's.
        floor = min(settings.gate_min_roc_auc, DEMO_MIN_ROC_AUC)
        if floor < settings.gate_min_roc_auc:
            say(
                f"  demo gate: backtest ROC-AUC >= {floor:.2f}"
                f" (CHURN_GATE_MIN_ROC_AUC is {settings.gate_min_roc_auc:.2f})"
            )
        gated = settings.model_copy(update={"gate_min_roc_auc": floor})
        summary = train(gated, archive, TrainOptions(), progress=lambda line: say(f"  {line}"))
        roc, pr = summary.backtest["roc_auc"], summary.backtest["pr_auc"]
        say(
            f"  model v{summary.version}: backtest ROC-AUC {roc['mean']:.3f} [{roc['low']:.3f}, {roc['high']:.3f}], "
            f"PR-AUC {pr['mean']:.3f}; gates: {'; '.join(summary.reasons)}"
        )
        if not summary.promoted:
            say("  the gates refused this model: the API answers 503 and the scorer writes features only")

        say("[5/6] starting the API, then a live producer once the scorer has the champion")
        # A local demo on loopback: without configured keys it opens the API explicitly.
        procs.start("api", "serve", env=None if settings.api_keys else {"CHURN_API_OPEN": "true"})
        base = f"http://{settings.api_host}:{settings.api_port}"
        for _ in range(60):
            try:
                _get(f"{base}/health/ready", None)
                break
            except OSError:
                time.sleep(1)
        # The first live event crosses the UTC midnight the history ends at: the scorer takes the
        # first daily snapshot then, which needs the champion loaded.
        time.sleep(settings.model_poll_seconds + 2)
        procs.start("producer", "produce", "--replay", str(live_path), "--rate", str(rate))

        say(f"[6/6] live scoring; the demo took {time.monotonic() - t0:.0f}s to get here")
        say(f"  API docs:      {base}/docs")
        say(f"  API metrics:   {base}/metrics")
        say(f"  scorer metrics: http://127.0.0.1:{settings.scorer_metrics_port}/metrics")
        prometheus = f"http://127.0.0.1:{settings.prometheus_port}"
        say(f"  Prometheus:    {_prometheus_page(prometheus, 'targets')}, {_prometheus_page(prometheus, 'alerts')}")
        say(f"  drift:         {base}/monitoring/drift (a snapshot at each UTC midnight of event time)")
        say(f"  performance:   {base}/monitoring/performance; prediction log: churn predictions")
        say(f"  MLflow UI:     .venv/bin/mlflow ui --workers 1 --backend-store-uri {settings.tracking_uri}")
        say(f"  logs:          {logs}")
        until = "until Ctrl-C (or kill)" if duration is None else f"for {duration:g} s"
        say(
            f"  the demo runs {until}, then stops what it started;"
            " `.venv/bin/churn infra down` stops Kafka, Redis and Prometheus"
        )
        _show_answers(settings, say)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            procs.check()
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping")
    finally:
        procs.stop()
