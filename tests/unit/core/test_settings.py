from __future__ import annotations

import json

import pytest

from core.errors import ConfigError
from core.settings import load_settings, mask_url


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


def test_url_passwords_are_masked_but_used() -> None:
    settings = load_settings(
        redis_url="redis://app:hunter2@cache:6379/0", mlflow_tracking_uri="postgresql://ml:pw9@db/ml"
    )
    printed = repr(settings) + str(settings)
    assert "hunter2" not in printed
    assert "pw9" not in printed
    assert "redis://app:***@cache:6379/0" in printed
    assert settings.redis_address == "redis://app:hunter2@cache:6379/0"
    assert mask_url("http://mlflow:5000") == "http://mlflow:5000"


def test_an_invalid_secret_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURN_API_KEYS", "not-json-but-secret")
    with pytest.raises(ConfigError, match="CHURN_API_KEYS") as raised:
        load_settings()
    assert "not-json-but-secret" not in str(raised.value)
    monkeypatch.delenv("CHURN_API_KEYS")
    with pytest.raises(ConfigError, match="CHURN_API_KEYS") as raised:
        load_settings(api_keys="secret-as-a-string")
    assert "secret-as-a-string" not in str(raised.value)
    assert raised.value.__cause__ is None  # a traceback would print pydantic's error, input included


@pytest.mark.parametrize("keys", ['[""]', '["real", "  "]'])
def test_a_blank_api_key_is_refused_not_dropped(keys: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`["${KEY}"]` with KEY unset gave `[""]`, which passed the keys-required check and left the
    API open (blank keys were dropped) without CHURN_API_OPEN."""
    monkeypatch.setenv("CHURN_API_KEYS", keys)
    with pytest.raises(ConfigError, match=r"CHURN_API_KEYS.*blank"):
        load_settings()


@pytest.mark.parametrize("prefix", ["{churn}:", "churn{:", "churn}:"])
def test_a_redis_prefix_with_a_hash_tag_brace_is_refused(prefix: str) -> None:
    """`{churn}:` (a common cluster habit) put every user in one slot of one master."""
    with pytest.raises(ConfigError, match=r"CHURN_REDIS_PREFIX.*must not contain \{ or \}"):
        load_settings(redis_prefix=prefix)
    assert load_settings(redis_prefix="prod:churn:").redis_prefix == "prod:churn:"


@pytest.mark.parametrize("key", ["clé-secrète", " padded ", "two words"])
def test_an_api_key_no_request_could_send_is_refused(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette reads header bytes as latin-1 and servers strip surrounding spaces: such a key
    never matched, and every request was refused 401."""
    monkeypatch.setenv("CHURN_API_KEYS", json.dumps(["fine-key", key]))
    with pytest.raises(ConfigError, match=r"CHURN_API_KEYS.*position \[1\].*visible ASCII") as raised:
        load_settings()
    assert key.strip() not in str(raised.value)  # the secret is not echoed


def test_the_future_skew_allowance_cannot_exceed_the_lateness() -> None:
    """An event accepted that far ahead would make its user's real events late."""
    with pytest.raises(ConfigError, match=r"CHURN_MAX_FUTURE_SKEW_SECONDS.*at most CHURN_ALLOWED_LATENESS_SECONDS"):
        load_settings(allowed_lateness_seconds=60)
    assert load_settings(allowed_lateness_seconds=60, max_future_skew_seconds=60).max_future_skew_seconds == 60
