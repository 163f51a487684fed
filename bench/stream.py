"""End-to-end stream benchmark: one run, every figure measured on the same events and machine.

Throwaway deployment on the configured broker and Redis: fresh topics, consumer groups, a Feast
project (registry in a temp folder), Redis key prefixes and an MLflow store (SQLite in a temp
folder) holding a small champion trained on simulated events; all deleted afterwards. The
scorer is the real `churn consume` in subprocesses, observed from outside: its metrics endpoint
(event counts, batch sizes, freshness histogram, CPU by stage) and /proc (CPU of the process
and of its loop thread), plus Redis' own CPU (`INFO cpu`).

Phases, in order (`bench_stream` returns them as JSON):
1. catch-up: 1, 2, 3... scorer processes (one consumer group each) drain the same topic; the
   1-process drain also gives CPU by stage, Redis bytes per user and Kafka bytes per event;
2. bound: one process consumes the topic and JSON-decodes each value, nothing else;
3. peer: Quix Streams doing the per-user hourly tiles over 28 days (`bench.quix_peer`);
4. naive: the fair one-message-at-a-time baseline (`bench.naive`), after a warm-up;
5. live: a probe at 50% of the catch-up rate gives the batch size the live loop really uses;
   capacity is then drained with batches bounded to that size, from a topic of one partition,
   and freshness measured per event at 25%, 50% and 75% of that capacity. One partition because
   a live batch holds the latest events of every partition, in time order, while a drain of a
   backlog on several partitions takes each partition's messages in long runs: its batches
   touch a fraction of the users a live batch of the same size touches (0.21 per event measured,
   against 0.47 expected for uniform users), and each touched user's row, score and state are
   paid once per batch, so it measured a capacity the live loop could not reach (the run's
   `backlog_drain_at_live_batch` still shows it; `live_loop_cost_model` splits the costs).
Throughput counts logged-in events only (guests are skipped by every consumer here).
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Counter
from redis.cluster import ClusterNode, RedisCluster

from bench.bound import consume_and_decode
from bench.harness import (
    Samples,
    ScorerProcess,
    cpu_seconds,
    delete_prefix,
    free_port,
    histogram_buckets,
    machine,
    machine_busy_seconds,
    runqueue_wait_seconds,
    scratch_settings,
    thread_cpu_seconds,
    train_small_champion,
    wait_for,
)
from bench.naive import naive_consume
from bench.produce import make_events
from bench.stream_figures import freshness_figures, report
from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.redis import redis_client
from core.settings import Settings
from features.feast_repo import apply_repo, open_feature_store
from features.feast_store import FeastFeatureStore
from features.online import state_layout
from features.state_store import RedisStateStore
from models.registry import load_champion
from monitoring.metrics import SCORER_STAGES, StageCpu
from stream.pacing import Pacing
from stream.producer import publish_lines
from stream.risk_store import RedisRiskStore
from stream.topics import delete_topics

LOADS: Final = (0.25, 0.5, 0.75)
FRESHNESS: Final = "churn_event_to_score_seconds"
STAGE_CPU: Final = "churn_scorer_stage_cpu_seconds_total"
SAMPLE_EVERY_S: Final = 0.25  # metrics scrapes cost the scorer CPU: four a second is enough
READY_TIMEOUT_S: Final = 600.0  # several scorers importing at once on a busy shared machine
LOGGED_IN_SHARE: Final = 0.95  # `make_events`: ~5% of messages are guests


@dataclass(frozen=True)
class Sizes:
    """How much each phase runs; `QUICK` is the smoke test's, the defaults the real run's."""

    events: int = 1_000_000
    users: int = 10_000
    processes: tuple[int, ...] = (1, 2, 3)
    peer_events: int = 300_000
    naive_events: int = 25_000
    naive_warmup: int = 1_000
    probe_seconds: float = 5.0
    capacity_events: int = 300_000
    load_seconds: float = 20.0
    timeout_s: float = 900.0


QUICK: Final = Sizes(
    events=20_000,
    users=500,
    processes=(1, 2),
    peer_events=10_000,
    naive_events=300,
    naive_warmup=50,
    probe_seconds=2.0,
    capacity_events=10_000,
    load_seconds=3.0,
    timeout_s=300.0,
)


@dataclass(frozen=True)
class Deployment:
    """One isolated scorer deployment: what its subprocesses get as env, and the same as Settings."""

    settings: Settings
    env: dict[str, str]
    logs: Path  # kept after the run: what each scorer said

    def start_scorers(self, count: int, idle_exit_s: float) -> list[ScorerProcess]:
        """Starts `count` `churn consume` processes in this deployment's group, each with its own
        metrics port (exiting after `idle_exit_s` idle seconds)."""
        scorers = []
        for i in range(count):
            port = free_port()
            env = {**self.env, "CHURN_SCORER_METRICS_PORT": str(port)}
            log = self.logs / f"scorer-{self.settings.scorer_group}-{i}.log"
            scorers.append(ScorerProcess(env, port, log, "--idle-exit", str(idle_exit_s)))
        return scorers


def _deployment(
    base: Settings, scratch: Path, logs: Path, topic: str, name: str, mlflow_uri: str, **extra: Any
) -> Deployment:
    """Returns settings and env for scorers on `topic` with their own group and state prefix;
    the Feast project and MLflow store are shared by the bench's deployments."""
    values: dict[str, object] = {
        "events_topic": topic,
        "dlq_topic": f"{topic}.dlq",
        "scorer_group": f"bench-scorer-{name}",
        "feast_project": f"bs_{scratch.name.split('-')[1]}",
        "feast_repo": scratch / "feast",
        "redis_prefix": f"bench:{name}:",
        "mlflow_tracking_uri": mlflow_uri,
        "scorer_metrics_port": free_port(),
        "state_dir": scratch,
    }
    # Everything else (ports, addresses, one Redis or a cluster, batch sizes) comes from the
    # caller's settings, which may not be in this process's environment (a test's).
    copied = ("kafka_port", "kafka_bootstrap", "redis_port", "redis_url", "redis_cluster", "topic_partitions")
    for key in (*copied, "max_batch_events"):
        values[key] = getattr(base, key)
    settings, env = scratch_settings(base, **(values | extra))
    return Deployment(settings, env, logs)


