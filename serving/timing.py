"""Request latency into `churn_api_request_duration_seconds`, as a plain ASGI middleware.

Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) wraps every request in extra tasks
and memory streams, which costs more than the rest of a risk request's own Python; this
middleware only notes the status code as the response starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

from monitoring.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]

# The method label takes these values only: a client's own method name (some HTTP servers pass
# any token) would add a series per name.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestTimer:
    """Observes each HTTP request's duration by route template, method and status code
    (`observe_request`).

    `metrics` returns the process's Metrics, or None before the lifespan has built them (then
    nothing is recorded).
    """

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        """Runs the request through the app and records its latency (HTTP only)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]  # if the app fails before it starts a response, the server answers 500

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            observe_request(self.metrics(), scope, status[0], time.perf_counter() - started)


def observe_request(
    metrics: Metrics | None, scope: Scope, status: int, seconds: float, routes: Sequence[BaseRoute] = ()
) -> None:
    """Records one answered request in `churn_api_request_duration_seconds` (nothing while
    `metrics` is None), labelled by its route's template ("unmatched" for a path no route
    takes, so ids never become labels), method and status code. A request answered before
    routing (`serving.auth.KeyGate`) is matched against `routes` here."""
    if metrics is None:
        return
    route = scope.get("route") or next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    # `path_format` drops a convertor ("{user_id:any}" is named "{user_id}").
    template = getattr(route, "path_format", "unmatched")
    method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
    metrics.request_seconds.labels(template, method, str(status)).observe(seconds)
