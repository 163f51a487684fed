"""`GET /monitoring/drift`: the scorer's latest drift report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from core.errors import ServiceUnavailableError
from serving.deps import DepsDep, SettingsDep
from serving.routes.errors import ERRORS
from serving.schemas import Problem

router = APIRouter(tags=["monitoring"])


@router.get(
    "/monitoring/drift",
    responses={**ERRORS, 503: {"model": Problem, "description": "No drift report yet, or Redis is down"}},
)
def drift(deps: DepsDep, settings: SettingsDep) -> dict[str, Any]:
    """The scorer's latest drift report: PSI/KS per feature and for the score, status, alert_since."""
    report = deps.drift_state()
    if report is None:
        msg = (
            "no drift report yet: the scorer publishes one every"
            f" {settings.drift_every_seconds:g} s once it has scored users with a champion model"
        )
        raise ServiceUnavailableError(msg)
    return report
