"""Tier-change events and the at-risk list, with in-memory stores: one event per change of the
scores, none repeated when a batch that published its changes is replayed after a crash."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from core.errors import ServiceUnavailableError
from events.schema import Event, parse_event
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel, feature_matrix, prediction_id
from monitoring.metrics import Metrics
from stream.at_risk import InMemoryAtRiskIndex
from stream.changes import InMemoryChangeLog, TierChange
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from tests.support import StandInModel, random_events


class ThreeTiers(StandInModel):
    """Tiers cut where these events put them (events in the last hour: ~4 and ~12)."""

    def tier(self, probability: float) -> str:
        return "high" if probability >= 0.11 else "medium" if probability >= 0.04 else "low"


MODEL = LoadedModel(ThreeTiers(), "churn-lightgbm", "7")


def messages(users: int = 12) -> list[Message]:
    """Events of `users` users on 3 partitions, offsets counted per partition."""
    out = []
    next_offset = [0, 0, 0]
    for e in random_events(5, users=users, days=6, per_user=80):
        partition = int(e.user_id[1:]) % 3
        out.append(Message(e.to_json(), "events", partition, next_offset[partition], e.ts))
        next_offset[partition] += 1
    return out


class CrashingStates(InMemoryStateStore):
    """A state store whose `crash_at`-th save dies before writing (a SIGKILL between the
    publication of the changes and the save)."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0
        self.crash_at: int | None = None

    def save(self, blobs: Mapping[str, bytes], applied: Mapping[str, int], expected: Mapping[str, int]) -> int:
        self.saves += 1
        if self.saves == self.crash_at:
            msg = "killed before the save"
            raise ServiceUnavailableError(msg)
        return super().save(blobs, applied, expected)


def processor(
    states: InMemoryStateStore, risks: InMemoryRiskStore, changes: InMemoryChangeLog, at_risk: InMemoryAtRiskIndex
) -> BatchProcessor:
    return BatchProcessor(
        OnlineEngine(), states, InMemoryFeatureStore(), risks, Metrics(), lambda: MODEL,
        wall_clock_ms=lambda: 0, changes=changes, at_risk=at_risk,
    )  # fmt: skip


def offline_changes(msgs: list[Message]) -> dict[str, list[str]]:
    """Returns each user's tier sequence with repeats collapsed, scoring every event on its own
    (what a scorer that scores each event announces)."""
    engine = OnlineEngine()
    chains: dict[str, list[str]] = {}
    for m in msgs:
        event = parse_event(m.value)
        assert isinstance(event, Event)
        engine.apply(event, m.partition, m.offset)
        row = engine.row(event.user_id)
        tier = MODEL.model.tier(float(MODEL.model.predict(feature_matrix([row]))[0]))
        chain = chains.setdefault(event.user_id, [])
        if not chain or chain[-1] != tier:
            chain.append(tier)
    return chains


def chains_of(changes: list[TierChange]) -> dict[str, list[str]]:
    """Returns each user's announced tiers, checking that every change starts where the user's
    previous one ended (the first from None) and repeats none."""
    out: dict[str, list[str]] = {}
    for change in sorted(changes, key=lambda c: (c.source_partition, c.source_offset)):
        chain = out.setdefault(change.user_id, [])
        assert change.old_tier == (chain[-1] if chain else None), (change, chain)
        assert change.new_tier != change.old_tier
        chain.append(change.new_tier)
    return out


def test_one_event_per_change_equals_the_offline_count_of_scores() -> None:
    msgs = messages()
    states, risks, changes, at_risk = (
        InMemoryStateStore(),
        InMemoryRiskStore(),
        InMemoryChangeLog(),
        InMemoryAtRiskIndex(),
    )
    p = processor(states, risks, changes, at_risk)
    for m in msgs:  # batches of one event: every event is scored, as offline
        p.process([m])
    expected = offline_changes(msgs)
    assert sum(len(c) for c in expected.values()) > len(expected)  # users do change tier
    assert chains_of(changes.all()) == expected
    # Each event carries what the stored risk row says, with the same prediction id.
    last = {c.user_id: c for c in changes.all()}
    for user, change in last.items():
        row = risks.rows[user]
        assert row.risk_tier == change.new_tier or row.event_time_ms > change.event_time_ms
        assert len(change.reasons) == 3
        assert change.model_version == "7"
    assert all(
        r.prediction_id == prediction_id("7", r.user_id, r.event_time_ms, r.event_time_ms) for r in risks.rows.values()
    )


