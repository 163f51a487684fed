"""The daily snapshot: at each UTC midnight t of event time, every user active within the lookback
and not churned, their row as of t, scored by the champion.

That is training's observation point exactly (`training.dataset`: the online row as of the last
event at or before t, plus the request-time features at t), so drift compares the population the
reference was built from, and the prediction log holds what realized performance needs. The
batch processor takes the snapshot of a midnight once every partition it owns has an event
past it; users whose partition ran ahead and carried them past the midnight first left their
row as of it (`Activity.capture`), the others' saved state is still as of it.

Each snapshot: drift overall and per segment (`monitoring.drift.snapshot_drift`), the prediction
log (`monitoring.prediction_log`), the expected figures; and the snapshot of t - H, now that
every label of it is known, is labelled from the cancellations the stream carried and its
realized figures published (`training.performance`).

Activity lives in Redis: a sorted set of users by latest event time (`<prefix>active`, churned
users removed) and a hash of churn times (`<prefix>churned`), both updated with every batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from core.redis import redis_errors
from core.timeutil import DAY_MS, ms_to_iso
from features import spec
from features.online import OnlineEngine
from features.state_store import StateStore
from features.store import FeatureRow
from models.runtime import LoadedModel, feature_matrix, prediction_id
from monitoring.drift import snapshot_drift
from monitoring.drift_state import DriftPublisher
from monitoring.performance_state import PerformancePublisher
from monitoring.prediction_log import read_snapshot, write_drift, write_labels, write_snapshot
from training.performance import expected, realized

log = logging.getLogger(__name__)


class Activity(Protocol):
    """Who is active and who churned, as the stream saw it."""

    def track(self, latest: dict[str, int], churned: dict[str, int]) -> None:
        """Raises each user's latest event time; removes churned users and records their churn time."""
        ...

    def active(self, since_ms: int, until_ms: int) -> list[str]:
        """Returns the users (not churned) whose latest event is in [since_ms, until_ms], sorted."""
        ...

    def churn_times(self, users: Sequence[str]) -> dict[str, int]:
        """Returns the churn time of the users among `users` who churned."""
        ...

    def capture(self, midnight: int, rows: Sequence[FeatureRow]) -> None:
        """Keeps rows as of `midnight` of users whose state has moved past it (first one kept)."""
        ...

    def captured(self, midnight: int) -> dict[str, FeatureRow]:
        """Returns the rows kept for `midnight`."""
        ...

    def taken(self, as_of_ms: int) -> bool:
        """Returns True if the snapshot of `as_of_ms` was already taken (by this or another scorer)."""
        ...

    def mark_taken(self, as_of_ms: int) -> None:
        """Records that the snapshot of `as_of_ms` is taken and drops its kept rows."""
        ...


class InMemoryActivity:
    """An `Activity` in dicts (unit tests)."""

    def __init__(self) -> None:
        self.latest: dict[str, int] = {}
        self.churned: dict[str, int] = {}
        self.done: set[int] = set()
        self.rows: dict[int, dict[str, FeatureRow]] = {}

    def track(self, latest: dict[str, int], churned: dict[str, int]) -> None:
        """See `Activity.track`."""
        for user, ts in latest.items():
            if user not in self.churned:
                self.latest[user] = max(ts, self.latest.get(user, ts))
        for user, ts in churned.items():
            self.churned.setdefault(user, ts)
            self.latest.pop(user, None)

    def active(self, since_ms: int, until_ms: int) -> list[str]:
        """See `Activity.active`."""
        return sorted(u for u, ts in self.latest.items() if since_ms <= ts <= until_ms)

    def churn_times(self, users: Sequence[str]) -> dict[str, int]:
        """See `Activity.churn_times`."""
        return {u: self.churned[u] for u in users if u in self.churned}

    def capture(self, midnight: int, rows: Sequence[FeatureRow]) -> None:
        """See `Activity.capture`."""
        kept = self.rows.setdefault(midnight, {})
        for row in rows:
            kept.setdefault(row.user_id, row)

    def captured(self, midnight: int) -> dict[str, FeatureRow]:
        """See `Activity.captured`."""
        return dict(self.rows.get(midnight, {}))

    def taken(self, as_of_ms: int) -> bool:
        """See `Activity.taken`."""
        return as_of_ms in self.done

    def mark_taken(self, as_of_ms: int) -> None:
        """See `Activity.mark_taken`."""
        self.done.add(as_of_ms)
        self.rows.pop(as_of_ms, None)


