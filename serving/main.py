"""The uvicorn factory for `churn serve`: settings from the environment, then `create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from core.errors import ConfigError
from core.settings import Settings, load_settings
from serving.app import create_app


def require_keys(settings: Settings) -> None:
    """Checks that the API will ask for keys, or was opened on purpose.

    Raises:
        ConfigError: no `CHURN_API_KEYS` and `CHURN_API_OPEN` is not true.
    """
    if not settings.api_keys and not settings.api_open:
        msg = (
            "CHURN_API_KEYS is empty: set it (e.g. CHURN_API_KEYS='[\"a-long-random-key\"]'), "
            "or set CHURN_API_OPEN=true to serve without keys on purpose"
        )
        raise ConfigError(msg)


def app_from_env() -> FastAPI:
    """Returns the API built from `CHURN_` settings (called once per uvicorn worker).

    Raises:
        ConfigError: invalid settings, or no API keys without `CHURN_API_OPEN=true`.
    """
    settings = load_settings()
    require_keys(settings)
    return create_app(settings)