# --- observation from outside --------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """Everything read at one instant of a drain or a load."""

    at: float  # perf_counter
    samples: list[Samples]  # one per scorer process
    process_cpu: float  # the scorers' processes, every thread
    loop_cpu: float  # the scorers' main (loop) threads
    redis_cpu: float  # Redis, or a cluster's masters
    redis_replica_cpu: float  # a cluster's replicas
    machine_busy: float
    loop_queued: float  # seconds the scorers' loop threads waited for a CPU (shared machine)
    redis_queued: float  # the same for Redis' main thread
    redis_commands: dict[str, float]  # microseconds Redis spent running each command (masters)


def _read(scorers: list[ScorerProcess], redis: RedisProbe) -> Reading:
    pids = [s.proc.pid for s in scorers]
    return Reading(
        time.perf_counter(),
        [s.samples() for s in scorers],
        sum(cpu_seconds(pid) for pid in pids),
        sum(thread_cpu_seconds(pid, pid) for pid in pids),
        redis.cpu(),
        redis.replica_cpu(),
        machine_busy_seconds(),
        sum(runqueue_wait_seconds(pid, pid) for pid in pids),
        redis.queued(),
        redis.command_usec(),
    )


def _total(reading: Reading, name: str, **labels: str) -> float:
    """Sums a sample over the processes; with no labels given, over every label set."""
    wanted = frozenset(labels.items())
    return sum(
        v for samples in reading.samples for (n, ls), v in samples.items() if n == name and (not labels or ls == wanted)
    )


def _consumed(reading: Reading) -> int:
    return round(_total(reading, "churn_events_consumed_total"))


def _stage_cpu_flushed_since(later: Reading, earlier: Reading) -> bool:
    """Returns whether every scorer added its stage CPU to the counters between two readings. A
    scorer adds a batch's stage CPU at the end of its loop turn, after the batch's events were
    counted, so a reading that shows the last event consumed may lack its batch's stages (one CI
    run of the smoke test read the engine stage at 0 over a tiny drain); "housekeeping", charged
    on every turn, is added last."""
    key = (STAGE_CPU, frozenset({("stage", "housekeeping")}))
    return all(
        after.get(key, 0.0) > before.get(key, 0.0) for after, before in zip(later.samples, earlier.samples, strict=True)
    )


