"""The one place a Kafka client's connection settings are decided (bootstrap servers and
security: TLS, SASL/SCRAM), for every producer, consumer and admin client."""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError
from core.settings import Settings


def kafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Returns a confluent-kafka client config for the settings' cluster and security
    (`CHURN_KAFKA_SECURITY_PROTOCOL`, `CHURN_KAFKA_SASL_*`, `CHURN_KAFKA_SSL_CA_LOCATION`), with
    `extra` (dots in librdkafka's names are written as `extra={"linger.ms": 5}` or with `**{...}`).

    Raises:
        ConfigError: a SASL protocol is set without a username or password.
    """
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers}
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        config["security.protocol"] = protocol
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password.get_secret_value()
        if not settings.kafka_sasl_username or not password:
            msg = f"CHURN_KAFKA_SECURITY_PROTOCOL={protocol} needs CHURN_KAFKA_SASL_USERNAME and _PASSWORD"
            raise ConfigError(msg)
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = password
    if protocol.endswith("SSL") and settings.kafka_ssl_ca_location is not None:
        config["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    return {**config, **extra}
