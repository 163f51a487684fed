"""The API's contract with in-memory stores and a transparent stand-in model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.settings import load_settings
from features import spec
from features.online import OnlineEngine
from features.store import InMemoryFeatureStore
from models.holder import ModelHolder
from models.runtime import LoadedModel
from monitoring.metrics import Metrics
from serving.admission import initial_limit
from serving.app import create_app
from serving.deps import Deps
from serving.model_info import model_info
from serving.risk import RiskService
from stream.risk_store import InMemoryRiskStore, RiskRow
from tests.support import StandInModel, random_events


class IdleModel(StandInModel):
    """Probability rises with thumbs down and with days since the last event."""

    meta: ClassVar[dict[str, Any]] = {
        "metrics": {"roc_auc": 0.9},
        "data_window": {"start": "a", "end": "b"},
        "horizon_days": 14,
    }

    def _logit(self, matrix: np.ndarray) -> np.ndarray:
        td = matrix[:, spec.MODEL_FEATURES.index("thumbs_down_28d")]
        idle = matrix[:, spec.MODEL_FEATURES.index("seconds_since_last_event")] / 86_400
        return 0.2 * td + 0.3 * idle - 3

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-self._logit(matrix)))

    def contributions(self, matrix: np.ndarray) -> list[dict[str, float]]:
        out = []
        for row in matrix:
            c = dict.fromkeys(spec.MODEL_FEATURES, 0.0)
            c["thumbs_down_28d"] = 0.2 * row[spec.MODEL_FEATURES.index("thumbs_down_28d")]
            c["seconds_since_last_event"] = 0.3 * row[spec.MODEL_FEATURES.index("seconds_since_last_event")] / 86_400
            out.append(c)
        return out

    def tier(self, probability: float) -> str:
        return "high" if probability > 0.5 else "medium" if probability > 0.2 else "low"


@pytest.fixture
def client() -> Iterator[tuple[TestClient, ModelHolder, InMemoryRiskStore]]:
    engine = OnlineEngine()
    engine.apply_all(random_events(3, users=5, days=30, per_user=100))
    features = InMemoryFeatureStore()
    features.write_rows([engine.row(u) for u in engine.states])
    risks = InMemoryRiskStore()
    risks.write([RiskRow("u1", 0.3, "medium", "1", engine.row("u1").last_event_ms, 0)])
    risks.write([RiskRow.cancelled("u4", CANCELLED_MS, engine.row("u4").last_event_ms, 0)])
    metrics = Metrics()
    version = ["1"]
    models = ModelHolder(
        lambda: version[0],
        lambda: LoadedModel(IdleModel(), "churn-lightgbm", version[0]),
        on_swap=metrics.model_swapped("api"),
    )
    now = max(row.last_event_ms for row in features.rows.values()) + 3 * 86_400_000
    service = RiskService(features, risks, lambda: models.current, lambda: now, metrics)
    deps = Deps(service=service, models=models, metrics=metrics)
    settings = load_settings(api_keys=["k1", "k2"])
    with TestClient(create_app(settings, deps)) as test_client:
        yield test_client, models, risks


KEY = {"X-API-Key": "k2"}
CANCELLED_MS = 1_767_830_400_000  # 2026-01-08T00:00:00Z


def test_risk_answer_has_every_field(client: Any) -> None:
    http, _, _ = client
    body = http.get("/users/u1/risk", headers=KEY).json()
    assert set(body) >= {"user_id", "churn_probability", "risk_tier", "horizon_days", "model", "as_of"}
    assert body["model"] == {"name": "churn-lightgbm", "version": "1"}
    assert len(body["reasons"]) == 5
    assert body["reasons"][0]["feature"] in {"thumbs_down_28d", "seconds_since_last_event"}
    assert body["stored_risk"]["risk_tier"] == "medium"
    assert http.get("/users/u1/risk?explain=false", headers=KEY).json()["reasons"] is None


def test_a_cancelled_user_is_answered_as_cancelled_without_a_probability(client: Any) -> None:
    http, models, _ = client
    body = http.get("/users/u4/risk", headers=KEY).json()
    assert body["status"] == "cancelled"
    assert body["cancelled_at"] == "2026-01-08T00:00:00.000Z"
    assert "churn_probability" not in body
    assert "risk_tier" not in body
    batch = http.post("/users/risk", json={"user_ids": ["u4", "u1"]}, headers=KEY).json()
    assert [r["status"] for r in batch["results"]] == ["cancelled", "scored"]
    assert batch["results"][0] == body
    assert batch["results"][1]["churn_probability"] > 0
    # No model is needed to say a user has cancelled.
    models.current = None
    assert http.get("/users/u4/risk", headers=KEY).json() == body
    # The OpenAPI document declares both answers, told apart by `status`.
    document = http.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "churn_probability" not in schemas["CancelledAnswer"]["properties"]
    assert {"cancelled_at", "status"} <= set(schemas["CancelledAnswer"]["required"])
    single = document["paths"]["/users/{user_id}/risk"]["get"]["responses"]["200"]["content"]["application/json"]
    assert single["schema"]["discriminator"]["propertyName"] == "status"


def test_errors_are_clear_4xx(client: Any) -> None:
    http, _, _ = client
    assert http.get("/users/nobody/risk", headers=KEY).status_code == 404
    assert "unknown user" in http.get("/users/nobody/risk", headers=KEY).json()["detail"]
    bad = http.get("/users/bad%0Aid/risk", headers=KEY)  # a control character: never an id
    assert bad.status_code == 422
    assert "user_id" in bad.json()["detail"]
    # Ids the stream scores can be looked up (before, only A-Z a-z 0-9 _ . : @ - could).
    for odd in ("jos%C3%A9", "user%207", "jane+churn@example.com"):
        assert http.get(f"/users/{odd}/risk", headers=KEY).status_code == 404, odd  # unknown, not refused
    assert http.post("/users/risk", json={"user_ids": ["a/b", "José"]}, headers=KEY).status_code == 200
    assert http.post("/users/risk", json={"user_ids": ["a\u0000"]}, headers=KEY).status_code == 422
    assert http.get("/users/" + "x" * 65 + "/risk", headers=KEY).status_code == 422
    assert http.post("/users/risk", json={"user_ids": []}, headers=KEY).status_code == 422
    assert http.post("/users/risk", json={"user_ids": ["u"] * 1001}, headers=KEY).status_code == 422


def test_auth(client: Any) -> None:
    http, _, _ = client
    assert http.get("/users/u1/risk").status_code == 401
    assert http.get("/users/u1/risk", headers={"X-API-Key": "nope"}).status_code == 401
    assert http.get("/users/u1/risk", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert http.get("/users/u1/risk", headers={"Authorization": "Basic k1"}).status_code == 401
    # X-API-Key, when sent, is the key that counts.
    assert http.get("/users/u1/risk", headers={"X-API-Key": "nope", "Authorization": "Bearer k1"}).status_code == 401
    assert http.get("/health/live").status_code == 200
    assert http.get("/metrics").status_code == 200


def test_metrics_show_the_in_flight_limit_before_any_data_request(client: Any) -> None:
    http, _, _ = client
    limit = initial_limit(load_settings().api_max_in_flight)
    assert f"churn_api_in_flight_limit {float(limit)}" in http.get("/metrics").text


def test_batch_lists_unknown_ids(client: Any) -> None:
    http, _, _ = client
    body = http.post("/users/risk", json={"user_ids": ["u0", "ghost", "u2"]}, headers=KEY).json()
    assert [r["user_id"] for r in body["results"]] == ["u0", "u2"]
    assert body["unknown_user_ids"] == ["ghost"]


def test_no_model_is_503(client: Any) -> None:
    http, models, _ = client
    models.current = None
    answer = http.get("/users/u1/risk", headers=KEY)
    assert answer.status_code == 503
    assert "no champion" in answer.json()["detail"]
    assert http.get("/health/ready").status_code == 503


def test_model_swap_is_picked_up(client: Any) -> None:
    http, models, _ = client
    current = http.get("/models/current", headers=KEY).json()
    assert current["version"] == "1"
    assert (current["calibration"], current["tier_cuts"]) == (None, None)  # not in this stand-in's meta
    models._identity_of_champion = lambda: "2"
    models._load = lambda: LoadedModel(IdleModel(), "churn-lightgbm", "2")
    assert models.refresh()
    assert http.get("/users/u1/risk", headers=KEY).json()["model"]["version"] == "2"


def test_current_model_says_its_calibration_and_tier_cuts() -> None:
    """A downstream tool acting on the probabilities needs the map and the cuts behind them;
    only the Markdown card had them. An artifact without them answers null."""
    meta = {**IdleModel.meta, "calibration": {"method": "platt", "a": 1.1, "b": -0.2}}
    meta["tiers"] = {"high": 0.08, "medium": 0.035, "rule": "high: top 10% of the backtest folds' scores"}
    info = model_info(LoadedModel(IdleModel(), "churn-lightgbm", "3"), meta, 14)
    assert (info.calibration, info.tier_cuts) == ("platt", {"medium": 0.035, "high": 0.08})
    bare = model_info(LoadedModel(IdleModel(), "churn-lightgbm", "3"), IdleModel.meta, 14)
    assert (bare.calibration, bare.tier_cuts) == (None, None)


class CardModel(IdleModel):
    meta: ClassVar[dict[str, Any]] = {**IdleModel.meta, "card": "# Model card: churn-lightgbm\n\n## Intended use\n"}


def test_model_card_is_markdown_and_clear_when_missing(client: Any) -> None:
    http, models, _ = client
    missing = http.get("/models/current/card", headers=KEY)
    assert missing.status_code == 404
    assert "no model card" in missing.json()["detail"]
    assert http.get("/models/current/card").status_code == 401
    models._identity_of_champion = lambda: "2"
    models._load = lambda: LoadedModel(CardModel(), "churn-lightgbm", "2")
    assert models.refresh()
    card = http.get("/models/current/card", headers=KEY)
    assert card.status_code == 200
    assert card.headers["content-type"].startswith("text/markdown")
    # Which version it describes, as the first line under the title and in a header.
    served = "_The champion this API serves: churn-lightgbm version 2._"
    assert card.text == f"# Model card: churn-lightgbm\n\n{served}\n\n## Intended use\n"
    assert card.headers["x-model-version"] == "2"
    models.current = None
    assert http.get("/models/current/card", headers=KEY).status_code == 503


def test_api_keys_are_declared_security_schemes(client: Any) -> None:
    http, _, _ = client
    document = http.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "One of CHURN_API_KEYS",
    }
    assert schemes["Bearer"]["type"] == "http"
    assert schemes["Bearer"]["scheme"] == "bearer"
    # A list of requirements: any one of them will do.
    either: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]
    assert document["paths"]["/users/{user_id}/risk"]["get"]["security"] == either
    assert document["paths"]["/users/risk"]["post"]["security"] == either
    assert "security" not in document["paths"]["/health/live"]["get"]  # open by default


def test_every_answer_of_the_document_is_declared_closed_health_and_slow_bodies_included() -> None:
    """A slow body's 408 and, with `CHURN_OPEN_HEALTH_AND_METRICS=false`, the 401 of the health
    and metrics routes are answers the document listed nowhere."""
    closed = create_app(load_settings(api_keys=["k"], open_health_and_metrics=False)).openapi()["paths"]
    assert {"408", "413", "401"} <= set(closed["/users/risk"]["post"]["responses"])
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert "401" in closed[path]["get"]["responses"], path
        assert closed[path]["get"]["security"] == [{"ApiKey": []}, {"Bearer": []}], path
    opened = create_app(load_settings(api_keys=["k"])).openapi()["paths"]
    assert "401" not in opened["/health/live"]["get"]["responses"]


def test_an_open_api_declares_no_security() -> None:
    document = create_app(load_settings(api_keys=[])).openapi()
    assert "securitySchemes" not in document.get("components", {})
    assert "security" not in document["paths"]["/users/{user_id}/risk"]["get"]


class QuietModel(IdleModel):
    """A deliberately different challenger: half the idle model's log-odds."""

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-0.5 * self._logit(matrix)))


