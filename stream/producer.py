"""Publishes raw event lines (a replay file or any iterable of JSON bytes) to the events topic.

The producer is a fast pipe, not a validator: it reads only `userId` (the partition key) from
each line and forwards the original bytes; full validation and dead-lettering happen in the
consumer, which knows the partition and offset the DLQ contract asks for. Decisions:

- Malformed lines (not a JSON object, or larger than `max_event_bytes`) are counted and
  reported with their line numbers, never published and never sent to the DLQ: the file is
  already their durable record, and the DLQ holds Kafka messages (topic/partition/offset).
- Guests (empty or missing `userId`) are published with no key (null), so the partitioner
  spreads them; the consumer skips and counts them, so their order does not matter.
- Keys are hashed with murmur2 (the Java client's partitioner), so a user lands on the same
  partition whichever client produced the event.
- The Kafka timestamp stays the produce time: replayed event times are years old and would
  make time-based retention delete the segments at once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.errors import InvalidInputError, ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from stream.pacing import Pacer, Pacing
from stream.topics import ensure_topics

# Measured with `churn bench produce` (2 cores, broker on the same machine): lingering lets
# librdkafka build ~1 MB batches; only failed deliveries come back to Python; a queue of 1M
# messages keeps the tight loop from blocking while the broker catches up.
PRODUCER_TUNING: Final[dict[str, object]] = {
    "enable.idempotence": True,
    # Idempotence implies it; said here because it is what makes a message acknowledged only once
    # the in-sync replicas have it (on the 3-broker cluster: at least `min.insync.replicas=2`).
    "acks": "all",
    "linger.ms": 25,
    "batch.size": 1_048_576,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 1_000_000,
    "compression.type": "lz4",
    "delivery.report.only.error": True,
    "partitioner": "murmur2_random",
    # Every message ends delivered or failed well within the flush timeout below.
    "message.timeout.ms": 60_000,
}
FLUSH_TIMEOUT_SECONDS: Final = 90.0
# After Ctrl-C or SIGTERM the flush waits at most this long: with the broker down it would wait
# out the message timeout (60 s), past `docker stop`'s 10 s grace, and gain nothing.
STOPPED_FLUSH_SECONDS: Final = 5.0
FLUSH_SLICE_SECONDS: Final = 0.25  # a flush is a blocking C call: a signal is handled between slices
MAX_REPORTED_LINES: Final = 1000  # line numbers kept per run; the counts stay exact beyond it
_POLL_EVERY: Final = 8192  # messages between polls for failed-delivery reports and progress


class _Head(msgspec.Struct):
    """The only field the hot path reads; msgspec skips (but still syntax-checks) the rest."""

    userId: str = ""  # noqa: N815 - the wire name


class _HeadWithTime(msgspec.Struct):
    userId: str = ""  # noqa: N815 - the wire name
    ts: int | None = None


_HEAD: Final = msgspec.json.Decoder(_Head)
_HEAD_WITH_TIME: Final = msgspec.json.Decoder(_HeadWithTime)


@dataclass
class ProduceReport:
    """What a run did. `sent` counts messages the broker acknowledged; `failed` those it did not
    (delivery errors by name in `failure_reasons`); `skipped` blank lines; `guests` the sent
    messages without a `userId`; `malformed_lines` holds (line number, reason), 1-based, for the
    first `MAX_REPORTED_LINES` malformed lines.
    """

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    malformed: int = 0
    guests: int = 0
    lines: int = 0
    elapsed_seconds: float = 0.0
    interrupted: bool = False
    malformed_lines: list[tuple[int, str]] = field(default_factory=list)
    failure_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def events_per_second(self) -> float:
        """Returns sent messages per second of wall time (0 before anything was sent)."""
        return self.sent / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def add_malformed(self, line_no: int, reason: str) -> None:
        """Counts one malformed line and keeps its number and reason while under the cap."""
        self.malformed += 1
        if len(self.malformed_lines) < MAX_REPORTED_LINES:
            self.malformed_lines.append((line_no, reason))


class _MalformedLineError(Exception):
    pass


def _slow_head(line: bytes) -> tuple[str | None, object]:
    """Returns (key, ts) of a line the fast decoder refused, or raises _MalformedLineError.

    The fast decoder refuses both broken JSON and valid objects with an odd `userId` type;
    the latter are published (keyed by their text) so the consumer dead-letters them.
    """
    try:
        obj = msgspec.json.decode(line)
    except (ValueError, RecursionError) as exc:  # msgspec.DecodeError and UnicodeDecodeError
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        msg = f"malformed JSON: {detail}"
        raise _MalformedLineError(msg) from exc
    if not isinstance(obj, dict):
        msg = f"expected a JSON object, got {type(obj).__name__}"
        raise _MalformedLineError(msg)
    user_id = obj.get("userId")
    key = str(user_id) if type(user_id) in (str, int) and user_id != "" else None
    return key, obj.get("ts")


def build_producer(settings: Settings, failures: Counter[str]) -> Producer:
    """Returns an idempotent producer tuned for throughput (`PRODUCER_TUNING`) that counts
    each failed delivery into `failures` by error name (served by `poll`/`flush`).
    """

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        # Only failures arrive here (`delivery.report.only.error`). One callback in the config
        # rather than one per message: measured 0.3-0.6 us less CPU per event.
        if err is not None:
            failures[err.name()] += 1

    return Producer(kafka_config(settings, **PRODUCER_TUNING, on_delivery=on_delivery))


def publish(
    producer: Producer,
    topic: str,
    lines: Iterable[bytes],
    report: ProduceReport,
    *,
    max_bytes: int = 64 * 1024,
    pacing: Pacing | None = None,
    progress: Callable[[ProduceReport], None] | None = None,
    progress_interval: float = 1.0,
    flush_timeout: float = FLUSH_TIMEOUT_SECONDS,
) -> ProduceReport:
    """Publishes each line's bytes to `topic`, keyed by its `userId`, then flushes.

    `producer` comes from `build_producer(settings, report.failure_reasons)`, so failed
    deliveries land in `report`. Lines may end in a newline (stripped); blank lines are
    skipped. `progress` is called with the running report about every `progress_interval`
    seconds and once at the end. Ctrl-C stops reading, waits up to `STOPPED_FLUSH_SECONDS`
    for what was queued (a second Ctrl-C ends that wait) and returns the report with
    `interrupted` set; what is unacknowledged then counts as failed.

    Returns:
        `report`, filled in; `sent + failed` equals the number of lines published.

    Raises:
        ServiceUnavailableError: the producer hit a fatal error (e.g. its idempotent
            session was fenced); what was queued is flushed first.
    """
    failures = report.failure_reasons
    pacer = Pacer(pacing) if pacing is not None and (pacing.rate or pacing.speedup) else None
    decode = (_HEAD_WITH_TIME if pacer is not None else _HEAD).decode
    produce, poll = producer.produce, producer.poll
    queued = guests = line_no = 0
    countdown = _POLL_EVERY
    started = last_progress = time.monotonic()
    fatal: KafkaException | None = None
    try:
        for line_no, raw in enumerate(lines, 1):
            line = raw.rstrip()  # returns `raw` itself when there is nothing to strip
            if not line:
                report.skipped += 1
                continue
            if len(line) > max_bytes:
                report.add_malformed(line_no, f"line of {len(line)} bytes exceeds the limit of {max_bytes}")
                continue
            ts: object = None
            try:
                head = decode(line)
                key: str | None = head.userId or None
                if pacer is not None:
                    ts = head.ts  # type: ignore[union-attr]
            except (ValueError, RecursionError):
                try:
                    key, ts = _slow_head(line)
                except _MalformedLineError as exc:
                    report.add_malformed(line_no, str(exc))
                    continue
            if key is None:
                guests += 1
            if pacer is not None:
                wait = pacer.delay(ts)
                if wait > 0.001:
                    _sleep_serving(producer, wait)
            try:
                produce(topic, line, key)
            except BufferError:
                _produce_when_room(producer, topic, line, key)
            except KafkaException as exc:
                if exc.args[0].fatal():
                    fatal = exc
                    break
                failures[exc.args[0].name()] += 1
            queued += 1
            countdown -= 1
            if countdown <= 0 or pacer is not None:
                countdown = _POLL_EVERY
                poll(0)
                now = time.monotonic()
                if progress is not None and now - last_progress >= progress_interval:
                    last_progress = now
                    _fill(report, queued, guests, line_no, now - started, len(producer))
                    progress(report)
    except KeyboardInterrupt:
        report.interrupted = True
    except BaseException:
        # The input failed mid-way (e.g. a truncated gzip file): deliver what was queued first.
        _flush(producer, flush_timeout)
        raise
    # Anything not acknowledged by now (broker gone past the timeout) counts as failed.
    undelivered, stopped = _flush(producer, STOPPED_FLUSH_SECONDS if report.interrupted else flush_timeout)
    report.interrupted = report.interrupted or stopped
    if undelivered:
        why = "not acknowledged when stopped" if report.interrupted else "not acknowledged before the flush timeout"
        failures[why] += undelivered
    _fill(report, queued, guests, line_no, time.monotonic() - started, 0)
    if progress is not None:
        progress(report)
    if fatal is not None:
        msg = f"the Kafka producer failed for good after {report.sent} events: {fatal.args[0].str()}"
        raise ServiceUnavailableError(msg) from fatal
    return report


def _flush(producer: Producer, timeout_s: float) -> tuple[int, bool]:
    """Waits up to `timeout_s` for the queued messages' acknowledgements, in short slices so that
    Ctrl-C or SIGTERM (KeyboardInterrupt) ends the wait; returns how many are unacknowledged and
    whether a stop ended the wait."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = int(producer.flush(max(0.0, min(deadline - time.monotonic(), FLUSH_SLICE_SECONDS))))
            if not left or time.monotonic() >= deadline:
                return left, False
    except KeyboardInterrupt:  # a (second) stop: what is queued is given up
        return len(producer), True


