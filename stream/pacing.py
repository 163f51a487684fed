"""Pacing a replay for live demos: a fixed event rate, event time sped up, or both."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from events.schema import MAX_TS_MS, MIN_TS_MS


@dataclass(frozen=True)
class Pacing:
    """How fast to publish. `rate`: at most this many events per second. `speedup`: event time
    runs this many times faster than the wall clock (60 = one hour of events per minute).
    When both are set, each is an upper bound and the slower one wins.
    """

    rate: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("rate", self.rate), ("speedup", self.speedup)):
            if value is not None and not value > 0:
                msg = f"pacing {name} must be > 0, got {value}"
                raise ValueError(msg)


class Pacer:
    """Tells the producer how long to wait before each event; holds the schedule's origin."""

    def __init__(self, pacing: Pacing, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = pacing.rate
        self._speedup = pacing.speedup
        self._clock = clock
        self._start: float | None = None
        self._first_ts: int | None = None
        self._count = 0

    def delay(self, ts_ms: object) -> float:
        """Returns the seconds to wait before sending the next event (<= 0: send now).

        `ts_ms` is the event's `ts`; a value that is not a plausible epoch-ms int is ignored
        for event-time pacing (the consumer will dead-letter it), so it can never stall the
        replay. Events earlier than the first one are sent at once.
        """
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start
        if self._rate is not None:
            due = max(due, self._start + self._count / self._rate)
        if self._speedup is not None and type(ts_ms) is int and MIN_TS_MS <= ts_ms <= MAX_TS_MS:
            if self._first_ts is None:
                self._first_ts = ts_ms
            due = max(due, self._start + (ts_ms - self._first_ts) / 1000.0 / self._speedup)
        self._count += 1
        return due - now
