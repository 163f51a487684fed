"""The scorer's batch effect, with in-memory stores: replays after a crash change nothing."""

from __future__ import annotations

import zlib

import msgspec
import polars as pl

from events.schema import CHURN_PAGE, Event, parse_event
from features.online import STATE_DECODER, STATE_ENCODER, OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.metrics import SCORER_STAGES, Metrics
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from tests.support import GUEST_EVENT_JSON, StandInModel, random_events
from training.dataset import GridConfig, observation_points


def messages(n_users: int = 20) -> list[Message]:
    events = random_events(7, users=n_users, days=10, per_user=60)
    out = []
    for i, e in enumerate(events):
        partition = hash(e.user_id) % 3
        out.append(Message(e.to_json(), "events", partition, i, e.ts))
    out.append(Message(b"{not json", "events", 0, len(out), 0))
    out.append(Message(GUEST_EVENT_JSON, "events", 1, len(out), 0))
    return out


def processor(states: InMemoryStateStore, features: InMemoryFeatureStore, risks: InMemoryRiskStore) -> BatchProcessor:
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    return BatchProcessor(OnlineEngine(), states, features, risks, Metrics(), lambda: model, wall_clock_ms=lambda: 0)


def run(batches: list[list[Message]]) -> tuple[InMemoryFeatureStore, InMemoryRiskStore, int]:
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = processor(states, features, risks)
    dead = 0
    for batch in batches:
        dead += len(p.process(batch).dead_letters)
    return features, risks, dead


def test_replay_after_crash_gives_the_clean_result() -> None:
    msgs = messages()
    clean_features, clean_risks, dead = run([msgs[i : i + 100] for i in range(0, len(msgs), 100)])
    assert dead == 1

    # A crash after batch k: a new process (empty cache) re-reads from an older offset.
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    first = processor(states, features, risks)
    for i in range(0, 500, 100):
        first.process(msgs[i : i + 100])
    restarted = processor(states, features, risks)
    result = restarted.process(msgs[300:])
    assert result.duplicates == 200
    # repr: NaN (unknown registration) must compare equal to itself.
    assert repr(sorted(features.rows.items())) == repr(sorted(clean_features.rows.items()))
    assert sorted(risks.rows.items()) == sorted(clean_risks.rows.items())


def test_a_replay_writes_again_the_rows_a_store_lost() -> None:
    # On a Redis Cluster a user's feature and risk rows may sit on a master that lost its latest
    # writes in a failover while the state, on another master, kept them: the replay (every
    # event a duplicate) must write them again from the state.
    msgs = messages()
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    processor(states, features, risks).process(msgs)
    clean_features, clean_risks = dict(features.rows), dict(risks.rows)
    lost = sorted(features.rows)[:3]
    for user in lost:
        del features.rows[user], risks.rows[user]
    result = processor(states, features, risks).process(msgs)
    assert result.applied == 0
    assert repr(sorted(features.rows.items())) == repr(sorted(clean_features.items()))
    assert sorted(risks.rows.items()) == sorted(clean_risks.items())


def test_guest_and_invalid_are_counted_not_applied() -> None:
    msgs = messages(3)
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    result = processor(states, features, risks).process(msgs)
    assert result.guests == 1
    assert [d.offset for d in result.dead_letters] == [len(msgs) - 2]
    assert "malformed JSON" in result.dead_letters[0].reason
    assert result.applied == len(msgs) - 2
    assert set(features.rows) == set(risks.rows) == {"u0", "u1", "u2"}


def test_one_batch_of_interleaved_users_equals_the_events_applied_in_order() -> None:
    msgs = messages(5)[:-2]  # valid, logged-in events only
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    processor(states, features, risks).process(msgs)

    engine = OnlineEngine()
    for m in msgs:
        event = parse_event(m.value)
        assert isinstance(event, Event)
        engine.apply(event, m.partition, m.offset)
    assert set(features.rows) == set(engine.states)
    for user, state in engine.states.items():
        assert repr(features.rows[user]) == repr(engine.row(user))  # repr: NaN equals NaN
        assert states.blobs[user] == STATE_ENCODER.encode(state)


def test_states_are_saved_with_the_batch_applied_offsets() -> None:
    msgs = messages()
    states = InMemoryStateStore()
    p = processor(states, InMemoryFeatureStore(), InMemoryRiskStore())
    p.process(msgs[:100])
    ends = {f"events:{m.partition}": m.offset + 1 for m in msgs[:100]}
    assert states.offsets == ends  # every partition of the batch, dead letters and guests included


