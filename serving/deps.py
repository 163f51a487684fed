"""What the API's routes need, built once per process and kept on `app.state`, and the typed
dependencies (`DepsDep`, `SettingsDep`) through which routes receive it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from core.redis import async_redis_client, redis_client, redis_errors
from core.settings import Settings
from features.feast_repo import open_feature_store
from features.feast_store import FeastFeatureStore
from features.store import FeatureRow
from models.holder import ModelHolder
from models.registry import CHALLENGER, champion_loader
from monitoring.drift_state import read_drift
from monitoring.metrics import Metrics
from monitoring.performance_state import read_performance
from serving.risk import RiskService, build_clock
from stream.at_risk import AtRiskIndex, InMemoryAtRiskIndex, RedisAtRiskIndex
from stream.risk_store import RedisRiskStore, RiskRow

# The user id `/health/ready` reads (any valid id works; it need not exist).
READY_PROBE_USER = "health-probe"


@dataclass
class Deps:
    """What the API needs; built from settings by `build_deps`, or injected by tests."""

    service: RiskService
    models: ModelHolder
    metrics: Metrics
    ready_checks: dict[str, Callable[[], None]] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    aclose: Callable[[], Awaitable[None]] | None = None  # closes the asyncio clients (on the event loop)
    drift_state: Callable[[], dict[str, Any] | None] = lambda: None  # the scorer's latest drift JSON
    performance_state: Callable[[], dict[str, Any] | None] = lambda: None  # expected/realized per day
    at_risk: AtRiskIndex = field(default_factory=InMemoryAtRiskIndex)  # the scorer's at-risk list
    challengers: ModelHolder | None = None  # the challenger: the canary's model and the shadow model

    def refresh_models(self) -> None:
        """Swaps in a new champion (and canary challenger) if the registry moved; never raises."""
        self.models.refresh()
        if self.challengers is not None:
            self.challengers.refresh()

    def model_meta(self) -> dict[str, Any] | None:
        """Returns the current champion's meta.json, or None while no model is loaded."""
        loaded = self.models.current
        return loaded.model.meta if loaded is not None else None


def build_deps(settings: Settings) -> Deps:
    """Opens Redis and Feast and prepares the model holder (loaded in the lifespan).

    Raises:
        ConfigError: the Feast repo was not applied.
    """
    metrics = Metrics()
    client = redis_client(settings, "request")
    risks = RedisRiskStore(client, settings.redis_prefix)
    features = FeastFeatureStore(open_feature_store(settings, "request"))
    # One OpenMP thread per predict: each request scores a few rows (see ChurnModel.threads).
    models = ModelHolder(
        *champion_loader(settings, threads=1),
        on_swap=metrics.model_swapped("api"),
        on_refuse=metrics.model_refused("api"),
    )
    # The challenger serves the canary slice and scores every answer in shadow (when distinct).
    challengers = ModelHolder(
        *champion_loader(settings, threads=1, alias=CHALLENGER),
        on_refuse=metrics.model_refused("api-challenger"),
        drop_when_unset=True,
    )

    def read_together(user_ids: Sequence[str]) -> tuple[list[FeatureRow | None], list[RiskRow | None]] | None:
        # Feast's online store and the risk rows share the Redis of `settings.redis_address`:
        # the risk rows' MGET rides in the feature read's pipeline (one round trip, not two).
        both = features.read_rows_and(user_ids, risks.read_command(user_ids))
        return None if both is None else (both[0], risks.decode(both[1]))

    # Where one pipeline reaches the features and the risk rows (one Redis server, not a
    # cluster), the single-user route reads them on an asyncio client: no thread hop per request
    # (measured: a fifth of the route's CPU), and a stalled Redis still never holds the loop.
    aclient = None if features.read_commands([READY_PROBE_USER]) is None else async_redis_client(settings, "request")
    event_clock = settings.clock == "event"

    async def read_async(user_ids: Sequence[str]) -> tuple[list[FeatureRow | None], list[RiskRow | None], int | None]:
        assert aclient is not None
        commands = features.read_commands(user_ids)
        assert commands is not None
        commands.append(risks.read_command(user_ids))
        if event_clock:  # the watermark is the clock: read it in the same round trip
            commands.append(("GET", risks.watermark_key))
        with redis_errors(f"reading {len(user_ids)} feature and risk rows"):
            replies = await aclient.execute(commands)
        if event_clock:
            mark = replies.pop()
            now_ms = None if mark is None else int(mark)
        else:
            now_ms = time.time_ns() // 1_000_000
        return features.decode_replies(user_ids, replies[:-1]), risks.decode(replies[-1]), now_ms

    service = RiskService(
        features, risks, lambda: models.current, build_clock(settings.clock, risks), metrics, read_together,
        read_async=read_async if aclient is not None else None,
        challenger=lambda: challengers.current,
        canary_percent=settings.canary_percent,
    )  # fmt: skip

    def feature_view() -> None:
        # A real read (an HMGET through Feast's online store) of a row that need not exist:
        # fails when Redis, its password or the view cannot serve a request.
        features.read_rows([READY_PROBE_USER])

    def ping() -> None:
        with redis_errors("pinging"):
            client.ping()

    def drift_state() -> dict[str, Any] | None:
        with redis_errors("reading the drift report"):
            return read_drift(client, settings.redis_prefix)

    def performance_state() -> dict[str, Any] | None:
        with redis_errors("reading the performance state"):
            return read_performance(client, settings.redis_prefix)

    return Deps(
        service=service,
        models=models,
        metrics=metrics,
        ready_checks={"redis": ping, "feature_view": feature_view},
        close=client.close,
        aclose=aclient.aclose if aclient is not None else None,
        drift_state=drift_state,
        performance_state=performance_state,
        at_risk=RedisAtRiskIndex(client, settings.redis_prefix),
        challengers=challengers,
    )


# The two getters are `async def` because they do no I/O: FastAPI runs a plain `def` dependency
# in its thread pool, one more thread hop per request.
async def get_deps(request: Request) -> Deps:
    """Returns the process's Deps (set on `app.state` by the lifespan)."""
    deps: Deps = request.app.state.deps
    return deps


async def get_settings(request: Request) -> Settings:
    """Returns the settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


DepsDep = Annotated[Deps, Depends(get_deps)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