def test_a_distinct_challenger_answers_in_shadow_beside_the_unchanged_served_answer() -> None:
    engine = OnlineEngine()
    engine.apply_all(random_events(3, users=5, days=30, per_user=100))
    features = InMemoryFeatureStore()
    features.write_rows([engine.row(u) for u in engine.states])
    now = max(row.last_event_ms for row in features.rows.values()) + 3 * 86_400_000
    champion = LoadedModel(IdleModel(), "churn-lightgbm", "1")
    answers = {}
    for challenger in (None, LoadedModel(QuietModel(), "churn-lightgbm", "2")):
        metrics = Metrics()

        def current(model: LoadedModel | None = challenger) -> LoadedModel | None:
            return model

        service = RiskService(features, InMemoryRiskStore(), lambda: champion, lambda: now, metrics, challenger=current)
        found, _ = service.answer(["u0", "u1", "u2", "u3"], explain=True)
        answers[challenger is not None] = [a.model_dump() for a in found]
        if challenger is not None:
            assert metrics.shadow_rows_total.labels("api")._value.get() == 4
            assert metrics.shadow_abs_delta_total.labels("api")._value.get() > 0
    for plain, beside in zip(answers[False], answers[True], strict=True):
        assert plain["shadow"] is None
        shadow = beside.pop("shadow")
        assert {**beside, "shadow": None} == plain  # the served fields are the champion's alone
        assert shadow["model"]["version"] == "2"
        assert shadow["churn_probability"] != plain["churn_probability"]
        assert shadow["prediction_id"] != plain["prediction_id"]


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope, as uvicorn hands a request to the app."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("1.2.3.4", 1), "server": ("test", 80),
    }  # fmt: skip