def test_an_event_far_ahead_of_its_append_time_is_dead_lettered_and_moves_nothing() -> None:
    msgs = messages(4)[:-2]
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = processor(states, features, risks)
    p.process(msgs)
    before = (repr(sorted(features.rows.items())), dict(states.blobs), dict(risks.rows), risks.watermark())

    event = parse_event(msgs[-1].value)
    assert isinstance(event, Event)
    future = msgspec.structs.replace(event, ts=4_070_908_800_000)  # 2099
    append_ms = msgs[-1].append_ms
    result = p.process([Message(future.to_json(), "events", 0, len(msgs), append_ms)])

    assert result.applied == 0
    assert [d.offset for d in result.dead_letters] == [len(msgs)]
    assert "ahead of its Kafka append time" in result.dead_letters[0].reason
    assert (repr(sorted(features.rows.items())), dict(states.blobs), dict(risks.rows), risks.watermark()) == before


def test_an_event_keyed_by_another_user_is_dead_lettered_and_moves_nothing() -> None:
    """The key picks the partition, and so the scorer: another scorer's copy of the user's state
    would overwrite this one's (or be overwritten). A message whose key is not its userId is
    refused; one with the right key, or with none, is applied."""
    msgs = messages(4)[:-2]  # events only: no malformed message, no guest
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = processor(states, features, risks)
    p.process(msgs[:-3])
    before = (repr(sorted(features.rows.items())), dict(states.blobs), dict(risks.rows))
    event, following = parse_event(msgs[-3].value), parse_event(msgs[-2].value)
    assert isinstance(event, Event)
    assert isinstance(following, Event)

    refused = p.process([msgs[-3]._replace(key=b"not-" + event.user_id.encode())])

    assert refused.applied == 0
    assert [d.offset for d in refused.dead_letters] == [msgs[-3].offset]
    assert f"is not the event's userId '{event.user_id}'" in refused.dead_letters[0].reason
    assert (repr(sorted(features.rows.items())), dict(states.blobs), dict(risks.rows)) == before
    right_key = p.process([msgs[-2]._replace(key=following.user_id.encode())])
    assert (right_key.applied, right_key.dead_letters) == (1, [])
    assert p.process([msgs[-1]]).applied == 1  # no key


def test_a_keyless_event_is_dead_lettered_unless_keys_are_not_required() -> None:
    """A keyless message lands on any partition, so on any scorer (the default refuses it); with
    `CHURN_REQUIRE_EVENT_KEY=false`, for a topic of one partition, it is applied."""
    [first, second] = messages(1)[:2]
    p = processor(InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore())
    p.key_required = True
    refused = p.process([first])
    assert refused.applied == 0
    assert [d.offset for d in refused.dead_letters] == [first.offset]
    assert "message has no key; the key must be the userId 'u0'" in refused.dead_letters[0].reason
    assert "CHURN_REQUIRE_EVENT_KEY=false" in refused.dead_letters[0].reason
    assert p.process([first._replace(key=b"u0")]).applied == 1
    p.key_required = False
    assert p.process([second]).applied == 1


def test_an_event_ahead_of_the_broker_within_the_skew_does_not_move_the_watermark_past_the_broker() -> None:
    msgs = messages(2)[:-2]
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = processor(states, features, risks)
    p.process(msgs)
    latest = max(m.append_ms for m in msgs)
    event = parse_event(msgs[-1].value)
    assert isinstance(event, Event)
    early = msgspec.structs.replace(event, ts=latest + 200_000)  # within the 300 s default skew
    result = p.process([Message(early.to_json(), "events", 0, len(msgs), latest + 1000)])
    assert result.applied == 1
    assert risks.watermark() == latest + 1000  # the broker's clock, not the device's


def test_a_cancelled_user_is_marked_with_the_cancellation_time_and_no_longer_scored() -> None:
    msgs = messages(3)[:-2]
    last = parse_event(msgs[-1].value)
    assert isinstance(last, Event)
    user = last.user_id
    cancel = msgspec.structs.replace(last, ts=last.ts + 1000, page=CHURN_PAGE, length=None)
    after = msgspec.structs.replace(last, ts=last.ts + 5000, page="Home", length=None, item_in_session=10_000)
    states, features, risks = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = processor(states, features, risks)
    p.process([*msgs, Message(cancel.to_json(), "events", 0, len(msgs), cancel.ts)])
    marked = risks.rows[user]
    assert (marked.churn_probability, marked.risk_tier, marked.cancelled_ms) == (None, None, cancel.ts)
    scored_others = {u: r for u, r in risks.rows.items() if u != user}
    assert all(r.churn_probability is not None and r.cancelled_ms is None for r in scored_others.values())

    # A new process (state from the store): a later event of the user updates the features
    # but the user stays cancelled and unscored.
    restarted = processor(states, features, risks)
    result = restarted.process([Message(after.to_json(), "events", 0, len(msgs) + 1, after.ts)])
    assert (result.applied, result.users_scored, result.users_cancelled) == (1, 0, 1)
    assert features.rows[user].last_event_ms == after.ts
    assert risks.rows[user].cancelled_ms == cancel.ts
    assert risks.rows[user].churn_probability is None


