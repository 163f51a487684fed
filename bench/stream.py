"""End-to-end stream benchmark: events/s through ONE real scorer process, a naive baseline,
event-to-score freshness at a fixed produce rate, and memory per active user.

Everything runs in a throwaway deployment on the configured broker and Redis: fresh topics,
a consumer group, a Feast project (registry in a temp folder), a Redis key prefix and an MLflow
store (SQLite in a temp folder) holding a small champion trained on simulated events. All of
it is deleted afterwards. The scorer is the real `churn consume` in a subprocess, observed only
from outside (its metrics endpoint and /proc), so the figures include parsing, the online
engine, Feast writes to Redis, LightGBM scoring, risk rows, state saves and offset commits.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.harness import (
    Samples,
    ScorerProcess,
    delete_prefix,
    free_port,
    histogram_buckets,
    scratch_settings,
    train_small_champion,
)
from bench.produce import make_events
from core.errors import ServiceUnavailableError
from core.redis import redis_client
from core.settings import Settings
from events.schema import Event, parse_event
from features.feast_repo import apply_repo, open_feature_store
from features.feast_store import FeastFeatureStore
from features.online import APPLIED, STATE_ENCODER, OnlineEngine, state_layout
from features.state_store import RedisStateStore
from models.registry import load_champion
from models.runtime import feature_matrix
from stream.kafka import committing_consumer
from stream.pacing import Pacing
from stream.producer import publish_lines
from stream.risk_store import RedisRiskStore, RiskRow
from stream.topics import delete_topics

GOAL_EVENTS_PER_SECOND: Final = 50_000
GOAL_SPEEDUP: Final = 50.0
GOAL_FRESHNESS_P99_SECONDS: Final = 1.0
FRESHNESS_RATE: Final = 10_000
FRESHNESS: Final = "churn_event_to_score_seconds"


@dataclass(frozen=True)
class Deployment:
    """One isolated scorer deployment: what the subprocess gets as env, and the same as Settings."""

    settings: Settings
    env: dict[str, str]
    folder: Path

    def start_scorer(self, idle_exit_s: float) -> ScorerProcess:
        """Starts `churn consume` for this deployment (exiting after `idle_exit_s` idle seconds)."""
        log = self.folder / f"scorer-{self.settings.scorer_group}.log"
        return ScorerProcess(self.env, self.settings.scorer_metrics_port, log, "--idle-exit", str(idle_exit_s))


def _deployment(base: Settings, scratch: Path, topic: str, name: str, mlflow_uri: str) -> Deployment:
    """Returns settings and env for a scorer on `topic` with its own group and state prefix;
    the Feast project and MLflow store are shared by the bench's deployments."""
    port = free_port()
    values: dict[str, object] = {
        "events_topic": topic,
        "dlq_topic": f"{topic}.dlq",
        "scorer_group": f"bench-scorer-{name}",
        "feast_project": f"bs_{scratch.name.split('-')[1]}",
        "feast_repo": scratch / "feast",
        "redis_prefix": f"bench:{name}:",
        "mlflow_tracking_uri": mlflow_uri,
        "scorer_metrics_port": port,
        "state_dir": scratch,
    }
    # Everything else (ports, addresses, batch sizes) comes from the caller's settings.
    for key in ("kafka_port", "kafka_bootstrap", "redis_port", "redis_url", "topic_partitions", "max_batch_events"):
        values[key] = getattr(base, key)
    settings, env = scratch_settings(base, **values)
    return Deployment(settings, env, scratch)


def _throughput(scorer: ScorerProcess, total: int, timeout_s: float) -> dict[str, Any]:
    """Returns events/s of `scorer` over `total` queued messages, from the first sample that
    shows progress to the first that shows all done, plus its RSS before and after."""
    rss_before = scorer.rss_bytes()
    first: list[tuple[float, int]] = []
    peak_rss = [rss_before]

    def on_sample(now: float, done: int, _: Samples) -> None:
        if done > 0 and not first:
            first.append((now, done))
        peak_rss[0] = max(peak_rss[0], scorer.rss_bytes())

    scorer.wait_consumed(total, timeout_s, on_sample)
    ended = time.perf_counter()
    started, done_at_start = first[0]
    measured = total - done_at_start
    seconds = max(ended - started, 1e-9)
    return {
        "events": total,
        "measured_events": measured,
        "seconds": round(seconds, 2),
        "events_per_second": round(measured / seconds),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": max(peak_rss[0], scorer.rss_bytes()),
    }


def _quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float:
    """Returns the q-quantile of a cumulative histogram [(le, count)], linear within a bucket
    (as Prometheus' histogram_quantile does)."""
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, count
    return lower_le