def test_keyless_requests_that_never_send_their_body_take_no_in_flight_slot(client: Any) -> None:
    """Four keyless POSTs declare a body and never send it (4: where the derived in-flight limit
    starts, and its floor). Before, they held every slot (admission comes before the key check,
    which came after the body was read) and a keyed request was shed with 503."""
    http, _, _ = client
    app = http.app

    async def scenario() -> tuple[list[int], int]:
        never = asyncio.Event()

        async def stalled() -> dict[str, Any]:
            await never.wait()
            return {"type": "http.disconnect"}

        keyless_answers: list[int] = []

        async def note_keyless(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                keyless_answers.append(message["status"])

        declared = [(b"content-type", b"application/json"), (b"content-length", b"200000")]
        uploads = [
            asyncio.create_task(app(_scope("POST", "/users/risk", declared), stalled, note_keyless)) for _ in range(4)
        ]
        await asyncio.sleep(0.05)
        answered: list[int] = []

        async def empty() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])

        await app(_scope("GET", "/users/u1/risk", [(b"x-api-key", b"k1")]), empty, note)
        never.set()
        await asyncio.gather(*uploads, return_exceptions=True)
        return keyless_answers, answered[0]

    keyless_answers, keyed = asyncio.run(scenario())
    assert keyless_answers == [401] * 4  # answered from the headers, the body never read
    assert keyed == 200