def test_a_state_saved_before_cancellation_was_tracked_decodes_as_not_cancelled() -> None:
    engine = OnlineEngine()
    engine.apply_all(random_events(1, users=1, days=2, per_user=20))
    state = engine.states["u0"]
    old_layout = msgspec.msgpack.encode(msgspec.to_builtins(state)[:-1])  # without `cancelled_ms`
    assert STATE_DECODER.decode(old_layout) == state
    assert state.cancelled_ms == -1


def freshness_observations(metrics: Metrics) -> dict[float, float]:
    """Returns the cumulative freshness buckets {le: count} the processor exported."""
    return {
        float(s.labels["le"]): s.value
        for family in metrics.registry.collect()
        if family.name == "churn_event_to_score_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    }


def test_freshness_counts_every_applied_event_against_its_own_append_time() -> None:
    # 3 users' events in one batch, 3 rows. Each event's append time is set so that its
    # freshness (risk rows written at wall time `now`) is known: 0.5 s or 3 s.
    msgs = [m for m in messages(3) if m.append_ms > 0]
    now = max(m.append_ms for m in msgs) + 10_000
    msgs = [m._replace(append_ms=now - (500 if i % 2 else 3000)) for i, m in enumerate(msgs)]
    metrics = Metrics()
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    stores = InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore()
    p = BatchProcessor(
        OnlineEngine(), *stores, metrics, lambda: model, wall_clock_ms=lambda: now, max_future_skew_ms=10**13
    )
    result = p.process(msgs)
    buckets = freshness_observations(metrics)
    assert result.applied == len(msgs) == buckets[float("inf")]
    assert buckets[0.5] == len(msgs) // 2  # the half appended 0.5 s before the write
    assert buckets[2.0] == len(msgs) // 2
    assert buckets[3.0] == len(msgs)


def test_every_stage_of_a_batch_is_charged_cpu() -> None:
    metrics = Metrics()
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    p = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), metrics, lambda: model
    )
    msgs = messages(50)
    for i in range(0, len(msgs), 500):
        p.process(msgs[i : i + 500])
    p.cpu.flush()
    charged = {
        s.labels["stage"]: s.value
        for family in metrics.registry.collect()
        if family.name == "churn_scorer_stage_cpu_seconds"
        for s in family.samples
        if s.name.endswith("_total")
    }
    # The processor's stages (the consumer loop charges consume, offset_check, commit, housekeeping).
    processor_stages = ("parse", "state_load", "engine", "feast_write", "score", "risk_write", "state_write")
    assert all(charged.get(stage, 0.0) > 0 for stage in processor_stages), charged
    assert set(charged) <= set(SCORER_STAGES)


class RecordedSnapshots:
    """The processor's side of the daily snapshots: which midnights it takes."""

    def __init__(self) -> None:
        self.taken: list[int] = []

    def track(self, rows: object, churned: object, captured: object) -> None:
        pass

    def take(self, as_of_ms: int, loaded: object, challenger: object = None, canary: float = 0.0) -> None:
        self.taken.append(as_of_ms)

    def first_due(self) -> None:
        return None  # a Redis no scorer has used


def test_one_ancient_event_in_the_first_batch_does_not_start_the_snapshot_clock_years_back() -> None:
    """A valid event of a user dated 2000 among days of events (not late: the user is new): the
    clock starts at the batch's own time, so the batch takes the snapshots of its days, not one
    for each of ~9,500 midnights since 2000."""
    day = messages(4)[:-2]
    ancient = parse_event(day[0].value)
    assert isinstance(ancient, Event)
    stale = msgspec.structs.replace(ancient, user_id="stale", ts=946_771_200_000)  # 2000-01-02
    batch = [Message(stale.to_json(), "events", day[0].partition, 10**6, day[0].append_ms), *day[:200]]
    taken = midnights_taken([batch])
    fresh = [m.append_ms for m in day[:200]]  # their event times
    assert taken
    assert min(taken) > min(fresh)  # none before the batch's own days
    assert len(taken) <= (max(fresh) - min(fresh)) // 86_400_000 + 1


