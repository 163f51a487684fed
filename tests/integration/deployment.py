"""A throwaway scorer + API deployment on the real services, for the fault tests.

Each `Deployment` has its own topics, consumer group, Feast project, Redis prefix and state
folder; its champion comes from an MLflow store registered once per module
(`register_champion`). The scorer under test runs as a real `churn consume` process
(`ScorerProcess`: metrics scraped over HTTP, log in a file, RSS from /proc); the reference
"uninterrupted run" is the same `build_scorer` wiring run in this process without faults.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from events.schema import Event
from features import spec
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from models.artifact import ChurnModel, save_artifact
from monitoring.metrics import Metrics
from stream.consumer import build_scorer
from stream.pacing import Pacing
from stream.producer import ProduceReport, build_producer, publish
from stream.risk_store import RedisRiskStore
from training import registry

CHURN = str(Path(sys.executable).parent / "churn")


def free_port() -> int:
    """Returns a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Polls `condition` until it holds; returns the seconds it took. Fails the test after `timeout`."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            msg = f"timed out after {timeout:.0f}s waiting for {what}"
            raise AssertionError(msg)
        time.sleep(every)
    return time.monotonic() - began


def small_model(*, missing_share: float = 0.0, rounds: int = 20, **meta: Any) -> ChurnModel:
    """A LightGBM booster on random rows (with `missing_share` of the values NaN), with the
    artifact's meta (identity calibration) updated by `meta`. Seconds, not a training run."""
    rng = np.random.default_rng(0)
    x = rng.random((2000, len(spec.MODEL_FEATURES))) * 10
    if missing_share:
        x[rng.random(x.shape) < missing_share] = np.nan
    y = np.nan_to_num(x[:, 0]) + rng.random(2000) * 10 > 10
    data = lgb.Dataset(x, y, feature_name=list(spec.MODEL_FEATURES))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15}, data, num_boost_round=rounds)
    base_meta = {
        "features": list(spec.MODEL_FEATURES),
        "horizon_days": 14,
        "spec_version": spec.spec_version(),
        "calibration": {"method": "none"},
        "tiers": {"high": 0.6, "medium": 0.3},
        "metrics": {},
    }
    return ChurnModel(booster, base_meta | meta)


def register_champion(folder: Path, base: Settings) -> str:
    """Registers `small_model()` (the real artifact format) as `champion` in a fresh MLflow
    SQLite store in `folder`; returns the store's URI."""

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    scratch = base.model_copy(update={"mlflow_tracking_uri": uri, "state_dir": folder / "state"})
    model = small_model()
    artifact = save_artifact(folder / "artifact", model.booster, model.meta)
    run_id, version = registry.log_run(scratch, artifact, {}, {}, {})
    registry.apply_decision(scratch, run_id, version, registry.Decision(True))
    return uri


@dataclass(frozen=True)
class FinalState:
    """Everything a scorer run leaves behind, comparable between runs (write times left out)."""

    feature_rows: str  # repr: NaN compares equal to itself
    states: dict[bytes, bytes | None]
    risks: list[tuple[str, float, str, str, int] | None]


