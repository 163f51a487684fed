"""`serving.admission.AdmissionControl`: the in-flight bound, its 503s, and what it never sheds."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import generate_latest

from core.settings import load_settings
from monitoring.metrics import Metrics
from serving.admission import (
    RETRY_AFTER_SECONDS,
    STANDING_SHED_SHARE,
    STAY_HALVED_SHARE,
    WINDOW_SECONDS,
    AdmissionControl,
)
from serving.app import create_app


class _Held:
    """An ASGI app whose requests stay in flight until released; answers 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def _request(app: AdmissionControl, path: str) -> tuple[int, dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


def test_requests_past_the_limit_are_refused_at_once_with_retry_after_and_counted() -> None:
    metrics = Metrics()
    inner = _Held()
    app = AdmissionControl(inner, max_in_flight=3, metrics=lambda: metrics)

    async def scenario() -> None:
        held = [asyncio.create_task(_request(app, f"/users/u{i}/risk")) for i in range(3)]
        while inner.entered < 3:
            await asyncio.sleep(0)
        assert app.in_flight == 3
        assert metrics.api_in_flight._value.get() == 3
        # Full: the next data request is refused without reaching the app...
        status, headers = await _request(app, "/users/u9/risk")
        assert status == 503
        assert headers[b"retry-after"] == str(RETRY_AFTER_SECONDS).encode()
        assert inner.entered == 3
        # ...health and metrics are not (they reach the app, and are not counted in flight).
        probes = [asyncio.create_task(_request(app, path)) for path in ("/health/live", "/health/ready", "/metrics")]
        while inner.entered < 6:
            await asyncio.sleep(0)
        assert app.in_flight == 3
        inner.release.set()
        assert [status for status, _ in await asyncio.gather(*held, *probes)] == [200] * 6
        assert app.in_flight == 0
        # Room again: accepted.
        assert (await _request(app, "/users/u9/risk"))[0] == 200

    asyncio.run(scenario())
    assert metrics.api_shed_total._value.get() == 1
    assert metrics.api_in_flight._value.get() == 0


def test_the_limit_halves_after_a_window_that_refused_a_large_share_and_comes_back_when_refusals_fall() -> None:
    metrics = Metrics()
    now = [100.0]
    inner = _Held()
    app = AdmissionControl(inner, max_in_flight=4, metrics=lambda: metrics, clock=lambda: now[0])

    async def statuses(count: int) -> list[int]:
        """Sends `count` requests that stay in flight if admitted; returns their statuses so far
        (0: admitted and still held)."""
        tasks = [asyncio.create_task(_request(app, f"/users/u{i}/risk")) for i in range(count)]
        for _ in range(5):
            await asyncio.sleep(0)
        return [task.result()[0] if task.done() else 0 for task in tasks]

    async def release() -> None:
        inner.release.set()
        while app.in_flight:
            await asyncio.sleep(0)
        inner.release = asyncio.Event()

    async def scenario() -> None:
        # A burst: 20 requests admitted, then 1 of 5 refused (1 of 25, below the share): the limit stays 4.
        assert 1 / 25 <= STANDING_SHED_SHARE < 1 / 9  # what the counts below rely on
        for _ in range(5):
            assert await statuses(4) == [0, 0, 0, 0]
            await release()
        assert await statuses(5) == [0, 0, 0, 0, 503]
        await release()
        now[0] += WINDOW_SECONDS
        assert await statuses(5) == [0, 0, 0, 0, 503]
        assert app.limit == 4
        assert metrics.api_in_flight_limit._value.get() == 4
        # A standing overload: 1 of the 5 of this window refused (above the share).
        await release()
        now[0] += WINDOW_SECONDS
        assert await statuses(3) == [0, 0, 503]
        assert app.limit == 2
        assert metrics.api_in_flight_limit._value.get() == 2
        await release()
        # A calm window at the halved limit (2 admitted, none refused): back to 4 after it.
        now[0] += WINDOW_SECONDS
        assert await statuses(2) == [0, 0]
        assert app.limit == 2  # the window before refused 1 of 3
        await release()
        now[0] += WINDOW_SECONDS
        assert await statuses(4) == [0, 0, 0, 0]
        assert app.limit == 4
        await release()
        # A window that ended long ago says nothing of now: an overloaded one (4 of 12 refused)
        # followed by a silent one.
        assert await statuses(8) == [0, 0, 0, 0, 503, 503, 503, 503]
        await release()
        now[0] += 2 * WINDOW_SECONDS
        assert await statuses(4) == [0, 0, 0, 0]
        assert app.limit == 4
        await release()
        # A load the full limit serves with a few refusals: halved after a window that refused
        # 4 of 12, the limit comes back after a halved window that refused 1 of 11, a share above
        # the standing one but below the one that keeps it halved.
        assert await statuses(8) == [0, 0, 0, 0, 503, 503, 503, 503]
        await release()
        now[0] += WINDOW_SECONDS
        for _ in range(4):
            assert await statuses(2) == [0, 0]
            await release()
        assert app.limit == 2
        assert STANDING_SHED_SHARE < 1 / 11 <= STAY_HALVED_SHARE
        assert await statuses(3) == [0, 0, 503]
        await release()
        now[0] += WINDOW_SECONDS
        assert await statuses(4) == [0, 0, 0, 0]
        assert app.limit == 4
        await release()

    asyncio.run(scenario())


def test_the_app_is_wrapped_first_with_the_setting_and_the_metrics_are_exposed() -> None:
    app = create_app(load_settings(api_max_in_flight=5))
    outermost = app.user_middleware[0]  # the last added runs first: nothing else is spent on a refusal
    assert outermost.cls is AdmissionControl
    assert outermost.kwargs["max_in_flight"] == 5
    text = generate_latest(Metrics().registry).decode()
    assert "churn_api_shed_requests_total 0.0" in text
    assert "churn_api_requests_in_flight 0.0" in text