def midnights_taken(batches: list[list[Message]], partitions: list[int] | None = None) -> list[int]:
    """Returns the midnights a processor on a Redis no scorer has used snapshots while it
    processes `batches` in order (owning `partitions`, when given)."""
    snapshots = RecordedSnapshots()
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    p = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), Metrics(), lambda: model,
        wall_clock_ms=lambda: 0, snapshots=snapshots,
    )  # fmt: skip
    if partitions is not None:
        p.partitions_changed(partitions, [])
    for batch in batches:
        p.process(batch)
    return snapshots.taken


def test_a_replay_whose_first_batch_spans_days_takes_its_first_midnight() -> None:
    """A replay from the start of the log on a fresh Redis: the first batch spans days, and the
    first midnight after its first event is snapshotted, as training has it (a start at each
    partition's median skipped one midnight with 1,000 users, two with 300)."""
    events = random_events(7, users=20, days=6, per_user=300)
    batch = [Message(e.to_json(), "events", zlib.crc32(e.user_id.encode()) % 3, i, e.ts) for i, e in enumerate(events)]
    first_midnight = min(e.ts for e in events) // 86_400_000 * 86_400_000 + 86_400_000
    assert min(midnights_taken([batch])) == first_midnight


def test_an_ancient_event_alone_in_its_partition_does_not_start_the_clock_years_back() -> None:
    """The ancient event is the only message of its partition in the first batch (a quiet
    partition): the clock still starts at the batch's own days once that partition moves on."""
    day = random_events(4, users=12, days=6, per_user=80)
    stale = msgspec.structs.replace(day[0], user_id="stale", ts=946_771_200_000)  # 2000-01-02
    first = [Message(stale.to_json(), "events", 2, 0, day[0].ts)]
    first += [Message(e.to_json(), "events", i % 2, i, e.ts) for i, e in enumerate(day[: len(day) // 2])]
    later = [Message(e.to_json(), "events", 2, 1 + i, e.ts) for i, e in enumerate(day[len(day) // 2 :])]
    taken = midnights_taken([first, later])
    assert taken
    assert min(taken) > min(e.ts for e in day)
    assert len(taken) <= 6  # the days of its events, not ~9,500


def test_an_ancient_backlog_filling_half_the_first_batch_does_not_start_the_clock_years_back() -> None:
    """A small first batch on a quiet topic, most of it one device's backlog dated 2000 (valid):
    the next batch shows those events for what they are, and the clock starts at the stream's days."""
    fresh = random_events(4, users=12, days=3, per_user=40)
    backlog = [msgspec.structs.replace(fresh[0], user_id="reset", ts=946_684_800_000 + i * 60_000) for i in range(3)]
    first = [Message(e.to_json(), "events", 0, i, fresh[0].ts) for i, e in enumerate([*backlog, *fresh[:2]])]
    later = [Message(e.to_json(), "events", 0, 10 + i, e.ts) for i, e in enumerate(fresh[2:])]
    taken = midnights_taken([first, later])
    assert taken
    assert min(taken) > min(e.ts for e in fresh)
    assert len(taken) <= 3  # the days of its events, not ~9,500


def test_a_partition_whose_first_fetch_comes_late_still_gets_trainings_first_midnight() -> None:
    """The first batch of a replay holds only partition 0; partition 1, fetched later, holds the
    log's first events. Training's first observation point (the first midnight after the first
    event) is still snapshotted: the start moves until a midnight has passed."""
    events = random_events(7, users=20, days=4, per_user=60)
    frame = pl.DataFrame({"user_id": [e.user_id for e in events], "ts": [e.ts for e in events],
                          "page": [e.page for e in events]})  # fmt: skip
    points, _ = observation_points(frame.lazy(), GridConfig())
    first_point = int(points["as_of"].min())  # type: ignore[arg-type]
    early = {e.user_id for e in events if e.ts < first_point}
    msgs = [Message(e.to_json(), "events", int(e.user_id in early), i, e.ts) for i, e in enumerate(events)]
    only_p0 = [m for m in msgs if m.partition == 0]
    assert min(m.append_ms for m in only_p0) > first_point  # partition 0 alone starts a day late
    batches = [only_p0[: len(only_p0) // 2], [m for m in msgs if m.partition == 1], only_p0[len(only_p0) // 2 :]]
    assert min(midnights_taken(batches, partitions=[0, 1])) == first_point