class Deployment:
    """One isolated deployment on the real Kafka, Redis and MLflow store."""

    def __init__(self, base: Settings, tracking_uri: str, folder: Path, name: str, topic: str, **extra: Any) -> None:
        fields: dict[str, Any] = {
            "events_topic": topic,
            "dlq_topic": f"{topic}.dlq",
            "scorer_group": f"scorer-{name}",
            "feast_project": f"f{name}",
            "feast_repo": folder / f"feast-{name}",
            "redis_prefix": f"test:{name}:",
            # Its own model cache: the cache is keyed by model name and version, not by registry.
            "state_dir": folder / f"state-{name}",
            "mlflow_tracking_uri": tracking_uri,
            "scorer_metrics_port": free_port(),
            "max_batch_events": 500,
            **extra,
        }
        self.name = name
        self.folder = folder
        self.settings = base.model_copy(update=fields)
        self.env = {**os.environ, **{f"CHURN_{key.upper()}": str(value) for key, value in fields.items()}}
        self.feast = apply_repo(self.settings)

    def start_scorer(self) -> ScorerProcess:
        """Starts `churn consume` for this deployment and waits until it has joined its group."""
        log = self.folder / f"scorer-{self.name}.log"
        with log.open("wb") as out:  # a file, not a pipe: nobody drains a pipe while a fault runs
            proc = subprocess.Popen([CHURN, "consume"], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        scorer = ScorerProcess(proc, self.settings.scorer_metrics_port, log)
        wait_for(lambda: scorer.value("churn_scorer_ready") == 1, 120, f"`churn consume` to start ({log})", 0.5)
        return scorer

    def run_uninterrupted(self, idle_s: float = 2.0) -> Metrics:
        """Runs the scorer's own wiring (`build_scorer`) here, without faults, until the topic is
        drained; returns its metrics."""

        metrics = Metrics()
        build_scorer(self.settings, metrics).run(max_idle_s=idle_s)
        return metrics

    def final_state(self, users: list[str]) -> FinalState:
        """Returns the feature rows, scorer states and risk rows of `users` in Redis."""
        rows = FeastFeatureStore(self.feast).read_rows(users)
        client = redis.Redis.from_url(self.settings.redis_address)
        try:
            prefix = self.settings.redis_prefix
            keys = sorted(client.scan_iter(f"{prefix}state:*", count=1000))
            blobs = dict(zip([k[len(prefix) :] for k in keys], client.mget(keys), strict=True)) if keys else {}
            risks = [
                None if r is None else (r.user_id, r.churn_probability, r.risk_tier, r.model_version, r.event_time_ms)
                for r in RedisRiskStore(client, prefix).read(users)
            ]
        finally:
            client.close()
        return FinalState(repr(rows), blobs, risks)

    def cleanup(self) -> None:
        """Deletes this deployment's Feast project and Redis keys (Redis must be up)."""
        self.feast.teardown()
        client = redis.Redis.from_url(self.settings.redis_address)
        keys = list(client.scan_iter(f"{self.settings.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class ScorerProcess:
    """A running `churn consume`: its metrics endpoint, log file and memory."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Returns every metric sample of the process (empty if its endpoint does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        """Returns one sample's value, None if the process does not (yet) export it."""
        return self.samples().get((name, frozenset(labels.items())))

    def events(self, outcome: str) -> int:
        """Returns `churn_events_consumed_total` for one outcome (ok, invalid, duplicate, ...)."""
        return int(self.value("churn_events_consumed_total", outcome=outcome) or 0)

    def rss_bytes(self) -> int:
        """Returns the process's resident memory now."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (finish the batch, commit, leave the group); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def log_lines(self, containing: str) -> list[str]:
        """Returns the log lines that contain `containing`."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if containing in line]


def produce_paced(
    settings: Settings, events: Iterable[Event], rate: float, progress: list[tuple[float, int]] | None = None
) -> ProduceReport:
    """Publishes `events` to `settings.events_topic` with the product's idempotent producer at
    `rate` events/s; `progress` collects (monotonic time, acknowledged so far) every 0.2 s."""
    report = ProduceReport()

    def note(current: ProduceReport) -> None:
        if progress is not None:
            progress.append((time.monotonic(), current.sent))

    return publish(
        build_producer(settings, report.failure_reasons),
        settings.events_topic,
        (e.to_json() for e in events),
        report,
        pacing=Pacing(rate=rate),
        progress=note,
        progress_interval=0.2,
    )


def record_figures(settings: Settings, fault: str, figures: dict[str, Any]) -> None:
    """Prints one fault's figures and merges them into `<state_dir>/fault-figures.json`."""
    print(f"\nFAULT {fault}: {json.dumps(figures)}")
    path = settings.state_dir.resolve() / "fault-figures.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known[fault] = figures
    path.write_text(json.dumps(known, indent=2, sort_keys=True))
