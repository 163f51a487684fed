"""Online (incremental) feature engine: per-user tiles on event time, updated event by event.

Each user's state keeps, per tile granularity of the spec, the sums of the aggregates that
granularity needs (a dict tile index -> list of sums), the start and size of recent sessions,
the latest event, and the last applied Kafka offset per partition. Tiles older than the
longest window plus the allowed lateness are dropped, so no raw events are stored. The row
is built as of the user's latest event, with the semantics documented in `features.spec`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from features import spec
from features.store import FeatureRow
from stream.events import Event

DUPLICATE: Final = 0
APPLIED: Final = 1
LATE: Final = 2


class UserState(msgspec.Struct, gc=False, array_like=True):
    """Everything the engine remembers of one user (serialised with msgpack between runs).

    `tiles[g]` maps a tile index of granularity g to the sums of `PLAN.slots[g]`;
    `sessions` maps a session id to [first event ts, events seen]; `offsets` maps a Kafka
    partition to the last offset applied for this user (replays at or below it are skipped).
    """

    last_ts: int = -1
    last_session: int = -1
    last_item: int = -1
    level_paid: int = 0
    registration: float | None = None
    tiles: list[dict[int, list[int]]] = msgspec.field(default_factory=list)
    sessions: dict[int, list[int]] = msgspec.field(default_factory=dict)
    offsets: dict[int, int] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class _Granularity:
    """What one tile granularity tracks: the slot layout and the windows evaluated on it."""

    ms: int
    slots: tuple[str, ...]  # aggregate names, one list position each
    page_slots: dict[str, tuple[int, ...]]  # page -> positions of page-filtered counts
    events_slot: int  # -1 if not tracked at this granularity
    listen_slot: int
    session_slot: int
    window_tiles: tuple[int, ...]  # distinct window lengths (in tiles) evaluated here
    keep_tiles: int  # tiles kept behind the current one (longest window + lateness)


@dataclass(frozen=True)
class _Plan:
    granularities: tuple[_Granularity, ...]
    # (feature name, granularity index, window tiles, slot position, scale, is int)
    window_features: tuple[tuple[str, int, int, int, float, bool], ...]


def _build_plan(lateness_ms: int) -> _Plan:
    aggregates = {a.name: a for a in spec.AGGREGATES}
    by_ms: dict[int, list[spec.WindowFeature]] = {}
    for feature in spec.WINDOW_FEATURES:
        by_ms.setdefault(feature.window.granularity_ms, []).append(feature)
    granularities = []
    window_features = []
    for gi, (ms, features) in enumerate(sorted(by_ms.items())):
        slots = tuple(dict.fromkeys(f.aggregate for f in features))
        page_slots: dict[str, list[int]] = {}
        for pos, name in enumerate(slots):
            agg = aggregates[name]
            if agg.measure == "events" and agg.pages is not None:
                for page in agg.pages:
                    page_slots.setdefault(page, []).append(pos)

        def slot_of(measure: str, slots: tuple[str, ...] = slots) -> int:
            matches = [
                i for i, n in enumerate(slots) if aggregates[n].measure == measure and aggregates[n].pages is None
            ]
            return matches[0] if matches else -1

        listen = [i for i, n in enumerate(slots) if aggregates[n].measure == "listen_ms"]
        window_tiles = tuple(sorted({f.window.tiles for f in features}))
        granularities.append(
            _Granularity(
                ms=ms,
                slots=slots,
                page_slots={page: tuple(pos) for page, pos in page_slots.items()},
                events_slot=slot_of("events"),
                listen_slot=listen[0] if listen else -1,
                session_slot=slot_of("session_starts"),
                window_tiles=window_tiles,
                keep_tiles=max(window_tiles) + -(-lateness_ms // ms),
            )
        )
        for f in features:
            window_features.append((f.name, gi, f.window.tiles, slots.index(f.aggregate), f.scale, f.dtype == "int"))
    return _Plan(tuple(granularities), tuple(window_features))


class OnlineEngine:
    """Applies events to user states and builds feature rows; no I/O.

    `states` is the working set; the caller loads a user's saved state into it (with
    `states[user] = state`) before applying that user's events, and saves it afterwards.
    """

    def __init__(self, lateness_ms: int = 3_600_000) -> None:
        self.lateness_ms = lateness_ms
        self.plan = _build_plan(lateness_ms)
        self.states: dict[str, UserState] = {}
        self._session_keep_ms = max(w.size_ms for w in spec.WINDOWS) + lateness_ms

    def new_state(self) -> UserState:
        """Returns an empty state with one tile dict per granularity."""
        return UserState(tiles=[{} for _ in self.plan.granularities])

    def apply(self, event: Event, partition: int = -1, offset: int = -1) -> int:
        """Applies one event to its user's state (created if absent).

        Returns APPLIED, DUPLICATE (offset already applied for this user and partition) or
        LATE (older than the user's latest event by more than the allowed lateness; ignored).
        """
        state = self.states.get(event.user_id)
        if state is None:
            state = self.states[event.user_id] = self.new_state()
        if offset >= 0:
            if offset <= state.offsets.get(partition, -1):
                return DUPLICATE
            state.offsets[partition] = offset
        ts = event.ts
        if ts < state.last_ts - self.lateness_ms:
            return LATE
        session_id = event.session_id
        if (ts, session_id, event.item_in_session) > (state.last_ts, state.last_session, state.last_item):
            state.last_ts, state.last_session, state.last_item = ts, session_id, event.item_in_session
            state.level_paid = 1 if event.level == "paid" else 0
            state.registration = event.registration

        # Sessions count where they start; a late event may move a session's start earlier.
        session = state.sessions.get(session_id)
        moved_from = -1
        if session is None:
            if len(state.sessions) > 16:
                self._prune_sessions(state)
            state.sessions[session_id] = [ts, 1]
            new_session = True
        else:
            session[1] += 1
            new_session = False
            if ts < session[0]:
                moved_from, session[0] = session[0], ts

        page = event.page
        listen_ms = round(event.length * 1000) if (event.length is not None and page == "NextSong") else 0
        for g, tiles in zip(self.plan.granularities, state.tiles, strict=True):
            index = ts // g.ms
            tile = tiles.get(index)
            if tile is None:
                if len(tiles) >= g.keep_tiles:
                    self._prune_tiles(tiles, index - g.keep_tiles)
                tile = tiles[index] = [0] * len(g.slots)
            if g.events_slot >= 0:
                tile[g.events_slot] += 1
            positions = g.page_slots.get(page)
            if positions is not None:
                for pos in positions:
                    tile[pos] += 1
            if listen_ms and g.listen_slot >= 0:
                tile[g.listen_slot] += listen_ms
            if g.session_slot >= 0 and (new_session or moved_from >= 0):
                tile[g.session_slot] += 1
                if moved_from >= 0:
                    old = tiles.get(moved_from // g.ms)
                    if old is not None:
                        old[g.session_slot] -= 1
        return APPLIED

    def _prune_tiles(self, tiles: dict[int, list[int]], newest_dropped: int) -> None:
        for index in [i for i in tiles if i <= newest_dropped]:
            del tiles[index]

    def _prune_sessions(self, state: UserState) -> None:
        horizon = state.last_ts - self._session_keep_ms
        for session_id in [s for s, (start, _) in state.sessions.items() if start < horizon]:
            del state.sessions[session_id]

    def apply_all(self, events: Iterable[Event]) -> None:
        """Applies events without Kafka positions (files, tests)."""
        for event in events:
            self.apply(event)

    def row(self, user_id: str) -> FeatureRow:
        """Returns the user's feature row as of their latest event.

        Raises:
            KeyError: the engine holds no state for `user_id`.
        """
        state = self.states[user_id]
        last = state.last_ts
        values: dict[str, float] = {}
        sums: list[dict[int, list[int]]] = []
        for g, tiles in zip(self.plan.granularities, state.tiles, strict=True):
            current = last // g.ms
            per_window: dict[int, list[int]] = {n: [0] * len(g.slots) for n in g.window_tiles}
            for index, tile in tiles.items():
                age = current - index  # 0 for the tile holding the latest event
                for n in g.window_tiles:
                    if 0 <= age < n:
                        per_window[n] = list(map(operator.add, per_window[n], tile))
            sums.append(per_window)
        for name, gi, n, pos, scale, is_int in self.plan.window_features:
            value = sums[gi][n][pos]
            values[name] = value if is_int else value * scale
        _derive(values)
        values["days_since_registration"] = (
            (last - state.registration) / spec.DAY_MS if state.registration is not None else float("nan")
        )
        values["level_paid"] = state.level_paid
        current_session = state.sessions.get(state.last_session)
        values["events_in_current_session"] = current_session[1] if current_session else 0
        return FeatureRow(user_id, last, values)


_TREND_TILES: Final = {trend.name: trend.tiles() for trend in spec.TRENDS}


def _derive(values: dict[str, float]) -> None:
    """Adds the ratio and trend features to `values`, with the formulas of `features.spec`."""
    for ratio in spec.RATIOS:
        values[ratio.name] = values[ratio.numerator] / max(values[ratio.denominator], 1)
    for trend in spec.TRENDS:
        recent_tiles, earlier_tiles = _TREND_TILES[trend.name]
        recent = values[trend.recent]
        earlier = values[trend.long] - recent
        values[trend.name] = (recent + 1) / (earlier * recent_tiles / earlier_tiles + 1)


STATE_ENCODER: Final = msgspec.msgpack.Encoder()
STATE_DECODER: Final = msgspec.msgpack.Decoder(UserState)
