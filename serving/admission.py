"""Admission control: at most `max_in_flight` requests in flight per worker, the rest refused at once.

Without a bound, a worker past its capacity queues every request (in its thread pool, its event
loop and the kernel's socket buffers) and answers all of them, ever later: the latency of every
request grows with the overload. Here a request that finds `max_in_flight` others in flight is
answered 503 with `Retry-After` before any routing, validation or I/O, so the requests that are
accepted wait behind at most `max_in_flight - 1` others and their latency stays bounded; the client
(or a load balancer) retries elsewhere or later. `/health/*` and `/metrics` are never refused: an
orchestrator must not restart a worker for being busy, and Prometheus must see the overload.

The limit halves during a standing overload. Once every slot is always taken, an accepted request
waits for about `limit` others (Little's law: in flight = throughput x time in the worker), while
at capacity it waits for one or two: with 4 the overload test measured the accepted p99 at
2.7x and 2.8x the p99 at capacity (README, *Overload*, has every run). A limit of 2 throughout
kept that to 0.9-1.3x, but a burst at capacity likely finds both slots taken sooner: the rate
served without a refusal came out at 300 and 375/s in its two runs, against 325-800/s (mean
500/s) in seven runs with 4 (a suggestive, not a conclusive, difference). So the worker keeps
`max_in_flight` for bursts, and halves it after a window of `WINDOW_SECONDS` that refused more
than `STANDING_SHED_SHARE` of its data requests. Once halved, it stays halved only while a window
refuses more than `STAY_HALVED_SHARE`: judged by the first share, a load that the full limit serves
with a few refusals (and the halved one with some more, as bursts find both slots taken) would keep
the limit halved for as long as that load lasts.

A plain ASGI middleware (like `serving.timing`): the refusal costs no task, no routing and no
thread hop. It runs on the event loop only, so the counters need no lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from monitoring.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]

RETRY_AFTER_SECONDS = 1
# A standing overload is told from a burst over this window, by the share of requests refused.
WINDOW_SECONDS = 1.0
# At capacity a burst refuses a few requests now and then (the search of `churn bench api` counts
# a step with any refusal as failed); a standing overload refuses a steady share (overload test
# runs with 4 in flight: 8% at 1.1x the rate the worker served, 55-80% at 3x its peak rate).
STANDING_SHED_SHARE = 0.05
# A halved limit is kept while a window refuses more than this: a standing overload refuses much
# more (the overload test at 3x: 55-80%), a load near capacity much less.
STAY_HALVED_SHARE = 0.20


def never_shed(path: str) -> bool:
    """Returns whether `path` is answered whatever the load (health probes and metrics)."""
    return path.startswith("/health/") or path == "/metrics"


class AdmissionControl:
    """Answers 503 with `Retry-After` to an HTTP request that arrives while `limit` others are
    in flight in this worker (paths of `never_shed` excepted, and not counted). `limit` is
    `max_in_flight`, or half of it (at least 1) for the window after one that refused more than
    `STANDING_SHED_SHARE` of its requests at the full limit, or more than `STAY_HALVED_SHARE`
    at the halved one.

    `metrics` returns the process's Metrics, or None before the lifespan has built them (then
    nothing is recorded); refusals go to `churn_api_shed_requests_total`, the count in flight to
    `churn_api_requests_in_flight`, the limit to `churn_api_in_flight_limit`. `clock` gives
    monotonic seconds (the windows').
    """

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        metrics: Callable[[], Metrics | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.standing_in_flight = max(1, max_in_flight // 2)
        self.limit = max_in_flight
        self.metrics = metrics
        self.clock = clock
        self.in_flight = 0
        self._window_start = float("-inf")  # the first request opens the first window
        self._arrivals = 0
        self._refused = 0
        detail = "the API worker has as many requests in flight as it admits now: retry later"
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
        self._arrived(metrics)
        if self.in_flight >= self.limit:
            self._refused += 1
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

    def _arrived(self, metrics: Metrics | None) -> None:
        """Counts a data request in the current window, first closing the window if it has ended:
        the next one's limit is halved if the closed one refused more than its share
        (`STANDING_SHED_SHARE` at the full limit, `STAY_HALVED_SHARE` at the halved one; a window
        followed by a silent one says nothing of now: full limit), and shown in
        `churn_api_in_flight_limit`."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed >= WINDOW_SECONDS:
            recent = elapsed < 2 * WINDOW_SECONDS
            share = STAY_HALVED_SHARE if self.limit < self.max_in_flight else STANDING_SHED_SHARE
            overloaded = self._refused > share * self._arrivals
            self.limit = self.standing_in_flight if recent and overloaded else self.max_in_flight
            if metrics is not None:
                metrics.api_in_flight_limit.set(self.limit)
            self._window_start, self._arrivals, self._refused = now, 0, 0
        self._arrivals += 1
