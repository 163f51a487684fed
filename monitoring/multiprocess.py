"""Metrics of a server with several worker processes (`churn serve` with `CHURN_API_WORKERS` > 1).

Each uvicorn worker is its own process, and a scrape of `/metrics` reaches whichever worker
accepts it: with one registry per worker, counters would jump between the workers' values and
look like resets to Prometheus. prometheus-client's multiprocess mode keeps every worker's
values in files of one folder (`PROMETHEUS_MULTIPROC_DIR`, read when prometheus-client is
imported: `churn serve` sets it before it starts the workers), and `/metrics` merges them:
counters and histograms summed over every worker of the run (a replaced worker's counts stay),
gauges one series per live worker (label `pid`; see `monitoring.metrics`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

# The variable prometheus-client reads when it is imported (it also accepts a lower-case one).
ENV = "PROMETHEUS_MULTIPROC_DIR"
# The variable `churn serve` hands its workers: the only sign of multiprocess mode this module
# trusts. Importing Feast sets `ENV` to a folder of its own in every process (feast.metrics), the
# API's single worker included, long after prometheus-client chose to keep values in memory.
FOLDER_ENV = "CHURN_API_METRICS_FOLDER"
# Who made a run's folder (host and pid of `churn serve`), to find folders of killed runs.
OWNER_FILE = "owner.json"
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def active_dir() -> Path | None:
    """Returns the folder this process's metric values are kept in when `churn serve` started it
    as one of several workers, else None (the values are in memory: one registry)."""
    found = os.environ.get(FOLDER_ENV)
    return Path(found) if found else None


@contextlib.contextmanager
def workers_folder(parent: Path, port: int) -> Iterator[Path]:
    """Makes a new, empty folder under `parent` for the worker processes started inside the block
    (one per run: a second server started on the same port, or a replica sharing the state
    volume, never shares or empties a running server's files) and removes it afterwards.
    Folders left by earlier runs on this host that were killed before they could remove theirs
    are removed first (`remove_abandoned`)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{port}-", dir=parent))
    (folder / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    before = {name: os.environ.get(name) for name in (ENV, FOLDER_ENV)}
    os.environ[ENV] = os.environ[FOLDER_ENV] = str(folder)
    try:
        yield folder
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(parent: Path) -> list[Path]:
    """Removes the folders under `parent` whose server ran on this host and no longer runs (a
    `churn serve` killed with SIGKILL leaves its folder); returns them. A folder of another host
    (a replica in another container sharing the state volume, where pids mean other processes)
    or without a readable owner stays."""
    host = socket.gethostname()
    removed = []
    for owner_file in sorted(parent.glob(f"*/{OWNER_FILE}")):
        try:
            owner = json.loads(owner_file.read_text())
            ours, pid = owner["host"] == host, int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ours and not process_alive(pid):
            shutil.rmtree(owner_file.parent, ignore_errors=True)
            removed.append(owner_file.parent)
    return removed


class _ProjectMetrics(Collector):
    """The project's metrics (`churn_*`) merged from every worker's files. Feast's metrics,
    created when a worker imports it, land in the same files and are left out, as they are
    with one worker (they live in prometheus-client's default registry, not the project's)."""

    def __init__(self, folder: Path) -> None:
        self.merged = MultiProcessCollector(None, path=str(folder))

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.merged.collect() if family.name.startswith("churn_"))


def exposition(registry: CollectorRegistry) -> bytes:
    """Returns the text exposition of this process's metrics: `registry` itself, or with
    several workers every worker's values merged from their folder (custom collectors of
    `registry`, which keep their values in memory, are then left out)."""
    folder = active_dir()
    if folder is None:
        return generate_latest(registry)
    merged = CollectorRegistry()
    merged.register(_ProjectMetrics(folder))
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
