"""Files written whole and flushed to disk (`core.durable`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import durable
from tests.support import record_fsyncs


def test_the_data_is_flushed_before_the_rename_and_the_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the flushes a power loss after the rename could leave a zero-length file under the
    final name, which a reader takes for the real one (the prediction log renamed without them)."""
    synced = record_fsyncs(monkeypatch)
    path = tmp_path / "date=2026-01-02" / "snapshot.parquet"
    durable.write_atomically(path, lambda temp: temp.write_bytes(b"rows"))
    temp = synced.index(str(path.with_name(f"{path.name}.{os.getpid()}.tmp")))
    assert synced.index(str(tmp_path)) < temp  # the new folder's entry, in its parent
    assert synced.index(str(path.parent), temp) > temp  # the rename, after the data
    assert path.read_bytes() == b"rows"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
