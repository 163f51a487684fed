"""The scorer's view of a store outage: readiness, consecutive failures, backoff, and which
partitions hold the batch being retried.

A batch that finds a store down is rewound and retried with backoff; the scorer reports
not-ready (`churn_scorer_ready` 0) until a batch is applied again. A rebalance can move the
rewound partitions to another scorer meanwhile: that one retries the batch, and this one has
nothing left to retry, so it is ready again (it would otherwise stay not-ready while idle, with
no batch to prove the stores are back, and an orchestrator would restart a healthy process).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from core.errors import ServiceUnavailableError, StoreRefusedError
from monitoring.metrics import Metrics

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.1

Partition = tuple[str, int]  # (topic, partition)


class StoreOutage:
    """Tracks one outage at a time and keeps the scorer's readiness metrics in step with it."""

    def __init__(self, metrics: Metrics, max_backoff_s: float) -> None:
        self.metrics = metrics
        self.max_backoff_s = max_backoff_s
        self.backoff_s = FIRST_BACKOFF_S
        self.since: float | None = None  # first failed attempt of the batch being retried
        self.failures = 0  # consecutive failed attempts
        self.refusing: str | None = None  # the error code while Redis refuses
        self.retrying: frozenset[Partition] = frozenset()  # partitions of the batch being retried

    @property
    def ongoing(self) -> bool:
        """Returns whether a batch is being retried."""
        return self.since is not None

    def failed(self, exc: ServiceUnavailableError, now: float, partitions: Iterable[Partition]) -> float:
        """Records a failed attempt of the batch on `partitions` (not-ready, one more failure,
        the refusal reason) and logs it; returns the seconds to wait before the retry (doubled
        after each failure, up to `max_backoff_s`)."""
        self.metrics.scorer_ready.set(0)
        self.failures += 1
        self.metrics.store_failures.set(self.failures)
        self.since = now if self.since is None else self.since
        self.retrying = frozenset(partitions)
        wait = self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
        if isinstance(exc, StoreRefusedError):
            self._refusing(exc.reason)
            log.error(
                "Redis refuses the scorer's writes (%s): nothing is applied or committed until "
                "an operator fixes Redis; retrying the batch in %.1fs: %s",
                exc.reason,
                wait,
                exc,
            )
        else:
            log.warning("store unavailable, retrying the batch in %.1fs: %s", wait, exc)
        return wait

    def applied(self, now: float) -> None:
        """Records an applied batch: ready, and any outage is over."""
        if self.since is not None:
            log.info("stores are back: batch applied after %.1fs", now - self.since)
        self._clear()

    def moved(self, assigned: Iterable[Partition]) -> bool:
        """Ends the outage if none of the retried batch's partitions is still `assigned` to this
        scorer (a rebalance gave them to another, which retries the batch); returns whether it
        did."""
        if self.since is None or self.retrying & frozenset(assigned):
            return False
        log.info(
            "the batch being retried moved to another scorer with partitions %s: nothing left to retry, ready",
            sorted(p for _, p in self.retrying),
        )
        self._clear()
        return True

    def _refusing(self, reason: str) -> None:
        if self.refusing == reason:
            return
        if self.refusing is not None:
            self.metrics.redis_refusing.labels(self.refusing).set(0)
        self.refusing = reason
        self.metrics.redis_refusing.labels(reason).set(1)

    def _clear(self) -> None:
        self.metrics.scorer_ready.set(1)
        self.backoff_s = FIRST_BACKOFF_S
        if self.failures:
            self.failures = 0
            self.metrics.store_failures.set(0)
        if self.refusing is not None:
            self.metrics.redis_refusing.labels(self.refusing).set(0)
            self.refusing = None
        self.since = None
        self.retrying = frozenset()