def _freshness(
    deployment: Deployment, lines: list[bytes], warmup: list[bytes], rate: int, timeout_s: float
) -> dict[str, Any]:
    """Starts a scorer, publishes `warmup` then `lines` at `rate` events/s, and returns the
    event-to-score freshness of the paced part from the scorer's histogram."""

    scorer = deployment.start_scorer(idle_exit_s=60)
    try:
        scorer.wait_ready()
        publish_lines(deployment.settings, warmup)
        before = histogram_buckets(scorer.wait_consumed(len(warmup), timeout_s), FRESHNESS)
        report = publish_lines(deployment.settings, lines, pacing=Pacing(rate=rate))
        after = histogram_buckets(scorer.wait_consumed(len(warmup) + len(lines), timeout_s), FRESHNESS)
    finally:
        scorer.stop()
    earlier = dict(before)
    paced = [(le, count - earlier.get(le, 0.0)) for le, count in after]
    within = dict(paced)
    total = paced[-1][1] if paced else 0.0
    return {
        "produce_rate": rate,
        "events": len(lines),
        "achieved_produce_rate": round(report.events_per_second),
        "scores_observed": round(total),
        "p50_seconds": round(_quantile_from_buckets(paced, 0.50), 4),
        "p99_seconds": round(_quantile_from_buckets(paced, 0.99), 4),
        "share_within_1s": round(within.get(1.0, 0.0) / total, 5) if total else None,
        "source": "scorer histogram churn_event_to_score_seconds (bucket-interpolated)",
    }


def _naive(deployment: Deployment, events: int, timeout_s: float) -> dict[str, Any]:
    """Runs the naive consumer in this process; see `naive_consume`."""
    settings = deployment.settings
    found = load_champion(settings)
    if found is None:
        msg = "no champion for the naive baseline"
        raise ServiceUnavailableError(msg)
    model, version = found
    client = redis_client(settings)
    store = FeastFeatureStore(open_feature_store(settings))
    return naive_consume(
        settings,
        store,
        RedisStateStore(client, settings.redis_prefix, state_layout(settings.allowed_lateness_seconds * 1000)),
        RedisRiskStore(client, settings.redis_prefix),
        model,
        version,
        events=events,
        timeout_s=timeout_s,
    )


