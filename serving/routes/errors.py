"""The error responses routes declare in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from serving.schemas import Problem

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    422: {"model": Problem, "description": "Invalid request (e.g. a malformed user id)"},
    503: {"model": Problem, "description": "No model loaded, or the feature store is unavailable"},
}
