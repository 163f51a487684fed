"""`churn materialize`: cold start of the online side from the archived event log.

1. The online engine replays the events, in Kafka offset order per partition where the log
   has offsets (as the stream applied them), to rebuild each user's scorer state (tiles,
   sessions, cancellation and the last applied Kafka offset per partition), so the first live
   event after the cold start extends the right history and events Kafka still holds are
   recognised as already applied.
2. The offline engine computes every user's row as of `as_of` from the events the replay
   applied (late ones beyond the allowed lateness are left out, as the stream leaves them);
   the rows become the Feast view's Parquet batch source and Feast's own `materialize`
   loads them into the Redis online store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from core.errors import InvalidInputError
from core.redis import redis_client
from core.settings import Settings
from core.timeutil import to_ms
from events.log import load_events_with_positions
from events.schema import Event
from features import offline, spec
from features.feast_repo import batch_source_path, key_ttl_seconds, open_feature_store
from features.online import APPLIED, STATE_ENCODER, OnlineEngine
from features.state_store import RedisStateStore, remove_old_layouts

# Users whose states one Lua script saves: Redis serves other clients between two scripts.
# Measured with 300,000 states of 700 bytes (2-core Xeon VM), a PING from another client: one
# script 4.8 s in all, worst PING 1.8 s; chunks of 5,000: 3.4 s, worst 52 ms; of 1,000: 2.7 s,
# worst 17 ms.
SAVE_CHUNK_USERS = 1_000


def offline_rows(log: pl.LazyFrame, as_of_ms: int) -> pl.DataFrame:
    """Returns every user's stored features as of `as_of_ms`, in the Feast batch-source layout
    (user_id, event_timestamp, last_event_ms, the spec's features); users with no event yet are left out."""
    users = log.select("user_id").unique().collect()
    points = users.with_columns(pl.lit(as_of_ms, pl.Int64).alias("as_of"))
    table = offline.compute(log, points).filter(pl.col("last_event_ms").is_not_null())
    return table.select(
        "user_id",
        pl.from_epoch("last_event_ms", time_unit="ms").dt.replace_time_zone("UTC").alias("event_timestamp"),
        "last_event_ms",
        *spec.STORED_FEATURES,
    )


def rebuild_states(log: pl.LazyFrame, as_of_ms: int, lateness_ms: int) -> tuple[OnlineEngine, pl.DataFrame]:
    """Replays the log up to `as_of_ms` into an online engine as the stream would have applied
    it: in offset order per partition where offsets exist (a late event, lower ts but higher
    offset, comes after the events Kafka had before it), by event time where they do not.

    "Up to `as_of_ms`" is a cut in offsets: each partition is replayed up to its first event
    after `as_of_ms`. Cut by event time instead, a late event behind that one (lower ts, higher
    offset) would be applied and its offset saved in the user's state, and the skipped event,
    replayed from Kafka by the scorer, would be taken for a duplicate and lost. Events without
    offsets are cut by event time.

    Returns the engine holding every user's state, and the events it applied (late and
    duplicate ones left out), from which the offline rows are computed so that both agree.
    """
    engine = OnlineEngine(lateness_ms=lateness_ms)
    # Events without offsets have partition and offset -1: they sort together, by ts.
    after = pl.col("ts") > as_of_ms
    ordered = (
        log.sort("partition", "offset", "ts", maintain_order=True)
        .filter(
            pl.when(pl.col("partition") >= 0)
            .then(after.cast(pl.UInt8).cum_max().over("partition") == 0)
            .otherwise(after.not_())
        )
        .collect()
    )
    columns = ("user_id", "ts", "session_id", "item_in_session", "page", "level", "registration", "length")
    applied: list[bool] = []
    for user_id, ts, session, item, page, level, registration, length, partition, offset in ordered.select(
        *columns, "partition", "offset"
    ).iter_rows():
        event = Event(
            ts=ts, user_id=user_id, session_id=session, item_in_session=item, page=page,
            auth="Logged In", level=level, registration=registration, length=length,
        )  # fmt: skip
        applied.append(engine.apply(event, partition, offset) == APPLIED)
    return engine, ordered.filter(pl.Series(applied, dtype=pl.Boolean))


@dataclass(frozen=True)
class BackfilledUsers:
    """The users a backfill saved: latest event time of each one not cancelled, (user,
    cancellation ms, latest event ms) of each cancelled one, and the backfill's instant."""

    latest: dict[str, int]
    cancelled: list[tuple[str, int, int]]
    as_of_ms: int


def materialize(
    settings: Settings,
    path: Path,
    as_of: datetime | None = None,
    progress: Callable[[str], None] = lambda _: None,
    record_users: Callable[[BackfilledUsers], None] = lambda _: None,
) -> dict[str, Any]:
    """Loads the online store (through Feast) and the scorer states from the event log at `path`
    (applied as the stream applies it: see `rebuild_states`); `record_users` gets the users'
    latest event times and cancellations, for what the stream keeps beside the states (in
    `stream`, above this layer): the cancelled users' risk rows, the snapshot's population
    (without it, users whose last event the topic no longer holds were left out of every daily
    snapshot until they came back), and the stream's clock.

    Returns counts and timings. Raises InvalidInputError (bad log) or ServiceUnavailableError.
    """

    log = load_events_with_positions(path)
    last_ms = log.select(pl.col("ts").max()).collect().item()
    as_of_ms = to_ms(as_of) if as_of else int(last_ms)
    started = time.perf_counter()
    engine, applied = rebuild_states(log, as_of_ms, settings.allowed_lateness_seconds * 1000)
    progress(f"replayed {applied.height} events in offset order: {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    rows = offline_rows(applied.lazy(), as_of_ms)
    if rows.is_empty():
        msg = f"{path}: no user has an event at or before {as_of_ms}"
        raise InvalidInputError(msg)
    target = batch_source_path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows.write_parquet(target)
    progress(f"offline backfill: {rows.height} rows in {time.perf_counter() - started:.1f}s -> {target}")

    started = time.perf_counter()
    store = open_feature_store(settings)
    first_ms = int(rows["last_event_ms"].min())  # type: ignore[arg-type]
    first = datetime.fromtimestamp(first_ms / 1000, tz=UTC) - timedelta(seconds=1)
    store.materialize(start_date=first, end_date=datetime.fromtimestamp(as_of_ms / 1000, tz=UTC) + timedelta(seconds=1))
    progress(f"Feast materialize into Redis: {time.perf_counter() - started:.1f}s")

    started = time.perf_counter()
    client = redis_client(settings)
    states = RedisStateStore(client, settings.redis_prefix, engine.state_layout, key_ttl_seconds(settings))
    # No applied offsets: a scorer starting on these states reads its partitions from the earliest
    # retained offset, and the per-user offsets saved here skip what the log already held. In
    # chunks: one save is one Lua script, and Redis serves nobody else while it runs (1.6M
    # states in one script blocked it for 41 s; the scorer and the API got BUSY errors).
    written = 0
    users = list(engine.states)
    for start in range(0, len(users), SAVE_CHUNK_USERS):
        chunk = users[start : start + SAVE_CHUNK_USERS]
        written += states.save({u: STATE_ENCODER.encode(engine.states[u]) for u in chunk}, {}, {})
        if start and start % (100 * SAVE_CHUNK_USERS) == 0:
            progress(f"scorer states: {start} of {len(users)} users saved")
    removed = remove_old_layouts(client, settings.redis_prefix, engine.state_layout)
    progress(f"removed {removed} keys of older state layouts")
    record_users(
        BackfilledUsers(
            latest={u: s.last_ts for u, s in engine.states.items() if s.cancelled_ms < 0},
            cancelled=[(u, s.cancelled_ms, s.last_ts) for u, s in engine.states.items() if s.cancelled_ms >= 0],
            as_of_ms=as_of_ms,
        )
    )
    progress(
        f"scorer states: {len(engine.states)} users, {written / max(len(engine.states), 1):.0f} bytes each, "
        f"{time.perf_counter() - started:.1f}s"
    )
    return {"users": rows.height, "as_of_ms": as_of_ms, "state_bytes": written}
