"""Reading the archived event log for offline work.

The archiver writes the log as Parquet partitioned by event date, hive style:
`<root>/date=YYYY-MM-DD/<any>.parquet`, one row per event with the wire (camelCase) columns
of `events.schema.Event`. For replays and fixtures the same events may come as JSON Lines
(`.jsonl`, or gzipped `.jsonl.gz`), one wire-format object per line.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import polars as pl

from core.errors import InvalidInputError

# Columns of the event log the feature engines read (snake_case; see `events_frame`).
EVENT_COLUMNS = ("user_id", "ts", "session_id", "item_in_session", "page", "level", "registration", "length")
_WIRE_NAMES = {"userId": "user_id", "sessionId": "session_id", "itemInSession": "item_in_session"}


def events_frame(raw: pl.DataFrame | pl.LazyFrame, *, keep: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Returns the event log in the engine's columns and types (accepts wire camelCase names),
    plus the `keep` columns as they are.

    Guests (empty user_id) are dropped, as the stream drops them.
    """
    frame = raw.lazy()
    frame = frame.rename({k: v for k, v in _WIRE_NAMES.items() if k in frame.collect_schema().names()})
    return frame.select(
        pl.col("user_id").cast(pl.String),
        pl.col("ts").cast(pl.Int64),
        pl.col("session_id").cast(pl.Int64),
        pl.col("item_in_session").cast(pl.Int64),
        pl.col("page").cast(pl.String),
        pl.col("level").cast(pl.String),
        pl.col("registration").cast(pl.Float64),
        pl.col("length").cast(pl.Float64),
        *keep,
    ).filter(pl.col("user_id") != "")


# The wire columns the feature engine and the labels need, with the types they are read as.
# userId is read as text: some exports write it as a number, and guests have "".
_WIRE_SCHEMA = {
    "ts": pl.Int64,
    "userId": pl.String,
    "sessionId": pl.Int64,
    "itemInSession": pl.Int64,
    "page": pl.String,
    "level": pl.String,
    "registration": pl.Float64,
    "length": pl.Float64,
}
_REQUIRED = ("ts", "userId", "sessionId", "itemInSession", "page", "level")


def load_events_with_positions(path: Path | str) -> pl.LazyFrame:
    """Returns the logged-in events at `path` (see `load_events`) plus `partition` and `offset`:
    their Kafka position where the log has one (the archiver's `kafkaPartition`/`kafkaOffset`),
    else -1 in both. A Kafka position is one event however many files hold it: the first file
    (in path order) counts, later copies are left out. (An archiver that stalls past the poll
    interval has its partitions moved while it still holds a batch, and can write a file over
    offsets its successor archived too: training and `churn materialize` would count those
    events twice.)

    Raises:
        InvalidInputError: as `load_events`.
    """
    path = Path(path)
    events = load_events(path)  # validates the log and gives the engine columns
    if path.is_dir():
        raw = _scan_files(sorted(path.rglob("*.parquet")))
        if {"kafkaPartition", "kafkaOffset"} <= set(raw.collect_schema().names()):
            raw = raw.with_columns(
                pl.col("kafkaPartition").cast(pl.Int64).alias("partition"),
                pl.col("kafkaOffset").cast(pl.Int64).alias("offset"),
            )
            positioned = events_frame(raw, keep=("partition", "offset"))
            unpositioned = pl.col("partition").is_null() | pl.col("offset").is_null() | (pl.col("offset") < 0)
            # One int per position (offsets stay far below 2**40): less than half the cost of a struct (measured).
            position = pl.col("partition") * 2**40 + pl.col("offset")
            return positioned.filter(unpositioned | position.is_first_distinct())
    return events.with_columns(pl.lit(-1, pl.Int64).alias("partition"), pl.lit(-1, pl.Int64).alias("offset"))


