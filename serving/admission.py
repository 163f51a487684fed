"""Admission control: at most `max_in_flight` requests in flight per worker, the rest refused at once.

Without a bound, a worker past its capacity queues every request (in its thread pool, its event
loop and the kernel's socket buffers) and answers all of them, ever later: the latency of every
request grows with the overload. Here a request that finds `max_in_flight` others in flight is
answered 503 with `Retry-After` before any routing, validation or I/O, so the requests that are
accepted wait behind at most `max_in_flight - 1` others and their latency stays bounded; the client
(or a load balancer) retries elsewhere or later. `/health/*` and `/metrics` are never refused: an
orchestrator must not restart a worker for being busy, and Prometheus must see the overload.

A plain ASGI middleware (like `serving.timing`): the refusal costs no task, no routing and no
thread hop. It runs on the event loop only, so the counter needs no lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from monitoring.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]

RETRY_AFTER_SECONDS = 1


def never_shed(path: str) -> bool:
    """Returns whether `path` is answered whatever the load (health probes and metrics)."""
    return path.startswith("/health/") or path == "/metrics"


class AdmissionControl:
    """Answers 503 with `Retry-After` to an HTTP request that arrives while `max_in_flight`
    others are in flight in this worker (paths of `never_shed` excepted, and not counted).

    `metrics` returns the process's Metrics, or None before the lifespan has built them (then
    nothing is recorded); refusals go to `churn_api_shed_requests_total`, the count in flight to
    `churn_api_requests_in_flight`.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0
        detail = f"the API is at its limit of {max_in_flight} requests in flight per worker: retry later"
        self._body = json.dumps({"detail": detail}).encode()
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        """Refuses the request when the worker is full, else runs it and counts it while in flight."""
        if scope["type"] != "http" or never_shed(scope["path"]):
            await self.app(scope, receive, send)
            return
        metrics = self.metrics()
        if self.in_flight >= self.max_in_flight:
            if metrics is not None:
                metrics.api_shed_total.inc()
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        self.in_flight += 1
        if metrics is not None:
            metrics.api_in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if metrics is not None:
                metrics.api_in_flight.set(self.in_flight)