def test_the_largest_valid_batch_fits_the_default_body_limit_as_a_default_json_encoder_writes_it(
    client: Any,
) -> None:
    """1,000 distinct ids of 64 characters outside the BMP, as `json.dumps` escapes them (12
    bytes each): 772 KB, refused with 413 under the former 256 KiB limit."""
    http, _, _ = client
    ids = ["".join(chr(0x1F600 + (i >> (2 * k) & 3)) for k in range(5)) + "\U0001f600" * 59 for i in range(1000)]
    assert len(set(ids)) == 1000
    body = json.dumps({"user_ids": ids, "explain": False}).encode()
    assert len(body) > 770_000
    answer = http.post("/users/risk", content=body, headers={**KEY, "content-type": "application/json"})
    assert answer.status_code == 200, answer.text[:200]
    assert len(answer.json()["unknown_user_ids"]) == 1000


def test_the_key_gate_and_the_routes_accept_the_same_keys_and_its_refusals_are_counted(client: Any) -> None:
    """A POST's key is judged by `KeyGate` from its headers, a GET's by the routes' `ApiKeys`:
    each way of sending a key gets one answer from both. Before, an empty `X-API-Key` beside a
    valid bearer token was accepted on GET and refused on POST; and the gate's 401s were missing
    from `churn_api_request_duration_seconds` (it sits outside the timer)."""
    http, _, _ = client
    ways: list[tuple[list[tuple[str, str]], int]] = [
        ([("X-API-Key", "k1")], 200),
        ([("Authorization", "Bearer k1")], 200),
        ([("X-API-Key", ""), ("Authorization", "Bearer k1")], 200),  # an empty X-API-Key is absent
        ([("X-API-Key", "wrong"), ("Authorization", "Bearer k1")], 401),  # X-API-Key comes first
        ([("X-API-Key", "k1"), ("X-API-Key", "wrong")], 200),  # the first of a repeated header
        ([("Authorization", "Basic k1"), ("Authorization", "Bearer k1")], 401),
        ([("Authorization", "Bearer ")], 401),
        ([], 401),
    ]
    for headers, expected in ways:
        get = http.get("/users/u1/risk", headers=headers)
        post = http.post("/users/risk", json={"user_ids": ["u1"]}, headers=headers)
        assert (get.status_code, post.status_code) == (expected, expected), headers
    registry = http.app.state.deps.metrics.registry
    refused = {"route": "/users/risk", "method": "POST", "status": "401"}
    assert registry.get_sample_value("churn_api_request_duration_seconds_count", refused) == 4


