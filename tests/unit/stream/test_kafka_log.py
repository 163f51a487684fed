"""librdkafka's log through Python logging: a line that repeats passes once, then at most once
per interval with the count held back; a real consumer whose broker is down stays quiet."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Consumer

from core.kafka import kafka_config
from core.settings import Settings
from stream.kafka import committing_consumer
from stream.kafka_log import REPEATS, RepeatThrottle

REFUSED = (
    "[thrd:127.0.0.1:1/bootstrap]: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after {}ms in state CONNECT)"
)


def _record(level: int, facility: str, text: str) -> logging.LogRecord:
    """Returns a record as confluent-kafka logs a librdkafka line of client `rdkafka#consumer-1`."""
    return logging.LogRecord(
        "librdkafka", level, __file__, 0, "%s [%s] %s", (facility, "rdkafka#consumer-1", text), None
    )


def test_a_repeated_line_passes_once_per_interval_with_the_count_held_back() -> None:
    now = [0.0]
    throttle = RepeatThrottle(every_s=30.0, clock=lambda: now[0])
    passed = []
    for second in range(0, 95):
        now[0] = float(second)
        record = _record(logging.ERROR, "FAIL", REFUSED.format(second % 7))  # the timing differs, the line repeats
        if throttle.filter(record):
            passed.append((second, record.getMessage()))
    assert [second for second, _ in passed] == [0, 30, 60, 90]
    assert passed[0][1] == "FAIL [rdkafka#consumer-1] " + REFUSED.format(0)
    for _, line in passed[1:]:
        assert line.endswith("(and 29 like it in the 30 s before)")


def test_another_line_level_or_facility_is_not_a_repeat() -> None:
    throttle = RepeatThrottle(every_s=30.0, clock=lambda: 5.0)
    assert throttle.filter(_record(logging.ERROR, "FAIL", REFUSED.format(0)))
    assert throttle.filter(_record(logging.ERROR, "FAIL", "SASL authentication error: Authentication failed"))
    assert throttle.filter(_record(logging.WARNING, "FAIL", REFUSED.format(0)))
    assert throttle.filter(_record(logging.ERROR, "ERROR", REFUSED.format(0)))
    assert throttle.filter(_record(logging.ERROR, "FAIL", REFUSED.format(0).replace("127.0.0.1:1", "127.0.0.1:2")))
    assert not throttle.filter(_record(logging.ERROR, "FAIL", REFUSED.format(3)))


def _poll_for(consumer: Consumer, seconds: float) -> None:
    consumer.subscribe(["events"])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.consume(100, 0.1)
    consumer.close()


def test_a_consumer_whose_broker_is_down_logs_each_kind_of_line_once_and_nothing_to_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    down = Settings(kafka_bootstrap="127.0.0.1:1")  # nothing listens there
    REPEATS.forget()  # another test's consumer may have logged the same line within the interval
    # The same consumer without the logger: librdkafka writes each failed reconnect to stderr.
    _poll_for(Consumer(kafka_config(down, **{"group.id": "g"})), 2.0)
    unthrottled = capfd.readouterr().err.count("Connection refused")
    with caplog.at_level(logging.INFO, logger="librdkafka"):
        _poll_for(committing_consumer(down, "g"), 2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "librdkafka"]
    assert unthrottled >= 10  # what it replaces: about 20 a second
    assert sum("Connection refused" in line for line in lines) == 1, lines
    assert "Connection refused" not in capfd.readouterr().err
