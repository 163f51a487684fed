"""`GET /monitoring/drift` and `GET /monitoring/performance`: what the scorer's daily snapshots found."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from core.errors import ServiceUnavailableError
from serving.deps import DepsDep
from serving.routes.errors import ERRORS
from serving.schemas import Problem

router = APIRouter(tags=["monitoring"])


@router.get(
    "/monitoring/drift",
    responses={**ERRORS, 503: {"model": Problem, "description": "No drift report yet, or Redis is down"}},
)
def drift(deps: DepsDep) -> dict[str, Any]:
    """The latest daily snapshot's drift: PSI/KS per feature and for the score, overall and per
    segment, status and alert_since."""
    report = deps.drift_state()
    if report is None:
        msg = (
            "no drift report yet: the scorer takes a snapshot at each UTC midnight of event time"
            " once it has a champion model"
        )
        raise ServiceUnavailableError(msg)
    return report


@router.get(
    "/monitoring/performance",
    responses={**ERRORS, 503: {"model": Problem, "description": "No snapshot yet, or Redis is down"}},
)
def performance(deps: DepsDep) -> dict[str, Any]:
    """Expected figures of the latest snapshot and realized figures of the latest labelled one,
    side by side, and every day kept (`days`)."""
    state = deps.performance_state()
    if state is None:
        msg = "no performance figures yet: the scorer takes a snapshot at each UTC midnight of event time"
        raise ServiceUnavailableError(msg)
    days = state.get("days") or {}
    latest_expected, latest_realized = state.get("latest_expected"), state.get("latest_realized")
    return {
        "expected": {"date": latest_expected, **(days.get(latest_expected) or {}).get("expected", {})}
        if latest_expected
        else None,
        "realized": {"date": latest_realized, **(days.get(latest_realized) or {}).get("realized", {})}
        if latest_realized
        else None,
        # What the labelled day's probabilities implied, beside what happened.
        "expected_for_realized_day": (days.get(latest_realized) or {}).get("expected") if latest_realized else None,
        "floor": state.get("floor"),
        "days": days,
    }
