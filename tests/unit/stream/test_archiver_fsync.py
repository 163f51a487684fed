"""The archiver's files are on disk (data, then name) before it commits their offsets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream import archiver
from tests.support import random_events


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
