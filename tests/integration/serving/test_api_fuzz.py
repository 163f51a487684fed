"""Schemathesis against the API's own OpenAPI document: no generated request gets a 5xx.

The app reads a real Feast project on the real Redis and a real risk store; the model is a
real `ChurnModel` (a small LightGBM booster in the artifact format) injected in place of the
MLflow registry, whose SQLite store takes longer to create than this whole run.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.python import asgi

from core.settings import Settings, load_settings
from features import spec
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.store import FeatureRow
from models.artifact import ChurnModel
from models.holder import ModelHolder
from models.runtime import LoadedModel
from monitoring.metrics import Metrics
from serving.app import create_app
from serving.deps import Deps
from serving.risk import RiskService, build_clock
from stream.risk_store import RedisRiskStore, RiskRow
from tests.support import small_model

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def fuzz_model() -> ChurnModel:
    """The small model with missing values, and the meta `/models/current` reports."""
    return small_model(
        missing_share=0.05,
        rounds=30,
        metrics={"test": {"roc_auc": 0.8, "pr_auc": 0.3, "calibration_curve": {"count": [1.0]}}},
        data_window={"first_event": "2026-01-01T00:00:00Z", "test_points": ["a", "b"], "sizes": {"test": {}}},
    )


def feature_rows(count: int) -> list[FeatureRow]:
    """Rows whose ids are what the fuzzer sends most often (short ids, digits, edge characters)."""
    rng = random.Random(1)
    ids = [str(i) for i in range(count)] + ["0", "-", ".", "_", "A", "a", "@", ":"]
    return [
        FeatureRow(
            user_id=user,
            last_event_ms=T0 + i * 1000,
            values={
                name: (rng.randint(0, 50) if name in spec.INT_FEATURES else rng.random() * 5)
                for name in spec.STORED_FEATURES
            }
            | {"days_since_registration": float("nan") if i % 7 == 0 else 12.5},
        )
        for i, user in enumerate(ids)
    ]


@pytest.fixture(scope="module")
def app(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    name = uuid.uuid4().hex[:10]
    scratch = settings.model_copy(
        update={
            "feast_project": f"fuzz_{name}",
            "feast_repo": Path(tmp_path_factory.mktemp("fuzz")) / "feast",
            "redis_prefix": f"test:fuzz{name}:",
            "api_keys": [],
        }
    )
    feast = apply_repo(scratch)
    client = redis.Redis.from_url(scratch.redis_address)
    try:
        features = FeastFeatureStore(feast)
        rows = feature_rows(50)
        features.write_rows(rows)
        risks = RedisRiskStore(client, scratch.redis_prefix)
        risks.write([RiskRow(r.user_id, 0.4, "medium", "1", r.last_event_ms, T0) for r in rows[::3]])
        risks.advance_watermark(max(r.last_event_ms for r in rows))
        metrics = Metrics()
        model = fuzz_model()
        models = ModelHolder(
            lambda: "1", lambda: LoadedModel(model, scratch.model_name, "1"), on_swap=metrics.model_swapped("api")
        )
        service = RiskService(features, risks, lambda: models.current, build_clock("event", risks), metrics)
        deps = Deps(
            service=service,
            models=models,
            metrics=metrics,
            ready_checks={"redis": lambda: None, "feature_view": lambda: None},
            # A healthy deployment has a drift report and performance figures; "none yet" is a documented 503.
            drift_state=lambda: {"status": "ok", "computed_at": T0 / 1000, "features": {}, "score": None},
            performance_state=lambda: {"days": {}, "latest_expected": None, "latest_realized": None},
        )
        yield create_app(scratch, deps)
    finally:
        # Schemathesis started the app's lifespan on the first request and keeps it for the process.
        asgi.shutdown_lifespans()
        feast.teardown()
        keys = list(client.scan_iter(f"{scratch.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# The document comes from an app that is never started (no lifespan, no connection); requests go
# to the `app` fixture. (`schemathesis.pytest.from_fixture` fails on pytest 9: Node._nodeid is gone.)
schema = schemathesis.openapi.from_dict(create_app(load_settings()).openapi())


@schema.parametrize()
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_answers_match_the_document(case: schemathesis.Case, app: FastAPI) -> None:
    case.call_and_validate(app=app)