def _flushed_reading(scorers: list[ScorerProcess], redis: RedisProbe, timeout_s: float) -> Reading:
    """Returns the first reading, from now on, taken after every scorer added its stage CPU (see
    `_stage_cpu_flushed_since`): called once every message of a run is counted as consumed, it
    includes the last batch's stages, batch size and CPU.

    Raises:
        TimeoutError: a scorer did not finish a loop turn within `timeout_s`.
    """
    consumed = _read(scorers, redis)
    flushed: list[Reading] = []

    def done() -> bool:
        flushed[:] = [_read(scorers, redis)]
        return _stage_cpu_flushed_since(flushed[0], consumed)

    wait_for(done, timeout_s, "every scorer to finish its loop turn", SAMPLE_EVERY_S)
    return flushed[0]


class RedisProbe:
    """Redis' own CPU (`INFO cpu`) and, when it runs on this machine, its main threads' wait for
    a CPU (/proc schedstat of the `process_id` INFO reports): of the one server, or summed over
    a Redis Cluster's masters (the scorer's loop waits for them), with its replicas' CPU apart
    (they apply the masters' writes, beside the loop)."""

    def __init__(self, settings: Settings) -> None:
        self.client = redis_client(settings)
        cluster = self.client if isinstance(self.client, RedisCluster) else None
        # None: the one server (a plain client's INFO).
        self.masters: list[ClusterNode | None] = list(cluster.get_primaries()) if cluster else [None]
        self.replicas: list[ClusterNode] = list(cluster.get_replicas()) if cluster else []
        self.pids = [int(self._info(node, "server")["process_id"]) for node in self.masters]

    def _info(self, node: ClusterNode | None, section: str) -> dict[str, Any]:
        if node is None:
            return dict(self.client.info(section))
        return dict(self.client.info(section, target_nodes=node))

    def _cpu_of(self, nodes: list[ClusterNode | None]) -> float:
        total = 0.0
        for node in nodes:
            info = self._info(node, "cpu")
            total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return total

    def cpu(self) -> float:
        """Returns the CPU seconds (user + system) of Redis (a cluster's masters) since it started."""
        return self._cpu_of(self.masters)

    def replica_cpu(self) -> float:
        """Returns the CPU seconds of a cluster's replicas since they started (0.0 for one server)."""
        return self._cpu_of(list(self.replicas))

    def used_memory(self) -> int:
        """Returns the bytes Redis (a cluster's masters together) holds (`used_memory`)."""
        return sum(int(self._info(node, "memory")["used_memory"]) for node in self.masters)

    def command_usec(self) -> dict[str, float]:
        """Returns, per command name, the microseconds Redis (a cluster's masters together) spent
        running it since it started (`INFO commandstats`: wall time around each command, not
        the socket work, and on a shared machine with Redis's waits for a CPU mid-command; a
        script's commands count under their own names and again in `eval`/`evalsha`)."""
        totals: dict[str, float] = {}
        for node in self.masters:
            for name, stats in self._info(node, "commandstats").items():
                command = name.removeprefix("cmdstat_")
                totals[command] = totals.get(command, 0.0) + float(stats["usec"])
        return totals

    def queued(self) -> float:
        """Returns the seconds Redis' main threads waited for a CPU (0.0 if not on this machine)."""
        return sum(runqueue_wait_seconds(pid, pid) for pid in self.pids)


