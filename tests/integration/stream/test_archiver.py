"""The archiver writes every produced event exactly once, even when killed mid-run; restarted on
a fully archived, quiet topic it reports no lag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from confluent_kafka import Producer

from core.kafka import kafka_config
from core.settings import Settings
from stream.archiver import Archiver
from tests.support import random_events

CHURN = str(Path(sys.executable).parent / "churn")


def test_archive_is_exactly_once_after_a_crash(settings: Settings, topic: str, unique: str, tmp_path: Path) -> None:
    events = random_events(21, users=50, days=10, per_user=400)
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True, "linger.ms": 20}))
    for event in events:
        producer.produce(topic, value=event.to_json(), key=event.user_id.encode())
    producer.produce(topic, value=b"{broken", key=b"x")
    assert producer.flush(30) == 0

    root = tmp_path / "events"
    env = {**os.environ, "CHURN_EVENTS_TOPIC": topic, "CHURN_ARCHIVER_GROUP": f"arch-{unique}"}
    cmd = [CHURN, "archive", "--out", str(root), "--idle-exit", "3"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    time.sleep(2.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    log = pl.read_parquet(root / "**" / "*.parquet", hive_partitioning=True)
    assert log.height == len(events)
    assert log.select("kafkaPartition", "kafkaOffset").n_unique() == len(events)
    produced = sorted((e.user_id, e.ts, e.session_id, e.item_in_session, e.page) for e in events)
    archived = sorted(log.select("userId", "ts", "sessionId", "itemInSession", "page").iter_rows())
    assert archived == produced
    days = {p.name for p in root.iterdir()}
    assert all(d.startswith("date=") for d in days)
    assert len(days) >= 10


def test_an_archiver_restarted_on_an_archived_quiet_topic_reports_no_lag(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    """Until a consumer reads from a partition it has no position there; the lag gauge took the
    whole partition as lag then, so a consumer restarted on a quiet topic it had fully consumed
    looked behind by everything, and the lag alert fired."""
    events = random_events(22, users=30, days=2, per_user=20)
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True}))
    for event in events:
        producer.produce(topic, value=event.to_json(), key=event.user_id.encode())
    assert producer.flush(30) == 0
    own = settings.model_copy(update={"events_topic": topic, "archiver_group": f"lag-{unique}"})
    Archiver(own, tmp_path / "events", lag_every_s=0.2).run(max_idle_s=2)
    restarted = Archiver(own, tmp_path / "events", lag_every_s=0.2)
    restarted.run(max_idle_s=3)
    lags = {
        sample.labels["partition"]: sample.value
        for family in restarted.metrics.archiver_lag.collect()
        for sample in family.samples
    }
    assert len(lags) == settings.topic_partitions
    assert set(lags.values()) == {0}
