"""The prediction log: every daily snapshot the scorer scored, as Parquet partitioned by date.

Layout: `<root>/date=YYYY-MM-DD/snapshot.parquet` with one "served" row per user: user_id, as_of
(epoch ms, the snapshot's UTC midnight), churn_probability, risk_tier, model_version (the model
that serves the user: the champion, or the challenger for the canary slice), prediction_id
(`models.runtime.prediction_id` of that version, the user and the midnight), role = "served".
When a distinct `challenger` exists, each user has a second row, role = "shadow", with the OTHER
model's churn_probability, risk_tier, model_version and prediction_id (the challenger's for a
user the champion serves, the champion's for a canary user). Every row also names the champion of
the snapshot (`champion_version`) and its horizon (`horizon_days`): the snapshot is labelled H
days later with that H, and that model's realized figures are the served ones (files written
before had neither). Files written before shadow scoring
have no `role` column: every row of them is "served" (`with_role`). Readers use the served rows
unless they ask for the shadow ones (`read_snapshot`, `read_log`). Once the labels
are known (`stream.snapshot`) the same folder gets `labels.parquet` (user_id, churned) and
`performance.json`; `drift.json` is the snapshot's drift report (the history the Redis state,
which holds the latest only, does not keep). Files appear atomically and durably
(`core.durable`), so a reader never sees half a file, not even after a power loss, and a
snapshot taken again after a crash replaces the first one whole.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from core.durable import write_atomically
from core.errors import InvalidInputError

SNAPSHOT = "snapshot.parquet"
SERVED, SHADOW = "served", "shadow"  # the `role` of a row
SHADOW_DRIFT = "shadow_drift.json"  # the shadow model's drift report against its own reference
LABELS = "labels.parquet"
PERFORMANCE = "performance.json"
DRIFT = "drift.json"
CHAMPION_VERSION, HORIZON_DAYS = "champion_version", "horizon_days"  # the snapshot's champion and its H


def day_of(as_of_ms: int) -> str:
    """Returns the UTC date (YYYY-MM-DD) of an epoch-ms instant."""
    return datetime.fromtimestamp(as_of_ms / 1000, UTC).strftime("%Y-%m-%d")


def folder(root: Path, as_of_ms: int) -> Path:
    """Returns the date folder of a snapshot taken at `as_of_ms`."""
    return root / f"date={day_of(as_of_ms)}"


def _atomic(path: Path, write: Any) -> None:
    # Two scorers sharing the folder may take the same snapshot (the same rows) at once: each
    # renames its own temporary file, and the last one wins.
    write_atomically(path, write)


def _read(path: Path) -> pl.DataFrame:
    """Returns the Parquet file at `path`.

    Raises:
        InvalidInputError: it cannot be read (truncated or corrupt), naming the file.
    """
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        msg = f"cannot read the prediction log file {path}: {exc}"
        raise InvalidInputError(msg) from exc


def write_snapshot(root: Path, as_of_ms: int, frame: pl.DataFrame) -> Path:
    """Writes the snapshot of `as_of_ms` (columns as in the module doc; no row when nobody was
    active) to its date folder; returns the file. The labels and drift reports of an earlier
    take of the same snapshot (a replay after Redis was lost) are removed first: the new rows
    are labelled in turn, and their drift is reported again when their model has a reference."""
    path = folder(root, as_of_ms) / SNAPSHOT
    # Before the write: a crash in between leaves the old snapshot unlabelled, never new rows
    # with the old rows' labels or drift.
    for stale in (LABELS, PERFORMANCE, DRIFT, SHADOW_DRIFT):
        (path.parent / stale).unlink(missing_ok=True)
    _atomic(path, frame.write_parquet)
    return path


def write_labels(root: Path, as_of_ms: int, labels: pl.DataFrame, performance: dict[str, Any]) -> None:
    """Writes the labels (user_id, churned) and the performance figures of a snapshot."""
    base = folder(root, as_of_ms)
    _atomic(base / LABELS, labels.write_parquet)
    _atomic(base / PERFORMANCE, lambda p: p.write_text(json.dumps(performance, default=str)))


def write_drift(root: Path, as_of_ms: int, report: dict[str, Any], name: str = DRIFT) -> None:
    """Writes a snapshot's drift report (`DriftReport.to_dict`) to its date folder (as `name`:
    `DRIFT` for the champion's, `SHADOW_DRIFT` for the shadow model's)."""
    _atomic(folder(root, as_of_ms) / name, lambda p: p.write_text(json.dumps(report)))


def read_drift_history(root: Path) -> dict[str, dict[str, Any]]:
    """Returns {date: drift report} of every logged snapshot that has one."""
    return {
        p.parent.name.removeprefix("date="): json.loads(p.read_text()) for p in sorted(root.glob(f"date=*/{DRIFT}"))
    }


def with_role(frame: pl.DataFrame) -> pl.DataFrame:
    """Returns a snapshot frame with its `role` column: a file logged before shadow scoring has
    none, and every row of it was served."""
    return frame if "role" in frame.columns else frame.with_columns(pl.lit(SERVED, pl.String).alias("role"))


def _roles(frame: pl.DataFrame, role: str | None) -> pl.DataFrame:
    frame = with_role(frame)
    return frame if role is None else frame.filter(pl.col("role") == role)


def read_snapshot(root: Path, as_of_ms: int, role: str | None = SERVED) -> pl.DataFrame | None:
    """Returns the rows of `role` ("served" by default, "shadow", or None for both) of the
    snapshot taken at `as_of_ms`, with the `role` column; None if no snapshot was logged.

    Raises:
        InvalidInputError: the logged file cannot be read.
    """
    path = folder(root, as_of_ms) / SNAPSHOT
    return _roles(_read(path), role) if path.exists() else None


def unlabelled_snapshots(root: Path) -> list[int]:
    """Returns the instants (epoch ms, oldest first) of the snapshots logged under `root` that
    have no labels yet."""
    stamps = []
    for day in sorted(root.glob("date=*")):
        # performance.json is written last: a crash after labels.parquet leaves it unlabelled.
        if not (day / SNAPSHOT).exists() or (day / PERFORMANCE).exists():
            continue
        try:
            stamp = datetime.strptime(day.name.removeprefix("date="), "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:  # not a folder of the log's
            continue
        stamps.append(int(stamp.timestamp() * 1000))
    return stamps


def snapshot_champion(root: Path, as_of_ms: int) -> tuple[str, int] | None:
    """Returns (champion version, horizon in days) the snapshot of `as_of_ms` records, reading
    one row of it; None when no snapshot was logged then, it has no row, or it was logged before
    snapshots recorded them.

    Raises:
        InvalidInputError: the logged file cannot be read.
    """
    path = folder(root, as_of_ms) / SNAPSHOT
    if not path.exists():
        return None
    try:
        first = pl.scan_parquet(path).head(1).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        msg = f"cannot read the prediction log file {path}: {exc}"
        raise InvalidInputError(msg) from exc
    if first.is_empty() or HORIZON_DAYS not in first.columns:
        return None
    return str(first[CHAMPION_VERSION][0]), int(first[HORIZON_DAYS][0])


def read_log(
    root: Path, user_id: str | None = None, date: str | None = None, role: str | None = SERVED
) -> pl.DataFrame:
    """Returns logged predictions of `role` ("served" by default, "shadow", or None for both)
    sorted by as_of, user_id then role, with `churned` where labels exist (null before),
    optionally for one user and/or one date (YYYY-MM-DD).

    Raises:
        InvalidInputError: no snapshot is logged under `root` (for that date), or a logged file
            cannot be read.
    """
    pattern = f"date={date}" if date else "date=*"
    days = sorted(p for p in root.glob(pattern) if (p / SNAPSHOT).exists())
    if not days:
        msg = f"no prediction snapshot under {root}" + (f" for {date}" if date else "")
        raise InvalidInputError(msg)
    parts = []
    for day in days:
        frame = _roles(_read(day / SNAPSHOT), role)
        if (day / LABELS).exists():
            frame = frame.join(_read(day / LABELS), on="user_id", how="left")
        else:
            frame = frame.with_columns(pl.lit(None, pl.Boolean).alias("churned"))
        parts.append(frame)
    log = pl.concat(parts, how="diagonal_relaxed")  # days logged before a column was added lack it
    if user_id is not None:
        log = log.filter(pl.col("user_id") == user_id)
    return log.sort("as_of", "user_id", "role")
