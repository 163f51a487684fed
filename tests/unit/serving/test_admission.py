"""`serving.admission.AdmissionControl`: the in-flight bound, its 503s, and what it never sheds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import generate_latest

from core.settings import load_settings
from monitoring.metrics import Metrics
from serving.admission import (
    DERIVED_MAX,
    DERIVED_START,
    MIN_MEASURED,
    RETRY_AFTER_SECONDS,
    STANDING_SHED_SHARE,
    STAY_HALVED_SHARE,
    WINDOW_SECONDS,
    AdmissionControl,
)
from serving.app import create_app
from serving.auth import KeyGate


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


class _Costly:
    """An ASGI app that answers 200 after `cost` seconds of the fake monotonic clock `now[0]` of
    the admission control under test (one request at a time: its whole cost is busy time)."""

    def __init__(self, now: list[float], cost: float) -> None:
        self.now = now
        self.cost = cost

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.now[0] += self.cost
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


def test_a_derived_limit_fits_half_the_budget_at_the_measured_service_time() -> None:
    now = [100.0]
    inner = _Costly(now, cost=0.0003)
    app = AdmissionControl(inner, max_in_flight=0, metrics=lambda: None, clock=lambda: now[0], latency_budget_s=0.020)

    async def window(requests: int, cost: float) -> None:
        """Sends `requests` requests one after the other, each busy for `cost` seconds, in one
        window, then opens the next."""
        inner.cost = cost
        start = now[0]
        for i in range(requests):
            assert (await _request(app, f"/users/u{i}/risk"))[0] == 200
        now[0] = start + WINDOW_SECONDS

    async def scenario() -> None:
        assert app.limit == DERIVED_START  # nothing measured yet
        await window(60, 0.0003)
        await window(1, 0.0003)  # its first request closed the window before: 20 ms / 4 / 0.3 ms
        assert (app.full_limit, app.limit) == (16, 16)
        # Smoothed with the window before: (0.3 + 0.6) / 2 = 0.45 ms, 11 fit.
        await window(MIN_MEASURED, 0.0006)
        await window(1, 0.0006)
        assert app.limit == 11
        # Too few requests and too little busy time to measure: kept.
        await window(MIN_MEASURED - 2, 0.002)
        await window(1, 0.002)
        assert app.limit == 11
        # Dearer requests: never fewer than the start (0.45 and 4 ms smoothed: 2.2 ms, 2.2 fit).
        await window(MIN_MEASURED, 0.004)
        await window(1, 0.004)
        assert app.limit == DERIVED_START
        # A window long past says nothing of now: kept.
        await window(MIN_MEASURED, 0.00001)
        now[0] += 5 * WINDOW_SECONDS
        await window(1, 0.00001)
        assert app.limit == DERIVED_START
        # Very cheap requests: capped.
        for _ in range(10):
            await window(MIN_MEASURED, 0.00001)
        assert app.limit == DERIVED_MAX
        # A few batches of tens of milliseconds each are enough to measure (busy 0.4 s): the
        # limit learnt from cheap requests does not stay.
        await window(10, 0.04)
        await window(1, 0.04)
        assert app.limit == DERIVED_START

    asyncio.run(scenario())


def test_a_worker_that_starts_in_an_overload_learns_its_limit_there() -> None:
    now = [100.0]
    inner = _Held()
    app = AdmissionControl(inner, max_in_flight=0, metrics=lambda: None, clock=lambda: now[0], latency_budget_s=0.020)

    async def scenario() -> None:
        # Each round: 8 arrive together, 4 are admitted and complete after 1.2 ms, 4 are refused
        # (half of every window: an overload); 0.3 ms of busy time per request completed.
        for _ in range(15):
            tasks = [asyncio.create_task(_request(app, f"/users/u{i}/risk")) for i in range(8)]
            for _ in range(5):
                await asyncio.sleep(0)
            assert app.in_flight == 4
            now[0] += 0.0012
            inner.release.set()
            statuses = [status for status, _ in await asyncio.gather(*tasks)]
            assert statuses.count(503) == 4
            inner.release = asyncio.Event()
        now[0] = 100.0 + WINDOW_SECONDS
        inner.release.set()
        assert (await _request(app, "/users/u0/risk"))[0] == 200
        assert app.service_seconds == pytest.approx(0.0003)
        assert (app.full_limit, app.limit) == (16, 8)  # learnt, and halved for the overload

    asyncio.run(scenario())


def test_a_fixed_limit_is_not_derived() -> None:
    now = [100.0]
    app = AdmissionControl(_Costly(now, cost=0.00001), max_in_flight=3, metrics=lambda: None, clock=lambda: now[0])

    async def scenario() -> None:
        for _ in range(3):
            for i in range(MIN_MEASURED * 2):
                assert (await _request(app, f"/users/u{i}/risk"))[0] == 200
            now[0] += WINDOW_SECONDS
        assert (app.limit, app.service_seconds) == (3, None)

    asyncio.run(scenario())


def test_the_app_is_wrapped_first_with_the_settings_and_the_metrics_are_exposed() -> None:
    app = create_app(load_settings(api_max_in_flight=5, api_latency_budget_ms=20))
    gate, outermost = app.user_middleware[:2]  # the last added runs first: nothing else is spent on a refusal
    assert gate.cls is KeyGate  # only a keyless request with a body is refused before admission
    assert outermost.cls is AdmissionControl
    assert outermost.kwargs["max_in_flight"] == 5
    assert outermost.kwargs["latency_budget_s"] == 0.020
    assert load_settings().api_max_in_flight == 0  # derived by default
    text = generate_latest(Metrics().registry).decode()
    assert "churn_api_shed_requests_total 0.0" in text
    assert "churn_api_requests_in_flight 0.0" in text
