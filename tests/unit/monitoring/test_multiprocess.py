"""Metrics of several API workers (`monitoring.multiprocess`): one merged `/metrics` whichever
worker answers, counts kept across a worker's death, gauges of dead workers dropped, and a model
swap that leaves no second "current" model. Workers are real processes writing real
prometheus-client files; the merge is read as Prometheus would parse it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from monitoring import multiprocess
from monitoring.metrics import Metrics

ROUTE = "/users/{user_id}/risk"
# A worker: serves `requests` requests, derives its limit, swaps its model from v1 to v2, then
# (with `wait`) stays up until its stdin closes.
WORKER = """
import sys
from monitoring.metrics import Metrics
requests, limit, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "wait"
m = Metrics()
for _ in range(requests):
    m.request_seconds.labels("/users/{user_id}/risk", "GET", "200").observe(0.002)
m.api_in_flight_limit.set(limit)
m.set_model("api", "churn", "1")
m.set_model("api", "churn", "2")
print("ready", flush=True)
if wait:
    sys.stdin.read()
"""


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Returns the (labels, value) samples named `name` in a text exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def start_worker(folder: Path, requests: int, limit: int, wait: bool) -> subprocess.Popen[str]:
    env = {**os.environ, multiprocess.ENV: str(folder), multiprocess.FOLDER_ENV: str(folder)}
    args = [sys.executable, "-c", WORKER, str(requests), str(limit), "wait" if wait else "exit"]
    worker = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "ready"
    return worker


def test_every_worker_is_in_one_exposition_and_a_dead_workers_counts_stay(tmp_path: Path) -> None:
    with multiprocess.workers_folder(tmp_path / "api-metrics", 8000) as folder:
        ended = start_worker(folder, requests=3, limit=6, wait=False)
        ended.wait(30)
        running = start_worker(folder, requests=5, limit=9, wait=True)
        try:
            merged = Metrics().exposition().decode()  # as a third worker answering the scrape
            counts = [v for labels, v in samples(merged, "churn_api_request_duration_seconds_count")]
            assert counts == [8.0]  # 3 + 5, whichever worker answers
            limits = {labels["pid"]: v for labels, v in samples(merged, "churn_api_in_flight_limit")}
            assert limits == {str(ended.pid): 6.0, str(running.pid): 9.0}
            # A swapped model cannot be removed from the files: the old one reads 0, the current 1.
            info = {(labels["version"], labels["pid"]): v for labels, v in samples(merged, "churn_model_info")}
            assert info[("1", str(running.pid))] == 0.0
            assert info[("2", str(running.pid))] == 1.0

            assert multiprocess.forget_dead_workers() == [ended.pid]
            after = Metrics().exposition().decode()
            assert [v for _, v in samples(after, "churn_api_request_duration_seconds_count")] == [8.0]
            assert {labels["pid"] for labels, _ in samples(after, "churn_api_in_flight_limit")} == {str(running.pid)}
        finally:
            assert running.stdin is not None
            running.stdin.close()
            running.wait(30)
    assert not folder.exists()
    assert multiprocess.active_dir() is None


def test_a_second_server_on_the_port_gets_its_own_folder(tmp_path: Path) -> None:
    with multiprocess.workers_folder(tmp_path, 8000) as first:
        (first / "counter_123.db").write_bytes(b"the running server's counts")
        with multiprocess.workers_folder(tmp_path, 8000) as second:
            assert second != first
            assert [path.name for path in second.iterdir()] == [multiprocess.OWNER_FILE]
        assert (first / "counter_123.db").exists()


def test_folders_of_killed_servers_on_this_host_are_removed_at_the_next_start(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    host = socket.gethostname()

    def left(name: str, owner: dict[str, object]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"counts")
        (folder / multiprocess.OWNER_FILE).write_text(json.dumps(owner))
        return folder

    killed = left("8000-killed", {"host": host, "pid": dead_pid})
    running = left("8000-running", {"host": host, "pid": os.getpid()})
    elsewhere = left("8000-other-container", {"host": f"{host}-replica", "pid": dead_pid})
    unknown = tmp_path / "8000-no-owner"
    unknown.mkdir()

    with multiprocess.workers_folder(tmp_path, 8000) as mine:
        assert not killed.exists()
        assert running.exists()
        assert elsewhere.exists()  # its pids are another container's
        assert unknown.exists()
        assert json.loads((mine / multiprocess.OWNER_FILE).read_text()) == {"host": host, "pid": os.getpid()}


def test_feast_setting_prometheus_s_folder_does_not_empty_one_worker_s_metrics() -> None:
    """Importing Feast (as the API does when it opens the feature store) sets
    PROMETHEUS_MULTIPROC_DIR to a folder of its own; one worker's /metrics is still its registry."""
    import feast.feature_store  # noqa: F401 - the import under test sets the variable

    assert os.environ.get(multiprocess.ENV)
    metrics = Metrics()
    metrics.request_seconds.labels(ROUTE, "GET", "200").observe(0.001)
    assert multiprocess.active_dir() is None
    counts = samples(metrics.exposition().decode(), "churn_api_request_duration_seconds_count")
    assert [v for _, v in counts] == [1.0]


def test_series_are_cleared_without_a_warning_when_feast_set_prometheus_s_folder() -> None:
    """One process (the scorer) after Feast set PROMETHEUS_MULTIPROC_DIR: clearing a gauge's
    series works (values are in memory), and prometheus-client's warning that it does not came
    at every daily snapshot."""
    import feast.feature_store  # noqa: F401 - the import under test sets the variable

    assert os.environ.get(multiprocess.ENV)
    metrics = Metrics()
    metrics.feature_psi.labels("events_1h").set(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test...
        Metrics()  # ...except those a new Metrics() filters again
        metrics.feature_psi.clear()
    assert samples(metrics.exposition().decode(), "churn_feature_psi") == []


def test_a_swapped_model_leaves_one_series_per_component() -> None:
    metrics = Metrics()
    metrics.set_model("scorer", "churn", "3")
    metrics.set_model("api", "churn", "1")
    metrics.set_model("api", "churn", "2")
    exposed = samples(metrics.exposition().decode(), "churn_model_info")
    assert {(labels["component"], labels["version"]): v for labels, v in exposed} == {
        ("scorer", "3"): 1.0,
        ("api", "2"): 1.0,
    }
    metrics.set_model("api", "churn", None)
    exposed = samples(metrics.exposition().decode(), "churn_model_info")
    assert {(labels["component"], labels["version"]): v for labels, v in exposed} == {("scorer", "3"): 1.0}
