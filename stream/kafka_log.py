"""librdkafka's log lines through Python logging (logger `librdkafka`), repeats held back.

A consumer whose broker is down logs every failed reconnect straight to stderr: about 20 lines a
second per consumer (measured against a closed port), which buries the process's own warnings
for the whole outage. Routed here, they take the process's log format, and a line that repeats
passes once, then at most once per `REPEAT_EVERY_S` with the count of those held back.

librdkafka queues log lines for the client's next poll when a logger is set (confluent-kafka's
`logger` setting), so only clients polled all the time may use it: the committing consumers of
the stream loops. A client left unpolled through an outage would pile its lines up in memory.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

REPEAT_EVERY_S = 30.0
# Distinct lines remembered; beyond this the memory starts over (a line then passes once more).
MAX_REMEMBERED = 1_000
# The part of a librdkafka line that varies between repeats: durations ("after 3ms in state ...").
DURATION = re.compile(r"\d+(?:\.\d+)?ms\b")


class RepeatThrottle(logging.Filter):
    """Passes the first record of each kind and then at most one per `every_s`, that one noting
    how many of its kind were held back since. Records are of one kind when their level, their
    librdkafka facility and client, and their text but for durations are the same (so "after
    0ms" and "after 3ms" are repeats; another broker or another error is not)."""

    def __init__(self, every_s: float = REPEAT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}  # kind -> (last passed at, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        """Returns whether `record` is logged; adds the held-back count to one that is."""
        kind = (record.levelno, DURATION.sub("#ms", record.getMessage()))
        now = self.clock()
        with self._lock:
            if kind in self._seen:
                passed_at, held = self._seen[kind]
                if now - passed_at < self.every_s:
                    self._seen[kind] = (passed_at, held + 1)
                    return False
                if held:
                    record.msg = f"{record.msg} (and {held} like it in the {now - passed_at:.0f} s before)"
            elif len(self._seen) >= MAX_REMEMBERED:
                self._seen.clear()
            self._seen[kind] = (now, 0)
        return True

    def forget(self) -> None:
        """Starts over: the next record of every kind passes."""
        with self._lock:
            self._seen.clear()


LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
REPEATS = RepeatThrottle()
LIBRDKAFKA_LOG.addFilter(REPEATS)
