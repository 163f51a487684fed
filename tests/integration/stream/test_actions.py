"""From scores to actions on the real Kafka, Redis and MLflow: tier-change events (one per change
of the scores, none repeated by a replay or a SIGKILL), prediction ids, the at-risk list."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from fastapi.testclient import TestClient

from bench.harness import wait_for
from core.redis import redis_client
from core.settings import Settings
from models.runtime import in_canary, prediction_id
from monitoring.metrics import Metrics
from serving.app import create_app
from stream.actions import WebhookSink, tail
from stream.at_risk import RedisAtRiskIndex
from stream.changes import ChangeReason, KafkaChangeLog, TierChange, ensure_changes_topic
from stream.consumer import build_scorer
from stream.risk_store import RedisRiskStore, RiskRow
from stream.topics import delete_topics
from tests.support import (
    Deployment,
    change_chains,
    drained,
    in_background,
    kill_mid_batch,
    offline_tiers,
    produce_paced,
    read_changes,
    read_dlq,
    record_figures,
    register_challenger,
    register_champion,
    small_model,
    spread_tiers,
    wave_events,
)

USERS, WAVES = 150, 6
WAVE_RATE = 200.0  # events/s in the SIGKILL test: a 1,500-event wave flows for 7.5 s
CHURN = str(Path(sys.executable).parent / "churn")


def _stored(d: Deployment, users: list[str]) -> dict[str, RiskRow]:
    client = redis_client(d.settings)
    try:
        rows = RedisRiskStore(client, d.settings.redis_prefix).read(users)
    finally:
        client.close()
    return {r.user_id: r for r in rows if r is not None}


@pytest.mark.slow
def test_one_change_event_per_change_of_the_scores_and_none_on_replay(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    lateness = settings.allowed_lateness_seconds * 1000
    waves = wave_events(USERS, WAVES, seed=3)
    model = spread_tiers(waves, small_model(), lateness)
    uri = register_champion(tmp_path / "registry", settings, model)
    d = Deployment(settings, uri, tmp_path, f"act{unique}", topic)
    try:
        # One wave at a time, each drained by a fresh scorer (a restart between waves): every
        # event is scored on its own, so the changes can be counted offline from the same events.
        for events in waves:
            produce_paced(d.settings, events, rate=100_000)
            d.run_uninterrupted(idle_s=1.0)
        expected = offline_tiers(waves, model, lateness)
        changes = read_changes(d.settings)
        chains = change_chains(changes)  # consistent per user, no duplicate
        assert chains == expected
        assert len(changes) == sum(len(chain) for chain in expected.values())
        assert len(changes) > 2 * USERS  # users do move between tiers
        users = sorted(expected)
        stored = _stored(d, users)
        assert {u: chain[-1] for u, chain in chains.items()} == {u: r.risk_tier for u, r in stored.items()}
        for change in changes:
            assert change.prediction_id == prediction_id(
                "1", change.user_id, change.event_time_ms, change.event_time_ms
            )
            assert change.model_version == "1"
            assert len(change.reasons) == 3
        for row in stored.values():
            assert row.prediction_id == prediction_id("1", row.user_id, row.event_time_ms, row.event_time_ms)

        # The whole topic again, from its start (another group), over the same saved states: every
        # event is a duplicate, nothing is scored or announced again.
        again = d.settings.model_copy(update={"scorer_group": f"again{unique}"})
        replayed = Metrics()
        build_scorer(again, replayed).run(max_idle_s=1.0)
        assert replayed.events_total.labels("duplicate")._value.get() == USERS * WAVES
        assert read_changes(d.settings) == changes
        record_figures(settings, "tier_changes_replay", {"events": USERS * WAVES, "changes": len(changes)})
    finally:
        d.cleanup()


@pytest.mark.slow
def test_at_risk_pages_equal_a_brute_force_ranking_and_answers_carry_prediction_ids(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    lateness = settings.allowed_lateness_seconds * 1000
    waves = wave_events(300, 3, seed=4)
    model = spread_tiers(waves, small_model(), lateness)
    uri = register_champion(tmp_path / "registry", settings, model)
    d = Deployment(settings, uri, tmp_path, f"risk{unique}", topic)
    try:
        produce_paced(d.settings, [e for events in waves for e in events], rate=100_000)
        d.run_uninterrupted(idle_s=1.0)
        users = sorted({e.user_id for e in waves[0]})
        stored = _stored(d, users)
        assert len(stored) == len(users)
        with TestClient(create_app(d.settings)) as api:
            for tier in ("high", "medium", "low"):
                rows = [r for r in stored.values() if r.risk_tier == tier]
                assert rows
                for order, key in (
                    ("probability", lambda r: (r.churn_probability, r.user_id)),
                    ("newest", lambda r: (r.event_time_ms, r.user_id)),
                ):
                    brute = [r.user_id for r in sorted(rows, key=key, reverse=True)]
                    listed: list[str] = []
                    offset: int | None = 0
                    while offset is not None:
                        answer = api.get(f"/users/at-risk?tier={tier}&order={order}&limit=7&offset={offset}")
                        assert answer.status_code == 200, answer.text
                        page = answer.json()
                        assert page["total"] == len(rows)
                        assert all(u["risk_tier"] == tier for u in page["users"])
                        listed += [u["user_id"] for u in page["users"]]
                        offset = page["next_offset"]
                    assert listed == brute
            top = api.get("/users/at-risk?tier=high&limit=1").json()["users"][0]
            assert top["prediction_id"] == stored[top["user_id"]].prediction_id

            answer = api.get(f"/users/{users[0]}/risk").json()
            row = stored[users[0]]
            assert answer["stored_risk"]["prediction_id"] == row.prediction_id
            as_of_ms = int(time.mktime(time.strptime(answer["as_of"][:19], "%Y-%m-%dT%H:%M:%S")) * 1000)
            assert len(answer["prediction_id"]) == 24
            assert answer["prediction_id"] != row.prediction_id or as_of_ms == row.event_time_ms
            assert api.get(f"/users/{users[0]}/risk").json()["prediction_id"] == answer["prediction_id"]
            assert api.get("/users/at-risk?tier=urgent").status_code == 422
            assert api.get("/users/at-risk?limit=0").status_code == 422
            assert api.get("/users/at-risk?limit=1001").status_code == 422

            # Rows expire (their TTL) while the members stay: paging on prunes them and skips no
            # live user (before, each pruned member hid the live one ranked next after the page).
            high = sorted(
                (r for r in stored.values() if r.risk_tier == "high"), key=lambda r: r.churn_probability or 0.0
            )
            expired = {r.user_id for r in high[::3]}
            client = redis_client(d.settings)
            risks = RedisRiskStore(client, d.settings.redis_prefix)
            client.delete(*(risks.key(u) for u in expired))
            listed, offset = [], 0
            while offset is not None:
                page = api.get(f"/users/at-risk?tier=high&limit=3&offset={offset}").json()
                listed += [u["user_id"] for u in page["users"]]
                offset = page["next_offset"]
            live = [r.user_id for r in sorted(high, key=lambda r: (r.churn_probability, r.user_id), reverse=True)]
            assert listed == [u for u in live if u not in expired]
            assert page["total"] == len(high) - len(expired)

            # A member the scorer re-adds (a new score) after a reader found it stale stays.
            index = RedisAtRiskIndex(client, d.settings.redis_prefix)
            back = high[-1]
            index.update([msgspec.structs.replace(back, churn_probability=0.999)])
            assert index.prune("high", "probability", {back.user_id: float(back.churn_probability or 0)}) == 0
            assert index.prune("high", "probability", {back.user_id: 0.999}) == 1
            client.close()
    finally:
        d.cleanup()


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(1200)  # a scorer start per kill, on a shared machine
def test_sigkilled_scorer_announces_each_change_once(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    lateness = settings.allowed_lateness_seconds * 1000
    waves = wave_events(1500, 3, seed=5)
    model = spread_tiers(waves, small_model(), lateness)
    uri = register_champion(tmp_path / "registry", settings, model)
    d = Deployment(settings, uri, tmp_path, f"kill{unique}", topic, max_batch_events=100)
    landed = []
    try:
        for events in waves:
            scorer = d.start_scorer()
            # Paced, so the scorer runs batch after batch while the kill looks for one whose
            # states are saved and whose commit is pending (a wave published at once was applied
            # in a burst of 15 batches, and the kill found none in one wave of three).
            producing = in_background(produce_paced, d.settings, events, WAVE_RATE)
            # Killed inside a batch (states saved, commit pending; its changes published), then a
            # new process replays what was not committed.
            landed.append(kill_mid_batch(scorer.proc, d.settings, timeout=120))
            assert producing.result(120).sent == len(events)
            scorer = d.start_scorer()
            wait_for(lambda: drained(d.settings), 300, "the restarted scorer to apply the wave")
            scorer.proc.send_signal(signal.SIGTERM)
            assert scorer.proc.wait(60) == 0
        expected = offline_tiers(waves, model, lateness)
        changes = read_changes(d.settings)
        assert change_chains(changes) == expected
        assert len(changes) == sum(len(chain) for chain in expected.values())
        assert landed == [True] * len(waves)
        record_figures(settings, "tier_changes_sigkill", {"kills_in_batch": landed, "changes": len(changes)})
    finally:
        d.cleanup()


class _Webhook(BaseHTTPRequestHandler):
    """A CRM webhook stand-in that does not log each request."""

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def _serving(handler: type[_Webhook]) -> Iterator[str]:
    """Serves `handler` on a free local port; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/changes"
    finally:
        server.shutdown()


