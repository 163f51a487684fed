"""Helpers shared by the tests (those the benchmarks also use live in `bench.harness`).

Event generation for engine tests, wire-format frames, a small LightGBM champion and its
registration, the throwaway deployment of the fault tests, a transparent stand-in model, tier
changes, and stand-ins for a Kafka consumer for unit tests of the consuming loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from bench.api import START_MS as BENCH_START_MS
from bench.api import _rows as bench_api_rows
from bench.api import wait_ready
from bench.harness import CHURN, ScorerProcess, delete_prefix, free_port, scratch_settings, wait_for
from core.kafka import kafka_config
from core.redis import mget, redis_client
from core.settings import Settings
from events.schema import Event
from features import spec
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import OnlineEngine, state_layout
from features.state_store import NOTHING_APPLIED, RedisStateStore
from features.store import FeatureRow
from models.artifact import ChurnModel, save_artifact
from models.registry import champion_version
from models.runtime import feature_matrix
from monitoring.metrics import Metrics
from monitoring.prediction_log import write_labels, write_snapshot
from stream.changes import DECODER as CHANGE_DECODER
from stream.changes import TierChange
from stream.consumer import build_scorer
from stream.pacing import Pacing
from stream.producer import ProduceReport, build_producer, publish
from stream.risk_store import RedisRiskStore
from training import registry

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent  # the repository
FIXTURES = ROOT.parent / "shared" / "fixtures"  # real Sparkify rows, beside the repository
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
# Series only a distinct challenger scored in shadow feeds (tests/integration/stream/test_shadow.py
# queries the panels that read them; a champion-only deployment leaves them empty).
SHADOW_ONLY_SERIES = ("churn_shadow_agreement", "churn_shadow_same_tier_total", "churn_shadow_abs_delta_total")

# --- events for engine tests (not the simulator: no behaviour model) -------------------------

PAGES = [
    "NextSong", "NextSong", "NextSong", "NextSong", "NextSong", "Home", "Thumbs Up", "Thumbs Down",
    "Add to Playlist", "Add Friend", "Roll Advert", "Error", "Help", "Settings", "Save Settings",
    "Downgrade", "Submit Downgrade", "Upgrade", "Submit Upgrade", "Logout", "About", "Some New Page",
]  # fmt: skip
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def random_events(seed: int, users: int, days: int, per_user: int = 200) -> list[Event]:
    """Returns events sorted by ts: bursts (sessions) of events at random times, ties included."""
    rng = random.Random(seed)
    events: list[Event] = []
    for u in range(users):
        user_id = f"u{u}"
        registration = float(START_MS - rng.randint(0, 90) * 86_400_000 + rng.randint(0, 10**6)) if u % 5 else None
        level: Literal["free", "paid"] = "free"
        session_id = u * 10_000
        count = 0
        while count < per_user:
            session_id += 1
            t = START_MS + rng.randint(0, days * 86_400_000)
            for item in range(rng.randint(1, 30)):
                if rng.random() < 0.02:
                    level = "paid" if level == "free" else "free"
                page = rng.choice(PAGES)
                length = round(rng.uniform(30, 600), 5) if page == "NextSong" else None
                events.append(
                    Event(
                        ts=t, user_id=user_id, session_id=session_id, item_in_session=item, page=page,
                        auth="Logged In", level=level, registration=registration, length=length,
                    )
                )  # fmt: skip
                count += 1
                t += rng.choice([0, 1000, 30_000, 200_000, 250_000])
    events.sort(key=lambda e: e.ts)
    return events


def shuffle_within(events: list[Event], lateness_ms: int, seed: int) -> list[Event]:
    """Returns the events in an arrival order where no event is later than `lateness_ms`
    behind the newest event of its user seen before it."""
    rng = random.Random(seed)
    keyed = sorted(events, key=lambda e: e.ts + rng.uniform(0, lateness_ms))
    newest: dict[str, int] = {}
    out = []
    for event in keyed:
        assert event.ts >= newest.get(event.user_id, 0) - lateness_ms
        newest[event.user_id] = max(newest.get(event.user_id, 0), event.ts)
        out.append(event)
    return out


def wire_frame(events: list[Event]) -> pl.DataFrame:
    """Returns events as a wire-format (camelCase) frame, as the archiver writes them."""
    rows = [
        {
            "userId": e.user_id, "ts": e.ts, "sessionId": e.session_id, "itemInSession": e.item_in_session,
            "page": e.page, "level": e.level, "registration": e.registration, "length": e.length,
        }
        for e in events
    ]  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"registration": pl.Float64, "length": pl.Float64})


# --- models ----------------------------------------------------------------------------------


class DictRedis:
    """The two Redis calls the drift and performance states use (`get`, `set`), on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()


