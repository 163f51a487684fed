"""Admission control: at most `limit` requests in flight per worker, the rest refused at once.

Without a bound, a worker past its capacity queues every request (in its thread pool, its event
loop and the kernel's socket buffers) and answers all of them, ever later: the latency of every
request grows with the overload. Here a request that finds `limit` others in flight is
answered 503 with `Retry-After` before any routing, validation or I/O, so the requests that are
accepted wait behind at most `limit - 1` others and their latency stays bounded; the client
(or a load balancer) retries elsewhere or later. `/health/*` and `/metrics` are never refused: an
orchestrator must not restart a worker for being busy, and Prometheus must see the overload.

The limit halves during a standing overload. Once every slot is always taken, an accepted request
waits for about `limit` others (Little's law: in flight = throughput x time in the worker), while
at capacity it waits for one or two: with 4 the overload test measured the accepted p99 at
2.7x and 2.8x the p99 at capacity (README, *Overload*, has every run). A limit of 2 throughout
kept that to 0.9-1.3x, but a burst at capacity likely finds both slots taken sooner: the rate
served without a refusal came out at 300 and 375/s in its two runs, against 325-800/s (mean
500/s) in seven runs with 4 (a suggestive, not a conclusive, difference). So the worker keeps
its full limit for bursts, and halves it after a window of `WINDOW_SECONDS` that refused more
than `STANDING_SHED_SHARE` of its data requests. Once halved, it stays halved only while a window
refuses more than `STAY_HALVED_SHARE`: judged by the first share, a load that the full limit serves
with a few refusals (and the halved one with some more, as bursts find both slots taken) would keep
the limit halved for as long as that load lasts.

The full limit is derived from what requests cost in this worker, unless `CHURN_API_MAX_IN_FLIGHT`
fixes it: as many as fit in `WAIT_SHARE` of the latency budget at the worker's service time per
request, measured each window as the wall time during which it had a request in flight divided by
the requests it completed (the inverse of its throughput while busy, so by Little's law n requests
ahead of an admitted one make it wait about n of those). Wall time, not CPU time: it includes the
CPU that other processes on the host take from the worker and the waits on Redis that requests do
not overlap, both of which delay the requests queued behind. Machines of one kind differ by up to
3x in speed, so one fixed number either queues past the budget on a slow machine or refuses
bursts that a fast one serves well within it: a score request cost 1.2 ms of CPU on one 2-core
machine of this kind and 0.37 ms on another, where a fixed 4 refused 1.8-20% of the requests at
3,200/s although, with 16 admitted, that rate was served with a p99 of 4.5 ms and none refused
(README, *Capacity, overload and sizing*).

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
# The derived full limit: the requests ahead of an accepted one may take at most this share of the
# latency budget (the rest is left to the request itself, the network and the machine's stalls).
# With half, `churn bench api`'s 10 s runs at capacity queued past the budget in all four runs
# (p99 12-19 ms; 13-16 in flight): a 1 s average service time hides the bursts in which the load
# and Redis take the worker's CPU. With a quarter (6-8 in flight): p99 4.7 ms at the same rate.
WAIT_SHARE = 0.25
# It starts at the fixed default of earlier versions and never goes below it, so a derived limit
# never refuses more than that default did; the cap bounds what one worker holds in memory.
DERIVED_START = 4
DERIVED_MAX = 64
# A window's service time per request counts once it completed this many requests or was busy this
# long (a few cheap requests say little; a few batches of 1,000 ids, tens of milliseconds each, say
# enough), and is smoothed with the earlier windows' by this weight. Windows that refused requests
# count too: a worker that starts during an overload learns its limit there.
MIN_MEASURED = 50
MIN_BUSY_SECONDS = 0.25
SMOOTHING = 0.5


def initial_limit(max_in_flight: int) -> int:
    """Returns the in-flight limit a worker starts with: `max_in_flight`, or `DERIVED_START` when
    it is 0 (derived)."""
    return max_in_flight or DERIVED_START


def never_shed(path: str) -> bool:
    """Returns whether `path` is answered whatever the load (health probes and metrics)."""
    return path.startswith("/health/") or path == "/metrics"


class AdmissionControl:
    """Answers 503 with `Retry-After` to an HTTP request that arrives while `limit` others are
    in flight in this worker (paths of `never_shed` excepted, and not counted). `limit` is the
    full limit, or half of it (at least 1) for the window after one that refused more than
    `STANDING_SHED_SHARE` of its requests at the full limit, or more than `STAY_HALVED_SHARE`
    at the halved one.

    The full limit is `max_in_flight` when it is positive. With 0 it is derived: `DERIVED_START`
    until a recent window has completed `MIN_MEASURED` requests or been busy `MIN_BUSY_SECONDS`,
    then as many requests as fit in `WAIT_SHARE` of `latency_budget_s` at the smoothed service
    time per request (busy wall time over requests completed), between `DERIVED_START` and
    `DERIVED_MAX`.

    `metrics` returns the process's Metrics, or None before the lifespan has built them (then
    nothing is recorded); refusals go to `churn_api_shed_requests_total`, the count in flight to
    `churn_api_requests_in_flight`, the limit to `churn_api_in_flight_limit`. `clock` gives
    monotonic seconds (the windows' and the busy time's).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        metrics: Callable[[], Metrics | None],
        clock: Callable[[], float] = time.monotonic,
        latency_budget_s: float = 0.010,
    ) -> None:
        self.app = app
        self.derived = max_in_flight == 0
        self.full_limit = initial_limit(max_in_flight)
        self.limit = self.full_limit
        self.halved = False
        self.wait_budget_s = WAIT_SHARE * latency_budget_s
        self.service_seconds: float | None = None  # smoothed, of the windows measured (derived limit only)
        self.metrics = metrics
        self.clock = clock
        self.in_flight = 0
        self._window_start = float("-inf")  # the first request opens the first window
        self._arrivals = 0
        self._refused = 0
        self._completed = 0
        self._busy = 0.0  # wall seconds of the window with a data request in flight, until _busy_since
        self._busy_since = 0.0
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
        now = self._arrived(metrics)
        if self.in_flight >= self.limit:
            self._refused += 1
            if metrics is not None:
                metrics.api_shed_total.inc()
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        if self.in_flight == 0:
            self._busy_since = now
        self.in_flight += 1
        if metrics is not None:
            metrics.api_in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self._completed += 1
            if self.in_flight == 0:
                self._busy += self.clock() - self._busy_since
            if metrics is not None:
                metrics.api_in_flight.set(self.in_flight)

    def _arrived(self, metrics: Metrics | None) -> float:
        """Counts a data request in the current window and returns the clock's time, first
        closing the window if it has ended: a derived full limit is measured again (`_measure`),
        and the next window's limit is halved if the closed one refused more than its share
        (`STANDING_SHED_SHARE` at the full limit, `STAY_HALVED_SHARE` at the halved one; a window
        followed by a silent one says nothing of now: full limit), and shown in
        `churn_api_in_flight_limit`."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed >= WINDOW_SECONDS:
            recent = elapsed < 2 * WINDOW_SECONDS
            share = STAY_HALVED_SHARE if self.halved else STANDING_SHED_SHARE
            overloaded = self._refused > share * self._arrivals
            if self.derived:
                busy = self._busy
                if self.in_flight > 0:  # the busy stretch goes on: count its part in this window
                    busy += now - self._busy_since
                    self._busy_since = now
                if recent:
                    self._measure(busy)
                self._busy = 0.0
            self.halved = recent and overloaded
            self.limit = max(1, self.full_limit // 2) if self.halved else self.full_limit
            if metrics is not None:
                metrics.api_in_flight_limit.set(self.limit)
            self._window_start, self._arrivals, self._refused, self._completed = now, 0, 0, 0
        self._arrivals += 1
        return now

    def _measure(self, busy_seconds: float) -> None:
        """Derives the full limit again from a window that was busy `busy_seconds`, if it
        completed `MIN_MEASURED` requests or was busy `MIN_BUSY_SECONDS`."""
        if self._completed == 0 or busy_seconds <= 0:
            return
        if self._completed < MIN_MEASURED and busy_seconds < MIN_BUSY_SECONDS:
            return
        per_request = busy_seconds / self._completed
        if self.service_seconds is not None:
            per_request = SMOOTHING * per_request + (1 - SMOOTHING) * self.service_seconds
        self.service_seconds = per_request
        self.full_limit = min(DERIVED_MAX, max(DERIVED_START, int(self.wait_budget_s / per_request)))
