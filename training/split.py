"""Time-based train / validation / test split of observation points, with gaps of the horizon.

A point at t carries a label read from (t, t + H]. So that no label window of one split reaches
into the next, the first time of each split is at least H after the last time of the one before;
the grid times in between are not used. Splits are by observation time, never random rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from core.errors import InvalidInputError
from features import spec


@dataclass(frozen=True)
class TimeSplit:
    """The observation times (epoch ms, sorted) of each split."""

    train: tuple[int, ...]
    valid: tuple[int, ...]
    test: tuple[int, ...]

    def bounds(self) -> dict[str, list[int]]:
        """Returns {split: [first, last] observation time} for logging."""
        return {
            name: [times[0], times[-1]]
            for name, times in (("train", self.train), ("valid", self.valid), ("test", self.test))
        }


def split_times(times: np.ndarray, horizon_days: int, valid_share: float = 0.2, test_share: float = 0.2) -> TimeSplit:
    """Returns the split of distinct observation `times`: the latest `test_share` of the usable
    times for test, the `valid_share` before it for validation, the rest for training, with
    every split starting at least `horizon_days` after the previous one ends.

    Raises:
        InvalidInputError: the times cannot hold three non-empty splits with those gaps.
    """
    unique = np.unique(np.asarray(times, dtype=np.int64))
    gap = horizon_days * spec.DAY_MS
    if len(unique) < 3:
        msg = f"only {len(unique)} labelled observation time(s); need at least 3 plus gaps of {horizon_days} days"
        raise InvalidInputError(msg)
    span_steps = len(unique)
    step = int(np.median(np.diff(unique)))
    # Grid times lost to the two gaps: those strictly inside (last, last + H).
    lost = 2 * max(0, -(-gap // step) - 1)
    usable = span_steps - lost
    n_test = max(1, round(test_share * usable))
    n_valid = max(1, round(valid_share * usable))
    test = unique[-n_test:]
    before_test = unique[unique <= test[0] - gap]
    valid = before_test[-n_valid:]
    train = unique[unique <= (valid[0] - gap if len(valid) else unique[0] - 1)]
    if len(valid) == 0 or len(train) == 0:
        days = (unique[-1] - unique[0]) / spec.DAY_MS
        msg = (
            f"labelled observation times span {days:.1f} days: too short for train, validation and test"
            f" with {horizon_days}-day gaps; use a longer event log or a shorter horizon"
        )
        raise InvalidInputError(msg)
    return TimeSplit(tuple(int(t) for t in train), tuple(int(t) for t in valid), tuple(int(t) for t in test))


def take(frame: pl.DataFrame, times: tuple[int, ...]) -> pl.DataFrame:
    """Returns the rows of `frame` whose `as_of` is one of `times`."""
    return frame.filter(pl.col("as_of").is_in(list(times)))


@dataclass(frozen=True)
class Fold:
    """One rolling-origin backtest fold: the observation times (epoch ms, sorted) it trains on
    and the later block it is tested on, at least H apart."""

    train: tuple[int, ...]
    test: tuple[int, ...]


def backtest_folds(
    times: np.ndarray, horizon_days: int, test_days: int = 3, min_train_days: int = 7, max_folds: int = 6
) -> list[Fold]:
    """Returns the rolling-origin folds of distinct observation `times`, oldest first: test
    blocks of `test_days` days going back from the latest time, non-overlapping, each training
    on every time at least `horizon_days` before its block's first time (so no training label
    window reaches into the test block) and kept only if that training part covers at least
    `min_train_days` distinct days; at most `max_folds` (the latest ones).

    Raises:
        InvalidInputError: not even one fold fits in the times.
    """
    unique = np.unique(np.asarray(times, dtype=np.int64))
    gap = horizon_days * spec.DAY_MS
    block = test_days * spec.DAY_MS
    folds: list[Fold] = []
    end = int(unique[-1]) if len(unique) else 0
    while len(unique) and len(folds) < max_folds:
        test = unique[(unique > end - block) & (unique <= end)]
        if not len(test):
            break
        train = unique[unique <= test[0] - gap]
        if len(np.unique(train // spec.DAY_MS)) < min_train_days:
            break
        folds.append(Fold(tuple(int(t) for t in train), tuple(int(t) for t in test)))
        end = int(test[0]) - 1
    if not folds:
        days = (unique[-1] - unique[0]) / spec.DAY_MS if len(unique) else 0.0
        msg = (
            f"labelled observation times span {days:.1f} days: too short for one backtest of {test_days} days"
            f" after {min_train_days} training days and a {horizon_days}-day gap; use a longer event log"
            " or a shorter horizon"
        )
        raise InvalidInputError(msg)
    return folds[::-1]


def labelled_times(times: np.ndarray, last_event_ms: int, horizon_days: int) -> np.ndarray:
    """Returns the distinct observation `times` whose label window (t, t + H] ends within the
    data (t + H <= `last_event_ms`): the only ones a model may be fitted on."""
    unique = np.unique(np.asarray(times, dtype=np.int64))
    return unique[unique + horizon_days * spec.DAY_MS <= last_event_ms]
