"""The API's request limits and key checks, without services: body size (413) and key digests."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from monitoring.metrics import Metrics
from serving.auth import ApiKeys
from serving.limits import BodySizeLimit
from serving.timing import RequestTimer

LIMIT = 4096


@pytest.fixture
def client() -> Iterator[tuple[TestClient, list[int]]]:
    """An app that echoes how many body bytes its route read, behind a 4 KiB limit."""
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=LIMIT)
    read: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        read.append(len(body))
        return {"bytes": len(body)}

    with TestClient(app) as test_client:
        yield test_client, read


def test_a_body_within_the_limit_passes(client: tuple[TestClient, list[int]]) -> None:
    http, read = client
    assert http.post("/echo", content=b"x" * LIMIT).json() == {"bytes": LIMIT}
    assert read == [LIMIT]


def test_a_declared_oversized_body_is_refused_unread(client: tuple[TestClient, list[int]]) -> None:
    http, read = client
    answer = http.post("/echo", content=b"x" * (LIMIT + 1))
    assert answer.status_code == 413
    assert answer.json() == {"detail": f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes"}
    assert read == []  # the route never ran


def test_a_chunked_body_is_refused_once_it_passes_the_limit(client: tuple[TestClient, list[int]]) -> None:
    http, read = client
    answer = http.post("/echo", content=(b"x" * 1000 for _ in range(100)))  # no Content-Length
    assert answer.status_code == 413
    assert "exceeds the limit" in json.loads(answer.text)["detail"]
    assert read == []


def test_keys_are_compared_as_equal_length_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    app = FastAPI()

    @app.get("/data", dependencies=[Depends(ApiKeys(["short", "a-much-longer-key-than-the-first"]))])
    async def data() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(app) as http:
        assert http.get("/data", headers={"X-API-Key": "short"}).status_code == 200
        assert http.get("/data", headers={"X-API-Key": "x" * 10_000}).status_code == 401
    # Both keys compared each time (no early exit on a match), always as two 32-byte digests.
    assert compared == [(32, 32)] * 4


def test_a_body_that_does_not_arrive_in_time_is_refused_with_408() -> None:
    """A client that declared a body and never sent it held its in-flight slot for as long as
    it liked (uvicorn has no body-read timeout)."""
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=LIMIT, read_timeout_s=0.2)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    async def scenario() -> tuple[list[int], float]:
        answers: list[int] = []

        async def never() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def note(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answers.append(message["status"])

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/echo", "raw_path": b"/echo", "query_string": b"", "root_path": "",
            "headers": [(b"content-length", b"100")], "client": ("1.2.3.4", 1), "server": ("test", 80),
        }  # fmt: skip
        started = time.monotonic()
        await asyncio.wait_for(app(scope, never, note), 5)
        return answers, time.monotonic() - started

    answers, waited = asyncio.run(scenario())
    assert answers == [408]
    assert 0.2 <= waited < 2


def test_an_unknown_method_is_one_label_value_not_one_per_name() -> None:
    """Some HTTP servers pass any method token through: each name was a new series."""
    metrics = Metrics()

    async def app(_scope: dict[str, Any], _receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(_message: dict[str, Any]) -> None:
        return None

    timer = RequestTimer(app, lambda: metrics)
    for method in ("BREW", "PROPFIND", "GET"):
        scope: dict[str, Any] = {"type": "http", "method": method, "path": "/x", "headers": []}
        asyncio.run(timer(scope, lambda: None, ignore))
    methods = {s.labels["method"] for m in metrics.request_seconds.collect() for s in m.samples}
    assert methods == {"other", "GET"}