def clean_run(msgs: list[Message]) -> tuple[InMemoryStateStore, InMemoryRiskStore]:
    """Returns the states and risk rows of an uninterrupted run in batches of 40."""
    states, risks = InMemoryStateStore(), InMemoryRiskStore()
    clean = processor(states, risks, InMemoryChangeLog(), InMemoryAtRiskIndex())
    for i in range(0, len(msgs), 40):
        clean.process(msgs[i : i + 40])
    return states, risks


def assert_one_chain_per_user(changes: InMemoryChangeLog, risks: InMemoryRiskStore) -> None:
    """Checks what a receiver of the topic relies on: consistent chains (nothing repeated,
    nothing missing), one change per (source_partition, source_offset), the topic's last tier
    of each user equal to the stored one, and the topic read in order with no deduplication
    ending on the same tiers."""
    chains = chains_of(changes.all())
    keys = [(c.source_partition, c.source_offset) for c in changes.all()]
    assert len(keys) == len(set(keys))
    final = {u: r.risk_tier for u, r in risks.rows.items()}
    assert {u: chain[-1] for u, chain in chains.items()} == final
    in_topic_order = {c.user_id: c.new_tier for c in changes.all()}
    assert in_topic_order == final


@pytest.mark.parametrize("replay_batch", [57, 13, 1])
@pytest.mark.parametrize("crash_at", [3, 7, 12])
@pytest.mark.parametrize("published_before_crash", [0, 1, None])
def test_a_batch_replayed_after_a_crash_publishes_nothing_twice(
    crash_at: int, published_before_crash: int | None, replay_batch: int
) -> None:
    """The replay cuts its batches elsewhere than the crashed run: bigger, smaller (a user's
    change published for an event the replay reaches only batches later), one event each.
    Before, a smaller replay announced the user's earlier scores again: a second change on the
    same event, and the one published first superseded where a receiver deduplicating on
    (source_partition, source_offset) dropped it."""
    msgs = messages()
    clean_states, clean_risks = clean_run(msgs)

    states, risks, changes = CrashingStates(), InMemoryRiskStore(), InMemoryChangeLog()
    first = processor(states, risks, changes, InMemoryAtRiskIndex())
    batches = [msgs[i : i + 40] for i in range(0, len(msgs), 40)]
    done = 0
    for k, batch in enumerate(batches):
        if k == crash_at:
            # Killed while publishing (after none or one of the batch's changes landed), or
            # after every change was acknowledged but before the states were saved.
            if published_before_crash is None:
                states.crash_at = states.saves + 1
            else:
                changes.fail_after = published_before_crash
        try:
            first.process(batch)
        except ServiceUnavailableError:
            break
        done += len(batch)
    assert done == crash_at * 40  # the crash landed in batch `crash_at`
    # A new process replays from the start of the crashed batch with other batch boundaries.
    replay = processor(states, risks, changes, InMemoryAtRiskIndex())
    published_at_crash = len(changes.all())
    for i in range(done, len(msgs), replay_batch):
        replay.process(msgs[i : i + replay_batch])
    assert published_at_crash > 0

    assert_one_chain_per_user(changes, risks)
    assert {u: r.risk_tier for u, r in risks.rows.items()} == {u: r.risk_tier for u, r in clean_risks.rows.items()}
    assert states.blobs == clean_states.blobs  # the announced tier is saved like the rest


