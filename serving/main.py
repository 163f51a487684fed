"""The uvicorn factory for `churn serve`: settings from the environment, then `create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from core.settings import load_settings
from serving.app import create_app


def app_from_env() -> FastAPI:
    """Returns the API built from `CHURN_` settings (called once per uvicorn worker)."""
    return create_app(load_settings())
