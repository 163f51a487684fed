"""Serves a process's metrics on its own port (the scorer and archiver; the API has `/metrics`)."""

from __future__ import annotations

from prometheus_client import start_http_server

from monitoring.metrics import Metrics


def start_metrics_server(metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
    """Starts a background HTTP server for `metrics` on `host`:`port` (0 = do not serve).

    Loopback by default; a container sets settings `metrics_host` 0.0.0.0 so Prometheus in
    another container can scrape it.
    """
    if port:
        start_http_server(port, addr=host, registry=metrics.registry)