def _fill(report: ProduceReport, queued: int, guests: int, lines: int, elapsed: float, in_flight: int) -> None:
    report.failed = sum(report.failure_reasons.values())
    report.sent = max(queued - in_flight - report.failed, 0)
    report.guests, report.lines, report.elapsed_seconds = guests, lines, elapsed


def _sleep_serving(producer: Producer, seconds: float) -> None:
    """Waits `seconds` while serving delivery reports, in short steps so Ctrl-C is prompt."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        producer.poll(min(left, 0.1))


def _produce_when_room(producer: Producer, topic: str, line: bytes, key: str | None) -> None:
    """The local queue is full: serve delivery reports until the broker has taken enough."""
    while True:
        producer.poll(0.05)
        try:
            producer.produce(topic, line, key)
        except BufferError:
            continue
        return


def publish_lines(
    settings: Settings,
    lines: Iterable[bytes],
    *,
    pacing: Pacing | None = None,
    progress: Callable[[ProduceReport], None] | None = None,
) -> ProduceReport:
    """Creates the topics if missing, then publishes `lines` (raw JSON bytes, one event each)
    to `settings.events_topic` with a tuned idempotent producer. A simulator feeds this.

    Returns:
        The run's report (see `publish`).

    Raises:
        ServiceUnavailableError: Kafka cannot be reached, or the producer failed for good.
    """
    ensure_topics(settings)
    report = ProduceReport()
    return publish(
        build_producer(settings, report.failure_reasons),
        settings.events_topic,
        lines,
        report,
        max_bytes=settings.max_event_bytes,
        pacing=pacing,
        progress=progress,
    )


def replay_file(
    settings: Settings,
    path: Path,
    *,
    pacing: Pacing | None = None,
    progress: Callable[[ProduceReport], None] | None = None,
) -> ProduceReport:
    """Publishes a JSON Lines file (gzip-compressed if it starts with the gzip magic bytes).

    Returns:
        The run's report; line numbers in it are the file's, 1-based.

    Raises:
        InvalidInputError: the file cannot be opened or read (e.g. a truncated gzip stream).
        ServiceUnavailableError: Kafka cannot be reached, or the producer failed for good.
    """
    import gzip

    try:
        with path.open("rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        file = gzip.open(path, "rb") if gzipped else path.open("rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        msg = f"cannot open the replay file {path}: {exc.strerror or exc}"
        raise InvalidInputError(msg) from exc
    try:
        with file:
            return publish_lines(settings, file, pacing=pacing, progress=progress)
    except (OSError, EOFError) as exc:
        msg = f"cannot read the replay file {path}: {exc}"
        raise InvalidInputError(msg) from exc