def naive_consume(
    settings: Settings,
    store: Any,
    states: Any,
    risks: Any,
    model: Any,
    version: str,
    *,
    events: int,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """The baseline a straightforward consumer would be, with the same engine and stores:
    for each message, one at a time: parse, read the user's row from Feast
    (`get_online_features`), load the user's state, apply the event, build the row,
    `store.push` that one row (Feast's documented write), predict that one row, write its
    risk row, save the state, commit the offset. Returns events/s over `events` messages.

    Raises:
        ServiceUnavailableError: Kafka or Redis cannot be reached.
    """
    engine = OnlineEngine(lateness_ms=settings.allowed_lateness_seconds * 1000)
    consumer = committing_consumer(settings, settings.scorer_group)
    consumer.subscribe([settings.events_topic])
    done = 0
    started: float | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while done < events and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            if started is None:
                started = time.perf_counter()
            event = parse_event(message.value() or b"")
            if type(event) is Event:
                user = event.user_id
                store.read_rows([user])
                engine.states.clear()
                engine.states.update(states.load([user]))
                if engine.apply(event, message.partition() or 0, message.offset() or 0) == APPLIED:
                    row = engine.row(user)
                    store.push_rows([row])
                    p = float(model.predict(feature_matrix([row]))[0])
                    now = time.time_ns() // 1_000_000
                    risks.write([RiskRow(user, p, model.tier(p), version, row.last_event_ms, now)])
                states.save({user: STATE_ENCODER.encode(engine.states[user])}, {}, {})
            consumer.commit(message=message, asynchronous=False)
            done += 1
    finally:
        consumer.close()
    elapsed = time.perf_counter() - started if started is not None else 0.0
    return {
        "events": done,
        "seconds": round(elapsed, 2),
        "events_per_second": round(done / elapsed, 1) if elapsed else 0.0,
        "per_event": "feast read, state load, apply, row, store.push, predict, risk write, state save, commit",
    }


def _state_bytes(settings: Settings, prefix: str, sample: int = 2000) -> float:
    """Returns the mean size of the saved user states under `prefix` (a sample of keys)."""
    client = redis_client(settings)
    keys = []
    for key in client.scan_iter(f"{prefix}state:*", count=1000):
        keys.append(key)
        if len(keys) >= sample:
            break
    if not keys:
        return 0.0
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.strlen(key)
    sizes = pipe.execute()
    return sum(sizes) / len(sizes)


def bench_stream(
    settings: Settings,
    *,
    events: int = 1_000_000,
    users: int = 10_000,
    naive_events: int = 2_000,
    freshness_seconds: float = 20.0,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Measures the scorer end to end on the configured broker and Redis (see the module doc).

    1. `events` pre-generated events over `users` users go into a fresh topic; ONE `churn
       consume` then drains it; events/s from its first to its last processed message.
    2. The naive consumer (`naive_consume`) reads the same topic with its own group for
       `naive_events` messages, in this process; the speed-up is the ratio of events/s.
    3. A fresh scorer on a fresh topic gets `FRESHNESS_RATE` events/s for `freshness_seconds`;
       p50/p99 of score-written time minus broker append time come from its histogram.
    Memory per active user: the mean saved state size, and the scorer's RSS growth / users.

    Returns:
        JSON-ready figures with the goals and whether each is met.

    Raises:
        ServiceUnavailableError: Kafka, Redis or MLflow cannot be reached, or a scorer failed.
    """

    run = uuid.uuid4().hex[:10]
    topic, fresh_topic = f"bench-stream-{run}", f"bench-fresh-{run}"
    topics = [topic, f"{topic}.dlq", fresh_topic, f"{fresh_topic}.dlq"]
    with tempfile.TemporaryDirectory(prefix=f"bs-{run}-", dir=settings.state_dir.resolve()) as folder:
        scratch = Path(folder)
        mlflow_uri = f"sqlite:///{scratch / 'mlflow.db'}"
        main = _deployment(settings, scratch, topic, f"{run}-main", mlflow_uri)
        naive = _deployment(settings, scratch, topic, f"{run}-naive", mlflow_uri)
        fresh = _deployment(settings, scratch, fresh_topic, f"{run}-fresh", mlflow_uri)
        feast = None
        try:
            began = time.perf_counter()
            trained = train_small_champion(main.settings, scratch)
            if not trained.promoted:
                msg = f"the bench model was not promoted: {trained.reasons}"
                raise ServiceUnavailableError(msg)
            version = str(trained.version)
            feast = apply_repo(main.settings)
            setup_s = time.perf_counter() - began

            lines = make_events(events, users=users, seed=11)
            produced = publish_lines(main.settings, lines)
            # Long enough for the group join; the scorer is stopped once everything is consumed.
            scorer = main.start_scorer(idle_exit_s=30)
            try:
                scorer.wait_ready()
                # Only now is the model loaded; consuming starts with the first poll.
                throughput = _throughput(scorer, events, timeout_s)
            finally:
                scorer.stop()
            state_bytes = _state_bytes(settings, main.settings.redis_prefix)
            naive_figures = _naive(naive, naive_events, timeout_s)

            per_second = FRESHNESS_RATE
            paced = make_events(int(per_second * freshness_seconds), users=users, seed=13)
            warmup = make_events(200, users=users, seed=17)
            freshness = _freshness(fresh, paced, warmup, per_second, timeout_s)
        finally:
            if feast is not None:
                feast.teardown()
            delete_topics(settings, topics)
            deleted = sum(delete_prefix(settings, d.settings.redis_prefix) for d in (main, naive, fresh))

    speedup = throughput["events_per_second"] / naive_figures["events_per_second"]
    rss_delta = throughput["rss_after_bytes"] - throughput["rss_before_bytes"]
    logged_in_users = min(users, events)
    return {
        "benchmark": "stream",
        "events": events,
        "users": users,
        "partitions": settings.topic_partitions,
        "max_batch_events": settings.max_batch_events,
        "produced": produced.sent,
        "model_version": version,
        "setup_seconds": round(setup_s, 1),
        "scorer": throughput,
        "naive": naive_figures,
        "speedup": round(speedup, 1),
        "freshness": freshness,
        "memory_per_active_user": {
            "state_bytes": round(state_bytes),
            "rss_delta_bytes": round(rss_delta / logged_in_users),
        },
        "goals": {
            "events_per_second": GOAL_EVENTS_PER_SECOND,
            "speedup": GOAL_SPEEDUP,
            "freshness_p99_seconds": GOAL_FRESHNESS_P99_SECONDS,
        },
        "meets": {
            "events_per_second": throughput["events_per_second"] >= GOAL_EVENTS_PER_SECOND,
            "speedup": speedup >= GOAL_SPEEDUP,
            "freshness_p99": freshness["p99_seconds"] <= GOAL_FRESHNESS_P99_SECONDS,
        },
        "redis_keys_deleted": deleted,
        "cpu_count": os.cpu_count(),
    }