def _change(user: str, i: int, partition: int, reasons: list[ChangeReason] | None = None) -> TierChange:
    """Returns user `user`'s change into `high`, caused by offset `i` of `partition`."""
    return TierChange(
        user_id=user, old_tier=None, new_tier="high", churn_probability=0.9, reasons=reasons or [],
        model_name="churn-lightgbm", model_version="1", event_time_ms=1_767_225_600_000 + i,
        prediction_id=prediction_id("1", user, i, i), source_partition=partition, source_offset=i,
    )  # fmt: skip


class _Receiver(_Webhook):
    """A CRM webhook: refuses user a5 (500, always) and a7 (400); every other change fails its
    first attempt (503) and is accepted on the next."""

    attempts: ClassVar[dict[str, int]] = {}
    accepted: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        user = body["user_id"]
        self.attempts[user] = self.attempts.get(user, 0) + 1
        status = 500 if user == "a5" else 400 if user == "a7" else 503 if self.attempts[user] == 1 else 200
        if status == 200:
            self.accepted.append(body)
        self.send_response(status)
        self.end_headers()


@pytest.mark.slow
def test_actions_tail_delivers_each_change_to_a_webhook_with_retries_and_a_dlq(
    settings: Settings, topic: str, unique: str
) -> None:
    own = settings.model_copy(update={"events_topic": topic})
    ensure_changes_topic(own)
    scored_by = [ChangeReason("songs_played_7d", 3.0, -0.5)]
    changes = [_change(f"a{i}", i, i % own.topic_partitions, scored_by) for i in range(30)]
    log = KafkaChangeLog(own, own.tier_changes_topic)
    log.publish(changes)
    log.producer.produce(own.tier_changes_topic, value=b"{not a change", partition=0)
    log.close()
    # The scorer's tail read skips it (it raised, and the scorer died at every start on it).
    reader = KafkaChangeLog(own, own.tier_changes_topic)
    assert reader.published(0, 0) == [c for c in changes if c.source_partition == 0]
    reader.close()
    with _serving(_Receiver) as url:
        report = tail(own, WebhookSink(url, max_attempts=3, backoff_s=0.01), group=f"crm{unique}", idle_exit_s=2.0)
    good = sorted(c.user_id for c in changes if c.user_id not in ("a5", "a7"))
    assert sorted(str(b["user_id"]) for b in _Receiver.accepted) == good  # each once, after one retry
    assert all(_Receiver.attempts[u] == 2 for u in good)
    assert (_Receiver.attempts["a5"], _Receiver.attempts["a7"]) == (3, 1)  # 5xx retried, 4xx final
    assert (report.delivered, report.dead_lettered, report.unreadable) == (28, 2, 1)
    dead = read_dlq(own, own.tier_changes_topic, expected=3)
    reasons = sorted(h["reason"].decode() for _, h in dead)
    assert len(reasons) == 3
    assert "HTTP 400" in reasons[1] or "HTTP 400" in reasons[0]
    assert any("gave up after 3 attempt(s): HTTP 500" in r for r in reasons)
    assert any(r.startswith("unreadable") for r in reasons)

    # The command prints each change as one JSON line (a new group reads from the start).
    printed = subprocess.run(
        [CHURN, "actions", "tail", "--group", f"print{unique}", "--idle-exit", "2"],
        env={**os.environ, "CHURN_EVENTS_TOPIC": topic}, capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    lines = [json.loads(line) for line in printed.stdout.decode().splitlines()]
    assert [line["prediction_id"] for line in lines if line["user_id"] == "a3"] == [changes[3].prediction_id]
    assert sorted(line["user_id"] for line in lines) == sorted(c.user_id for c in changes)


@pytest.mark.slow
def test_a_dead_letter_topic_deleted_while_the_tail_runs_is_created_again(
    settings: Settings, topic: str, unique: str
) -> None:
    """`<changes topic>.dlq` deleted while `tail` runs, then an unreadable message: its letter
    cannot be delivered (topics are never created automatically), so the tail creates the topic
    again and delivers it, instead of retrying until a restart; the batch is then committed."""
    own = settings.model_copy(update={"events_topic": topic})
    ensure_changes_topic(own)
    dlq = f"{own.tier_changes_topic}.dlq"
    delete_topics(own, [dlq])
    log = KafkaChangeLog(own, own.tier_changes_topic)
    log.publish([_change("d1", 1, 0)])
    log.producer.produce(own.tier_changes_topic, value=b"{not a change", partition=0)
    log.close()
    delivered: list[TierChange] = []
    started = time.monotonic()
    report = tail(own, delivered.append, group=f"dlqgone{unique}", idle_exit_s=2.0)
    seconds = time.monotonic() - started
    dead = read_dlq(own, own.tier_changes_topic, expected=1)
    # Learned from the broker, not by waiting out the 30 s acknowledgement wait (over 30 s
    # before `UNKNOWN_TOPIC_AFTER_MS`).
    assert seconds < 20, seconds
    assert [c.user_id for c in delivered] == ["d1"]
    assert report.unreadable == 1
    assert not report.commit_abandoned
    assert [value for value, _ in dead] == [b"{not a change"]


class _Down(_Webhook):
    """A CRM webhook down for maintenance: 503 to every change."""

    posts: ClassVar[int] = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        type(self).posts += 1
        self.send_response(503)
        self.end_headers()


@pytest.mark.slow
def test_sigterm_in_the_webhook_retries_stops_the_tail_and_the_restart_delivers_every_change(
    settings: Settings, topic: str, unique: str
) -> None:
    own = settings.model_copy(update={"events_topic": topic})
    ensure_changes_topic(own)
    changes = [_change(f"s{i}", i, 0) for i in range(10)]
    log = KafkaChangeLog(own, own.tier_changes_topic)
    log.publish(changes)
    log.close()
    group = f"crm-stop{unique}"
    with _serving(_Down) as url:
        tailing = subprocess.Popen(
            [CHURN, "actions", "tail", "--group", group, "--webhook", url],
            env={**os.environ, "CHURN_EVENTS_TOPIC": topic}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: _Down.posts >= 2, 60, "the tail retrying the first change")  # in its backoff
        tailing.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, err = tailing.communicate(timeout=30)
        took = time.monotonic() - stopped
    assert tailing.returncode == 0, err.decode()[-2000:]
    assert took < 5  # not the rest of the 5 attempts' backoff per change of the batch
    assert "delivered 0, dead-lettered 0; stopped within a batch" in err.decode()
    # Stopped, not refused: nothing was dead-lettered or committed, so a restart delivers every change.
    _Receiver.attempts, _Receiver.accepted = {}, []
    with _serving(_Receiver) as url:
        report = tail(own, WebhookSink(url, backoff_s=0.01), group=group, idle_exit_s=2.0)
    assert sorted(str(b["user_id"]) for b in _Receiver.accepted) == sorted(c.user_id for c in changes)
    assert (report.delivered, report.dead_lettered, report.unreadable) == (10, 0, 0)


@pytest.mark.slow
def test_canary_serves_a_stable_slice_from_the_challenger_in_stream_and_api(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    users = 10_000
    waves = wave_events(users, 1, seed=6)
    champion = small_model()
    challenger = small_model(rounds=3, tiers={"high": 0.5, "medium": 0.2})
    folder = tmp_path / "registry"
    uri = register_champion(folder, settings, champion)
    assert register_challenger(folder, settings, challenger) == "2"
    d = Deployment(settings, uri, tmp_path, f"can{unique}", topic, canary_percent=10.0, max_batch_events=5000)
    try:
        produce_paced(d.settings, waves[0], rate=1_000_000)
        d.run_uninterrupted(idle_s=1.0)
        ids = sorted(e.user_id for e in waves[0])
        stored = _stored(d, ids)
        assert len(stored) == users
        served = {u: r.model_version for u, r in stored.items()}
        share = sum(v == "2" for v in served.values()) / users
        assert 0.08 <= share <= 0.12, share
        assert all((v == "2") == in_canary(u, 10.0) for u, v in served.items())  # the slice is the hash's
        sample = [u for u in ids if served[u] == "2"][:50]
        with TestClient(create_app(d.settings)) as api:
            for start in range(0, users, 1000):
                answer = api.post("/users/risk", json={"user_ids": ids[start : start + 1000]})
                assert answer.status_code == 200, answer.text
                for result in answer.json()["results"]:
                    assert result["model"]["version"] == served[result["user_id"]]  # same model everywhere
            answers = api.post("/users/risk", json={"user_ids": sample}).json()["results"]
        assert {a["model"]["version"] for a in answers} == {"2"}
        record_figures(settings, "canary_share", {"users": users, "percent": 10.0, "served_by_challenger": share})
    finally:
        d.cleanup()
