"""The one place a Kafka client's connection settings are decided (bootstrap servers now; a
client's security settings belong here too), for every producer, consumer and admin client."""

from __future__ import annotations

from typing import Any

from core.settings import Settings


def kafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Returns a confluent-kafka client config for the settings' cluster, with `extra` (dots in
    librdkafka's names are written as `extra={"linger.ms": 5}` or with `**{...}`)."""
    return {"bootstrap.servers": settings.bootstrap_servers, **extra}
