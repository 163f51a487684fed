"""Consumers that commit their own offsets: the scorer, the archiver and the benchmark's naive
baseline share these settings."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer

from core.kafka import kafka_config
from core.settings import Settings

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
