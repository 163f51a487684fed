"""Reading the archived event log with its Kafka positions (`events.log`)."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from core.errors import InvalidInputError
from events.log import load_events, load_events_with_positions
from tests.support import random_events, wire_frame


def test_a_kafka_position_archived_twice_is_one_event(tmp_path: Path) -> None:
    """Two archivers wrote offsets 2-3 of partition 0 (one had stalled past the poll interval with
    them in hand, its successor archived them too): they load once. Events without a whole
    position (a log from elsewhere in the same folder) are all kept."""
    events = wire_frame(random_events(3, users=2, days=2, per_user=4))[:6]
    positioned = events.with_columns(
        kafkaPartition=pl.lit(0, pl.Int64), kafkaOffset=pl.int_range(pl.len(), dtype=pl.Int64)
    )
    folder = tmp_path / "date=2026-01-01"
    folder.mkdir(parents=True)
    positioned[:4].write_parquet(folder / "p0-0-3.parquet")
    positioned[2:].write_parquet(folder / "p0-2-5.parquet")  # the stalled archiver's late copy
    events[:2].vstack(events[:2]).write_parquet(folder / "without-positions.parquet")
    events[:2].with_columns(kafkaOffset=pl.lit(7, pl.Int64)).write_parquet(folder / "without-partition.parquet")

    loaded = load_events_with_positions(tmp_path).collect()

    with_position = loaded.filter(pl.col("partition").is_not_null())
    assert sorted(with_position["offset"].to_list()) == [0, 1, 2, 3, 4, 5]
    assert loaded.filter(pl.col("partition").is_null()).height == 6  # 4 without a position, 2 with half of one


def test_a_folder_whose_first_file_lacks_the_kafka_columns_is_read_whole(tmp_path: Path) -> None:
    """An export without Kafka positions sorts before the archiver's files: its rows are read
    without a position, the archived rows keep theirs (the first file does not set the columns)."""
    events = wire_frame(random_events(5, users=2, days=2, per_user=4))[:6]
    positioned = events.with_columns(
        kafkaPartition=pl.lit(1, pl.Int64), kafkaOffset=pl.int_range(pl.len(), dtype=pl.Int64)
    )
    events[:2].write_parquet(tmp_path / "a-export.parquet")
    positioned.write_parquet(tmp_path / "b-archive.parquet")
    positioned[4:].write_parquet(tmp_path / "c-archive-copy.parquet")

    assert load_events(tmp_path).collect().height == 10
    loaded = load_events_with_positions(tmp_path).collect()

    assert loaded.filter(pl.col("partition").is_null()).height == 2
    assert sorted(loaded.filter(pl.col("partition") == 1)["offset"].to_list()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage", ["cut short", "not gzip"])
def test_a_gzip_log_that_is_not_whole_is_a_clear_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    """gzip's EOFError escaped as is; the command line took it for a Ctrl-D ("Aborted.", exit 1)."""
    whole = b"".join(e.to_json() + b"\n" for e in random_events(3, users=2, days=2, per_user=50))
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(gzip.compress(whole)[:200] if damage == "cut short" else whole)
    with pytest.raises(InvalidInputError, match=r"events\.jsonl\.gz: not a whole gzip file"):
        load_events(path)
