"""The prediction log's files (`monitoring.prediction_log`): where a snapshot goes, and what a
reader says of a file it cannot read."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from core.errors import InvalidInputError
from monitoring.prediction_log import (
    LABELS,
    SHADOW_DRIFT,
    folder,
    read_drift_history,
    read_log,
    read_snapshot,
    unlabelled_snapshots,
    write_drift,
    write_labels,
    write_snapshot,
)

MIDNIGHT = 1_767_312_000_000  # 2026-01-02T00:00:00Z


def test_a_snapshot_with_nobody_active_is_logged_under_its_own_day(tmp_path: Path) -> None:
    empty = pl.DataFrame(schema={"user_id": pl.String, "as_of": pl.Int64})
    assert write_snapshot(tmp_path, MIDNIGHT, empty).parent.name == "date=2026-01-02"  # was 1970-01-01


def test_a_log_file_that_cannot_be_read_is_named_in_a_clear_error(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, MIDNIGHT, pl.DataFrame({"user_id": ["a"], "as_of": [MIDNIGHT]}))
    path.write_bytes(b"")  # what a power loss can leave behind a rename that was not flushed
    with pytest.raises(InvalidInputError, match=r"cannot read the prediction log file .*snapshot.parquet"):
        read_log(tmp_path)
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_snapshot(tmp_path, MIDNIGHT)


def test_a_snapshot_whose_labelling_stopped_before_its_performance_file_is_labelled_again(tmp_path: Path) -> None:
    """The labels are written before performance.json, whose presence marks the step done: a
    crash in between (labels.parquet alone) leaves the snapshot to be labelled again."""
    as_of = 1_767_312_000_000
    write_snapshot(tmp_path, as_of, pl.DataFrame({"user_id": ["u1"], "as_of": [as_of]}))
    assert unlabelled_snapshots(tmp_path) == [as_of]
    pl.DataFrame({"user_id": ["u1"], "churned": [False]}).write_parquet(folder(tmp_path, as_of) / LABELS)
    assert unlabelled_snapshots(tmp_path) == [as_of]
    write_labels(tmp_path, as_of, pl.DataFrame({"user_id": ["u1"], "churned": [False]}), {"as_of_ms": as_of})
    assert unlabelled_snapshots(tmp_path) == []


def test_a_snapshot_taken_again_drops_the_earlier_take_s_labels_and_drift(tmp_path: Path) -> None:
    """A replay after Redis was lost takes the snapshot again, perhaps under a model without a
    reference (no drift report then): nothing of the earlier take's rows may stay beside it."""
    rows = pl.DataFrame({"user_id": ["u1"], "as_of": [MIDNIGHT]})
    write_snapshot(tmp_path, MIDNIGHT, rows)
    write_drift(tmp_path, MIDNIGHT, {"alerts": []})
    write_drift(tmp_path, MIDNIGHT, {"alerts": []}, SHADOW_DRIFT)
    write_labels(tmp_path, MIDNIGHT, pl.DataFrame({"user_id": ["u1"], "churned": [False]}), {"as_of_ms": MIDNIGHT})
    write_snapshot(tmp_path, MIDNIGHT, rows)
    assert sorted(p.name for p in folder(tmp_path, MIDNIGHT).iterdir()) == ["snapshot.parquet"]
    assert read_drift_history(tmp_path) == {}
    assert unlabelled_snapshots(tmp_path) == [MIDNIGHT]