def _between(first: Reading, last: Reading) -> dict[str, Any]:
    """Returns the figures of the interval between two readings: logged-in events/s, CPU per event
    (process, loop thread by stage, Redis), batch sizes and what the machine was doing."""
    seconds = max(last.at - first.at, 1e-9)
    applied = _total(last, "churn_events_consumed_total", outcome="ok") - _total(
        first, "churn_events_consumed_total", outcome="ok"
    )
    messages = _consumed(last) - _consumed(first)
    per_event = 1e6 / applied if applied else math.nan
    scored = _total(last, "churn_users_scored_total") - _total(first, "churn_users_scored_total")
    stages = {
        stage: (_total(last, STAGE_CPU, stage=stage) - _total(first, STAGE_CPU, stage=stage)) * per_event
        for stage in SCORER_STAGES
    }
    batches = _total(last, "churn_batch_events_count") - _total(first, "churn_batch_events_count")
    batch_messages = _total(last, "churn_batch_events_sum") - _total(first, "churn_batch_events_sum")
    loop_us = (last.loop_cpu - first.loop_cpu) * per_event
    process_us = (last.process_cpu - first.process_cpu) * per_event
    redis_us = (last.redis_cpu - first.redis_cpu) * per_event
    by_command = {
        command: (usec - first.redis_commands.get(command, 0.0)) / applied if applied else math.nan
        for command, usec in last.redis_commands.items()
    }
    return {
        "seconds": round(seconds, 2),
        "messages": messages,
        "logged_in_events": round(applied),
        "events_per_second": round(applied / seconds),
        "batches": round(batches),
        "mean_batch_messages": round(batch_messages / batches, 1) if batches else None,
        # Risk rows written per applied event: each touched user's row, score and state are paid
        # once per batch, so this is what makes a small batch cost more per event.
        "users_scored_per_event": round(scored / applied, 5) if applied else None,
        "cpu_us_per_event": {
            "scorer_process": round(process_us, 2),
            "scorer_loop_thread": round(loop_us, 2),
            "scorer_other_threads": round(process_us - loop_us, 2),
            "redis_server": round(redis_us, 2),
            "redis_replicas": round((last.redis_replica_cpu - first.redis_replica_cpu) * per_event, 2),
            # Where Redis' time goes, by command (wall time: see `RedisProbe.command_usec`).
            "redis_commands": {
                command: round(us, 2)
                for command, us in sorted(by_command.items(), key=lambda item: -item[1])
                if us >= 0.05
            },
            "loop_thread_by_stage": {stage: round(us, 2) for stage, us in stages.items()},
            "stages_cover_share_of_loop_thread": round(sum(stages.values()) / loop_us, 3) if loop_us else None,
        },
        "machine_cores_busy": round((last.machine_busy - first.machine_busy) / seconds, 2),
        "loop_threads_waited_for_cpu_seconds": round(last.loop_queued - first.loop_queued, 2),
        "redis_waited_for_cpu_seconds": round(last.redis_queued - first.redis_queued, 2),
        "scorer_cores_busy": round((last.process_cpu - first.process_cpu) / seconds, 2),
    }


def _owned(scorer: ScorerProcess) -> set[int]:
    """Returns the partitions a scorer owns now, from its `assigned`/`revoked` log lines
    (cooperative rebalancing: each line adds or removes some)."""
    owned: set[int] = set()
    for line in scorer.log_lines(" stream.consumer "):
        for verb in ("assigned", "revoked"):
            if f" {verb} [" in line:
                listed = {int(p) for p in line.rsplit("[", 1)[1].rstrip("]").split(",") if p.strip()}
                owned = owned | listed if verb == "assigned" else owned - listed
    return owned


def _drain(
    deployment: Deployment, processes: int, lines: list[bytes], timeout_s: float, redis_cpu: RedisProbe
) -> dict[str, Any]:
    """Starts `processes` scorers on the deployment's (empty) topic and waits until the group has
    settled (each owns partitions, every partition owned once: a late starter would otherwise
    find the work done), then publishes `lines` at full speed. Timed from the reading taken when
    the last message is published (a backlog every scorer works on) to the first reading that
    shows every message consumed and every scorer's stage CPU of it (from the start of publishing
    instead if the scorers had already done half of it by then: tiny runs); returns `_between` of
    those two readings."""
    scorers = deployment.start_scorers(processes, idle_exit_s=120)
    partitions = deployment.settings.topic_partitions
    try:
        for scorer in scorers:
            scorer.wait_ready(READY_TIMEOUT_S)

        def settled() -> bool:
            owned = [_owned(scorer) for scorer in scorers]
            return all(owned) and sum(map(len, owned)) == partitions == len(set().union(*owned))

        wait_for(settled, READY_TIMEOUT_S, f"{processes} scorer(s) to share {partitions} partitions", 0.5)
        before = _read(scorers, redis_cpu)
        publish_lines(deployment.settings, lines)
        first = _read(scorers, redis_cpu)
        timed_from = "end of publishing"
        if _consumed(first) > len(lines) // 2:  # tiny runs: the scorers kept up with the producer
            first, timed_from = before, "start of publishing"

        def done() -> bool:
            for scorer in scorers:
                if scorer.proc.poll() is not None:
                    msg = f"`churn consume` exited early: {scorer.tail()}"
                    raise RuntimeError(msg)
            return _consumed(_read(scorers, redis_cpu)) >= len(lines)

        wait_for(done, timeout_s, f"{len(lines)} messages consumed by {processes} scorer(s)", SAMPLE_EVERY_S)
        last = _flushed_reading(scorers, redis_cpu, timeout_s)
    finally:
        for scorer in scorers:
            scorer.stop()
    return {
        "processes": processes,
        "timed_from": timed_from,
        "messages_consumed_before_timing": _consumed(first),
        **_between(first, last),
    }