class StandInModel:
    """A transparent stand-in for `models.runtime.Model`: probability grows with the first
    feature; subclasses change `predict` or `tier`."""

    horizon_days = 14
    features = spec.MODEL_FEATURES
    meta: ClassVar[dict[str, Any]] = {"horizon_days": 14, "metrics": {}, "data_window": {}}

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return 1 - 1 / (1 + matrix[:, 0] / 100)

    def contributions(self, matrix: np.ndarray) -> list[dict[str, float]]:
        return [dict.fromkeys(spec.MODEL_FEATURES, 0.0) for _ in matrix]

    def tier(self, probability: float) -> str:
        return "high" if probability > 0.5 else "low"


def gauge_series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """Returns every sample of metric family `name` in `metrics`' registry as {label values: value}."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in metrics.registry.collect()
        if family.name == name
        for sample in family.samples
    }


def small_model(
    *, missing_share: float = 0.0, rounds: int = 20, features: tuple[str, ...] = spec.MODEL_FEATURES, **meta: Any
) -> ChurnModel:
    """A LightGBM booster on random rows (with `missing_share` of the values NaN) reading
    `features`, with the artifact's meta (identity calibration) updated by `meta`. Seconds, not
    a training run."""
    rng = np.random.default_rng(0)
    x = rng.random((2000, len(features))) * 10
    if missing_share:
        x[rng.random(x.shape) < missing_share] = np.nan
    y = np.nan_to_num(x[:, 0]) + rng.random(2000) * 10 > 10
    data = lgb.Dataset(x, y, feature_name=list(features))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15}, data, num_boost_round=rounds)
    base_meta = {
        "features": list(features),
        "horizon_days": 14,
        "spec_version": spec.spec_version(),
        "calibration": {"method": "none"},
        "tiers": {"high": 0.6, "medium": 0.3},
        "metrics": {},
    }
    return ChurnModel(booster, base_meta | meta)


def register_champion(folder: Path, base: Settings, model: ChurnModel | None = None) -> str:
    """Registers `model` (default `small_model()`; the real artifact format) as `champion` in the
    MLflow SQLite store in `folder` (a new version if the store exists); returns the store's URI."""

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    scratch = base.model_copy(update={"mlflow_tracking_uri": uri, "state_dir": folder / "state"})
    model = model or small_model()
    artifact = save_artifact(folder / f"artifact-{time.time_ns()}", model.booster, model.meta)
    run_id, version = registry.log_run(scratch, artifact, {}, {}, {})
    # Promoted over whatever is champion now (a decision judged against it).
    judged = registry.Decision(True, champion_version=champion_version(scratch))
    registry.apply_decision(scratch, run_id, version, judged)
    return uri


