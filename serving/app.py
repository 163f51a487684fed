"""The risk API: `create_app(settings, deps)` is the one wiring point of the API process."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churn.errors import ChurnError, NotFoundError, ServiceUnavailableError
from churn.gc_policy import freeze_survivors
from churn.settings import Settings
from monitoring.metrics import Metrics
from serving.auth import ApiKeys
from serving.limits import BodySizeLimit
from serving.model_info import model_info
from serving.risk import RiskService
from serving.schemas import (
    USER_ID_PATTERN,
    BatchAnswer,
    BatchRequest,
    Health,
    ModelInfo,
    Problem,
    RiskAnswer,
)
from serving.timing import RequestTimer
from stream.consumer import ModelHolder

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    422: {"model": Problem, "description": "Invalid request (e.g. a malformed user id)"},
    503: {"model": Problem, "description": "No model loaded, or the feature store is unavailable"},
}


@dataclass
class Deps:
    """What the API needs; built from settings by `build_deps`, or injected by tests."""

    service: RiskService
    models: ModelHolder
    metrics: Metrics
    ready_checks: dict[str, Callable[[], None]] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    model_meta: Callable[[], dict[str, Any] | None] = lambda: None
    drift_state: Callable[[], dict[str, Any] | None] = lambda: None  # the scorer's latest drift JSON


def build_deps(settings: Settings) -> Deps:
    """Opens Redis and Feast and prepares the model holder (loaded in the lifespan).

    Raises:
        ConfigError: the Feast repo was not applied.
    """
    import redis

    from features.feast_repo import open_feature_store
    from features.feast_store import FeastFeatureStore
    from serving.risk import build_clock
    from stream.risk_store import RedisRiskStore
    from stream.scorer import LoadedModel
    from training.registry import champion_version, load_champion

    metrics = Metrics()
    client = redis.Redis.from_url(settings.redis_address, socket_timeout=2, socket_connect_timeout=1)
    risks = RedisRiskStore(client, settings.redis_prefix)
    features = FeastFeatureStore(open_feature_store(settings))

    def load() -> LoadedModel | None:
        found = load_champion(settings)
        if found is None:
            return None
        # One OpenMP thread per predict: each request scores one row (see ChurnModel.threads).
        return LoadedModel(replace(found[0], threads=1), settings.model_name, str(found[1]))

    models = ModelHolder(lambda: champion_version(settings), load, metrics, "api")
    service = RiskService(features, risks, lambda: models.current, build_clock(settings.clock, risks), metrics)

    def feature_view() -> None:
        features.read_rows([])

    return Deps(
        service=service,
        models=models,
        metrics=metrics,
        ready_checks={"redis": lambda: _ping(client), "feature_view": feature_view},
        close=client.close,
        model_meta=lambda: getattr(models.current.model, "meta", None) if models.current else None,
        drift_state=lambda: _read_drift(client, settings.redis_prefix),
    )


def _read_drift(client: Any, prefix: str) -> dict[str, Any] | None:
    import redis

    from monitoring.drift_state import read_drift

    try:
        return read_drift(client, prefix)
    except redis.RedisError as exc:
        msg = f"Redis unreachable: {exc}"
        raise ServiceUnavailableError(msg) from exc


def _ping(client: Any) -> None:
    import redis

    try:
        client.ping()
    except redis.RedisError as exc:
        msg = f"Redis unreachable: {exc}"
        raise ServiceUnavailableError(msg) from exc


def create_app(settings: Settings, deps: Deps | None = None) -> FastAPI:
    """Returns the API. Clients are opened, and the champion loaded, in the lifespan; a thread
    polls the registry every `model_poll_seconds` and swaps the model between requests."""
    keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
    if not keys.enabled:
        log.warning("no CHURN_API_KEYS configured: the API is open to anyone who can reach it")
    state: dict[str, Deps] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        d = deps or build_deps(settings)
        state["deps"] = d
        d.models.refresh()
        # Feast, MLflow and pandas leave ~400k long-lived objects: full collections walking them
        # would stall requests (see churn.gc_policy).
        freeze_survivors()
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(settings.model_poll_seconds):
                d.models.refresh()

        poller = threading.Thread(target=poll, name="model-poller", daemon=True)
        poller.start()
        yield
        stop.set()
        d.close()

    app = FastAPI(
        title="Churn risk API",
        version="1",
        description="Churn probability, tier and reasons per user, from the online feature store.",
        lifespan=lifespan,
    )

    # Without keys the routes declare no security scheme: the document describes this deployment.
    auth = [Depends(keys)] if keys.enabled else []
    open_or_auth = [] if settings.open_health_and_metrics else auth

    # Added first, so it runs inside the timer: refused bodies are timed and counted as 413s.
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(RequestTimer, metrics=lambda: state["deps"].metrics if "deps" in state else None)

    @app.exception_handler(ChurnError)
    async def churn_error(request: Request, exc: ChurnError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status if exc.http_status != 500 else 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()[:5]
        )
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    @app.get(
        "/users/{user_id}/risk",
        response_model=RiskAnswer,
        responses={**ERRORS, 404: {"model": Problem, "description": "Unknown user"}},
        dependencies=auth,
    )
    async def user_risk(
        user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description="1-64 of A-Z a-z 0-9 _ . : @ -")],
        explain: Annotated[bool, Query(description="Include the top 5 reasons")] = True,
    ) -> Response:
        """Churn probability within the horizon for one user, with tier and reasons."""
        d = state["deps"]
        # On the event loop, blocking: one user is two loopback Redis round trips and ~0.1 ms of
        # Python, less than the hop to a worker thread (and its GIL hand-offs) a sync route pays.
        answers, _ = d.service.answer([user_id], explain=explain)
        if not answers:
            msg = f"unknown user {user_id!r}: no features in the online store"
            raise NotFoundError(msg)
        # The answer was validated when it was built: serialise it once, without FastAPI's
        # second validation pass through `response_model` (which stays for the document).
        return Response(answers[0].model_dump_json(), media_type="application/json")

    @app.post(
        "/users/risk",
        response_model=BatchAnswer,
        responses={
            **ERRORS,
            400: {"model": Problem, "description": "The body cannot be parsed"},
            413: {"model": Problem, "description": "The body is larger than CHURN_API_MAX_BODY_BYTES"},
        },
        dependencies=auth,
    )
    def users_risk(body: BatchRequest) -> Response:
        """Up to 1,000 users in one call (one feature read, one predict); unknown ids are listed."""
        d = state["deps"]
        ids = list(dict.fromkeys(body.user_ids))
        answers, unknown = d.service.answer(ids, explain=body.explain)
        batch = BatchAnswer(results=answers, unknown_user_ids=unknown)
        return Response(batch.model_dump_json(), media_type="application/json")

    @app.get("/models/current", response_model=ModelInfo, responses=ERRORS, dependencies=auth)
    def model_current() -> ModelInfo:
        """The champion in use: version, metrics, training window."""
        d = state["deps"]
        loaded = d.models.current
        meta = d.model_meta()
        if loaded is None or meta is None:
            msg = "no champion model is loaded yet"
            raise ServiceUnavailableError(msg)
        return model_info(loaded, meta, settings.horizon_days)

    @app.get("/health/live", response_model=Health, dependencies=open_or_auth)
    def live() -> Health:
        """The process is up."""
        return Health(status="ok", checks={})

    @app.get(
        "/health/ready",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready"}},
        dependencies=open_or_auth,
    )
    def ready() -> Any:
        """Redis reachable, feature view present, model loaded."""
        d = state["deps"]
        checks: dict[str, str] = {}
        for name, check in d.ready_checks.items():
            try:
                check()
                checks[name] = "ok"
            except ChurnError as exc:
                checks[name] = str(exc)
        checks["model"] = f"version {d.models.current.version}" if d.models.current else "no champion loaded"
        ok = all(v == "ok" for k, v in checks.items() if k != "model") and d.models.current is not None
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get(
        "/monitoring/drift",
        responses={**ERRORS, 503: {"model": Problem, "description": "No drift report yet, or Redis is down"}},
        dependencies=auth,
    )
    def drift() -> dict[str, Any]:
        """The scorer's latest drift report: PSI/KS per feature and for the score, status, alert_since."""
        d = state["deps"]
        report = d.drift_state()
        if report is None:
            msg = (
                "no drift report yet: the scorer publishes one every"
                f" {settings.drift_every_seconds:g} s once it has scored users with a champion model"
            )
            raise ServiceUnavailableError(msg)
        return report

    @app.get("/metrics", dependencies=open_or_auth, response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics of this process."""
        d = state["deps"]
        return Response(generate_latest(d.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