def _loads(
    deployment: Deployment,
    capacity: float,
    sizes: Sizes,
    users: int,
    redis_cpu: RedisProbe,
) -> list[dict[str, Any]]:
    """One scorer (the live settings) on a fresh topic: a warm-up, then `load_seconds` of events
    at each of `LOADS` x `capacity` events/s in turn; returns each load's freshness (every
    applied event, from the scorer's histogram) and its batch sizes and CPU."""
    rates = [max(1, round(share * capacity / LOGGED_IN_SHARE)) for share in LOADS]  # messages/s
    warmup = 2000
    counts = [round(rate * sizes.load_seconds) for rate in rates]
    lines = make_events(warmup + sum(counts), users=users, seed=13)  # one stream: event time keeps rising
    scorer = deployment.start_scorers(1, idle_exit_s=120)[0]
    out = []
    try:
        scorer.wait_ready(READY_TIMEOUT_S)
        publish_lines(deployment.settings, lines[:warmup])
        scorer.wait_consumed(warmup, sizes.timeout_s)
        _flushed_reading([scorer], redis_cpu, sizes.timeout_s)  # each load starts between loop turns
        start = warmup
        for share, rate, count in zip(LOADS, rates, counts, strict=True):
            before = _read([scorer], redis_cpu)
            report = publish_lines(deployment.settings, lines[start : start + count], pacing=Pacing(rate=rate))
            start += count
            scorer.wait_consumed(start, sizes.timeout_s)
            after = _flushed_reading([scorer], redis_cpu, sizes.timeout_s)
            figures = freshness_figures(
                histogram_buckets(before.samples[0], FRESHNESS), histogram_buckets(after.samples[0], FRESHNESS)
            )
            interval = _between(before, after)
            out.append(
                {
                    "share_of_capacity": share,
                    "target_events_per_second": round(share * capacity),
                    "produce_messages_per_second": rate,
                    "achieved_produce_messages_per_second": round(report.events_per_second),
                    "logged_in_events": interval["logged_in_events"],
                    "freshness": figures,
                    "mean_batch_messages": interval["mean_batch_messages"],
                    "users_scored_per_event": interval["users_scored_per_event"],
                    "scorer_cores_busy": interval["scorer_cores_busy"],
                    "loop_thread_cpu_us_per_event": interval["cpu_us_per_event"]["scorer_loop_thread"],
                    # Where a live batch's time goes: smaller batches pay each touched user's
                    # row, Feast write, score and state for fewer events.
                    "loop_thread_by_stage": interval["cpu_us_per_event"]["loop_thread_by_stage"],
                    "redis_server_cpu_us_per_event": interval["cpu_us_per_event"]["redis_server"],
                    "redis_commands_us_per_event": interval["cpu_us_per_event"]["redis_commands"],
                    "stages_cover_share_of_loop_thread": interval["cpu_us_per_event"][
                        "stages_cover_share_of_loop_thread"
                    ],
                    "batches": interval["batches"],
                    "machine_cores_busy": interval["machine_cores_busy"],
                }
            )
    finally:
        scorer.stop()
    return out