def test_a_user_id_with_a_slash_is_looked_up_and_a_path_that_is_not_utf8_is_refused() -> None:
    """Every id the stream scores can be looked up: "a/b" is sent as a%2Fb, which arrives
    decoded. /users/%FF/risk is no id at all (Starlette would read it as the user "\ufffd")."""
    engine = OnlineEngine()
    events = random_events(3, users=2, days=3, per_user=20)
    first, second = sorted({e.user_id for e in events})
    renamed = {first: "a/b", second: "\ufffd"}
    engine.apply_all([msgspec.structs.replace(e, user_id=renamed.get(e.user_id, e.user_id)) for e in events])
    features = InMemoryFeatureStore()
    features.write_rows([engine.row(u) for u in engine.states])
    metrics = Metrics()
    models = ModelHolder(lambda: "1", lambda: LoadedModel(IdleModel(), "churn-lightgbm", "1"))
    now = max(row.last_event_ms for row in features.rows.values())
    deps = Deps(service=RiskService(features, InMemoryRiskStore(), lambda: models.current, lambda: now, metrics),
                models=models, metrics=metrics)  # fmt: skip
    with TestClient(create_app(load_settings(api_keys=["k2"]), deps)) as http:
        slash = http.get("/users/a%2Fb/risk", headers=KEY)
        assert slash.status_code == 200, slash.text
        assert slash.json()["user_id"] == "a/b"
        assert http.get("/users/%EF%BF%BD/risk", headers=KEY).json()["user_id"] == "\ufffd"  # a real id
        refused = http.get("/users/%FF/risk", headers=KEY)
        assert refused.status_code == 422
        assert "is not UTF-8" in refused.json()["detail"]
        assert http.get("/users/at-risk?tier=high", headers=KEY).status_code == 200  # still its own route
    # The latency series keeps the route's documented name (dashboards and alerts select it).
    series = {"route": "/users/{user_id}/risk", "method": "GET", "status": "200"}
    assert metrics.registry.get_sample_value("churn_api_request_duration_seconds_count", series) == 2


def test_a_body_that_is_not_json_gets_one_status_and_says_why(client: Any) -> None:
    """Malformed JSON, a body that is not UTF-8 (UTF-16 and UTF-32 too, which the JSON parser
    would read), one nested too deeply, an empty one and one sent as text or without a content
    type are the same mistake:
    each gets 422 with what was wrong (FastAPI answered 400 "There was an
    error parsing the body" for the second and third, "14: JSON decode error" for the first)."""
    http, _, _ = client
    as_json = {**KEY, "content-type": "application/json"}
    bodies = {
        b'{"user_ids": [': (as_json, "the body is not JSON"),
        b'{"user_ids": ["\xff"]}': (as_json, "not UTF-8"),
        b"[" * 100_000 + b"]" * 100_000: (as_json, "nested too deeply"),
        b'{"user_ids": ["u1"]}': ({**KEY, "content-type": "text/plain"}, "content-type application/json"),
        b'{"user_ids": ["u1"]} ': ({**KEY, "content-type": "text/json"}, "content-type application/json"),
        b' {"user_ids": ["u1"]}': (KEY, "content-type application/json (the request has no content-type)"),
        b"": (as_json, "the body is empty"),
        '{"user_ids": ["u1"]}'.encode("utf-16"): (as_json, "not UTF-8"),  # the parser would read it
        '{"user_ids": ["u1"]}'.encode("utf-32-le"): (as_json, "not UTF-8"),  # no byte order mark
    }
    for body, (headers, why) in bodies.items():
        answer = http.post("/users/risk", content=body, headers=headers)
        assert answer.status_code == 422, (body[:20], answer.text)
        assert why in answer.json()["detail"], answer.text
    assert http.get("/no/such/route", headers=KEY).status_code == 404  # other HTTP errors unchanged
    assert http.post("/users/risk", json={"user_ids": ["u1"]}, headers=KEY).status_code == 200
    assert "400" not in http.app.openapi()["paths"]["/users/risk"]["post"]["responses"]
