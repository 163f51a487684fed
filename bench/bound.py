"""The stream benchmark's bound: one process that only consumes the topic with confluent-kafka
(the scorer's `consume` call and tuning) and decodes each JSON value, nothing else. No
Python consumer of this topic can be faster on this machine, so the scorer's share of it says
how much of the possible rate its work leaves."""

from __future__ import annotations

import resource
import time
from typing import Any

import orjson

from core.settings import Settings
from stream.kafka import committing_consumer


def consume_and_decode(settings: Settings, group: str, messages: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """Reads `messages` messages of `settings.events_topic` from the start in `group`, in
    batches of up to `settings.max_batch_events` (`Consumer.consume`), `orjson.loads` on each
    value; timed from the first message to the last. Counts logged-in events (non-empty
    `userId`) apart, so its rate compares with the scorer's.

    Returns:
        Messages/s, logged-in events/s and CPU microseconds per message of this process.

    Raises:
        KafkaException: the broker cannot be reached.
    """
    consumer = committing_consumer(settings, group, {"fetch.min.bytes": 1, "queued.max.messages.kbytes": 65536})
    consumer.subscribe([settings.events_topic])
    seen = logged_in = 0
    started = cpu_started = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < messages and time.monotonic() < deadline:
            batch = consumer.consume(settings.max_batch_events, 0.5)
            if not batch:
                continue
            if not seen:
                started, cpu_started = time.perf_counter(), _cpu()
            for message in batch:
                if message.error() is None:
                    value = orjson.loads(message.value() or b"null")
                    logged_in += bool(value.get("userId"))
                    seen += 1
        elapsed, cpu = time.perf_counter() - started, _cpu() - cpu_started
    finally:
        consumer.close()
    return {
        "messages": seen,
        "logged_in_events": logged_in,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(seen / elapsed) if elapsed else 0,
        "events_per_second": round(logged_in / elapsed) if elapsed else 0,
        "cpu_us_per_message": round(1e6 * cpu / seen, 2) if seen else None,
        "complete": seen >= messages,
        "timed": "Consumer.consume + orjson.loads of every value, first message to last",
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
