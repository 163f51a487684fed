"""Request latency into `churn_api_request_duration_seconds`, as a plain ASGI middleware.

Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) wraps every request in extra tasks
and memory streams, which costs more than the rest of a risk request's own Python; this
middleware only notes the status code as the response starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from monitoring.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]

# The method label takes these values only: a client's own method name (some HTTP servers pass
# any token) would add a series per name.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestTimer:
    """Observes each HTTP request's duration by route template, method and status code.

    `metrics` returns the process's Metrics, or None before the lifespan has built them (then
    nothing is recorded). Unmatched paths are labelled "unmatched" so ids never become labels.
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
            metrics = self.metrics()
            if metrics is not None:
                # `path_format` drops a convertor ("{user_id:any}" is named "{user_id}").
                route = getattr(scope.get("route"), "path_format", "unmatched")
                method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
                metrics.request_seconds.labels(route, method, str(status[0])).observe(time.perf_counter() - started)
