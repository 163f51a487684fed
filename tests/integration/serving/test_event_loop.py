"""`churn serve` (real uvicorn) on a Redis stalled with `DEBUG SLEEP`: liveness still answers at
once, risk requests wait on Redis without holding the event loop, and readiness fails when Redis is gone."""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.harness import CHURN, free_port, scratch_settings, wait_for
from core.settings import Settings
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import OnlineEngine
from infra.local import prometheus_targets_dir
from tests.support import random_events

STALL_SECONDS = 3
KEY = "event-loop-test-key"


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Returns (status, body, seconds taken) of a GET with the test's API key."""
    request = urllib.request.Request(url, headers={"X-API-Key": KEY})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.perf_counter() - started


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server of this test only (DEBUG enabled, nothing saved): stalling or stopping it
    disturbs no other test."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--enable-debug-command", "local", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), 20, "the test's redis-server")
    yield port, proc
    proc.kill()
    proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.soak
def test_a_stalled_redis_leaves_liveness_answering(
    settings: Settings, own_redis: tuple[int, subprocess.Popen[bytes]], tmp_path: Path, unique: str
) -> None:
    redis_port, redis_proc = own_redis
    api_port = free_port()
    scratch, env = scratch_settings(
        settings,
        redis_port=redis_port,
        state_dir=tmp_path / "state",
        feast_project=f"loop{unique}",
        feast_repo=tmp_path / "feast",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        api_port=api_port,
        clock="wall",
        api_max_in_flight=8,  # the 8 requests below all wait on Redis (none is shed)
    )
    env["CHURN_API_KEYS"] = json.dumps([KEY])
    feast = apply_repo(scratch)
    engine = OnlineEngine()
    engine.apply_all(random_events(2, users=3, days=3, per_user=30))
    FeastFeatureStore(feast).write_rows([engine.row(u) for u in engine.states])

    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([CHURN, "serve"], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait_for(lambda: _live(base), 120, "`churn serve` to answer", 0.5, log=tmp_path / "serve.log")
        status, body, _ = _get(f"{base}/health/ready")
        assert json.loads(body)["checks"]["feature_view"] == "ok"

        stall = threading.Thread(
            target=lambda: redis.Redis(port=redis_port).execute_command("DEBUG", "SLEEP", STALL_SECONDS)
        )
        stall.start()
        time.sleep(0.2)  # the stall has begun
        risk_times: list[tuple[int, float]] = []

        def ask_risk() -> None:
            status, _, took = _get(f"{base}/users/u1/risk")
            risk_times.append((status, took))

        askers = [threading.Thread(target=ask_risk) for _ in range(8)]
        for asker in askers:
            asker.start()
        time.sleep(0.3)  # the requests have reached the server and wait on Redis in its pool
        live_ms = []
        deadline = time.monotonic() + STALL_SECONDS - 0.6
        while time.monotonic() < deadline:
            status, _, took = _get(f"{base}/health/live")
            assert status == 200
            live_ms.append(took * 1000)
            time.sleep(0.05)
        stall.join()
        for asker in askers:
            asker.join()

        # The stall landed while requests were in flight: each risk request waited on Redis.
        assert len(risk_times) == 8
        assert min(took for _, took in risk_times) > 1.0, risk_times
        assert len(live_ms) >= 20
        # A loop the stall blocked would hold a probe until the stall ends: 2.5 s for the first
        # (sent 0.5 s into the 3 s stall). The typical probe takes a few ms; one CI run had a
        # single 68 ms probe among ~2 ms ones, a stall of the shared machine, not of the loop.
        assert statistics.median(live_ms) < 50, live_ms
        assert max(live_ms) < 750, live_ms
        print(f"\nliveness during a {STALL_SECONDS}s Redis stall: max {max(live_ms):.1f} ms over {len(live_ms)} probes")

        # Readiness reads a row through Feast: with Redis gone it fails, naming the feature view.
        redis_proc.kill()
        redis_proc.wait()
        status, body, _ = _get(f"{base}/health/ready")
        checks = json.loads(body)["checks"]
        assert status == 503
        assert checks["feature_view"] != "ok"
        assert "unavailable" in checks["feature_view"]

        # SIGTERM ends it through its cleanup: its Prometheus target file goes with it (uvicorn
        # raised the signal again after its shutdown, and the default handler left the file, a
        # down target for Prometheus and `churn alerts --check`).
        target = list(prometheus_targets_dir(scratch).glob(f"api-{api_port}-{server.pid}.json"))
        assert target
        server.terminate()
        assert server.wait(30) == 0
        assert not target[0].exists()
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _live(base: str) -> bool:
    try:
        return _get(f"{base}/health/live", timeout=2)[0] == 200
    except OSError:
        return False
