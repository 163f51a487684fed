"""`GET /models/history`: the registry's promotions and rollbacks (the audit log), newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from models import audit
from serving.deps import SettingsDep
from serving.routes.errors import ERRORS
from serving.schemas import HistoryEntry, ModelHistory

router = APIRouter(tags=["models"])


@router.get("/models/history", response_model=ModelHistory, responses=ERRORS)
def model_history(
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Steps per page")] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Steps to skip (the previous `next_offset`)")] = 0,
) -> ModelHistory:
    """Every `churn promote` (accepted, refused, forced), `churn rollback` and `churn train` gate
    decision: who, what, when, why, from and to which version, with the figures; newest first."""
    entries, total = audit.read(settings.audit_log_path, limit, offset)
    following = offset + len(entries)
    return ModelHistory(
        offset=offset,
        limit=limit,
        total=total,
        next_offset=following if following < total else None,
        entries=[HistoryEntry.model_validate(e) for e in entries],
    )