def _probe_batch(deployment: Deployment, rate: float, sizes: Sizes, users: int, timeout_s: float) -> dict[str, Any]:
    """Paces `rate` logged-in events/s at one live scorer for `probe_seconds`; returns the mean
    batch (messages) the live loop took."""
    messages_rate = max(1, round(rate / LOGGED_IN_SHARE))
    lines = make_events(1000 + round(messages_rate * sizes.probe_seconds), users=users, seed=19)
    scorer = deployment.start_scorers(1, idle_exit_s=60)[0]
    try:
        scorer.wait_ready(READY_TIMEOUT_S)
        publish_lines(deployment.settings, lines[:1000])
        before = scorer.wait_consumed(1000, timeout_s)
        publish_lines(deployment.settings, lines[1000:], pacing=Pacing(rate=messages_rate))
        after = scorer.wait_consumed(len(lines), timeout_s)
    finally:
        scorer.stop()

    def delta(name: str) -> float:
        return sum(v for (n, _), v in after.items() if n == name) - sum(v for (n, _), v in before.items() if n == name)

    batches = delta("churn_batch_events_count")
    return {
        "target_events_per_second": round(rate),
        "seconds": sizes.probe_seconds,
        "batches": round(batches),
        "mean_batch_messages": round(delta("churn_batch_events_sum") / batches, 1) if batches else None,
    }


# --- what a stored user and a Kafka event cost -----------------------------------------------


def _memory_per_user(
    settings: Settings, deployment: Deployment, redis: RedisProbe, used_before: int, sample: int = 500
) -> dict[str, Any]:
    """Returns Redis bytes per user of one drained deployment: `INFO used_memory` growth (a
    cluster's masters together) over the users it stored, and `MEMORY USAGE` of a sample of each
    kind of key."""
    client = redis_client(settings)
    prefix = deployment.settings.redis_prefix
    project = deployment.settings.feast_project.encode()
    states = [k for _, k in zip(range(sample), client.scan_iter(f"{prefix}state:*", count=1000), strict=False)]
    risks = [k for _, k in zip(range(sample), client.scan_iter(f"{prefix}risk:*", count=1000), strict=False)]
    feast = [k for _, k in zip(range(sample), client.scan_iter(b"*" + project, count=1000), strict=False)]
    users = sum(1 for _ in client.scan_iter(f"{prefix}state:*", count=5000))
    used_after = redis.used_memory()

    def mean_usage(keys: list[Any]) -> int | None:
        if not keys:
            return None
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
        return round(sum(int(v or 0) for v in pipe.execute()) / len(keys))

    per_key = {"state": mean_usage(states), "feast_row": mean_usage(feast), "risk_row": mean_usage(risks)}
    return {
        "users_stored": users,
        "used_memory_growth_per_user_bytes": round((used_after - used_before) / users) if users else None,
        "memory_usage_per_key_bytes": per_key,
        "sum_of_keys_bytes": sum(v for v in per_key.values() if v is not None),
    }


def _kafka_bytes(settings: Settings, topic: str, lines: list[bytes]) -> dict[str, Any]:
    """Returns bytes per message: JSON value and key as produced, and the broker's log segments
    on disk (lz4 batches, replication factor 1) when the broker is the local one."""
    data = settings.state_dir / "kafka" / "data"
    on_disk = sum(f.stat().st_size for f in data.glob(f"{topic}-*/*.log")) if data.is_dir() else 0
    keys = sum(len(line.split(b'"userId":"', 1)[1].split(b'"', 1)[0]) for line in lines[:10_000])
    return {
        "value_bytes": round(sum(map(len, lines)) / len(lines), 1),
        "key_bytes": round(keys / min(len(lines), 10_000), 1),
        "log_bytes_on_disk_per_message": round(on_disk / len(lines), 1) if on_disk else None,
        "compression": "lz4 (the producer's)",
    }


def instrumentation_cost(batches: int = 20_000) -> dict[str, Any]:
    """Returns what `StageCpu` costs per batch, measured here: one loop batch marks every stage
    once and flushes every stage's counter once (the most it ever does)."""
    counter = Counter("bench_stage_cpu_seconds", "bench", ["stage"], registry=CollectorRegistry())
    cpu = StageCpu(counter)

    def batch() -> None:
        for stage in SCORER_STAGES:
            cpu.mark(stage)
        cpu.flush()

    batch()
    seconds = min(timeit.repeat(batch, number=batches, repeat=3)) / batches
    return {"us_per_batch": round(seconds * 1e6, 2), "clock_reads_and_increments_per_batch": len(SCORER_STAGES)}


# --- peer ------------------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools" / "bin" / "uv"  # the Makefile installs it
QUIX_STREAMS = "quixstreams==3.28.1"  # the peer's version (pinned: figures compare across runs)


