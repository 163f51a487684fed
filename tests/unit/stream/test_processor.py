"""The scorer's batch effect, with in-memory stores: replays after a crash change nothing."""

from __future__ import annotations

from events.schema import Event, parse_event
from features.online import STATE_ENCODER, OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.metrics import Metrics
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from tests.support import StandInModel, random_events


def messages(n_users: int = 20) -> list[Message]:
    events = random_events(7, users=n_users, days=10, per_user=60)
    out = []
    for i, e in enumerate(events):
        partition = hash(e.user_id) % 3
        out.append(Message(e.to_json(), "events", partition, i, e.ts))
    out.append(Message(b"{not json", "events", 0, len(out), 0))
    guest = (
        b'{"ts":1538352117000,"userId":"","sessionId":1,"itemInSession":0,'
        b'"page":"Home","auth":"Logged Out","level":"free"}'
    )
    out.append(Message(guest, "events", 1, len(out), 0))
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
