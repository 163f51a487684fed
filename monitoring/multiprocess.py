"""Metrics of a server with several worker processes (`churn serve` with `CHURN_API_WORKERS` > 1).

Each uvicorn worker is its own process, and a scrape of `/metrics` reaches whichever worker
accepts it: with one registry per worker, counters would jump between the workers' values and
look like resets to Prometheus. prometheus-client's multiprocess mode keeps every worker's
values in files of one folder (`PROMETHEUS_MULTIPROC_DIR`, read when prometheus-client is
imported: it must be set before the workers start), and `/metrics` merges them: counters and
histograms summed over every worker that ever ran (a restarted worker's counts stay), gauges
per live worker (label `pid`) or summed over them (see `monitoring.metrics`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# The variable prometheus-client reads (it also accepts the deprecated lower-case one).
ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def active_dir() -> Path | None:
    """Returns the multiprocess folder this process's metric values are kept in, or None (the
    values are in memory: one process, one registry)."""
    found = os.environ.get(ENV) or os.environ.get(ENV.lower())
    return Path(found) if found else None


def prepare(folder: Path) -> None:
    """Empties `folder` (values of an earlier run would be added to this one's) and sets it as the
    multiprocess folder of the worker processes this process starts from now on."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[ENV] = str(folder)


def exposition(registry: CollectorRegistry) -> bytes:
    """Returns the text exposition of this process's metrics: `registry` itself, or in
    multiprocess mode every worker's values merged from the folder (custom collectors of
    `registry`, which keep their values in memory, are then left out)."""
    folder = active_dir()
    if folder is None:
        return generate_latest(registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(folder))
    return generate_latest(merged)


def forget_dead_workers() -> list[int]:
    """Removes the live-gauge files of processes that no longer run (a worker killed without its
    shutdown, which uvicorn replaces); returns their pids. Does nothing outside multiprocess mode."""
    folder = active_dir()
    if folder is None:
        return []
    dead = sorted(
        {
            int(match.group(1))
            for path in folder.glob("gauge_live*.db")
            if (match := _LIVE_GAUGE_FILE.match(path.name)) and not process_alive(int(match.group(1)))
        }
    )
    for pid in dead:
        mark_process_dead(pid, str(folder))
    return dead


def leave() -> None:
    """Removes this process's live gauges from the merged view (a worker shutting down)."""
    folder = active_dir()
    if folder is not None:
        mark_process_dead(os.getpid(), str(folder))


def process_alive(pid: int) -> bool:
    """Returns whether a process with this pid runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