def _quix_peer(
    settings: Settings, topic: str, group: str, messages: int, folder: Path, idle_s: float
) -> dict[str, Any]:
    """Runs `bench.quix_peer` as its own process on `topic`, in an environment of its own
    (`uv run --isolated --with quixstreams`: Quix Streams pins confluent-kafka < 2.13, older than
    the project's, so it must not share the project's lock); returns its JSON figures.

    Raises:
        RuntimeError: the peer failed, or stopped before its last message was checkpointed.
    """
    done = subprocess.run(
        [
            str(UV), "run", "--isolated", "--no-project", "--python", sys.executable,
            "--with", QUIX_STREAMS, "--with", "orjson",
            "python", "-m", "bench.quix_peer", "--broker", settings.bootstrap_servers, "--topic", topic,
            "--group", group, "--count", str(messages), "--state-dir", str(folder / "quix-state"),
            "--idle", str(idle_s),
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=idle_s * 10 + 900,  # the first run also installs Quix Streams into uv's cache
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        msg = f"the Quix Streams peer failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
        raise RuntimeError(msg)
    figures: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    if not figures["complete"]:
        msg = f"the Quix Streams peer stopped short (idle {idle_s:.0f} s, or no checkpoint after the last): {figures}"
        raise RuntimeError(msg)
    return figures


def _services(settings: Settings, redis: RedisProbe) -> dict[str, Any]:
    """Returns what the run ran on: Kafka brokers, and one Redis server or a cluster's masters
    and replicas (whose CPU the figures sum: `redis_server` is the masters', `redis_replicas`
    the replicas')."""
    brokers = AdminClient(kafka_config(settings)).list_topics(timeout=10).brokers
    return {
        "kafka_brokers": len(brokers),
        "redis": "cluster" if settings.redis_cluster else "one server",
        "redis_masters": len(redis.masters),
        "redis_replicas": len(redis.replicas),
    }


def _quix_topics(settings: Settings, group: str) -> list[str]:
    """Returns the topics Quix Streams created for `group` (its changelogs)."""
    admin = AdminClient(kafka_config(settings))
    return [name for name in admin.list_topics(timeout=10).topics if group in name]


# --- the run -------------------------------------------------------------------------------


def bench_stream(settings: Settings, sizes: Sizes | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every phase of the module doc on the configured broker and Redis; `say` gets one
    progress line per phase.

    Returns:
        JSON-ready figures: each phase, the ratios the goals are judged on, and the machine.

    Raises:
        ServiceUnavailableError: Kafka, Redis or MLflow cannot be reached, or a scorer failed.
        RuntimeError: a scorer or the peer exited early.
    """
    sizes = sizes or Sizes()
    run = uuid.uuid4().hex[:10]
    partitions = settings.topic_partitions
    topic, probe_topic, live_topic = f"bench-stream-{run}", f"bench-probe-{run}", f"bench-live-{run}"
    topics = [name for t in (topic, probe_topic, live_topic) for name in (t, f"{t}.dlq")]
    machine_before = machine()
    redis_cpu = RedisProbe(settings)
    services = _services(settings, redis_cpu)
    with tempfile.TemporaryDirectory(prefix=f"bs-{run}-", dir=settings.state_dir.resolve()) as folder:
        scratch = Path(folder)
        mlflow_uri = f"sqlite:///{scratch / 'mlflow.db'}"
        deployments: list[Deployment] = []
        logs = settings.state_dir / "bench-stream-logs" / run
        logs.mkdir(parents=True, exist_ok=True)

        def deploy(on: str, name: str, **extra: Any) -> Deployment:
            if on not in topics:
                topics.extend((on, f"{on}.dlq"))
            deployment = _deployment(settings, scratch, logs, on, f"{run}-{name}", mlflow_uri, **extra)
            deployments.append(deployment)
            return deployment

        feast = None
        quix_group = f"bench-quix-{run}"
        try:
            began = time.perf_counter()
            main = deploy(topic, "main")
            say("training the bench champion and applying the Feast repo")
            trained = train_small_champion(main.settings, scratch)
            if not trained.promoted:
                msg = f"the bench model was not promoted: {trained.reasons}"
                raise ServiceUnavailableError(msg)
            feast = apply_repo(main.settings)
            setup_s = time.perf_counter() - began

            say(f"producing {sizes.events:,} events over {sizes.users:,} users")
            lines = make_events(sizes.events, users=sizes.users, seed=11)
            guests = sum(1 for line in lines if b'"userId":""' in line)
            produced = publish_lines(main.settings, lines)
            kafka = _kafka_bytes(settings, topic, lines)

            catch_up = []
            memory: dict[str, Any] = {}
            for n in sizes.processes:
                say(f"catch-up: {n} scorer process(es) drain a backlog of the same events")
                deployment = deploy(f"bench-drain{n}-{run}", f"p{n}")
                used_before = redis_cpu.used_memory()
                catch_up.append(_drain(deployment, n, lines, sizes.timeout_s, redis_cpu))
                say(orjson.dumps(catch_up[-1]).decode())
                if n == 1:
                    memory = _memory_per_user(settings, deployment, redis_cpu, used_before)
            one = catch_up[0]

            say("bound: consume + JSON decode only")
            bound = consume_and_decode(main.settings, f"bench-bound-{run}", sizes.events, sizes.timeout_s)
            say(orjson.dumps(bound).decode())

            say(f"peer: Quix Streams over {sizes.peer_events:,} messages")
            peer = _quix_peer(settings, topic, quix_group, sizes.peer_events, scratch, idle_s=60)
            say(orjson.dumps(peer).decode())

            say(f"naive baseline: {sizes.naive_warmup:,} warm-up + {sizes.naive_events:,} events")
            naive = _naive(deploy(topic, "naive"), sizes)
            say(orjson.dumps(naive).decode())

            say(f"live probe at 50% of the catch-up rate ({one['events_per_second'] // 2:,} events/s)")
            probe = _probe_batch(
                deploy(probe_topic, "probe"), one["events_per_second"] / 2, sizes, sizes.users, sizes.timeout_s
            )
            say(orjson.dumps(probe).decode())
            live_batch = max(1, round(probe["mean_batch_messages"] or 1))
            # The capacity from one partition (batches in time order, as live ones); for comparison,
            # the same bound on a backlog of the usual partitions (read in runs per partition).
            drains: dict[int, dict[str, Any]] = {}
            for count in dict.fromkeys((1, partitions)):
                say(f"drain with batches of at most {live_batch} messages (the live loop's), {count} partition(s)")
                drains[count] = _drain(
                    deploy(
                        f"bench-cap{count}-{run}", f"cap{count}", max_batch_events=live_batch, topic_partitions=count
                    ),
                    1,
                    lines[: sizes.capacity_events],
                    sizes.timeout_s,
                    redis_cpu,
                )
                say(orjson.dumps(drains[count]).decode())
            capacity, backlog = drains[1], drains[partitions]
            say(f"freshness at 25/50/75% of {capacity['events_per_second']:,} events/s")
            loads = _loads(deploy(live_topic, "loads"), capacity["events_per_second"], sizes, sizes.users, redis_cpu)
        finally:
            if feast is not None:
                feast.teardown()
            delete_topics(settings, topics + _quix_topics(settings, quix_group))
            deleted = sum(delete_prefix(settings, d.settings.redis_prefix) for d in deployments)

    cost = instrumentation_cost()
    return report(
        sizes=sizes,
        produced=produced.sent,
        guests=guests,
        version=str(trained.version),
        setup_s=setup_s,
        catch_up=catch_up,
        memory=memory,
        kafka=kafka,
        bound=bound,
        peer=peer,
        naive=naive,
        probe=probe,
        capacity=capacity,
        backlog=backlog,
        loads=loads,
        cost=cost,
        settings=settings,
        machine_before=machine_before,
        services=services,
        deleted=deleted,
        logs=logs,
    )


def _naive(deployment: Deployment, sizes: Sizes) -> dict[str, Any]:
    settings = deployment.settings
    found = load_champion(settings)
    if found is None:
        msg = "no champion for the naive baseline"
        raise ServiceUnavailableError(msg)
    model, version = found
    client = redis_client(settings)
    layout = state_layout(settings.allowed_lateness_seconds * 1000)
    return naive_consume(
        settings,
        FeastFeatureStore(open_feature_store(settings)),
        RedisStateStore(client, settings.redis_prefix, layout),
        RedisRiskStore(client, settings.redis_prefix),
        model,
        version,
        events=sizes.naive_events,
        warmup=sizes.naive_warmup,
        timeout_s=sizes.timeout_s,
    )
