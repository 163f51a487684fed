"""The local broker's SASL/SCRAM listener (started by `churn infra up`): the producer and the
scorer work with the right credentials and fail with a clear message with wrong ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from infra import local as infra
from monitoring.metrics import Metrics
from stream.consumer import build_scorer
from stream.producer import publish_lines
from tests.support import Deployment, random_events, register_champion


def test_producer_and_scorer_over_sasl_scram(settings: Settings, topic: str, unique: str, tmp_path: Path) -> None:
    user, password = f"churn-{unique}", f"pw-{unique}"
    infra.ensure_scram_user(settings, user, password)
    sasl = {
        "kafka_bootstrap": f"127.0.0.1:{settings.kafka_sasl_listener_port}",
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": user,
        "kafka_sasl_password": SecretStr(password),
    }
    deployment = Deployment(settings, register_champion(tmp_path, settings), tmp_path, f"sasl{unique}", topic, **sasl)
    try:
        config = kafka_config(deployment.settings)
        assert (config["security.protocol"], config["sasl.mechanism"], config["sasl.username"]) == (
            "SASL_PLAINTEXT",
            "SCRAM-SHA-512",
            user,
        )
        events = random_events(4, users=5, days=3, per_user=30)
        report = publish_lines(deployment.settings, [e.to_json() for e in events])
        assert report.sent == len(events)
        metrics = deployment.run_uninterrupted()
        assert metrics.events_total.labels("ok")._value.get() == len(events)

        wrong = deployment.settings.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
        with pytest.raises(ServiceUnavailableError, match="refused the credentials of CHURN_KAFKA_SASL_USERNAME"):
            publish_lines(wrong, [events[0].to_json()])
        with pytest.raises(ServiceUnavailableError, match="refused the credentials of CHURN_KAFKA_SASL_USERNAME"):
            build_scorer(wrong, Metrics())
        # The PLAINTEXT address with SASL expected is also a clear failure, not a hang.
        plain_port = deployment.settings.model_copy(update={"kafka_bootstrap": settings.bootstrap_servers})
        with pytest.raises(ServiceUnavailableError):
            publish_lines(plain_port, [events[0].to_json()])
    finally:
        deployment.cleanup()
