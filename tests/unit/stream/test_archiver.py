"""The archiver's files are on disk (data, then name) before it commits their offsets; its
offset commit heeds a stop signal while Kafka does not answer, and a refused commit does not stop
it."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import msgspec
import polars as pl
import pytest

from core.settings import Settings
from monitoring.metrics import Metrics
from stream import archiver
from tests.support import (
    CommitRefusedOnce,
    CommitWaitsForBroker,
    KafkaMessage,
    random_events,
    seconds_to_stop_during_commit,
)


def test_each_file_and_its_folder_are_fsynced_after_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(archiver.os, "fsync", recording_fsync)
    events = random_events(3, users=4, days=3, per_user=20)
    rows = [(int(e.user_id[1:]) % 2, i, e) for i, e in enumerate(events)]
    written, _ = archiver.write_batch(tmp_path, rows)

    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == written > 1
    for file in files:
        data = synced.index(str(file.with_suffix(".tmp")))  # the data, under its temporary name
        folder = synced.index(str(file.parent), data)  # then the rename, in its folder
        assert folder > data
    # Each new date folder's entry is synced in the root.
    assert synced.count(str(tmp_path)) == len({f.parent for f in files})


def _messages(first_offset: int, count: int) -> list[KafkaMessage]:
    """Returns `count` valid events of partition 0 as the consumer hands them over."""
    events = random_events(5, users=3, days=1, per_user=count)[:count]
    return [KafkaMessage(0, first_offset + i, msgspec.json.encode(e)) for i, e in enumerate(events)]


def _archived_rows(root: Path) -> int:
    return sum(pl.read_parquet(file).height for file in root.rglob("*.parquet"))


def _archiver(tmp_path: Path, consumer: object, monkeypatch: pytest.MonkeyPatch) -> archiver.Archiver:
    monkeypatch.setattr(archiver, "committing_consumer", lambda *_args, **_kw: consumer)
    return archiver.Archiver(Settings(), tmp_path / "log", metrics=Metrics(), lag_every_s=3600)


def test_a_stop_signal_while_a_commit_waits_for_kafka_ends_the_archiver_and_leaves_the_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = CommitWaitsForBroker(batches=[_messages(0, 10)])
    worker = _archiver(tmp_path, consumer, monkeypatch)
    loop = threading.Thread(target=worker.run)
    loop.start()
    waited = seconds_to_stop_during_commit(consumer, loop, worker.stopping)
    assert waited < 2  # one wait slice, not the broker's silence
    assert worker.commit_abandoned
    assert not consumer.closed  # closing under the abandoned commit would be unsafe
    assert _archived_rows(tmp_path / "log") == 10  # the batch's files were written before the commit


def test_a_refused_commit_is_counted_and_logged_and_the_next_batch_commits_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = CommitRefusedOnce(batches=[_messages(0, 4), _messages(4, 3)])
    worker = _archiver(tmp_path, consumer, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=archiver.__name__):
        worker.run(max_idle_s=0.2)
    assert consumer.commits == 2
    assert consumer.committed == [[(0, 7)]]  # the second batch's commit covers the refused one's offsets
    assert worker.metrics.registry.get_sample_value("churn_archiver_commit_failures_total") == 1
    assert (worker.metrics.registry.get_sample_value("churn_archiver_last_commit_timestamp_seconds") or 0) > 0
    assert "offset commit refused" in caplog.text
    assert consumer.closed
    assert _archived_rows(tmp_path / "log") == 7
