from __future__ import annotations

import pytest

from churn.errors import ConfigError
from churn.settings import load_settings


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURN_KAFKA_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="CHURN_KAFKA_PORT"):
        load_settings()


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="CHURN_NO_SUCH_THING"):
        load_settings(no_such_thing=1)


def test_derived_addresses_follow_ports() -> None:
    settings = load_settings(kafka_port=1234, redis_port=4321)
    assert settings.bootstrap_servers == "127.0.0.1:1234"
    assert settings.redis_address == "redis://127.0.0.1:4321/0"


def test_secrets_are_masked() -> None:
    settings = load_settings(api_keys=["s3cret"])
    assert "s3cret" not in repr(settings)
    assert settings.api_keys[0].get_secret_value() == "s3cret"
