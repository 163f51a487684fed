"""Training-data checks, run on the event log before anything is fitted.

Soft findings (the log is usable but something upstream is off) become warning lines in the
data report: duplicated events, time running backwards within a session, unknown pages, null
rates of every column, users with events after their cancellation. Hard failures (a split
without churners, a log too short) stay the pipeline's clear `InvalidInputError`s; the
report records the churner count of every split for the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from events.log import EVENT_COLUMNS
from events.schema import CHURN_PAGE, KNOWN_PAGES

# Columns that may legitimately be empty on many rows (only songs have a length); their null
# rate is reported but never warned about. Every other column should always be filled.
OPTIONAL_COLUMNS = frozenset({"registration", "length"})
# The identity of an event: the same user, time, session, position and page twice is a duplicate.
EVENT_KEY = ("user_id", "ts", "session_id", "item_in_session", "page")


@dataclass
class DataReport:
    """What the checks found: counts per check, null rate per column, churners per split,
    and one warning line per soft finding."""

    events: int
    users: int
    duplicated_events: int
    sessions_out_of_order: int
    unknown_pages: dict[str, int]
    null_rates: dict[str, float]
    users_active_after_cancellation: int
    churners_per_split: dict[str, int] = field(default_factory=dict)
    # Events the stream ignores (older than their user's newest earlier event by more than the
    # allowed lateness, in Kafka order), left out of training as well (`record_late`).
    late_events: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as plain JSON-ready values."""
        return {
            "events": self.events,
            "users": self.users,
            "duplicated_events": self.duplicated_events,
            "sessions_out_of_order": self.sessions_out_of_order,
            "unknown_pages": dict(self.unknown_pages),
            "null_rates": dict(self.null_rates),
            "users_active_after_cancellation": self.users_active_after_cancellation,
            "churners_per_split": dict(self.churners_per_split),
            "late_events": self.late_events,
            "warnings": list(self.warnings),
        }


def check_events(events: pl.LazyFrame) -> DataReport:
    """Returns the data report of an event log in the engine's columns (`events.log.EVENT_COLUMNS`):
    every check runs, none raises; soft findings are listed in `warnings`."""
    frame = events.select(EVENT_COLUMNS).collect()
    total = frame.height
    key = pl.struct(*EVENT_KEY)
    duplicated = total - int(frame.select(key.is_first_distinct().sum()).item()) if total else 0
    # Within a session, event time must not go down as the position in the session goes up.
    backwards = pl.col("ts").diff().over("user_id", "session_id", order_by="item_in_session") < 0
    out_of_order = (
        frame.lazy().filter(backwards).select(pl.struct("user_id", "session_id").n_unique()).collect().item()
        if total
        else 0
    )
    unknown = (
        frame.filter(~pl.col("page").is_in(sorted(KNOWN_PAGES))).group_by("page").len().sort("len", descending=True)
    )
    unknown_pages = {str(row[0]): int(row[1]) for row in unknown.iter_rows()}
    null_rates = {name: (frame[name].null_count() / total if total else 0.0) for name in EVENT_COLUMNS}
    churned = frame.filter(pl.col("page") == CHURN_PAGE).group_by("user_id").agg(pl.col("ts").min().alias("churn_ms"))
    after = frame.join(churned, on="user_id").filter(pl.col("ts") > pl.col("churn_ms")).select("user_id").n_unique()
    report = DataReport(
        events=total,
        users=frame["user_id"].n_unique(),
        duplicated_events=duplicated,
        sessions_out_of_order=int(out_of_order),
        unknown_pages=unknown_pages,
        null_rates=null_rates,
        users_active_after_cancellation=int(after),
    )
    if duplicated:
        report.warnings.append(f"{duplicated} duplicated event(s) (same {', '.join(EVENT_KEY)})")
    if out_of_order:
        report.warnings.append(f"{out_of_order} session(s) whose time goes backwards as itemInSession grows")
    if unknown_pages:
        pages = ", ".join(f"{page!r} x{count}" for page, count in list(unknown_pages.items())[:5])
        report.warnings.append(f"{sum(unknown_pages.values())} event(s) on unknown pages: {pages}")
    for name, rate in null_rates.items():
        if rate > 0 and name not in OPTIONAL_COLUMNS:
            report.warnings.append(f"column {name} is null on {rate:.2%} of events")
    if after:
        report.warnings.append(f"{after} user(s) with events after their '{CHURN_PAGE}'")
    return report


def record_churners(report: DataReport, split_name: str, churners: int, rows: int) -> None:
    """Records the distinct churners of one split in `report`, with a warning line when there
    are fewer than 10 (its metrics will be noisy). A split with none is the caller's hard failure."""
    report.churners_per_split[split_name] = churners
    if 0 < churners < 10:
        report.warnings.append(f"split {split_name}: only {churners} churner(s) in {rows} rows; its metrics are noisy")


def record_late(report: DataReport, late: int, lateness_ms: int) -> None:
    """Records how many events training left out as late (see `features.offline.as_streamed`),
    with a warning line when there are any: a producer that delivers that late loses events in
    the stream as well."""
    report.late_events = late
    if late:
        report.warnings.append(
            f"{late} event(s) arrived more than the allowed lateness ({lateness_ms // 1000} s,"
            " CHURN_ALLOWED_LATENESS_SECONDS) after their user's newest event: the scorer ignores them,"
            " and so does training"
        )