class RedisActivity:
    """An `Activity` in Redis: `<prefix>active` (ZSET user -> latest ts), `<prefix>churned`
    (HASH user -> churn ts), `<prefix>snapshot:<as_of_ms>` markers. Raises ServiceUnavailableError."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.active_key = f"{prefix}active"
        self.churned_key = f"{prefix}churned"
        self.prefix = prefix

    def track(self, latest: dict[str, int], churned: dict[str, int]) -> None:
        """See `Activity.track` (ZADD GT: a replayed batch never lowers a time)."""
        with redis_errors("tracking activity"):
            pipe = self.client.pipeline(transaction=False)
            live = {u: ts for u, ts in latest.items() if u not in churned}
            if live:
                pipe.zadd(self.active_key, live, gt=True)
            if churned:
                pipe.zrem(self.active_key, *churned)
                for user, ts in churned.items():
                    pipe.hsetnx(self.churned_key, user, ts)
            pipe.execute()

    def active(self, since_ms: int, until_ms: int) -> list[str]:
        """See `Activity.active`."""
        with redis_errors("reading active users"):
            users = self.client.zrangebyscore(self.active_key, since_ms, until_ms)
        return sorted(u.decode() if isinstance(u, bytes) else u for u in users)

    def churn_times(self, users: Sequence[str]) -> dict[str, int]:
        """See `Activity.churn_times`."""
        if not users:
            return {}
        with redis_errors("reading churn times"):
            values = self.client.hmget(self.churned_key, list(users))
        return {u: int(v) for u, v in zip(users, values, strict=True) if v is not None}

    def capture(self, midnight: int, rows: Sequence[FeatureRow]) -> None:
        """See `Activity.capture` (HSETNX into `<prefix>capture:<midnight>`: a replay keeps the first)."""
        with redis_errors("keeping snapshot rows"):
            pipe = self.client.pipeline(transaction=False)
            for row in rows:
                pipe.hsetnx(
                    f"{self.prefix}capture:{midnight}", row.user_id, json.dumps([row.last_event_ms, row.values])
                )
            pipe.execute()

    def captured(self, midnight: int) -> dict[str, FeatureRow]:
        """See `Activity.captured`."""
        with redis_errors("reading snapshot rows"):
            raw = self.client.hgetall(f"{self.prefix}capture:{midnight}")
        out = {}
        for user, value in raw.items():
            name = user.decode() if isinstance(user, bytes) else user
            last, values = json.loads(value)
            out[name] = FeatureRow(name, int(last), values)
        return out

    def taken(self, as_of_ms: int) -> bool:
        """See `Activity.taken`."""
        with redis_errors("reading snapshot markers"):
            return bool(self.client.exists(f"{self.prefix}snapshot:{as_of_ms}"))

    def mark_taken(self, as_of_ms: int) -> None:
        """See `Activity.mark_taken`."""
        with redis_errors("writing a snapshot marker"):
            pipe = self.client.pipeline(transaction=False)
            pipe.set(f"{self.prefix}snapshot:{as_of_ms}", int(time.time()))
            pipe.delete(f"{self.prefix}capture:{as_of_ms}")
            pipe.execute()


class DailySnapshots:
    """Takes the daily snapshots (see the module doc) for one scorer process."""

    def __init__(
        self,
        activity: Activity,
        states: StateStore,
        engine: OnlineEngine,
        drift: DriftPublisher,
        performance: PerformancePublisher,
        log_root: Path,
        *,
        lookback_days: int = 28,
        min_segment_rows: int = 500,
    ) -> None:
        self.activity = activity
        self.states = states
        self.engine = engine  # a scratch engine of the scorer's layout: rows of loaded states
        self.drift = drift
        self.performance = performance
        self.log_root = log_root
        self.lookback_ms = lookback_days * DAY_MS
        self.min_segment_rows = min_segment_rows

    def track(self, rows: Sequence[FeatureRow], churned: dict[str, int], captured: dict[int, list[FeatureRow]]) -> None:
        """Records the users of rows just written, those who churned (see `Activity.track`) and
        the rows as of open midnights of users who moved past them (`Activity.capture`)."""
        if rows or churned:
            self.activity.track({r.user_id: r.last_event_ms for r in rows}, churned)
        for midnight, kept in captured.items():
            self.activity.capture(midnight, kept)

    def take(self, as_of_ms: int, loaded: LoadedModel | None) -> None:
        """Takes, publishes and logs the snapshot of `as_of_ms` with `loaded` (skipped without a
        model or when already taken), then labels the snapshot of `as_of_ms` - H.

        Raises:
            ServiceUnavailableError: Redis is down (the batch is retried; nothing was marked taken).
        """
        if loaded is None:
            log.info("no champion at %s: no snapshot", ms_to_iso(as_of_ms))
            return
        if self.activity.taken(as_of_ms):
            return
        started = time.perf_counter()
        model = loaded.model
        users, matrix = self.rows(as_of_ms)
        probabilities = np.asarray(model.predict(matrix), dtype=np.float64) if users else np.empty(0)
        tiers = [model.tier(float(p)) for p in probabilities]
        frame = pl.DataFrame(
            {
                "user_id": users,
                "as_of": [as_of_ms] * len(users),
                "churn_probability": probabilities,
                "risk_tier": tiers,
                "model_version": [loaded.version] * len(users),
                "prediction_id": [prediction_id(loaded.version, u, as_of_ms, as_of_ms) for u in users],
            },
            schema={"user_id": pl.String, "as_of": pl.Int64, "churn_probability": pl.Float64,
                    "risk_tier": pl.String, "model_version": pl.String, "prediction_id": pl.String},
        )  # fmt: skip
        write_snapshot(self.log_root, frame)
        reference = (model.meta or {}).get("reference")
        if reference is not None and users:
            report = snapshot_drift(
                reference, spec.MODEL_FEATURES, matrix, probabilities, self.drift.thresholds,
                now=time.time(), as_of_ms=as_of_ms, min_segment_rows=self.min_segment_rows,
            )  # fmt: skip
            write_drift(self.log_root, as_of_ms, report.to_dict())
            self.drift.publish(report, loaded.name, loaded.version)
        self.performance.expected(as_of_ms, loaded.version, expected(probabilities, tiers))
        self.label(as_of_ms - model.horizon_days * DAY_MS, model.horizon_days)
        self.activity.mark_taken(as_of_ms)
        log.info(
            "snapshot %s: %d users, model v%s, %.2f s",
            ms_to_iso(as_of_ms), len(users), loaded.version, time.perf_counter() - started,
        )  # fmt: skip

    def rows(self, as_of_ms: int) -> tuple[list[str], np.ndarray]:
        """Returns (users, matrix in `spec.MODEL_FEATURES` order) of the users active in the
        lookback at `as_of_ms`, as of that instant (their saved state + request-time features)."""
        since = as_of_ms - self.lookback_ms
        # Users whose state moved past the midnight (their partition ran ahead) left their row as
        # of it; the others' saved state is as of their last event at or before it.
        kept = {u: r for u, r in self.activity.captured(as_of_ms).items() if since <= r.last_event_ms <= as_of_ms}
        users = [u for u in self.activity.active(since, as_of_ms) if u not in kept]
        states = self.states.load(users)
        self.engine.states.clear()
        self.engine.states.update(states)
        rows = [self.engine.row(u) for u in users if u in states and states[u].last_ts <= as_of_ms]
        self.engine.states.clear()
        rows = sorted([*rows, *kept.values()], key=lambda r: r.user_id)
        return [r.user_id for r in rows], feature_matrix(rows, [as_of_ms] * len(rows))

    def label(self, as_of_ms: int, horizon_days: int) -> dict[str, float] | None:
        """Labels the logged snapshot of `as_of_ms` now that its horizon has passed (churned = a
        churn time in (as_of, as_of + H]) and publishes its realized figures; returns them, or
        None when no snapshot was logged for that instant."""
        snapshot = read_snapshot(self.log_root, as_of_ms)
        if snapshot is None or snapshot.is_empty():
            return None
        users = snapshot["user_id"].to_list()
        churn = self.activity.churn_times(users)
        end = as_of_ms + horizon_days * DAY_MS
        labels = np.array([as_of_ms < churn.get(u, -1) <= end for u in users])
        figures = realized(labels, snapshot["churn_probability"].to_numpy(), snapshot["risk_tier"].to_list())
        write_labels(
            self.log_root,
            as_of_ms,
            pl.DataFrame({"user_id": users, "churned": labels.tolist()}),
            {"as_of_ms": as_of_ms, "horizon_days": horizon_days, "realized": figures},
        )
        self.performance.realized(as_of_ms, figures)
        return figures
