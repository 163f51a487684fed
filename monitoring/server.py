"""Serves a process's metrics on its own port (the scorer and archiver; the API has `/metrics`), and
registers every local process with the local Prometheus.

Registration is a file-discovery target file (`infra.local.prometheus_targets_dir`):
`<service>-<port>-<pid>.json` holding the endpoint with label `service` (scorer, api, archiver),
written when the process starts serving and removed when it stops, so `churn infra up` + any
`churn consume` / `serve` / `archive` is scraped with no step by the user. Files left by a process
that was killed (its pid no longer runs) are removed by the next registration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import start_http_server

from core.settings import Settings
from infra.local import prometheus_targets_dir
from monitoring.metrics import Metrics
from monitoring.multiprocess import process_alive

log = logging.getLogger(__name__)
_TARGET_FILE = re.compile(r"^[a-z]+-\d+-(\d+)\.json$")


def start_metrics_server(metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
    """Starts a background HTTP server for `metrics` on `host`:`port` (0 = do not serve).

    Loopback by default; a container sets settings `metrics_host` 0.0.0.0 so Prometheus in
    another container can scrape it.
    """
    if port:
        start_http_server(port, addr=host, registry=metrics.registry)


def remove_stale_targets(folder: Path) -> list[Path]:
    """Deletes target files whose process no longer runs; returns them."""
    removed = []
    for path in folder.glob("*.json"):
        match = _TARGET_FILE.match(path.name)
        if match and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def register_target(settings: Settings, service: str, port: int, host: str = "127.0.0.1") -> Path | None:
    """Writes this process's target file for the local Prometheus (see the module doc); returns
    it, or None when `port` is 0 (nothing served). A wildcard bind address is registered as
    loopback. Never raises: a process that cannot register still runs (and logs why)."""
    if not port:
        return None
    try:
        folder = prometheus_targets_dir(settings)
        remove_stale_targets(folder)
        address = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - a comparison, not a bind
        path = folder / f"{service}-{port}-{os.getpid()}.json"
        temp = path.with_suffix(".tmp")  # Prometheus watches *.json: it never reads half a file
        temp.write_text(json.dumps([{"targets": [f"{address}:{port}"], "labels": {"service": service}}]))
        temp.rename(path)
    except OSError:
        log.exception("could not register %s:%d with the local Prometheus", service, port)
        return None
    return path


@contextlib.contextmanager
def registered(settings: Settings, service: str, port: int, host: str = "127.0.0.1") -> Iterator[Path | None]:
    """Registers the target for the duration of the block (removed on exit, also on errors)."""
    path = register_target(settings, service, port, host)
    try:
        yield path
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
