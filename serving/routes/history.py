"""`GET /models/history`: the registry's promotions and rollbacks (the audit log), newest first."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ValidationError

from models import audit
from serving.deps import SettingsDep
from serving.routes.errors import ERRORS
from serving.schemas import HistoryEntry, ModelHistory

router = APIRouter(tags=["models"])
log = logging.getLogger(__name__)


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
        entries=[_entry(e) for e in entries],
    )


def _entry(line: dict[str, Any]) -> HistoryEntry:
    """Returns one audit-log line as a step; a line whose fields do not fit (edited by hand, say)
    is returned as an `unreadable` step carrying the line under `line`, so that one bad line
    neither fails the page nor hides from the reader."""
    try:
        return HistoryEntry.model_validate(line)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        log.warning("an audit-log step does not fit the schema (%s): %s", problems, line)
        return HistoryEntry.model_validate({"outcome": "unreadable", "reason": problems, "line": line})