def register_challenger(folder: Path, base: Settings, model: ChurnModel) -> str:
    """Registers `model` as a new version with alias `challenger` only (not promoted) in the
    MLflow store in `folder`; returns its version."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    scratch = base.model_copy(update={"mlflow_tracking_uri": uri, "state_dir": folder / "state"})
    artifact = save_artifact(folder / f"artifact-{time.time_ns()}", model.booster, model.meta)
    run_id, version = registry.log_run(scratch, artifact, {}, {}, {})
    judged = registry.Decision(True, champion_version=champion_version(scratch))
    registry.apply_decision(scratch, run_id, version, judged, hold=True)  # the gates passed; held
    return version


def write_shadow_log(
    root: Path,
    served: str,
    shadow: str,
    *,
    users: int,
    days: int,
    served_skill: float,
    shadow_skill: float,
    first_day: int = 0,
    seed: int = 0,
) -> None:
    """Writes `days` labelled daily snapshots (from START_MS + `first_day` days) to the prediction
    log at `root` as a scorer with shadow scoring writes them: every one of `users` users has a
    `served` row from version `served` and a `shadow` row from version `shadow`. Churn (about
    15 %) follows a hidden risk; each version's log-odds are `skill` x that risk plus unit noise,
    so a higher skill ranks churners better (0: no better than chance)."""
    rng = np.random.default_rng(seed)
    ids = [f"u{i:05d}" for i in range(users)]
    for day in range(first_day, first_day + days):
        as_of = START_MS + day * 86_400_000
        risk = rng.normal(size=users)
        churned = rng.random(users) < 1 / (1 + np.exp(-(2 * risk - 2.5)))

        def rows(version: str, skill: float, role: str, as_of: int = as_of, risk: np.ndarray = risk) -> pl.DataFrame:
            p = 1 / (1 + np.exp(-(skill * risk + rng.normal(size=users) - 2)))
            return pl.DataFrame(
                {
                    "user_id": ids,
                    "as_of": [as_of] * users,
                    "churn_probability": p,
                    "risk_tier": np.where(p > 0.6, "high", np.where(p > 0.3, "medium", "low")).tolist(),
                    "model_version": [version] * users,
                    "prediction_id": [f"{version}-{u}-{as_of}" for u in ids],
                    "role": [role] * users,
                }
            )

        write_snapshot(
            root, as_of, pl.concat([rows(served, served_skill, "served"), rows(shadow, shadow_skill, "shadow")])
        )
        write_labels(root, as_of, pl.DataFrame({"user_id": ids, "churned": churned}), {"rows": users})


# --- a throwaway scorer + API deployment on the real services (fault tests) ------------------


@dataclass(frozen=True)
class FinalState:
    """Everything a scorer run leaves behind, comparable between runs (write times left out)."""

    feature_rows: str  # repr: NaN compares equal to itself
    states: dict[bytes, bytes | None]
    risks: list[tuple[str, float | None, str | None, str, int] | None]


class Deployment:
    """One isolated deployment on the real Kafka, Redis and MLflow store."""

    def __init__(self, base: Settings, tracking_uri: str, folder: Path, name: str, topic: str, **extra: Any) -> None:
        fields: dict[str, Any] = {
            "events_topic": topic,
            "dlq_topic": f"{topic}.dlq",
            "scorer_group": f"scorer-{name}",
            "feast_project": f"f{name}",
            "feast_repo": folder / f"feast-{name}",
            "redis_prefix": f"test:{name}:",
            # Its own model cache: the cache is keyed by model name and version, not by registry.
            "state_dir": folder / f"state-{name}",
            "mlflow_tracking_uri": tracking_uri,
            "scorer_metrics_port": free_port(),
            "max_batch_events": 500,
            **extra,
        }
        self.name = name
        self.folder = folder
        self.settings, self.env = scratch_settings(base, **fields)
        self.feast = apply_repo(self.settings)

    def start_scorer(self, metrics_port: int | None = None, wait: bool = True) -> ScorerProcess:
        """Starts `churn consume` for this deployment (metrics on `metrics_port`, by default the
        deployment's) and, with `wait`, waits until it has joined its group."""
        port = metrics_port or self.settings.scorer_metrics_port
        log = self.folder / f"scorer-{self.name}-{port}.log"
        scorer = ScorerProcess({**self.env, "CHURN_SCORER_METRICS_PORT": str(port)}, port, log)
        if not wait:
            return scorer

        def ready() -> bool:
            if scorer.proc.poll() is not None:
                msg = f"`churn consume` exited with {scorer.proc.returncode} before it was ready: {scorer.tail()}"
                raise RuntimeError(msg)
            return scorer.value("churn_scorer_ready") == 1

        try:
            # Seconds on a quiet machine; minutes when others load its two cores.
            wait_for(ready, 300, f"`churn consume` to start ({log})", 0.5)
        except TimeoutError:
            scorer.proc.kill()  # never left running after its test (it would outlive its Feast repo)
            scorer.proc.wait()
            raise
        return scorer

    def run_uninterrupted(self, idle_s: float = 2.0) -> Metrics:
        """Runs the scorer's own wiring (`build_scorer`) here, without faults, until the topic is
        drained; returns its metrics."""

        metrics = Metrics()
        build_scorer(self.settings, metrics).run(max_idle_s=idle_s)
        return metrics

    def final_state(self, users: list[str]) -> FinalState:
        """Returns the feature rows, scorer states and risk rows of `users` in Redis."""
        rows = FeastFeatureStore(self.feast).read_rows(users)
        client = redis_client(self.settings)
        try:
            prefix = self.settings.redis_prefix
            keys = sorted(client.scan_iter(f"{prefix}state:*", count=1000))
            blobs = dict(zip([k[len(prefix) :] for k in keys], mget(client, keys), strict=True))
            risks = [
                None if r is None else (r.user_id, r.churn_probability, r.risk_tier, r.model_version, r.event_time_ms)
                for r in RedisRiskStore(client, prefix).read(users)
            ]
        finally:
            client.close()
        return FinalState(repr(rows), blobs, risks)

    def cleanup(self) -> None:
        """Deletes this deployment's Feast project and Redis keys (Redis must be up)."""
        self.feast.teardown()
        delete_prefix(self.settings, self.settings.redis_prefix)


def produce_paced(
    settings: Settings, events: Iterable[Event], rate: float, progress: list[tuple[float, int]] | None = None
) -> ProduceReport:
    """Publishes `events` to `settings.events_topic` with the product's idempotent producer at
    `rate` events/s; `progress` collects (monotonic time, acknowledged so far) every 0.2 s."""
    report = ProduceReport()

    def note(current: ProduceReport) -> None:
        if progress is not None:
            progress.append((time.monotonic(), current.sent))

    return publish(
        build_producer(settings, report.failure_reasons),
        settings.events_topic,
        (e.to_json() for e in events),
        report,
        pacing=Pacing(rate=rate),
        progress=note,
        progress_interval=0.2,
    )


def in_background(function: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Runs `function(*args, **kwargs)` on a thread of its own; returns its future (whose
    `result` re-raises what it raised)."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def read_dlq(settings: Settings, topic: str, expected: int) -> list[tuple[bytes, dict[str, bytes]]]:
    """Returns up to `expected` messages of `<topic>.dlq` (value, headers), read from the start
    by a fresh group within 30 s."""
    consumer = Consumer(
        kafka_config(settings, **{"group.id": f"dlq-{topic}-{time.time_ns()}", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([f"{topic}.dlq"])
    out: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    while len(out) < expected and time.monotonic() < deadline:
        msg = consumer.poll(1)
        if msg is not None and msg.error() is None:
            headers = {str(k): v for k, v in msg.headers() or []}  # type: ignore[str-unpack]
            out.append((msg.value() or b"", {k: v if isinstance(v, bytes) else b"" for k, v in headers.items()}))
    consumer.close()
    return out


def record_figures(settings: Settings, fault: str, figures: dict[str, Any]) -> None:
    """Prints one fault's figures and merges them into `<state_dir>/fault-figures.json`."""
    print(f"\nFAULT {fault}: {json.dumps(figures)}")
    path = settings.state_dir.resolve() / "fault-figures.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known[fault] = figures
    path.write_text(json.dumps(known, indent=2, sort_keys=True))


# --- `churn serve` as a subprocess on the real Redis ----------------------------------------


@dataclass
class ServedApi:
    """A running `churn serve` (see `churn_serve`): its port, process and log file."""

    port: int
    server: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def churn_serve(settings: Settings, folder: Path, name: str, users: int, workers: int = 1) -> Iterator[ServedApi]:
    """Starts `churn serve --workers N` without keys, on its own Feast project and Redis prefix
    (named `name`) holding the feature rows of `users` users (`bench.api._rows`) and a watermark
    31 days in, with a small champion registered in `folder`; waits until it is ready; stops it
    (SIGTERM) and deletes its data afterwards.

    Raises:
        ServiceUnavailableError: the server exited or was not ready within 240 s.
    """
    uri = register_champion(folder / "champion", settings)
    port = free_port()
    scratch, env = scratch_settings(
        settings,
        state_dir=folder / "state",
        feast_project=name,
        feast_repo=folder / "feast",
        mlflow_tracking_uri=uri,
        redis_prefix=f"test:{name}:",
        api_port=port,
        clock="event",
    )
    env |= {"CHURN_API_KEYS": "[]", "CHURN_API_OPEN": "true"}
    feast = apply_repo(scratch)
    FeastFeatureStore(feast).write_rows(bench_api_rows(users))
    client = redis_client(scratch)
    RedisRiskStore(client, scratch.redis_prefix).advance_watermark(BENCH_START_MS + 31 * 86_400_000)
    log = folder / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([CHURN, "serve", "--workers", str(workers)], env=env, stdout=out, stderr=out)
    try:
        wait_ready(port, server, log, timeout_s=240)
        yield ServedApi(port, server, log)
    finally:
        server.terminate()
        server.wait(30)
        feast.teardown()
        client.close()
        delete_prefix(scratch, scratch.redis_prefix)


# --- killing a scorer inside a batch -----------------------------------------------------------


def applied_in_redis(settings: Settings) -> dict[str, int]:
    """Returns the scorer's applied offsets saved in Redis (`topic:partition` -> next offset; on a
    Redis Cluster the lowest over the slot groups' copies, as the scorer reads them)."""
    layout = state_layout(settings.allowed_lateness_seconds * 1000)
    client = redis_client(settings)
    try:
        copies = [client.hgetall(key) for key in RedisStateStore(client, settings.redis_prefix, layout).applied_keys]
        fields = {field for copy in copies for field in copy}
        return {f.decode(): min(int(copy.get(f, NOTHING_APPLIED)) for copy in copies) for f in sorted(fields)}
    finally:
        client.close()


def kill_mid_batch(
    proc: subprocess.Popen[bytes], settings: Settings, timeout: float = 40.0, also: Callable[[], None] | None = None
) -> bool:
    """SIGKILLs the scorer `proc` inside a batch: freezes it (SIGSTOP) at random moments until
    Redis holds applied offsets of this process that Kafka has not committed yet (its states are
    saved, the commit is pending), runs `also` (e.g. killing Redis with it) and SIGKILLs it there.
    Returns True if the kill landed inside a batch; False if no frozen moment found one within
    `timeout` or the process exited (it is killed, if running, anyway)."""
    rng = random.Random(proc.pid)
    before = applied_in_redis(settings)  # what earlier processes left: not this one's batches
    topic = settings.events_topic
    consumer = Consumer(kafka_config(settings, **{"group.id": settings.scorer_group}))
    partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
    deadline = time.monotonic() + timeout
    in_batch = False
    try:
        # Unfrozen until it saves its first batch: freezing a process that is still loading its
        # model would only slow its start.
        while applied_in_redis(settings) == before and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        while not in_batch and time.monotonic() < deadline and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            applied = applied_in_redis(settings)
            committed = {f"{tp.topic}:{tp.partition}": tp.offset for tp in consumer.committed(partitions, timeout=10)}
            in_batch = any(
                offset != before.get(key) and offset > committed.get(key, -1) for key, offset in applied.items()
            )
            if not in_batch:
                proc.send_signal(signal.SIGCONT)
                time.sleep(rng.uniform(0.005, 0.05))
        if not in_batch:  # shown with a failing test's output: which of the two it was
            why = "the scorer exited (its backlog drained?)" if proc.poll() is not None else f"{timeout:.0f} s passed"
            print(f"kill_mid_batch: no frozen moment fell inside a batch: {why}")
        if also is not None:
            also()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        consumer.close()
    return in_batch


def drained(settings: Settings) -> bool:
    """Returns whether Redis holds applied offsets at the end of every partition of the topic."""
    applied = applied_in_redis(settings)
    consumer = Consumer(kafka_config(settings, **{"group.id": f"ends-{settings.scorer_group}"}))
    try:
        topic = settings.events_topic
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()
    return all(applied.get(f"{topic}:{p}", 0) == end for p, end in ends.items() if end > 0)


# --- tier changes and the at-risk list ------------------------------------------------------


def read_changes(settings: Settings) -> list[TierChange]:
    """Returns every tier change on the deployment's changes topic, partition by partition in
    offset order (read up to each partition's end, by assignment: no group)."""
    topic = settings.tier_changes_topic
    consumer = Consumer(kafka_config(settings, **{"group.id": f"read-{topic}", "enable.auto.commit": False}))
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        out: list[TierChange] = []
        for partition in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            deadline = time.monotonic() + 30
            position = low
            while position < high and time.monotonic() < deadline:
                for message in consumer.consume(1000, 1.0):
                    if message.error() is None and (message.offset() or 0) < high:
                        out.append(CHANGE_DECODER.decode(message.value() or b""))
                        position = (message.offset() or 0) + 1
            assert position >= high, f"{topic}[{partition}] not read to its end in 30 s"
            consumer.unassign()
        return out
    finally:
        consumer.close()


def change_chains(changes: Iterable[TierChange]) -> dict[str, list[str]]:
    """Returns each user's announced tiers in order, asserting that every change starts where the
    user's previous one ended (the first from None), changes something, and that no event
    (user, source position) appears twice."""
    chains: dict[str, list[str]] = {}
    seen: set[tuple[str, int, int]] = set()
    for change in sorted(changes, key=lambda c: (c.source_partition, c.source_offset)):
        identity = (change.user_id, change.source_partition, change.source_offset)
        assert identity not in seen, f"duplicated change {change}"
        seen.add(identity)
        chain = chains.setdefault(change.user_id, [])
        assert change.old_tier == (chain[-1] if chain else None), f"{change} does not follow {chain}"
        assert change.new_tier != change.old_tier
        chain.append(change.new_tier)
    return chains


def wave_events(users: int, waves: int, seed: int) -> list[list[Event]]:
    """Returns `waves` lists with one event per user each (every user later in each wave), so a
    scorer that applies one wave at a time scores every event on its own, whatever its batches."""
    rng = random.Random(seed)
    out = []
    clock = {f"w{u}": START_MS + rng.randint(0, 3_600_000) for u in range(users)}
    for wave in range(waves):
        events = []
        for user in clock:
            clock[user] += rng.choice([60_000, 600_000, 3_000_000, 7_200_000, 40_000_000])
            page = rng.choice(PAGES[:-1])
            events.append(
                Event(
                    ts=clock[user], user_id=user, session_id=wave, item_in_session=0, page=page,
                    auth="Logged In", level="paid", registration=float(START_MS - 86_400_000),
                    length=200.0 if page == "NextSong" else None,
                )
            )  # fmt: skip
        out.append(sorted(events, key=lambda e: e.ts))
    return out


def offline_tiers(waves: list[list[Event]], model: ChurnModel, lateness_ms: int) -> dict[str, list[str]]:
    """Returns each user's tier sequence (repeats collapsed) scoring every event on its own with
    the online engine and `model`, as the stream scores a user as of their latest event."""
    engine = OnlineEngine(lateness_ms=lateness_ms)
    chains: dict[str, list[str]] = {}
    offset = 0
    for events in waves:
        for event in events:
            engine.apply(event, 0, offset)
            offset += 1
            tier = model.tier(float(model.predict(feature_matrix([engine.row(event.user_id)]))[0]))
            chain = chains.setdefault(event.user_id, [])
            if not chain or chain[-1] != tier:
                chain.append(tier)
    return chains


def spread_tiers(waves: list[list[Event]], model: ChurnModel, lateness_ms: int) -> ChurnModel:
    """Returns `model` with tier cut points at the 60th and 85th percentiles of its per-event
    scores of `waves`, so those events move users between all three tiers."""
    engine = OnlineEngine(lateness_ms=lateness_ms)
    rows = []
    for offset, event in enumerate(e for events in waves for e in events):
        engine.apply(event, 0, offset)
        rows.append(engine.row(event.user_id))
    scores = model.predict(feature_matrix(rows))
    cuts = {"high": float(np.quantile(scores, 0.85)), "medium": float(np.quantile(scores, 0.6))}
    return ChurnModel(model.booster, {**model.meta, "tiers": cuts})


# --- the real Prometheus and the dashboards' queries -------------------------------------------


def prom(settings: Settings, path: str, **params: str) -> Any:
    """Returns the `data` of a Prometheus HTTP API answer (asserting its status is success)."""
    url = f"http://127.0.0.1:{settings.prometheus_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def query(settings: Settings, expr: str) -> list[dict[str, Any]]:
    """Returns the samples of an instant PromQL query."""
    return list(prom(settings, "/api/v1/query", query=expr)["result"])


def panel_expressions() -> list[tuple[str, str, str]]:
    """Returns (dashboard file, panel title, PromQL) of every panel target of every dashboard."""
    out: list[tuple[str, str, str]] = []
    for path in DASHBOARDS:

        def walk(panels: list[dict[str, Any]], name: str = path.name) -> None:
            for panel in panels:
                walk(panel.get("panels", []))
                out.extend((name, panel.get("title", ""), t["expr"]) for t in panel.get("targets", []) if t.get("expr"))

        walk(json.loads(path.read_text())["panels"])
    return out


# --- tier changes -------------------------------------------------------------------------


def tier_change(user: str) -> TierChange:
    """Returns a change of `user` from low to high (prediction id `p-<user>`)."""
    return TierChange(
        user_id=user, old_tier="low", new_tier="high", churn_probability=0.9, reasons=[], model_name="m",
        model_version="1", event_time_ms=1_767_225_600_000, prediction_id=f"p-{user}", source_partition=0,
        source_offset=1,
    )  # fmt: skip


# --- stand-ins for a Kafka consumer, for unit tests of the consuming loops ---------------------

STAND_IN_TOPIC = "events"  # the topic the stand-in consumers read
# A guest's event (no userId) as a producer publishes it: skipped by the scorer, not dead-lettered.
GUEST_EVENT_JSON = (
    b'{"ts":1538352117000,"userId":"","sessionId":1,"itemInSession":0,"page":"Home","auth":"Logged Out","level":"free"}'
)


class KafkaMessage:
    """What `Consumer.consume` returns, for one message without error; `append_ms` is its Kafka
    append time (-1: none, as librdkafka reports a message without a timestamp)."""

    def __init__(
        self, partition: int, offset: int, value: bytes = b"{}", append_ms: int = -1, key: bytes | None = None
    ) -> None:
        self._partition, self._offset, self._value, self._append_ms = partition, offset, value, append_ms
        self._key = key

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return STAND_IN_TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        if self._append_ms < 0:
            return (TIMESTAMP_NOT_AVAILABLE, -1)
        return (TIMESTAMP_LOG_APPEND_TIME, self._append_ms)


class ScriptedConsumer:
    """A consumer holding `assigned` partitions whose `consume` calls return `batches` in turn
    (default: one message of partition 0) and then nothing; emptying `assigned` is what a
    rebalance that revokes every partition does."""

    def __init__(self, assigned: list[int], batches: list[list[KafkaMessage]] | None = None) -> None:
        self.assigned = assigned
        self.batches = batches if batches is not None else [[KafkaMessage(0, 7)]]
        self.seeks: list[tuple[int, int]] = []
        self.idle_polls = 0

    def subscribe(self, topics: list[str], **_: Any) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[KafkaMessage]:
        if self.batches:
            return self.batches.pop(0)
        self.idle_polls += 1
        time.sleep(min(timeout, 0.01))
        return []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(STAND_IN_TOPIC, p) for p in self.assigned]

    def seek(self, partition: TopicPartition) -> None:
        self.seeks.append((partition.partition, partition.offset))

    def close(self) -> None:
        pass


class CommitWaitsForBroker(ScriptedConsumer):
    """A consumer whose commit waits for a broker that does not answer (until `answer` is set),
    as librdkafka's synchronous commit does; it records whether it was closed."""

    def __init__(self, batches: list[list[KafkaMessage]] | None = None) -> None:
        super().__init__(assigned=[0], batches=batches)
        self.answer = threading.Event()
        self.commits = 0
        self.closed = False

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        self.commits += 1
        self.answer.wait(30)

    def close(self) -> None:
        self.closed = True


class CommitRefusedOnce(ScriptedConsumer):
    """A consumer whose first commit the broker refuses (as after a rebalance or a broken
    connection) and whose later commits go through; `committed` holds each accepted commit's
    offsets (None: the consumer's positions)."""

    def __init__(self, batches: list[list[KafkaMessage]]) -> None:
        super().__init__(assigned=[0], batches=batches)
        self.commits = 0
        self.committed: list[list[tuple[int, int]] | None] = []
        self.closed = False

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> list[TopicPartition]:
        self.commits += 1
        if self.commits == 1:
            raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
        self.committed.append(None if offsets is None else [(tp.partition, tp.offset) for tp in offsets])
        return offsets or []

    def close(self) -> None:
        self.closed = True


def seconds_to_stop_during_commit(
    consumer: CommitWaitsForBroker, loop: threading.Thread, stopping: threading.Event
) -> float:
    """Waits until the started `loop` is in `consumer`'s commit, checks that it still waits there
    0.3 s later (as it must while Kafka is merely slow), sets `stopping` and returns how long the
    loop then took to end (5 s at most). The commit is answered in any case, so that no thread
    is left waiting."""
    try:
        wait_for(lambda: consumer.commits == 1, 10, "the batch's commit", 0.005)
        time.sleep(0.3)
        assert loop.is_alive()
        stopping.set()
        stopped_at = time.monotonic()
        loop.join(5)
        return time.monotonic() - stopped_at
    finally:
        consumer.answer.set()
        stopping.set()
        loop.join(5)


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes every `os.fsync` also record the path of the file or folder it flushes; returns the
    list they are recorded in, in order."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


# --- Feast projects of their own, and feature rows to write there ------------------------------


def feast_scratch(settings: Settings, unique: str, tmp_path: Path) -> Settings:
    """Returns `settings` with a fresh Feast project (letters, digits, `_`: valid for Feast) and
    its registry under `tmp_path`."""
    return settings.model_copy(update={"feast_project": f"test_{unique}", "feast_repo": tmp_path / "feast"})


@contextlib.contextmanager
def applied_feast(settings: Settings) -> Iterator[Any]:
    """Yields the applied Feast store of `settings`; its Redis keys and registry go afterwards."""
    store = apply_repo(settings)
    try:
        yield store
    finally:
        store.teardown()


def sample_feature_row(user_id: str, last_event_ms: int, seed: int = 0) -> FeatureRow:
    """Returns a row of every stored feature, counts for the int ones, thirds for the others;
    `seed` varies the values."""
    values: dict[str, float] = {
        name: (i * 7 + seed) % 97 if name in spec.INT_FEATURES else (i + seed) / 3
        for i, name in enumerate(spec.STORED_FEATURES)
    }
    return FeatureRow(user_id, last_event_ms, values)
