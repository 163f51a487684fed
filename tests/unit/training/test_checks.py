"""The training-data checks find each defect of a small crafted log, and only that one."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import polars as pl
import pytest

from core.errors import InvalidInputError
from core.settings import load_settings
from events.log import events_frame, write_partitioned
from events.schema import CHURN_PAGE, KNOWN_PAGES, Event
from features import spec
from tests.support import START_MS, random_events, wire_frame
from training import checks
from training.pipeline import TrainOptions, train

CLEAN = [e for e in random_events(seed=7, users=8, days=20, per_user=120) if e.page in KNOWN_PAGES]


def _report(events: list[Event], edit: pl.Expr | None = None) -> checks.DataReport:
    frame = events_frame(pl.DataFrame([msgspec.to_builtins(e) for e in events]))
    if edit is not None:
        frame = frame.with_columns(edit)
    return checks.check_events(frame)


def _flags(report: checks.DataReport) -> dict[str, bool]:
    return {
        "duplicated": report.duplicated_events > 0,
        "out_of_order": report.sessions_out_of_order > 0,
        "unknown_pages": bool(report.unknown_pages),
        "nulls": any(rate > 0 for name, rate in report.null_rates.items() if name not in checks.OPTIONAL_COLUMNS),
        "after_cancellation": report.users_active_after_cancellation > 0,
    }


def test_a_clean_log_has_no_warning() -> None:
    report = _report(CLEAN)
    assert report.warnings == []
    assert not any(_flags(report).values())
    assert set(report.null_rates) == {"user_id", "ts", "session_id", "item_in_session", "page", "level",
                                      "registration", "length"}  # fmt: skip
    assert report.events == len(CLEAN)
    assert report.users == 8


def _session_pair() -> tuple[int, int]:
    """Returns the indices of two consecutive events of one session in CLEAN."""
    for i, (a, b) in enumerate(itertools.pairwise(CLEAN)):
        if a.session_id == b.session_id and b.item_in_session == a.item_in_session + 1 and b.ts > a.ts:
            return i, i + 1
    raise AssertionError


def _defects() -> dict[str, tuple[list[Event], pl.Expr | None]]:
    first, second = _session_pair()
    backwards = list(CLEAN)
    backwards[second] = msgspec.structs.replace(CLEAN[second], ts=CLEAN[first].ts - 60_000)
    user = CLEAN[0].user_id
    cancel = Event(ts=START_MS + 5 * spec.DAY_MS, user_id=user, session_id=1, item_in_session=0,
                   page=CHURN_PAGE, auth="Cancelled", level="free")  # fmt: skip
    return {
        "duplicated": ([*CLEAN, CLEAN[10], CLEAN[11]], None),
        "out_of_order": (backwards, None),
        "unknown_pages": ([*CLEAN, msgspec.structs.replace(CLEAN[3], page="Some New Page")], None),
        "nulls": (CLEAN, pl.when(pl.col("ts") % 7 == 0).then(None).otherwise(pl.col("level")).alias("level")),
        "after_cancellation": ([*CLEAN, cancel], None),
    }


@pytest.mark.parametrize("defect", ["duplicated", "out_of_order", "unknown_pages", "nulls", "after_cancellation"])
def test_each_defect_is_caught_alone(defect: str) -> None:
    events, edit = _defects()[defect]
    report = _report(events, edit)
    flags = _flags(report)
    assert flags[defect]
    assert not any(value for name, value in flags.items() if name != defect), flags
    assert len(report.warnings) == 1, report.warnings
    assert report.to_dict()["warnings"] == report.warnings


def test_churners_per_split_are_recorded_and_few_warn() -> None:
    report = _report(CLEAN)
    checks.record_churners(report, "train", 40, 1000)
    checks.record_churners(report, "backtest 1", 3, 500)
    assert report.churners_per_split == {"train": 40, "backtest 1": 3}
    assert report.warnings == ["split backtest 1: only 3 churner(s) in 500 rows; its metrics are noisy"]


def test_a_split_without_churners_is_a_clear_error(tmp_path: Path) -> None:
    # One user cancels near the end: only the latest observation points have a churner.
    events = random_events(seed=2, users=12, days=40, per_user=200)
    cancel = Event(ts=START_MS + 39 * spec.DAY_MS, user_id="u3", session_id=1, item_in_session=0,
                   page=CHURN_PAGE, auth="Cancelled", level="free")  # fmt: skip
    write_partitioned(wire_frame([*events, cancel]), tmp_path / "events")
    settings = load_settings(state_dir=tmp_path / "state")
    with pytest.raises(InvalidInputError, match=r"the train split .* has no churner"):
        train(settings, tmp_path / "events", TrainOptions(horizon_days=3, register=False))
