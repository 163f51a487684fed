"""Consumers that commit their own offsets: the scorer, the archiver and the benchmark's naive
baseline share these settings."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException
from prometheus_client import Gauge

from core.kafka import kafka_config
from core.settings import Settings

log = logging.getLogger(__name__)
# A crashed member's partitions move to the others after this long (the broker's minimum is 6 s).
SESSION_TIMEOUT_MS = 10_000


def committing_consumer(settings: Settings, group: str, extra: dict[str, Any] | None = None) -> Consumer:
    """Returns a consumer in `group` that starts at the earliest offset when the group has none
    and never commits by itself (the caller commits after its writes); `extra` overrides."""
    return Consumer(
        kafka_config(
            settings,
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                **(extra or {}),
            },
        )
    )


def report_lag(consumer: Consumer, gauge: Gauge) -> None:
    """Sets `gauge` (labels topic, partition) to the lag of each partition assigned to `consumer`
    (high watermark minus position). Best-effort monitoring: never raises."""
    try:
        positions = consumer.position(consumer.assignment())
    except KafkaException:
        return
    for tp in positions:
        try:
            _, high = consumer.get_watermark_offsets(tp, timeout=1, cached=False)
        except KafkaException as exc:
            log.debug("no watermark for %s[%d]: %s", tp.topic, tp.partition, exc)
            continue
        lag = high - tp.offset if tp.offset >= 0 else high
        gauge.labels(tp.topic, str(tp.partition)).set(max(lag, 0))
