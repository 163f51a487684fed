"""One micro-batch through the batch processor: parse, update user state, write features, score, write risk.

No Kafka here (see `stream.consumer` for the loop), so the whole effect of a batch can be
unit-tested with in-memory stores. The order of writes is what makes replays harmless:
features, then risk, then user states (which carry the applied offsets); the caller commits
Kafka offsets only after `process` returns.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from core.timeutil import DAY_MS
from events.schema import CHURN_PAGE, ErrorRecord, Event, ParsedBatch, parse_batch
from features.online import APPLIED, DUPLICATE, LATE, STATE_ENCODER, OnlineEngine
from features.spec import MODEL_FEATURES, W28D
from features.state_store import StateStore
from features.store import FeatureRow, FeatureStore
from models.runtime import LoadedModel, feature_matrix, prediction_id, shadow_of, split_canary
from monitoring.metrics import Metrics, StageCpu
from stream.at_risk import AtRiskIndex
from stream.changes import ChangeLog, ChangeReason, TierChange
from stream.risk_store import RiskRow, RiskStore

CHANGE_REASONS = 3  # top features by |impact| in a tier-change event


class Message(NamedTuple):
    """The parts of a Kafka message the scorer uses (a tuple: one is built per event)."""

    value: bytes
    topic: str
    partition: int
    offset: int
    append_ms: int  # broker append (or create) timestamp
    key: bytes | None = None  # the Kafka message key: the userId (None: a message without one)


class Snapshots(Protocol):
    """The daily snapshot the processor drives (`stream.snapshot.DailySnapshots`)."""

    def track(self, rows: Sequence[FeatureRow], churned: dict[str, int], captured: dict[int, list[FeatureRow]]) -> None:
        """Records the users whose rows were just written, those who churned (ts) and the rows
        as of open midnights of users who just moved past them."""
        ...

    def take(
        self, as_of_ms: int, loaded: LoadedModel | None, challenger: LoadedModel | None = None, canary: float = 0.0
    ) -> None:
        """Takes the snapshot of the UTC midnight `as_of_ms` (every earlier event applied): served
        by `loaded` (the canary's `canary` % by `challenger`), the other model in shadow."""
        ...

    def first_due(self) -> int | None:
        """Returns the earliest midnight no scorer has passed yet (None before the first)."""
        ...


@dataclass
class BatchResult:
    """What one batch did; `dead_letters` must reach the DLQ before offsets are committed."""

    dead_letters: list[ErrorRecord] = field(default_factory=list)
    unknown_pages: int = 0  # valid events whose page is not a known page
    applied: int = 0
    duplicates: int = 0
    late: int = 0
    guests: int = 0
    users_written: int = 0
    users_scored: int = 0
    users_cancelled: int = 0  # touched users who have cancelled: marked, not scored
    changes: int = 0  # tier changes announced


class BatchProcessor:
    """Applies micro-batches to the online engine and writes their effect to the stores."""

    def __init__(
        self,
        engine: OnlineEngine,
        states: StateStore,
        features: FeatureStore,
        risks: RiskStore,
        metrics: Metrics,
        current_model: Callable[[], LoadedModel | None],
        *,
        max_event_bytes: int = 64 * 1024,
        max_future_skew_ms: int = 300_000,
        key_required: bool = False,
        max_cached_users: int = 200_000,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        snapshots: Snapshots | None = None,
        changes: ChangeLog | None = None,
        at_risk: AtRiskIndex | None = None,
        challenger: Callable[[], LoadedModel | None] = lambda: None,
        canary_percent: float = 0.0,
    ) -> None:
        self.engine = engine
        self.states = states
        self.features = features
        self.risks = risks
        self.metrics = metrics
        self.current_model = current_model
        self.max_event_bytes = max_event_bytes
        self.max_future_skew_ms = max_future_skew_ms
        # With it (`CHURN_REQUIRE_EVENT_KEY`), a keyless event is dead-lettered (`key_mismatch_reason`).
        self.key_required = key_required
        self.max_cached_users = max_cached_users
        self.wall_clock_ms = wall_clock_ms
        self.snapshots = snapshots  # the daily snapshot at each UTC midnight of event time
        self._open: int | None = None  # the earliest midnight not yet snapshotted
        # On a Redis no scorer has used, until the first midnight passes: the event runs seen
        # (`event_runs`), whose latest run starts the clock.
        self._runs: list[tuple[int, int]] | None = None
        self._progress: dict[int, int] = {}  # partition -> latest event time applied from it
        self._partitions: set[int] | None = None  # owned partitions (None: not told yet)
        self.changes = changes  # where tier changes are announced (None: not announced)
        self.at_risk = at_risk  # the at-risk list kept beside the risk rows (None: not kept)
        # A distinct challenger serves the canary slice of users (`models.runtime.in_canary`) and
        # scores every user in shadow beside the model that serves them (nothing it scores is written).
        self.challenger = challenger
        self.canary_percent = canary_percent
        # Per partition: user -> (source offset, tier) of changes published for events the saved
        # states may not hold yet (a batch that crashed before its save); read from the changes
        # topic on first sight of a partition, pruned as saves cover them.
        self._announced: dict[int, dict[str, tuple[int, str]]] = {}
        # CPU by stage; the consumer loop marks its own stages (consume, commit...) on the same clock.
        self.cpu = StageCpu(metrics.stage_cpu_seconds)

    def forget(self) -> None:
        """Drops cached user states (after a rebalance they are reloaded on first sight) and the
        changes known published for unsaved events (read again from the changes topic)."""
        self.engine.states.clear()
        self._announced.clear()

    def process(self, messages: Sequence[Message], expected: Mapping[str, int] | None = None) -> BatchResult:
        """Processes one batch; returns what it did. The states are saved with the batch's applied
        offsets (`applied_offsets`) if the store still holds the `expected` applied offset of
        each partition (see `StateStore.save`).

        Raises:
            ServiceUnavailableError: a store is down; nothing of this batch may be committed
                (a retry of the same messages is safe).
            StateRolledBackError: the store went back in time; nothing of this batch may be
                committed, the partitions must be replayed from the offsets the store holds.
        """
        cpu = self.cpu
        parsed = parse_batch(
            messages,
            max_bytes=self.max_event_bytes,
            max_future_skew_ms=self.max_future_skew_ms,
            key_required=self.key_required,
        )
        result = BatchResult(dead_letters=parsed.errors, guests=parsed.guests, unknown_pages=parsed.unknown_pages)
        cpu.mark("parse")
        engine = self.engine
        if len(engine.states) > self.max_cached_users:
            engine.states.clear()
        unseen = {e.user_id for e in parsed.events if e.user_id not in engine.states}
        engine.states.update(self.states.load(unseen))
        cpu.mark("state_load")
        loaded = self.current_model()
        if self.snapshots is not None and self._open is None and parsed.events:
            # The first midnight not yet passed, as the scorers recorded it. Not the one after the
            # shared watermark: that follows the partition furthest ahead, and a restart while
            # another partition was still before a midnight skipped that midnight for good.
            start = self.snapshots.first_due()
            if start is None:  # the first run on this Redis
                start = self.risks.watermark()
            if start is None:
                self._runs = []  # the start is decided from the events, until a midnight passes
            else:
                self._open = -(-start // DAY_MS) * DAY_MS
        if self._runs is not None and parsed.events:
            # Every batch until then may move it: a partition whose first fetch came late may
            # hold earlier events, and a later batch shows an ancient first batch for what it was.
            self._runs = event_runs(self._runs, [e.ts for e in parsed.events])
            self._open = -(-self._runs[-1][0] // DAY_MS) * DAY_MS
        self._apply(messages, parsed, result, loaded, applied_offsets(messages), expected or {})
        # Counted as soon as the states are saved: if a later step (the snapshot, the dead
        # letters) fails, the retry finds these events applied and counts them as duplicates, so
        # "ok" counts each event once. What the states do not record is counted by
        # `count_unapplied`, once the batch's dead letters are delivered.
        self._count_applied(result)
        if self.snapshots is not None:
            for i, event in enumerate(parsed.events):
                partition = messages[parsed.sources[i]].partition
                self._progress[partition] = max(event.ts, self._progress.get(partition, event.ts))
            while self._open is not None and self._passed(self._open):
                self.snapshots.take(self._open, loaded, self.challenger(), self.canary_percent)
                self._open += DAY_MS
                self._runs = None  # a midnight has passed: the clock is set for good
            cpu.mark("snapshot")
        return result

    def partitions_changed(self, added: Sequence[int], removed: Sequence[int]) -> None:
        """Tracks the partitions this processor owns (a rebalance): a midnight is snapshotted
        once every owned partition has an event past it."""
        self._partitions = (self._partitions or set()) | set(added)
        self._partitions -= set(removed)
        for partition in removed:
            self._progress.pop(partition, None)

    def _passed(self, midnight: int) -> bool:
        """Returns True once every owned partition (those seen, before an assignment is known)
        has applied an event after `midnight`: only then is every user's row as of it known."""
        partitions = self._partitions if self._partitions is not None else set(self._progress)
        return bool(partitions) and all(self._progress.get(p, midnight) > midnight for p in partitions)

    def _apply(
        self,
        messages: Sequence[Message],
        parsed: ParsedBatch,
        result: BatchResult,
        loaded: LoadedModel | None,
        offsets: Mapping[str, int],
        expected: Mapping[str, int],
    ) -> None:
        """Applies the batch's events and writes their effect: features, scores, the
        watermark, the snapshot's activity, then the states (which carry the applied offsets)."""
        engine = self.engine
        events, sources = parsed.events, parsed.sources
        # User by user (each user's events in batch order; users are independent), the row and
        # the saved state are built right after the user's events, while the state is still
        # in the CPU cache (measured at live batch sizes: ~10% of the engine's time).
        rows: list[FeatureRow] = []
        appended_ms: list[int] = []  # per applied event: its Kafka append time (freshness is per event)
        positions: list[tuple[int, int]] = []  # per row: (partition, offset) of that message
        blobs: dict[str, bytes] = {}  # users whose state changed (applied, or a late event's offset)
        churned: dict[str, int] = {}  # users whose Cancellation Confirmation was applied: its ts
        captured: dict[int, list[FeatureRow]] = {}  # open midnight -> rows of users who just crossed it
        open_midnight = self._open if self.snapshots is not None else None
        encode = STATE_ENCODER.encode
        for user, indexes in _by_user(events).items():
            latest_applied: int | None = None  # append time (-1 when the broker gave none)
            replayed: int | None = None  # append time of a duplicate: the batch replays the user
            position = replayed_at = (-1, -1)  # (partition, offset) of those messages
            changed = False
            for j in indexes:
                event = events[j]
                message = messages[sources[j]]
                partition, offset, append_ms = message[2], message[3], message[4]
                if open_midnight is not None:
                    _capture(engine, user, event.ts, open_midnight, captured)
                outcome = engine.apply(event, partition, offset)
                if outcome == APPLIED:
                    result.applied += 1
                    latest_applied = append_ms
                    appended_ms.append(append_ms)
                    position = (partition, offset)
                    changed = True
                    if event.page == CHURN_PAGE:
                        churned.setdefault(user, event.ts)
                elif outcome == DUPLICATE:
                    result.duplicates += 1
                    replayed, replayed_at = append_ms, (partition, offset)
                elif outcome == LATE:
                    result.late += 1
                    changed = True
            # A replayed user's row and score are written again from their state: on a Redis
            # Cluster they may sit on a master that lost its latest writes in a failover while
            # the state, on another master, kept them (the rows are the same either way).
            if latest_applied is not None or replayed is not None:
                rows.append(engine.row(user))
                positions.append(position if latest_applied is not None else replayed_at)
            if changed:
                blobs[user] = encode(engine.states[user])
        cpu = self.cpu
        cpu.mark("engine")

        if rows:
            started = time.perf_counter()
            self.features.write_rows(rows)
            self.metrics.store_write_seconds.observe(time.perf_counter() - started)
        result.users_written += len(rows)
        cpu.mark("feast_write")
        # A user who has cancelled is answered as cancelled, never scored again.
        states = engine.states
        cancelled = [row for row in rows if states[row.user_id].cancelled_ms >= 0]
        if cancelled:
            now = self.wall_clock_ms()
            marks = [
                RiskRow.cancelled(r.user_id, states[r.user_id].cancelled_ms, r.last_event_ms, now) for r in cancelled
            ]
            self.risks.write(marks)
            if self.at_risk is not None:
                self.at_risk.update(marks)
            if self.changes is not None:  # no longer scored: nothing is announced for them again
                for row in cancelled:
                    if states[row.user_id].tier:
                        states[row.user_id].tier = ""
                        blobs[row.user_id] = encode(states[row.user_id])
            result.users_cancelled += len(cancelled)
            kept = [i for i, row in enumerate(rows) if states[row.user_id].cancelled_ms < 0]
            rows, positions = [rows[i] for i in kept], [positions[i] for i in kept]
            cpu.mark("risk_write")
        if loaded is not None and rows:
            challenger = self.challenger()
            scored = []
            for model, kept in split_canary([r.user_id for r in rows], loaded, challenger, self.canary_percent):
                part = [rows[i] for i in kept]
                risk_rows, matrix = self._score(part, model)
                result.users_scored += len(part)
                scored.append((risk_rows, [positions[i] for i in kept], matrix, model))
        if loaded is not None and appended_ms:
            # Every applied event, each with its own append time, against the moment its batch's
            # risk rows (scores, or the cancelled mark) are written.
            written_ms = self.wall_clock_ms()
            self.metrics.freshness_seconds.observe_many(np.maximum(written_ms - np.asarray(appended_ms), 0) * 0.001)
            cpu.mark("score")
        if loaded is not None and rows:
            # After the risk rows and the freshness clock: the shadow predict delays the commit, not the scores.
            for risk_rows, _, matrix, model in scored:
                shadow = shadow_of(model, loaded, challenger)
                if shadow is not None:
                    self._shadow(risk_rows, matrix, shadow)
            cpu.mark("shadow")
        if loaded is not None and rows and self.changes is not None:
            for risk_rows, part_positions, matrix, model in scored:
                topic = messages[0].topic
                result.changes += self._announce(risk_rows, part_positions, matrix, model, blobs, topic, expected)
            cpu.mark("changes")
        watermark = batch_watermark(events, [messages[i].append_ms for i in sources])
        if watermark is not None:
            self.risks.advance_watermark(watermark)
        cpu.mark("risk_write")
        if self.snapshots is not None:  # before the states: a replay re-tracks harmlessly
            self.snapshots.track(rows, churned, captured)  # cancelled users have left the population
            cpu.mark("snapshot")
        written = self.states.save(blobs, offsets, expected)
        if blobs:
            self.metrics.state_bytes.set(written / len(blobs))
        cpu.mark("state_write")
        if self._announced:  # the saved states now hold what was announced for events before the offsets
            for key, applied in offsets.items():
                partition = int(key.rpartition(":")[2])
                pending = self._announced.get(partition)
                if pending:
                    self._announced[partition] = {u: a for u, a in pending.items() if a[0] >= applied}

    def _score(self, rows: list[FeatureRow], loaded: LoadedModel) -> tuple[list[RiskRow], np.ndarray]:
        """Scores the rows, writes their risk rows (and the at-risk list); returns the risk rows
        and the matrix they were scored from (CPU charged to `score` and `risk_write`)."""
        matrix = feature_matrix(rows)
        probabilities = loaded.model.predict(matrix)
        now = self.wall_clock_ms()
        version = loaded.version
        risk_rows = [
            RiskRow(
                row.user_id, float(p), loaded.model.tier(float(p)), version, row.last_event_ms, now, None,
                prediction_id(version, row.user_id, row.last_event_ms, row.last_event_ms),
            )
            for row, p in zip(rows, probabilities, strict=True)
        ]  # fmt: skip
        m = self.metrics
        m.score.observe_many(probabilities)
        for tier, count in Counter(risk.risk_tier for risk in risk_rows).items():
            m.tier_total.labels(tier).inc(count)
        m.users_scored_total.inc(len(risk_rows))
        self.cpu.mark("score")
        self.risks.write(risk_rows)
        if self.at_risk is not None:
            self.at_risk.update(risk_rows)
        self.cpu.mark("risk_write")
        return risk_rows, matrix

    def _shadow(self, risk_rows: list[RiskRow], matrix: np.ndarray, shadow: LoadedModel) -> None:
        """Scores the matrix the risk rows were scored from with the shadow model and counts the
        agreement (`Metrics.track_shadow`); writes nothing: shadow never changes what is served."""
        probabilities = shadow.model.predict(matrix)
        tiers = [shadow.model.tier(float(p)) for p in probabilities]
        served = np.fromiter((r.churn_probability or 0.0 for r in risk_rows), dtype=np.float64, count=len(risk_rows))
        self.metrics.track_shadow("scorer", served, probabilities, [r.risk_tier or "" for r in risk_rows], tiers)

    def _announce(
        self,
        risk_rows: list[RiskRow],
        positions: list[tuple[int, int]],
        matrix: np.ndarray,
        loaded: LoadedModel,
        blobs: dict[str, bytes],
        topic: str,
        expected: Mapping[str, int],
    ) -> int:
        """Publishes the tier changes of the scored rows (see `stream.changes`): a change when the
        new tier differs from the one last announced for the user (published for an unsaved
        event, else saved in the state), unless a change for a later event of the user is
        published already (a replay); sets the states' tiers to the last announced (re-encoding
        their blobs). Returns how many changes were published.

        Raises:
            ServiceUnavailableError: the changes topic cannot be read or did not acknowledge.
        """
        assert self.changes is not None
        states = self.engine.states
        for partition in {p for p, _ in positions} - set(self._announced):
            key = partition_key(topic, partition)
            # The saved applied offset (the consumer checked it, or the state store holds it).
            since = expected[key] if key in expected else self.states.applied([key])[key]
            self._announced[partition] = {
                c.user_id: (c.source_offset, c.new_tier) for c in self.changes.published(partition, since)
            }
        changed: list[int] = []
        olds: list[str] = []
        for i, (risk, (partition, offset)) in enumerate(zip(risk_rows, positions, strict=True)):
            state = states[risk.user_id]
            known = self._announced[partition].get(risk.user_id)
            tier = risk.risk_tier or ""
            if known is not None and offset < known[0]:
                # A replay cut where the crashed batch was not: a change for a later event of
                # this user is already published. Announcing this earlier score would put a
                # second change on an event, or a change the receiver never sees superseded
                # (the topic's tail would end on the older one). The published one stands: the
                # replay announces again from its event on.
                tier = known[1]
            else:
                before = known[1] if known is not None else state.tier
                if tier != before:
                    changed.append(i)
                    olds.append(before)
                    self._announced[partition][risk.user_id] = (offset, tier)
            if state.tier != tier:
                state.tier = tier
                blobs[risk.user_id] = STATE_ENCODER.encode(state)
        if not changed:
            return 0
        contributions = loaded.model.contributions(matrix[changed])
        events = []
        for i, old, contribution in zip(changed, olds, contributions, strict=True):
            risk, (partition, offset) = risk_rows[i], positions[i]
            top = sorted(contribution.items(), key=lambda kv: abs(kv[1]), reverse=True)[:CHANGE_REASONS]
            events.append(
                TierChange(
                    user_id=risk.user_id,
                    old_tier=old or None,
                    new_tier=risk.risk_tier or "",
                    churn_probability=risk.churn_probability or 0.0,
                    reasons=[ChangeReason(name, _value(matrix[i, _COLUMN[name]]), round(v, 6)) for name, v in top],
                    model_name=loaded.name,
                    model_version=loaded.version,
                    event_time_ms=risk.event_time_ms,
                    prediction_id=risk.prediction_id,
                    source_partition=partition,
                    source_offset=offset,
                )
            )
        self.changes.publish(events)
        return len(events)

    def _count_applied(self, result: BatchResult) -> None:
        m = self.metrics
        m.events_total.labels("ok").inc(result.applied)
        m.events_total.labels("late").inc(result.late)
        m.events_total.labels("duplicate").inc(result.duplicates)

    def count_unapplied(self, result: BatchResult) -> None:
        """Counts the batch's invalid and guest messages and its unknown pages. Call it once the
        batch's dead letters are delivered: a batch retried after an outage parses them again,
        and nothing in the states tells a retry from a first attempt. A batch read again after
        its delivery (a crash before the commit, or a commit Kafka refused) counts them twice, as
        its dead letters are then sent twice."""
        m = self.metrics
        m.events_total.labels("invalid").inc(len(result.dead_letters))
        m.events_total.labels("guest").inc(result.guests)
        m.unknown_pages_total.inc(result.unknown_pages)


def _value(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


_COLUMN = {name: i for i, name in enumerate(MODEL_FEATURES)}


def partition_key(topic: str, partition: int) -> str:
    """Returns how a partition is named in the applied offsets: `<topic>:<partition>`."""
    return f"{topic}:{partition}"


def applied_offsets(messages: Sequence[Message]) -> dict[str, int]:
    """Returns, per partition of the batch, the next offset to read once the batch is applied
    (a partition's messages arrive in offset order: its last one is its end)."""
    return {partition_key(m.topic, m.partition): m.offset + 1 for m in messages}


def batch_watermark(events: Sequence[Event], append_ms: Sequence[int]) -> int | None:
    """Returns how far a batch may raise the stream watermark: its latest event time, but never
    past the latest Kafka append time (the broker's clock) of the batch, so an event dated
    ahead of the broker (accepted within the allowed skew) cannot push "now" into the future.
    None for a batch without events. Append times < 0 (none given) do not cap."""
    if not events:
        return None
    latest = max(e.ts for e in events)
    broker = max(append_ms, default=-1)
    return min(latest, broker) if broker >= 0 else latest


def event_runs(runs: Sequence[tuple[int, int]], times: Sequence[int]) -> list[tuple[int, int]]:
    """Returns `runs` (first, last event time; oldest first) with `times` added: the spans of
    event time in which no two consecutive events are further apart than the longest feature
    window (28 days). The snapshot clock of a fresh Redis starts at the latest run's first
    event: one device's events dated in 2000 (valid, ancient) would otherwise make a batch take
    a snapshot for each of the ~9,500 midnights since, all but the first few empty, while a
    replay whose first batches span days starts at its first event, as training's first
    observation point does. Runs are few, however many events they hold."""
    spans = sorted([*runs, *((t, t) for t in times)])
    merged = [spans[0]]
    for first, last in spans[1:]:
        if first - merged[-1][1] > W28D.size_ms:
            merged.append((first, last))
        else:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
    return merged


def _capture(engine: OnlineEngine, user: str, ts: int, first_open: int, captured: dict[int, list[FeatureRow]]) -> None:
    """Keeps the user's row as of each open midnight (>= `first_open`) that the event at `ts` is
    about to carry them past: the row a snapshot of that midnight needs, once the state has moved
    on (partitions run ahead of each other, so a midnight is snapshotted after some users crossed it)."""
    state = engine.states.get(user)
    if state is None or state.last_ts < 0 or ts <= state.last_ts:
        return
    midnight = max(first_open, -(-state.last_ts // DAY_MS) * DAY_MS)  # the first at or after the last event
    if midnight >= ts:
        return
    row = engine.row(user)
    while midnight < ts:
        captured.setdefault(midnight, []).append(row)
        midnight += DAY_MS


def _by_user(events: Sequence[Event]) -> dict[str, list[int]]:
    """Returns each user's event positions, in batch order (users in order of first event)."""
    groups: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        group = groups.get(event.user_id)
        if group is None:
            groups[event.user_id] = [i]
        else:
            group.append(i)
    return groups
