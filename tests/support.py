"""Helpers shared by the tests (those the benchmarks also use live in `bench.harness`).

Event generation for engine tests, wire-format frames, a small LightGBM champion and its
registration, the throwaway deployment of the fault tests, and a transparent stand-in model.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightgbm as lgb
import numpy as np
import polars as pl
from confluent_kafka import Consumer, TopicPartition

from bench.harness import ScorerProcess, delete_prefix, free_port, scratch_settings, wait_for
from core.kafka import kafka_config
from core.redis import redis_client
from core.settings import Settings
from events.schema import Event
from features import spec
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import state_layout
from models.artifact import ChurnModel, save_artifact
from monitoring.metrics import Metrics
from stream.consumer import build_scorer
from stream.pacing import Pacing
from stream.producer import ProduceReport, build_producer, publish
from stream.risk_store import RedisRiskStore
from training import registry

ROOT = Path(__file__).resolve().parent.parent  # the repository
FIXTURES = ROOT.parent / "shared" / "fixtures"  # real Sparkify rows, beside the repository

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
    registry.apply_decision(scratch, run_id, version, registry.Decision(True))
    return uri


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

    def start_scorer(self) -> ScorerProcess:
        """Starts `churn consume` for this deployment and waits until it has joined its group."""
        log = self.folder / f"scorer-{self.name}.log"
        scorer = ScorerProcess(self.env, self.settings.scorer_metrics_port, log)
        try:
            # Seconds on a quiet machine; minutes when others load its two cores.
            wait_for(lambda: scorer.value("churn_scorer_ready") == 1, 300, f"`churn consume` to start ({log})", 0.5)
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
            blobs = dict(zip([k[len(prefix) :] for k in keys], client.mget(keys), strict=True)) if keys else {}
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
            headers = {str(k): v for k, v in msg.headers() or []}
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


# --- killing a scorer inside a batch -----------------------------------------------------------


def applied_in_redis(settings: Settings) -> dict[str, int]:
    """Returns the scorer's applied offsets saved in Redis (`topic:partition` -> next offset)."""
    key = f"{settings.redis_prefix}applied:{state_layout(settings.allowed_lateness_seconds * 1000)}"
    client = redis_client(settings)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(key).items()}
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