def load_events(path: Path | str) -> pl.LazyFrame:
    """Returns the logged-in events at `path` in the offline engine's columns (see
    `events_frame`: user_id, ts, session_id, item_in_session, page, level,
    registration, length), unsorted.

    `path` is a directory of Parquet files (searched recursively, so a hive-partitioned
    `date=YYYY-MM-DD/` layout works), one `.parquet` file, or a `.jsonl` / `.jsonl.gz` file.

    Raises:
        InvalidInputError: the path does not exist, has an unknown suffix, cannot be read,
            lacks a required column, or holds no logged-in event.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or directory; expected an event log (Parquet directory, .parquet or .jsonl[.gz])"
        raise InvalidInputError(msg)
    try:
        raw = _scan(path)
        names = raw.collect_schema().names()
        missing = [c for c in _REQUIRED if c not in names]
        if missing:
            msg = f"{path}: the event log lacks the column(s) {missing}; expected the wire format (camelCase)"
            raise InvalidInputError(msg)
        # Optional columns may be absent from a log (e.g. no song was ever played in it).
        raw = raw.with_columns(
            pl.lit(None, dtype=kind).alias(name) for name, kind in _WIRE_SCHEMA.items() if name not in names
        )
        events = events_frame(raw)
        empty = events.head(1).collect().is_empty()
    except InvalidInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        msg = f"{path}: cannot read the event log: {exc}"
        raise InvalidInputError(msg) from exc
    if empty:
        msg = f"{path}: the event log holds no logged-in event"
        raise InvalidInputError(msg)
    return events


def _scan(path: Path) -> pl.LazyFrame:
    name = path.name.lower()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            msg = f"{path}: the directory holds no .parquet file"
            raise InvalidInputError(msg)
        return _scan_files(files)
    if name.endswith(".parquet"):
        return pl.scan_parquet(path)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return _read_json_lines(path.read_bytes())
    if name.endswith((".jsonl.gz", ".ndjson.gz", ".json.gz")):
        try:
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        except (EOFError, OSError, zlib.error) as exc:  # cut short, or not gzip (BadGzipFile is an OSError)
            # EOFError escaped as is, and the command line read it as a Ctrl-D: "Aborted.", exit 1.
            msg = f"{path}: not a whole gzip file ({type(exc).__name__}: {exc}): a copy cut short, or not gzip at all"
            raise InvalidInputError(msg) from exc
        return _read_json_lines(data)
    msg = f"{path}: unknown event log format; expected a Parquet directory, .parquet, .jsonl or .jsonl.gz"
    raise InvalidInputError(msg)


def _scan_files(files: list[Path]) -> pl.LazyFrame:
    """Returns a scan of the Parquet `files` with every column any of them has (null where a
    file lacks it): a folder may mix archiver files (with their Kafka position) and other exports.
    A column's type is the first file's that has it."""
    schema: dict[str, pl.DataType] = {}
    for file in files:  # only the footers: ~35 µs a file
        for name, kind in pl.read_parquet_schema(file).items():
            schema.setdefault(name, kind)
    # Hive partitioning adds the `date` column from the folder names; it is not needed.
    return pl.scan_parquet(files, schema=schema, hive_partitioning=False, missing_columns="insert")


def _read_json_lines(data: bytes) -> pl.LazyFrame:
    if not data.strip():
        msg = "the JSON Lines file is empty"
        raise InvalidInputError(msg)
    # A fixed schema: inference from the first rows would miss columns that appear later.
    return pl.read_ndjson(io.BytesIO(data), schema=_WIRE_SCHEMA, ignore_errors=False).lazy()


def write_partitioned(events: pl.DataFrame, root: Path) -> None:
    """Writes wire-format events as the archiver does: root/date=YYYY-MM-DD/part-0.parquet."""
    frame = events.with_columns(pl.col(pl.Categorical).cast(pl.String))
    frame = frame.with_columns(pl.from_epoch("ts", time_unit="ms").dt.date().cast(pl.String).alias("date"))
    for (day,), part in frame.partition_by("date", as_dict=True).items():
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        part.drop("date").write_parquet(folder / "part-0.parquet")
