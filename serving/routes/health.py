"""`/health/live`, `/health/ready` and `/metrics`: for orchestrators and Prometheus."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core.errors import ChurnError
from serving.deps import DepsDep
from serving.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    """The process is up (on the event loop, no I/O: it answers even while every pool thread
    waits on a stalled Redis)."""
    return Health(status="ok", checks={})


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
def ready(deps: DepsDep) -> Any:
    """Redis answers, a feature row can be read through Feast (registry, view and online store),
    model loaded."""
    checks: dict[str, str] = {}
    for name, check in deps.ready_checks.items():
        try:
            check()
            checks[name] = "ok"
        except ChurnError as exc:
            checks[name] = str(exc)
    loaded = deps.models.current
    checks["model"] = f"version {loaded.version}" if loaded else "no champion loaded"
    ok = all(v == "ok" for k, v in checks.items() if k != "model") and loaded is not None
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return body if ok else JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", response_class=Response)
def metrics(deps: DepsDep) -> Response:
    """Prometheus metrics of this process (of every worker, with several)."""
    return Response(deps.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
