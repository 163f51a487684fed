"""`churn bench api`: the risk API under a fixed request rate, as a separate `churn serve` process.

Everything runs in a throwaway deployment (own Feast project, Redis prefix, MLflow store and
state folder, all deleted afterwards) on the configured Redis: a small model is trained on a
simulated log and promoted, `users` feature rows are written through `FeastFeatureStore`,
`churn serve` starts as a child process, and `bench.loadgen` (another process) sends
GET /users/{id}/risk over loopback at a fixed rate, with and without reasons. The anchor is
one user read with Feast's documented `get_online_features` (`feast_read_one_user`), next to
the same read as the API does it (`FeastFeatureStore.read_rows([id])`, `feature_read_one_user`),
both from this process while the server is idle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.feast_write import synthetic_rows
from bench.harness import CHURN, delete_prefix, free_port, train_small_champion
from bench.loadgen import percentiles_ms
from core.errors import ServiceUnavailableError
from core.redis import redis_client
from core.settings import Settings
from core.timeutil import DAY_MS
from features.feast_repo import FEATURE_VIEW_NAME, JOIN_KEY, apply_repo, view_feature_names
from features.feast_store import FeastFeatureStore
from features.store import FeatureRow
from stream.risk_store import RedisRiskStore
from training import registry

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _rows(users: int, seed: int = 0) -> list[FeatureRow]:
    """Returns one row per user `bench-<i>`, latest events spread over 30 days."""

    rng = random.Random(seed)  # noqa: S311 - benchmark data, not secrets
    return [
        FeatureRow(row.user_id, START_MS + rng.randrange(30 * DAY_MS), row.values)
        for row in synthetic_rows(users, seed=seed)
    ]


def _wait_ready(port: int, server: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            msg = f"`churn serve` exited with code {server.returncode} before it was ready: {log.read_text()[-2000:]}"
            raise ServiceUnavailableError(msg)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    msg = f"`churn serve` did not become ready on port {port} within {timeout_s:.0f} s"
    raise ServiceUnavailableError(msg)


def _load(port: int, users: int, explain: bool, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.loadgen", "--port", str(port), "--ids", str(users),
        "--path", f"/users/{{id}}/risk?explain={'true' if explain else 'false'}",
        "--rate", str(rate), "--seconds", str(seconds), "--connections", str(connections),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, check=False, timeout=seconds + 120)
    if done.returncode != 0:
        msg = f"load generator failed: {done.stderr.decode()[-2000:]}"
        raise ServiceUnavailableError(msg)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def _time_reads(read: Callable[[str], Any], ids: list[str], count: int) -> list[float]:
    """Returns the seconds of `count` reads of one random user each (after one untimed read:
    Feast's first read imports modules)."""
    rng = random.Random(1)  # noqa: S311 - which user to read, not a secret
    read(ids[0])
    seconds = []
    for _ in range(count):
        user = rng.choice(ids)
        started = time.perf_counter()
        read(user)
        seconds.append(time.perf_counter() - started)
    return seconds


def bench_api(
    settings: Settings,
    users: int = 100_000,
    rate: float = 1000.0,
    seconds: float = 15.0,
    connections: int = 32,
    workers: int = 2,
    anchor_reads: int = 3000,
    repeats: int = 3,
) -> dict[str, Any]:
    """Returns the API's figures at `rate` requests/s for `seconds` (after a 2 s warm-up), with
    explain=false and explain=true, `repeats` runs of each (alternating): per run the achieved
    rate, latency percentiles from each request's scheduled time and status counts; per mode
    the median of the runs' p50 and p99 (the headline: one stall of the shared machine moves a
    single run's p99); plus the one-user read anchors and the setup timings.

    Raises:
        ServiceUnavailableError: Redis cannot be reached, or `churn serve` did not start.
        ConfigError: the settings give an invalid Feast config.
    """
    name = uuid.uuid4().hex[:10]
    folder = Path(tempfile.mkdtemp(prefix="churn-api-bench-", dir=settings.state_dir.resolve()))
    port = free_port()
    scratch = settings.model_copy(
        update={
            "state_dir": folder / "state",
            "mlflow_tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
            "feast_project": f"bench_api_{name}",
            "feast_repo": folder / "feast",
            "redis_prefix": f"bench:api{name}:",
            "api_port": port,
        }
    )
    feast = None
    server: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = {}
    try:
        began = time.perf_counter()
        trained = train_small_champion(scratch, folder)
        if not trained.promoted:  # the bench needs a champion, whatever the gates said
            registry.apply_decision(scratch, str(trained.run_id), str(trained.version), registry.Decision(True))
        version = str(trained.version)
        timings["train_seconds"] = round(time.perf_counter() - began, 1)

        began = time.perf_counter()
        feast = apply_repo(scratch)
        store = FeastFeatureStore(feast)
        rows = _rows(users)
        for first in range(0, len(rows), 5000):
            store.write_rows(rows[first : first + 5000])
        RedisRiskStore(redis_client(scratch), scratch.redis_prefix).advance_watermark(START_MS + 31 * DAY_MS)
        timings["load_rows_seconds"] = round(time.perf_counter() - began, 1)

        env = {
            **os.environ,
            "CHURN_STATE_DIR": str(scratch.state_dir),
            "CHURN_MLFLOW_TRACKING_URI": scratch.tracking_uri,
            "CHURN_FEAST_PROJECT": scratch.feast_project,
            "CHURN_FEAST_REPO": str(scratch.feast_repo_dir),
            "CHURN_REDIS_URL": scratch.redis_address,
            "CHURN_REDIS_PREFIX": scratch.redis_prefix,
            "CHURN_API_HOST": "127.0.0.1",
            "CHURN_API_PORT": str(port),
            "CHURN_API_KEYS": "[]",
            "CHURN_API_OPEN": "true",
            "CHURN_CLOCK": "event",
        }
        began = time.perf_counter()
        log = folder / "serve.log"
        with log.open("wb") as out:  # a file, not a pipe: nobody reads a pipe while the load runs
            server = subprocess.Popen([CHURN, "serve", "--workers", str(workers)], env=env, stdout=out, stderr=out)
        _wait_ready(port, server, log)
        timings["serve_start_seconds"] = round(time.perf_counter() - began, 1)

        ids = [row.user_id for row in rows]
        refs = [f"{FEATURE_VIEW_NAME}:{name}" for name in view_feature_names()]
        reads = _time_reads(
            lambda user: feast.get_online_features(features=refs, entity_rows={JOIN_KEY: [user]}).to_dict(),
            ids,
            anchor_reads,
        )
        api_reads = _time_reads(lambda user: store.read_rows([user]), ids, anchor_reads)
        # Before the load (and after this bench's own set-up work has calmed down a little): how
        # busy the machine already was. The figure after the runs includes the load they caused.
        load_before = round(os.getloadavg()[0], 2)

        runs: dict[str, list[dict[str, Any]]] = {"explain_false": [], "explain_true": []}
        for _ in range(repeats):
            for explain in (False, True):
                runs[f"explain_{str(explain).lower()}"].append(_load(port, users, explain, rate, seconds, connections))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        if feast is not None:
            feast.teardown()
        delete_prefix(scratch, scratch.redis_prefix)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "users": users,
        "model_version": version,
        "workers": workers,
        "cpus": os.cpu_count(),
        "load_average_1m_before_runs": load_before,
        "load_average_1m": round(os.getloadavg()[0], 2),
        **timings,
        "feast_read_one_user": percentiles_ms(reads),
        "feature_read_one_user": percentiles_ms(api_reads),
        **{mode: _summary(mode_runs) for mode, mode_runs in runs.items()},
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the median over `runs` of the achieved rate and of the latency p50/p99, and the runs."""
    return {
        "achieved_rate_median": statistics.median(r["achieved_rate"] for r in runs),
        "p50_ms_median": statistics.median(r["latency"]["p50_ms"] for r in runs),
        "p99_ms_median": statistics.median(r["latency"]["p99_ms"] for r in runs),
        "non_200": sum(r["requests"] - r["statuses"].get("200", 0) for r in runs),
        "runs": runs,
    }
