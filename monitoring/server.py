"""Serves a process's metrics on its own port (the scorer and archiver; the API has `/metrics`)."""

from __future__ import annotations

from prometheus_client import start_http_server

from monitoring.metrics import Metrics


def start_metrics_server(metrics: Metrics, port: int) -> None:
    """Starts a background HTTP server for `metrics` on 127.0.0.1:`port` (0 = do not serve)."""
    if port:
        start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
