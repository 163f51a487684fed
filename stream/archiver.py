"""`churn archive`: a second consumer group writing the event log as Parquet, by event date.

Layout: `<root>/date=YYYY-MM-DD/p<partition>-<first offset>-<last offset>.parquet`, wire
(camelCase) columns plus `kafkaPartition`/`kafkaOffset`. Exactly once after crashes: each
file appears atomically (temp name, then rename) and offsets are committed after the files.
A crash between the two leaves files whose offsets Kafka will deliver again; on assignment
the archiver reads the offsets already archived at or after the committed position (file
names tell which files can hold them) and skips those messages. It keeps the events the scorer
applies, judged by the scorer's own `parse_message`: guests and what the scorer dead-letters
(invalid, dated more than `CHURN_MAX_FUTURE_SKEW_SECONDS` after the Kafka append time, keyed by
another user, or not keyed unless `CHURN_REQUIRE_EVENT_KEY=false`) are left out. While the
group's coordinator does not answer for the committed positions, it asks again until it does or
a stop comes, and after a stop it archives nothing it is unsure of.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
from confluent_kafka import Consumer, KafkaException, TopicPartition

from core.durable import fsync_path
from core.settings import Settings
from events.schema import Event, parse_message
from monitoring.metrics import Metrics
from stream.kafka import commit_unless_stopped, committing_consumer, report_lag
from stream.topics import keyless_events_warning

log = logging.getLogger(__name__)

# How long one request for the committed offsets may wait for the coordinator, and the pause
# between tries: a stop signal during the lookup is heeded within their sum.
COMMITTED_TRY_S = 1.0
COMMITTED_RETRY_PAUSE_S = 0.25
_FILE = re.compile(r"p(\d+)-(\d+)-(\d+)\.parquet$")


def archived_since(root: Path, partition: int, committed: int) -> set[int]:
    """Returns the offsets >= `committed` of `partition` already archived under `root`."""
    found: set[int] = set()
    for path in root.glob(f"date=*/p{partition}-*.parquet"):
        match = _FILE.search(path.name)
        if match and int(match.group(3)) >= committed:
            offsets = pl.read_parquet(path, columns=["kafkaOffset"])["kafkaOffset"]
            found.update(o for o in offsets.to_list() if o >= committed)
    return found


def write_batch(root: Path, rows: list[tuple[int, int, Event]]) -> tuple[int, int]:
    """Writes (partition, offset, event) rows as one file per (date, partition), each fsynced
    and renamed into place with its folder fsynced (and a new folder's parent), so a power loss
    after the caller commits the offsets cannot lose or truncate a file; returns (files, bytes)
    written."""
    groups: dict[tuple[str, int], list[tuple[int, Event]]] = defaultdict(list)
    for partition, offset, event in rows:
        day = datetime.fromtimestamp(event.ts / 1000, tz=UTC).strftime("%Y-%m-%d")
        groups[(day, partition)].append((offset, event))
    written = 0
    for (day, partition), items in groups.items():
        folder = root / f"date={day}"
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_path(root)  # the new folder's entry
        offsets = [o for o, _ in items]
        frame = pl.DataFrame(
            [{**msgspec.to_builtins(e), "kafkaPartition": partition, "kafkaOffset": o} for o, e in items],
            schema_overrides={"registration": pl.Float64, "length": pl.Float64, "status": pl.Int64},
            infer_schema_length=None,
        )
        final = folder / f"p{partition}-{min(offsets)}-{max(offsets)}.parquet"
        temp = final.with_suffix(".tmp")
        frame.write_parquet(temp)
        fsync_path(temp)  # the data, before the name points at it
        written += temp.stat().st_size
        temp.rename(final)
        fsync_path(folder)  # the rename
    return len(groups), written


class Archiver:
    """Consumes the events topic in its own group and appends valid events to the Parquet log."""

    def __init__(
        self,
        settings: Settings,
        root: Path,
        extra_config: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
        lag_every_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.root = root
        self.metrics = metrics or Metrics()
        self.lag_every_s = lag_every_s
        self.stopping = threading.Event()
        self.consumer = committing_consumer(settings, settings.archiver_group, extra_config)
        self.skipped = 0
        self.commit_abandoned = False
        self.already_archived: dict[int, set[int]] = {}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Loads, for each newly assigned partition, the offsets already archived at or after its
        committed offset (none committed: from offset 0).

        The committed offsets come from the group's coordinator, which a broker outage during the
        rebalance can leave unanswered. Then this logs a warning and asks again, each try lasting
        at most `COMMITTED_TRY_S`, until the coordinator answers or a stop signal comes (invariant
        11: a dependency's failure is retried, never fatal). After a stop the partitions'
        archived offsets stay unknown, and `run` ends before archiving any message.
        """
        if (warning := keyless_events_warning(self.settings, [p.partition for p in partitions])) is not None:
            log.warning(warning)
        tries = 0
        while not self.stopping.is_set():
            try:
                committed = consumer.committed(partitions, timeout=COMMITTED_TRY_S)
            except KafkaException as exc:
                tries += 1
                log.warning("committed offsets unavailable (try %d), asking again: %s", tries, exc)
                self.stopping.wait(COMMITTED_RETRY_PAUSE_S)
                continue
            for tp in committed:
                start = tp.offset if tp.offset >= 0 else 0
                self.already_archived[tp.partition] = archived_since(self.root, tp.partition, start)
            return

    def run(self, *, max_batch: int = 20_000, max_idle_s: float | None = None) -> None:
        """Archives until stopped (or `max_idle_s` without messages)."""
        self.root.mkdir(parents=True, exist_ok=True)
        skew_ms = self.settings.max_future_skew_seconds * 1000
        self.consumer.subscribe([self.settings.events_topic], on_assign=self._on_assign)
        last_message = last_lag = time.monotonic()
        try:
            while not self.stopping.is_set():
                messages = [m for m in self.consumer.consume(max_batch, 0.5) if m.error() is None]
                if self.stopping.is_set():  # `_on_assign` may have given up: archive nothing unsure
                    break
                if time.monotonic() - last_lag > self.lag_every_s:
                    report_lag(self.consumer, self.metrics.archiver_lag)
                    last_lag = time.monotonic()
                if not messages:
                    if max_idle_s is not None and not self.consumer.assignment():
                        last_message = time.monotonic()  # the idle clock runs only while partitions are assigned
                    elif max_idle_s is not None and time.monotonic() - last_message > max_idle_s:
                        break
                    continue
                last_message = time.monotonic()
                rows = []
                for m in messages:
                    partition, offset = m.partition() or 0, m.offset() or 0
                    if offset in self.already_archived.get(partition, ()):
                        continue
                    event = parse_message(
                        m.value() or b"", m.timestamp()[1], m.key(),
                        max_bytes=self.settings.max_event_bytes, max_future_skew_ms=skew_ms,
                        key_required=self.settings.require_event_key,
                    )  # fmt: skip
                    if isinstance(event, Event):
                        rows.append((partition, offset, event))
                    else:
                        # Guests and what the scorer dead-letters (invalid, dated too far ahead
                        # of its append time, keyed by another user or not keyed). The log holds
                        # what the scorer applies (training and `churn materialize` read it): one
                        # event dated in 2099 made training take every point's label window as ended.
                        self.skipped += 1
                files, size = write_batch(self.root, rows)
                self.metrics.archiver_files_total.inc(files)
                self.metrics.archiver_bytes_total.inc(size)
                self.metrics.archiver_events_total.inc(len(rows))
                ends: dict[int, int] = {}
                for m in messages:
                    partition, offset = m.partition() or 0, m.offset() or 0
                    ends[partition] = max(ends.get(partition, -1), offset)
                offsets = [TopicPartition(self.settings.events_topic, p, o + 1) for p, o in ends.items()]
                if not self._commit(offsets):
                    return
        finally:
            if not self.commit_abandoned:  # closing under the abandoned commit would be unsafe
                self.consumer.close()

    def _commit(self, offsets: list[TopicPartition]) -> bool:
        """Commits a batch's offsets; returns False when a stop signal came while the commit
        waited for a broker (the commit is abandoned). A refused commit is logged and counted, and
        the archiver goes on: the next batch's commit covers these offsets, and a crash before it
        replays files that `archived_since` skips."""
        try:
            if not commit_unless_stopped(self.consumer, offsets, self.stopping):
                self.commit_abandoned = True
                log.warning("stopped while the offset commit waited for Kafka: the batch's files are written")
                return False
        except KafkaException as exc:
            self.metrics.archiver_commit_failures_total.inc()
            log.warning("offset commit refused, the next batch's commit covers it: %s", exc)
            return True
        self.metrics.archiver_last_commit.set(time.time())
        return True
