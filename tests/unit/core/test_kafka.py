"""Kafka client security comes from settings, through one function, for every client."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.kafka import kafka_config
from core.settings import load_settings
from tests.support import ROOT


def test_plaintext_by_default_and_extras_pass_through() -> None:
    config = kafka_config(load_settings(kafka_port=1234), **{"group.id": "g"})
    assert config.pop("group.id") == "g"
    assert list(config.values()) == ["127.0.0.1:1234"]  # only the bootstrap servers: no security keys


def test_sasl_scram_and_tls_settings_reach_the_client_config() -> None:
    settings = load_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="churn",
        kafka_sasl_password="s3cret",
        kafka_ssl_ca_location="/etc/ca.pem",
    )
    config = kafka_config(settings)
    assert config["security.protocol"] == "SASL_SSL"
    assert (config["sasl.mechanism"], config["sasl.username"], config["sasl.password"]) == (
        "SCRAM-SHA-256",
        "churn",
        "s3cret",
    )
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "s3cret" not in repr(settings)


def test_sasl_without_credentials_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="CHURN_KAFKA_SASL_USERNAME"):
        kafka_config(load_settings(kafka_security_protocol="SASL_PLAINTEXT"))


def test_no_client_config_is_built_anywhere_else() -> None:
    # Every producer, consumer and admin client (production, infra, tests, benchmarks) gets its
    # connection and security settings from `kafka_config`, so none can miss the credentials.
    key = '"bootstrap' + '.servers"'
    offenders = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if ".venv" not in path.parts and ".tools" not in path.parts and key in path.read_text()
    ]
    assert offenders == ["core/kafka.py"]
