"""`churn serve --workers 2` (real uvicorn workers, real Redis and Feast): `/metrics` counts every
worker's requests whichever worker answers the scrape, and a worker killed with SIGKILL (which
uvicorn replaces) keeps its counts in the total and leaves no gauge behind."""

from __future__ import annotations

import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import wait_for
from core.settings import Settings
from tests.support import churn_serve

USERS = 50
ROUTE = "/users/{user_id}/risk"


def ask(port: int, requests: int) -> None:
    """Sends `requests` risk requests, 3 at a time: both workers take some, and neither has more
    in flight than its smallest in-flight limit (4), so none is shed."""

    def one(i: int) -> int:
        url = f"http://127.0.0.1:{port}/users/bench-{i % USERS}/risk"
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)

    with ThreadPoolExecutor(3) as pool:
        assert set(pool.map(one, range(requests))) == {200}


def scrape(port: int) -> tuple[float, dict[str, float]]:
    """Returns (risk requests counted, in-flight limit per worker pid with a model loaded) from
    one `/metrics`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counted = 0.0
    limits: dict[str, float] = {}
    loaded: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "churn_api_request_duration_seconds_count" and sample.labels["route"] == ROUTE:
                counted += sample.value
            elif sample.name == "churn_api_in_flight_limit":
                limits[sample.labels["pid"]] = sample.value
            elif sample.name == "churn_model_loaded" and sample.value == 1:
                loaded.add(sample.labels["pid"])
    return counted, {pid: limit for pid, limit in limits.items() if pid in loaded}


@pytest.mark.soak
def test_metrics_of_two_workers_add_up_across_scrapes_and_a_killed_worker(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    with churn_serve(settings, tmp_path, f"workers{unique}", USERS, workers=2) as served:
        port, log = served.port, served.log

        def both_loaded() -> dict[str, float]:
            limits = scrape(port)[1]
            return limits if len(limits) == 2 else {}

        workers = wait_for(both_loaded, 240, "two workers with the model", log=log)
        ask(port, 200)
        # Each scrape reaches one worker or the other; every one reports all 200.
        assert [scrape(port)[0] for _ in range(10)] == [200.0] * 10

        killed = int(next(iter(workers)))
        os.kill(killed, signal.SIGKILL)

        def replaced() -> dict[str, float]:
            limits = scrape(port)[1]
            return limits if len(limits) == 2 and str(killed) not in limits else {}

        after = wait_for(replaced, 240, "uvicorn to replace the killed worker", every=0.5, log=log)
        assert set(after) != set(workers)  # a new worker, and the killed one's gauge is gone
        assert scrape(port)[0] == 200.0  # the killed worker's counts stay in the total
        ask(port, 100)
        assert [scrape(port)[0] for _ in range(5)] == [300.0] * 5
        alive = served.server.poll() is None

    assert alive
    assert "Traceback" not in log.read_text(errors="replace")
    assert list((tmp_path / "state" / "api-metrics").iterdir()) == []  # the run's folder went with it