@pytest.mark.parametrize("first_replay_batch", [1, 3])
@pytest.mark.parametrize("second_crash_after_saves", [1, 3, 15])
@pytest.mark.parametrize("crash_at", [1, 3, 7])
def test_two_crashes_in_a_row_leave_one_chain_per_user(
    crash_at: int, second_crash_after_saves: int, first_replay_batch: int
) -> None:
    """A crash between a 40-event batch's publication and its save, a replay in smaller batches
    killed the same way, then a replay of the rest. Before, the second replay read a tail still
    holding the first crash's change for a later event, published before the first replay's
    changes that superseded it: it announced nothing more, and the topic ended on a tier the
    stored rows no longer had."""
    msgs = messages()
    clean_states, clean_risks = clean_run(msgs)
    states, risks, changes = CrashingStates(), InMemoryRiskStore(), InMemoryChangeLog()
    at = 0
    for size, crash_after in ((40, crash_at), (first_replay_batch, second_crash_after_saves), (40, None)):
        run = processor(states, risks, changes, InMemoryAtRiskIndex())  # a new process
        states.crash_at = None if crash_after is None else states.saves + crash_after + 1
        while at < len(msgs):
            try:
                run.process(msgs[at : at + size])
            except ServiceUnavailableError:
                break
            at += size
        assert crash_after is None or at < len(msgs)  # the crash landed mid-stream
        assert changes.all()  # the first crash came after changes were published
    assert_one_chain_per_user(changes, risks)
    assert {u: r.risk_tier for u, r in risks.rows.items()} == {u: r.risk_tier for u, r in clean_risks.rows.items()}
    assert states.blobs == clean_states.blobs


class HighFromThreeAnHour(StandInModel):
    """High from 3 events in the user's last hour (the stand-in's probability grows with them)."""

    def tier(self, probability: float) -> str:
        return "high" if probability >= 1 - 1 / (1 + 3 / 100) - 1e-9 else "low"


def test_a_late_event_that_changes_the_tier_is_a_change_with_its_own_key() -> None:
    """A late event (within the allowed lateness) raises the user's count without a newer event
    time: a real change, which the key README tells a receiver to deduplicate on
    (source_partition, source_offset) keeps apart from the first one."""
    changes = InMemoryChangeLog()
    model = LoadedModel(HighFromThreeAnHour(), "churn-lightgbm", "1")
    processor = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), Metrics(),
        lambda: model, wall_clock_ms=lambda: 0, changes=changes,
    )  # fmt: skip
    t = 1_767_225_600_000
    times = [t, t - 60_000, t - 120_000]  # the third comes 2 minutes late, in the next batch
    events = [
        Event(ts=ts, user_id="u1", session_id=1, item_in_session=5 - i, page="Home", auth="Logged In", level="free")
        for i, ts in enumerate(times)
    ]
    batch = [Message(e.to_json(), "events", 0, offset, t) for offset, e in enumerate(events)]
    processor.process(batch[:2])
    processor.process(batch[2:])
    published = changes.published(0, 0)
    assert [(c.old_tier, c.new_tier) for c in published] == [(None, "low"), ("low", "high")]
    assert len({(c.source_partition, c.source_offset) for c in published}) == 2


def test_at_risk_list_ranks_the_stored_scores() -> None:
    msgs = messages(30)
    states, risks, changes, at_risk = (
        InMemoryStateStore(),
        InMemoryRiskStore(),
        InMemoryChangeLog(),
        InMemoryAtRiskIndex(),
    )
    p = processor(states, risks, changes, at_risk)
    for i in range(0, len(msgs), 100):
        p.process(msgs[i : i + 100])
    for tier in ("high", "medium", "low"):
        rows = [r for r in risks.rows.values() if r.risk_tier == tier]
        total, page = at_risk.page(tier, "probability", 0, 1000)
        assert total == len(rows) > 0
        ranked = sorted(rows, key=lambda r: (r.churn_probability, r.user_id), reverse=True)
        assert page == [(r.user_id, r.churn_probability) for r in ranked]
