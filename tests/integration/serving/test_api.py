"""The risk API on the real Redis and Feast with a real trained champion in a real MLflow registry.

One module-wide deployment: a model trained on a small simulated log (own MLflow SQLite store),
every user's online features from the online engine (own Feast project), the stream watermark
(own Redis prefix). The app runs with `build_deps`, as `churn serve` runs it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from redis.connection import AbstractConnection

from bench.harness import SMALL_SIMULATION, SMALL_TRAIN_OPTIONS, free_port, train_small_champion
from core.redis_pipeline import PipelineConnection
from core.settings import Settings
from core.timeutil import ms_to_iso
from events.log import load_events
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import OnlineEngine
from features.store import FeatureRow
from models import registry as model_registry
from models.artifact import ChurnModel
from models.runtime import feature_matrix
from serving.app import create_app
from serving.deps import build_deps
from serving.schemas import CancelledAnswer, RiskAnswer
from sim.simulator import simulate
from stream.risk_store import RedisRiskStore, RiskRow
from training import registry
from training.card import SECTIONS
from training.scoring import score_users


@dataclass
class World:
    settings: Settings
    log: Path
    rows: dict[str, FeatureRow]
    watermark_ms: int
    version: str


@pytest.fixture(scope="module")
def world(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("api")
    name = uuid.uuid4().hex[:10]
    scratch = settings.model_copy(
        update={
            "state_dir": tmp / "state",
            "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "feast_project": f"api_{name}",
            "feast_repo": tmp / "feast",
            "redis_prefix": f"test:api{name}:",
            "model_poll_seconds": 0.2,
            "clock": "event",
            "api_keys": [],
        }
    )
    sim = simulate(SMALL_SIMULATION)  # what the champion is trained on (tmp / "events")
    trained = train_small_champion(scratch, tmp)
    assert trained.promoted, trained.reasons

    engine = OnlineEngine(lateness_ms=scratch.allowed_lateness_seconds * 1000)
    engine.apply_all(e for e in sim.to_events() if e.user_id)
    rows = {user: engine.row(user) for user in engine.states}
    feast = apply_repo(scratch)
    client = redis.Redis.from_url(scratch.redis_address)
    try:
        FeastFeatureStore(feast).write_rows(list(rows.values()))
        watermark = int(sim.events["ts"].max())  # type: ignore[arg-type]
        RedisRiskStore(client, scratch.redis_prefix).advance_watermark(watermark)
        yield World(scratch, tmp / "events", rows, watermark, str(trained.version))
    finally:
        feast.teardown()
        keys = list(client.scan_iter(f"{scratch.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def api(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(world.settings)) as client:
        yield client


@pytest.fixture(scope="module")
def offline(world: World) -> pl.DataFrame:
    """What `churn score` gives every user as of the watermark, with the champion."""
    found = model_registry.load_champion(world.settings)
    assert found is not None
    model, version = found
    assert version == world.version
    return score_users(model, load_events(world.log), world.watermark_ms, version)


def test_answer_for_a_user_built_by_the_online_engine(api: TestClient, world: World, offline: pl.DataFrame) -> None:
    user = str(offline["user_id"][len(offline) // 2])
    row = world.rows[user]
    body = api.get(f"/users/{user}/risk").json()
    assert body["user_id"] == user
    assert body["model"] == {"name": world.settings.model_name, "version": world.version}
    assert body["horizon_days"] == SMALL_TRAIN_OPTIONS.horizon_days
    assert 0.0 <= body["churn_probability"] <= 1.0
    assert body["risk_tier"] in {"low", "medium", "high"}
    assert body["as_of"] == ms_to_iso(world.watermark_ms)
    assert body["features_updated_at"] == ms_to_iso(row.last_event_ms)
    assert body["stored_risk"] is None  # no scorer ran in this deployment

    found = model_registry.load_champion(world.settings)
    assert found is not None
    matrix = feature_matrix([row], [world.watermark_ms])
    contributions = found[0].contributions(matrix)[0]
    top = sorted(contributions.items(), key=lambda kv: abs(kv[1]), reverse=True)[:5]
    assert [r["feature"] for r in body["reasons"]] == [name for name, _ in top]
    assert [r["impact"] for r in body["reasons"]] == pytest.approx([v for _, v in top], abs=1e-6)
    index = {name: i for i, name in enumerate(found[0].features)}
    for reason in body["reasons"]:
        value = matrix[0, index[reason["feature"]]]
        assert reason["value"] == (None if np.isnan(value) else pytest.approx(value))
        assert reason["description"]

    bare = api.get(f"/users/{user}/risk", params={"explain": "false"}).json()
    assert bare["reasons"] is None
    assert bare["churn_probability"] == body["churn_probability"]


def test_same_probability_as_churn_score(api: TestClient, offline: pl.DataFrame) -> None:
    expected = dict(zip(offline["user_id"].to_list(), offline["churn_probability"].to_list(), strict=True))
    users = sorted(expected)
    assert len(users) > 100
    one = users[0]
    assert api.get(f"/users/{one}/risk").json()["churn_probability"] == pytest.approx(expected[one], abs=1e-9)
    body = api.post("/users/risk", json={"user_ids": users, "explain": False}).json()
    assert body["unknown_user_ids"] == []
    got = {r["user_id"]: r["churn_probability"] for r in body["results"]}
    assert set(got) == set(users)
    worst = max(abs(got[u] - expected[u]) for u in users)
    assert worst < 1e-9, worst
    tiers = dict(zip(offline["user_id"].to_list(), offline["risk_tier"].to_list(), strict=True))
    assert {r["user_id"]: r["risk_tier"] for r in body["results"]} == tiers


def test_errors_are_clear(api: TestClient) -> None:
    unknown = api.get("/users/nobody-here/risk")
    assert unknown.status_code == 404
    assert "unknown user" in unknown.json()["detail"]
    bad = api.get("/users/bad%0Aid/risk")  # a control character: never an id
    assert bad.status_code == 422
    assert "user_id" in bad.json()["detail"]
    empty = api.get("/users//risk")  # no id at all: refused as one, not a route that is missing
    assert empty.status_code == 422
    assert "user_id" in empty.json()["detail"]
    assert api.get("/users/bad%20id!/risk").status_code == 404  # odd but valid: looked up, unknown
    assert api.get("/health/ready").json()["status"] == "ok"
    current = api.get("/models/current").json()
    assert current["horizon_days"] == SMALL_TRAIN_OPTIONS.horizon_days
    assert "roc_auc" in current["metrics"]
    card = api.get("/models/current/card")
    assert card.status_code == 200
    assert card.headers["content-type"].startswith("text/markdown")
    assert [line[3:] for line in card.text.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert card.headers["x-model-version"] == current["version"]
    assert f"version {current['version']}" in card.text.splitlines()[2]


def test_no_champion_is_503(world: World, tmp_path: Path) -> None:
    empty = world.settings.model_copy(update={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'empty.db'}"})
    with TestClient(create_app(empty)) as client:
        user = next(iter(world.rows))
        answer = client.get(f"/users/{user}/risk")
        assert answer.status_code == 503
        assert "no champion" in answer.json()["detail"]
        assert client.get("/models/current").status_code == 503
        assert client.get("/health/ready").status_code == 503


def test_redis_down_is_503(world: World) -> None:
    down = world.settings.model_copy(update={"redis_port": free_port()})
    with TestClient(create_app(down)) as client:
        began = time.monotonic()
        answer = client.get(f"/users/{next(iter(world.rows))}/risk")
        assert answer.status_code == 503
        assert "Redis" in answer.json()["detail"]
        assert time.monotonic() - began < 5
        assert client.post("/users/risk", json={"user_ids": ["a"]}).status_code == 503
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] != "ok"


def test_auth(world: World) -> None:
    keyed = world.settings.model_copy(update={"api_keys": [SecretStr("k1"), SecretStr("k2")]})
    user = next(iter(world.rows))
    with TestClient(create_app(keyed)) as client:
        assert client.get(f"/users/{user}/risk").status_code == 401
        assert client.get(f"/users/{user}/risk", headers={"X-API-Key": "nope"}).status_code == 401
        assert client.get(f"/users/{user}/risk", headers={"Authorization": "Bearer k3"}).status_code == 401
        assert client.get(f"/users/{user}/risk", headers={"X-API-Key": "k2"}).status_code == 200
        assert client.get(f"/users/{user}/risk", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert client.post("/users/risk", json={"user_ids": [user]}).status_code == 401
        assert client.get("/models/current").status_code == 401
        # Health and metrics stay open by default (CHURN_OPEN_HEALTH_AND_METRICS).
        assert client.get("/health/live").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_model_swap_under_load_fails_no_request(api: TestClient, world: World) -> None:
    user = next(iter(world.rows))
    assert api.get(f"/users/{user}/risk").json()["model"]["version"] == world.version
    # A second version of the same artifact: registered, then made champion mid-loop.
    artifact = Path(next(world.settings.artifacts_dir.rglob("meta.json")).parent)
    _, second = registry.log_run(world.settings, artifact, {}, {}, {})
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def fire() -> None:
        while not stop.is_set():
            response = api.get(f"/users/{user}/risk")
            version = response.json()["model"]["version"] if response.status_code == 200 else None
            answers.append((response.status_code, version))

    loop = threading.Thread(target=fire)
    loop.start()
    try:
        time.sleep(0.5)
        judged = registry.Decision(True, champion_version=world.version)
        registry.apply_decision(world.settings, _run_of(world.settings, second), second, judged)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (answers and answers[-1][1] == second):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        loop.join(10)
    assert {status for status, _ in answers} == {200}
    versions = [v for _, v in answers]
    switch = versions.index(second)
    assert switch > 0
    assert set(versions[:switch]) == {world.version}
    assert set(versions[switch:]) == {second}


def _run_of(settings: Settings, version: str) -> str:
    from mlflow.tracking import MlflowClient

    client: Any = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    return str(client.get_model_version(settings.model_name, version).run_id)


def test_a_batch_is_one_redis_round_trip_and_one_predict(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # The service as `churn serve` builds it (wall clock: the watermark's cached read stays out).
    deps = build_deps(world.settings.model_copy(update={"clock": "wall"}))
    deps.models.refresh()
    users = sorted(world.rows)[:100]
    scored, cancelled = users[:40], users[40]
    risks = RedisRiskStore(redis.Redis.from_url(world.settings.redis_address), world.settings.redis_prefix)
    risks.write(
        [RiskRow(u, 0.25, "medium", world.version, world.rows[u].last_event_ms, 1) for u in scored]
        + [RiskRow.cancelled(cancelled, world.rows[cancelled].last_event_ms, world.rows[cancelled].last_event_ms, 1)]
    )
    sends: list[int] = []
    predicted: list[int] = []
    explained: list[int] = []
    send, predict, contributions = AbstractConnection.send_packed_command, ChurnModel.predict, ChurnModel.contributions

    def counted_send(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        sends.append(1)
        send(self, *args, **kwargs)

    def counted_predict(self: ChurnModel, matrix: np.ndarray) -> np.ndarray:
        predicted.append(len(matrix))
        return predict(self, matrix)

    def counted_contributions(self: ChurnModel, matrix: np.ndarray) -> list[dict[str, float]]:
        explained.append(len(matrix))
        return contributions(self, matrix)

    try:
        deps.service.answer(users, explain=True)  # connects (and greets Redis) once
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted_send)
        monkeypatch.setattr(ChurnModel, "predict", counted_predict)
        monkeypatch.setattr(ChurnModel, "contributions", counted_contributions)
        answers, unknown = deps.service.answer([*users, "nobody-at-all"], explain=True)
        round_trips = len(sends)
        monkeypatch.undo()  # the clean-up's own command is not the answer's
    finally:
        risks.client.delete(*(risks.prefix + u for u in [*scored, cancelled]))
        risks.client.close()
        deps.close()

    assert round_trips == 1  # features and stored risk of 101 ids: one pipeline, one round trip
    assert predicted == [99]  # one vectorised predict for every user to score (the cancelled one is not)
    assert explained == [99]
    assert unknown == ["nobody-at-all"]
    by_user = {a.user_id: a for a in answers}
    assert [a.user_id for a in answers] == users
    assert isinstance(by_user[cancelled], CancelledAnswer)
    for user in scored:
        answer = by_user[user]
        assert isinstance(answer, RiskAnswer)
        assert answer.stored_risk is not None
        assert answer.stored_risk.churn_probability == 0.25
    assert all(by_user[u].stored_risk is None for u in users[41:])  # type: ignore[union-attr]


def test_the_single_user_route_reads_on_the_event_loop_and_answers_as_the_blocking_path(world: World) -> None:
    # The service as `churn serve` builds it on one Redis server, with the stream's clock (the
    # watermark rides in the same round trip).
    deps = build_deps(world.settings)
    deps.models.refresh()
    assert deps.service.read_async is not None  # one server: the asyncio read path is taken
    users = sorted(world.rows)[100:110]
    scored, cancelled = users[:4], users[4]
    risks = RedisRiskStore(redis.Redis.from_url(world.settings.redis_address), world.settings.redis_prefix)
    risks.write(
        [RiskRow(u, 0.5, "high", world.version, world.rows[u].last_event_ms, 1) for u in scored]
        + [RiskRow.cancelled(cancelled, world.rows[cancelled].last_event_ms, world.rows[cancelled].last_event_ms, 1)]
    )
    asked = [*users, "nobody-at-all"]
    sends: list[int] = []
    scoring_threads: set[int] = set()
    exchange = PipelineConnection.exchange

    async def counted_exchange(self: PipelineConnection, payload: bytes, count: int) -> list[Any]:
        sends.append(count)
        return await exchange(self, payload, count)

    predict = ChurnModel.predict

    def noting_predict(self: ChurnModel, matrix: np.ndarray) -> np.ndarray:
        scoring_threads.add(threading.get_ident())
        return predict(self, matrix)

    async def on_the_loop() -> tuple[Any, int]:
        try:
            await deps.service.answer_async(asked[:1], explain=False)  # connects (and greets Redis) once
            sends.clear()
            PipelineConnection.exchange = counted_exchange  # type: ignore[method-assign]
            ChurnModel.predict = noting_predict  # type: ignore[method-assign]
            try:
                answered = await deps.service.answer_async(asked, explain=True)
            finally:
                PipelineConnection.exchange = exchange  # type: ignore[method-assign]
                ChurnModel.predict = predict  # type: ignore[method-assign]
            return answered, threading.get_ident()
        finally:
            assert deps.aclose is not None
            await deps.aclose()

    try:
        (answers, unknown), loop_thread = asyncio.run(on_the_loop())
        blocking_answers, blocking_unknown = deps.service.answer(asked, explain=True)
    finally:
        risks.client.delete(*(risks.prefix + u for u in [*scored, cancelled]))
        risks.client.close()
        deps.close()

    # Features (one HMGET per user), stored risk and the watermark: one pipeline, one round trip.
    assert sends == [len(asked) + 2]
    assert scoring_threads == {loop_thread}  # scored on the event loop's thread: no hop to a worker
    assert unknown == blocking_unknown == ["nobody-at-all"]
    assert [a.model_dump() for a in answers] == [a.model_dump() for a in blocking_answers]
    assert isinstance(answers[4], CancelledAnswer)
    assert all(isinstance(a, RiskAnswer) and a.stored_risk is not None for a in answers[:4])
    assert {a.as_of for a in answers if isinstance(a, RiskAnswer)} == {ms_to_iso(world.watermark_ms)}
