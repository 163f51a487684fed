"""The daily snapshot: at each UTC midnight t of event time, every user active within the lookback
and not churned, their row as of t, scored by the model that serves them (the champion, the
challenger for the canary slice) and, while a distinct challenger exists, by the other in shadow
(`monitoring.prediction_log`'s `role`).

That is training's observation point exactly (`training.dataset`: the online row as of the last
event at or before t, plus the request-time features at t), so drift compares the population the
reference was built from, and the prediction log holds what realized performance needs. The
batch processor takes the snapshot of a midnight once every partition it owns has an event
past it; users whose partition ran ahead and carried them past the midnight first left their
row as of it (`Activity.capture`), the others' saved state is still as of it.

Each snapshot: drift overall and per segment (`monitoring.drift.snapshot_drift`, the champion's),
the prediction log (`monitoring.prediction_log`), the expected figures of the served rows; per
model, its drift against its own reference and its expected figures over every user, and the
agreement of served and shadow scores (`monitoring.agreement`); and every logged snapshot whose
horizon has passed by t (its own: the H of the champion that took it, kept in its rows with that
champion's version), now that every label of it is known, is labelled from the cancellations the
stream carried and its realized figures published (`training.performance`). A promotion that
changes H thus neither skips nor mislabels a snapshot, and the model that served a snapshot keeps
role "served" in its realized figures after it is replaced.

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

from core.redis import execute_commands, redis_errors
from core.timeutil import DAY_MS, ms_to_iso
from features import spec
from features.online import OnlineEngine
from features.state_store import StateStore
from features.store import FeatureRow
from models.runtime import LoadedModel, feature_matrix, in_canary, prediction_id, shadow_of
from monitoring.agreement import agreement
from monitoring.drift import snapshot_drift
from monitoring.drift_state import DriftPublisher
from monitoring.performance_state import PerformancePublisher
from monitoring.prediction_log import (
    CHAMPION_VERSION,
    HORIZON_DAYS,
    SERVED,
    SHADOW,
    SHADOW_DRIFT,
    read_snapshot,
    snapshot_champion,
    unlabelled_snapshots,
    write_drift,
    write_labels,
    write_snapshot,
)
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

    def mark_passed(self, as_of_ms: int) -> None:
        """Records that `as_of_ms` is done with (taken, or skipped without a model): drops its
        kept rows, and the first midnight due moves past it (never back)."""
        ...

    def first_due(self) -> int | None:
        """Returns the earliest midnight not yet passed (`mark_passed`), or None before any."""
        ...


class InMemoryActivity:
    """An `Activity` in dicts (unit tests)."""

    def __init__(self) -> None:
        self.latest: dict[str, int] = {}
        self.churned: dict[str, int] = {}
        self.done: set[int] = set()
        self.rows: dict[int, dict[str, FeatureRow]] = {}
        self.due: int | None = None

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
        self.mark_passed(as_of_ms)

    def mark_passed(self, as_of_ms: int) -> None:
        """See `Activity.mark_passed`."""
        self.rows.pop(as_of_ms, None)
        self.due = max(as_of_ms + DAY_MS, self.due or 0)

    def first_due(self) -> int | None:
        """See `Activity.first_due`."""
        return self.due


class RedisActivity:
    """An `Activity` in Redis: `<prefix>active` (ZSET user -> latest ts), `<prefix>churned`
    (HASH user -> churn ts), `<prefix>snapshot:<as_of_ms>` markers, `<prefix>snapshot:due` (the
    first midnight due, the score of its one member: ZADD GT only raises it, whichever scorer
    writes last). Raises ServiceUnavailableError."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.active_key = f"{prefix}active"
        self.churned_key = f"{prefix}churned"
        self.due_key = f"{prefix}snapshot:due"
        self.prefix = prefix

    def track(self, latest: dict[str, int], churned: dict[str, int]) -> None:
        """See `Activity.track` (ZADD GT: a replayed batch never lowers a time)."""
        live = [v for u, ts in latest.items() if u not in churned for v in (ts, u)]
        commands: list[tuple[str | int, ...]] = [("ZADD", self.active_key, "GT", *live)] if live else []
        if churned:
            commands.append(("ZREM", self.active_key, *churned))
            commands.extend(("HSETNX", self.churned_key, user, ts) for user, ts in churned.items())
        with redis_errors("tracking activity"):
            execute_commands(self.client, commands)

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
        key = f"{self.prefix}capture:{midnight}"
        commands = [("HSETNX", key, row.user_id, json.dumps([row.last_event_ms, row.values])) for row in rows]
        with redis_errors("keeping snapshot rows"):
            execute_commands(self.client, commands)

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
            self.client.set(f"{self.prefix}snapshot:{as_of_ms}", int(time.time()))
        self.mark_passed(as_of_ms)

    def mark_passed(self, as_of_ms: int) -> None:
        """See `Activity.mark_passed`."""
        next_due = as_of_ms + DAY_MS
        commands = [("DEL", f"{self.prefix}capture:{as_of_ms}"), ("ZADD", self.due_key, "GT", next_due, "next")]
        with redis_errors("moving the first snapshot due"):
            execute_commands(self.client, commands)

    def first_due(self) -> int | None:
        """See `Activity.first_due`."""
        with redis_errors("reading the first snapshot due"):
            score = self.client.zscore(self.due_key, "next")
        return None if score is None else int(score)


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

    def first_due(self) -> int | None:
        """Returns the earliest midnight no scorer has passed yet (`Activity.first_due`)."""
        return self.activity.first_due()

    def show_latest(self) -> None:
        """Sets the drift and performance gauges from the shared state in Redis: the latest
        snapshot any scorer took (see `DriftPublisher.mirror`). Never raises."""
        self.drift.mirror()
        self.performance.mirror()

    def take(
        self, as_of_ms: int, loaded: LoadedModel | None, challenger: LoadedModel | None = None, canary: float = 0.0
    ) -> None:
        """Takes, publishes and logs the snapshot of `as_of_ms` served by `loaded` (the canary's
        `canary` % of users by a distinct `challenger`, which otherwise scores every user in
        shadow; skipped without a model, and when another scorer took it, whose figures the
        gauges then show), then labels the snapshot of
        `as_of_ms` - H.

        Raises:
            ServiceUnavailableError: Redis is down (the batch is retried; nothing was marked taken).
        """
        if loaded is None:
            log.info("no champion at %s: no snapshot", ms_to_iso(as_of_ms))
            self.activity.mark_passed(as_of_ms)  # its kept rows would stay in Redis for good
            return
        if self.activity.taken(as_of_ms):
            self.show_latest()  # another scorer took it: its figures, not this one's last
            self.activity.mark_passed(as_of_ms)
            return
        started = time.perf_counter()
        model = loaded.model
        users, matrix = self.rows(as_of_ms)
        shadow = shadow_of(loaded, loaded, challenger)
        scored = [_scored(m, matrix, users) for m in (loaded, shadow) if m is not None]
        probabilities, tiers = scored[0]
        # Per user: True where the challenger serves (the canary slice), else the champion serves.
        canary_users = np.array([in_canary(u, canary) for u in users], dtype=bool)
        roles = [(SERVED, canary_users), (SHADOW, ~canary_users)] if shadow is not None else [(SERVED, None)]
        frame = pl.concat([self._frame(as_of_ms, users, loaded, shadow, scored, role, mask) for role, mask in roles])
        # Which model was champion, and its horizon: how and when the snapshot is labelled.
        frame = frame.with_columns(
            pl.lit(loaded.version, pl.String).alias(CHAMPION_VERSION),
            pl.lit(model.horizon_days, pl.Int32).alias(HORIZON_DAYS),
        )
        write_snapshot(self.log_root, as_of_ms, frame)
        reference = (model.meta or {}).get("reference")
        if reference is not None and users:
            report = snapshot_drift(
                reference, spec.MODEL_FEATURES, matrix, probabilities, self.drift.thresholds,
                now=time.time(), as_of_ms=as_of_ms, min_segment_rows=self.min_segment_rows,
            )  # fmt: skip
            write_drift(self.log_root, as_of_ms, report.to_dict())
            self.drift.publish(report, loaded.name, loaded.version)
            self.drift.publish_model(report, SERVED, loaded.version)
        served = frame.filter(pl.col("role") == SERVED)
        self.performance.expected(
            as_of_ms, loaded.version,
            expected(served["churn_probability"].to_numpy(), served["risk_tier"].to_list()),
        )  # fmt: skip
        self.performance.model_figures("expected", as_of_ms, SERVED, loaded.version, expected(probabilities, tiers))
        if shadow is not None:
            self._shadow(as_of_ms, users, matrix, shadow, scored, frame)
        else:
            self.drift.publish_agreement(None, as_of_ms)
        self.label_due(as_of_ms, model.horizon_days, loaded.version)
        self.activity.mark_taken(as_of_ms)
        log.info(
            "snapshot %s: %d users, model v%s%s, %.2f s",
            ms_to_iso(as_of_ms), len(users), loaded.version,
            f", shadow v{shadow.version}" if shadow is not None else "", time.perf_counter() - started,
        )  # fmt: skip

    @staticmethod
    def _frame(
        as_of_ms: int,
        users: list[str],
        champion: LoadedModel,
        challenger: LoadedModel | None,
        scored: list[tuple[np.ndarray, list[str]]],
        role: str,
        challenger_rows: np.ndarray | None,
    ) -> pl.DataFrame:
        """Returns the rows of `role`: per user the champion's score, or the challenger's where
        `challenger_rows` is True (None: the champion's everywhere)."""
        probabilities, tiers = scored[0]
        versions = [champion.version] * len(users)
        if challenger is not None and challenger_rows is not None:
            other, other_tiers = scored[1]
            probabilities = np.where(challenger_rows, other, probabilities)
            tiers = [b if c else a for a, b, c in zip(tiers, other_tiers, challenger_rows, strict=True)]
            versions = [challenger.version if c else champion.version for c in challenger_rows]
        return pl.DataFrame(
            {
                "user_id": users,
                "as_of": [as_of_ms] * len(users),
                "churn_probability": probabilities,
                "risk_tier": tiers,
                "model_version": versions,
                "prediction_id": [
                    prediction_id(v, u, as_of_ms, as_of_ms) for v, u in zip(versions, users, strict=True)
                ],
                "role": [role] * len(users),
            },
            schema={"user_id": pl.String, "as_of": pl.Int64, "churn_probability": pl.Float64,
                    "risk_tier": pl.String, "model_version": pl.String, "prediction_id": pl.String,
                    "role": pl.String},
        )  # fmt: skip

    def _shadow(
        self,
        as_of_ms: int,
        users: list[str],
        matrix: np.ndarray,
        shadow: LoadedModel,
        scored: list[tuple[np.ndarray, list[str]]],
        frame: pl.DataFrame,
    ) -> None:
        """Publishes the shadow model's figures: its drift against its own reference (gauges and
        `SHADOW_DRIFT`), its expected figures, and the agreement of served and shadow rows."""
        probabilities, tiers = scored[1]
        reference = (shadow.model.meta or {}).get("reference")
        if reference is not None and users:
            report = snapshot_drift(
                reference, spec.MODEL_FEATURES, matrix, probabilities, self.drift.thresholds,
                now=time.time(), as_of_ms=as_of_ms, min_segment_rows=self.min_segment_rows,
            )  # fmt: skip
            write_drift(self.log_root, as_of_ms, report.to_dict(), SHADOW_DRIFT)
            self.drift.publish_model(report, SHADOW, shadow.version)
        self.performance.model_figures("expected", as_of_ms, SHADOW, shadow.version, expected(probabilities, tiers))
        served, other = (frame.filter(pl.col("role") == role).sort("user_id") for role in (SERVED, SHADOW))
        figures = agreement(
            served["churn_probability"].to_numpy(), other["churn_probability"].to_numpy(),
            served["risk_tier"].to_list(), other["risk_tier"].to_list(),
        )  # fmt: skip
        self.drift.publish_agreement(figures, as_of_ms)

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

    def label_due(self, now_ms: int, horizon_days: int, champion: str) -> list[int]:
        """Labels, oldest first, every logged snapshot without labels whose horizon has passed by
        `now_ms` (see `label`; `horizon_days` and `champion` stand in for a snapshot logged
        before its rows recorded them); returns the instants labelled."""
        done = []
        for as_of_ms in unlabelled_snapshots(self.log_root):
            if as_of_ms >= now_ms:
                break
            if self.label(as_of_ms, horizon_days, champion, until_ms=now_ms) is not None:
                done.append(as_of_ms)
        return done

    def label(
        self, as_of_ms: int, horizon_days: int, champion: str | None = None, until_ms: int | None = None
    ) -> dict[str, float] | None:
        """Labels the logged snapshot of `as_of_ms` (churned = a churn time in (as_of, as_of + H],
        H the horizon recorded in its rows, else `horizon_days`) and publishes its realized
        figures: of the served rows, and of each model over every user it scored (served or in
        shadow; role "served" for the champion recorded in its rows, else `champion`, "shadow"
        for any other); returns the served rows' figures, or None when no snapshot was logged for
        that instant, or its horizon has not passed by `until_ms`."""
        recorded = snapshot_champion(self.log_root, as_of_ms)
        if recorded is not None:
            champion, horizon_days = recorded
        if until_ms is not None and as_of_ms + horizon_days * DAY_MS > until_ms:
            return None  # read one row, not the whole snapshot: every day asks for each of the last H
        snapshot = read_snapshot(self.log_root, as_of_ms, role=None)
        if snapshot is None or snapshot.is_empty():
            return None
        served = snapshot.filter(pl.col("role") == SERVED)
        users = served["user_id"].to_list()
        churn = self.activity.churn_times(users)
        end = as_of_ms + horizon_days * DAY_MS
        labels = np.array([as_of_ms < churn.get(u, -1) <= end for u in users])
        figures = realized(labels, served["churn_probability"].to_numpy(), served["risk_tier"].to_list())
        # Each model over every user it scored, served or in shadow (without a shadow model: the
        # served rows again, unless a canary split them).
        by_model: dict[str, dict[str, Any]] = {}
        label_of = dict(zip(users, labels.tolist(), strict=True))
        for version, rows in sorted(snapshot.group_by("model_version"), key=lambda kv: str(kv[0][0])):
            role = SERVED if version[0] == champion else SHADOW
            model_labels = np.array([label_of.get(u, False) for u in rows["user_id"].to_list()])
            probabilities, tiers = rows["churn_probability"].to_numpy(), rows["risk_tier"].to_list()
            model_figures = realized(model_labels, probabilities, tiers)
            by_model[str(version[0])] = {"role": role, "realized": model_figures}
            self.performance.model_figures("realized", as_of_ms, role, str(version[0]), model_figures)
        write_labels(
            self.log_root,
            as_of_ms,
            pl.DataFrame({"user_id": users, "churned": labels.tolist()}),
            {"as_of_ms": as_of_ms, "horizon_days": horizon_days, "realized": figures, "by_model": by_model},
        )
        self.performance.realized(as_of_ms, figures)
        return figures


def _scored(loaded: LoadedModel, matrix: np.ndarray, users: list[str]) -> tuple[np.ndarray, list[str]]:
    """Returns (probabilities, tiers) of `loaded` on the snapshot's rows."""
    probabilities = np.asarray(loaded.model.predict(matrix), dtype=np.float64) if users else np.empty(0)
    return probabilities, [loaded.model.tier(float(p)) for p in probabilities]
