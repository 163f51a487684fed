"""The risk API: `create_app(settings, deps)` is the one wiring point of the API process.

The lifespan builds the clients (`serving.deps.build_deps`) and keeps them on `app.state`;
routes (`serving.routes.*`) receive them through typed dependencies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ChurnError
from core.gc_policy import freeze_survivors
from core.settings import Settings
from monitoring import multiprocess
from monitoring.metrics import Metrics
from serving.admission import AdmissionControl, initial_limit
from serving.auth import ApiKeys, KeyGate
from serving.deps import Deps, build_deps
from serving.limits import BodySizeLimit
from serving.routes import health, history, models, monitoring, risk
from serving.routes.errors import ERRORS
from serving.timing import RequestTimer

log = logging.getLogger(__name__)
ROUTERS = (risk.router, models.router, history.router, monitoring.router, health.router)


def create_app(settings: Settings, deps: Deps | None = None) -> FastAPI:
    """Returns the API. Clients are opened, and the champion loaded, in the lifespan (`deps`
    when given, else `build_deps(settings)`); a thread polls the registry every
    `model_poll_seconds` and swaps the model between requests."""
    keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
    if not keys.enabled:
        log.warning("no CHURN_API_KEYS configured: the API is open to anyone who can reach it")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A worker uvicorn started in place of a killed one clears the killed one's gauges.
        multiprocess.forget_dead_workers()
        d = deps or build_deps(settings)
        app.state.deps = d
        # AdmissionControl sets the limit when a window closes; until the first data request
        # closes one, the dashboard would read 0.
        d.metrics.api_in_flight_limit.set(initial_limit(settings.api_max_in_flight))
        d.refresh_models()
        # Feast, MLflow and pandas leave ~400k long-lived objects: full collections walking them
        # would stall requests (see core.gc_policy).
        freeze_survivors()
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(settings.model_poll_seconds):
                d.refresh_models()

        poller = threading.Thread(target=poll, name="model-poller", daemon=True)
        poller.start()
        yield
        stop.set()
        d.close()
        if d.aclose is not None:
            await d.aclose()
        multiprocess.leave()

    app = FastAPI(
        title="Churn risk API",
        version="1",
        description="Churn probability, tier and reasons per user, from the online feature store.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    def current_metrics() -> Metrics | None:
        found: Deps | None = getattr(app.state, "deps", None)
        return found.metrics if found is not None else None

    # Added first, so it runs inside the timer: refused bodies are timed and counted as 413s.
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.api_max_body_bytes, read_timeout_s=settings.api_body_timeout_seconds
    )
    app.add_middleware(RequestTimer, metrics=current_metrics)
    # Added last, so it runs first: a refused request costs nothing else and is counted in
    # churn_api_shed_requests_total, not as a failed request in the latency histogram.
    app.add_middleware(
        AdmissionControl,
        max_in_flight=settings.api_max_in_flight,
        metrics=current_metrics,
        latency_budget_s=settings.api_latency_budget_ms / 1000,
    )
    # Added after admission, so it runs before it: a keyless request with a body takes no slot.
    app.add_middleware(KeyGate, keys=keys, metrics=current_metrics, routes=[r for rt in ROUTERS for r in rt.routes])
    _add_error_handlers(app)

    # Without keys the routes declare no security scheme: the document describes this deployment.
    auth = [Depends(keys)] if keys.enabled else []
    for router in ROUTERS:
        if router is not health.router:
            app.include_router(router, dependencies=auth)  # their routes document 401 (ERRORS)
        elif settings.open_health_and_metrics or not keys.enabled:
            app.include_router(router)
        else:
            app.include_router(router, dependencies=auth, responses={401: ERRORS[401]})
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Maps errors to answers: a ChurnError to its HTTP status (500s shown as 503), a
    validation error to 422 naming the fields, anything else to a logged 500."""

    @app.exception_handler(ChurnError)
    async def churn_error(request: Request, exc: ChurnError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status if exc.http_status != 500 else 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_problem(e, request.headers.get("content-type", "")) for e in exc.errors()[:5])
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 "There was an error parsing the body" for a body that is not UTF-8
        # or is nested too deeply, and 422 for other malformed JSON: one mistake, one answer.
        cause = exc.__cause__
        why = _UNPARSEABLE.get(type(cause)) if cause is not None and exc.status_code == 400 else None
        if why is None:
            return await http_exception_handler(request, exc)
        return JSONResponse({"detail": f"invalid request: the body is not JSON: {why}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)


_UNPARSEABLE: dict[type[BaseException], str] = {
    UnicodeDecodeError: "it is not UTF-8",
    RecursionError: "it is nested too deeply",
}


def _problem(error: Any, content_type: str) -> str:
    """Returns one validation error as "where: what" (a malformed JSON body or one sent as
    another content type said in words, not as a character offset or a type name)."""
    where = ".".join(str(p) for p in error["loc"] if p != "body")
    if error["type"] == "json_invalid":
        return f"the body is not JSON: {error['ctx']['error']} at character {where}"
    if error["loc"] == ("body",) and content_type and not _parsed_as_json(content_type):
        return f"the body must be JSON sent as content-type application/json, not {content_type!r}"
    if error["loc"] == ("body",) and error["type"] == "missing":
        return "the body is empty: send a JSON object"
    if error["loc"] == ("body",) and not content_type:  # FastAPI parses no body without the header
        return "the body must be JSON sent as content-type application/json (the request has no content-type)"
    return f"{where}: {error['msg']}"


def _parsed_as_json(content_type: str) -> bool:
    """Returns True for the content types FastAPI parses as JSON (application/json and
    application/*+json); it hands any other body to validation unparsed."""
    main, _, sub = content_type.split(";", 1)[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))
