"""The producer against the real broker: what goes in comes out, per user in order, and bad lines
are counted with their line numbers without stopping the run."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from churn.cli import app
from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings, load_settings
from stream.producer import publish_lines, replay_file
from stream.topics import delete_topics, ensure_topics, producer_clock_warning

# (line number in the file, content, reason prefix): placed between real rows.
MALFORMED = [
    (3, b"this is not json", "malformed JSON"),
    (50, b"[1, 2, 3]", "expected a JSON object, got list"),
    (101, b'{"userId": "30", "ts": 15383521', "malformed JSON"),
]
BLANK_LINE = 77
ROUNDS = 3  # the 100 fixture rows, three times over with different user ids: 15 users


def _replay_lines(sparkify_lines: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Returns (file lines in order, the valid events among them in order)."""
    events = []
    for round_no in range(ROUNDS):
        for raw in sparkify_lines:
            row = json.loads(raw)
            if row["userId"]:
                row["userId"] = f"{row['userId']}-{round_no}"
            events.append(json.dumps(row).encode())
    lines = list(events)
    # Ascending, so each insert lands on its final line number.
    for line_no, content in sorted([(n, c) for n, c, _ in MALFORMED] + [(BLANK_LINE, b"")]):
        lines.insert(line_no - 1, content)
    return lines, events


@pytest.fixture
def topic_settings(settings: Settings, topic: str) -> Iterator[Settings]:
    """Settings whose events topic is the fresh test topic; its DLQ is deleted afterwards."""
    yield load_settings(events_topic=topic, dlq_topic=f"{topic}.dlq")
    delete_topics(settings, [f"{topic}.dlq"])


def _consume(settings: Settings, topic: str, group: str, count: int) -> list[tuple[int, bytes | None, bytes]]:
    """Reads `count` messages as (partition, key, value), failing if they do not all arrive."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    received: list[tuple[int, bytes | None, bytes]] = []
    try:
        while len(received) < count:
            msg = consumer.poll(10)
            assert msg is not None, f"timed out after {len(received)} of {count} messages"
            assert msg.error() is None, msg.error()
            partition, value = msg.partition(), msg.value()
            assert partition is not None
            assert value is not None
            received.append((partition, msg.key(), value))
        assert consumer.poll(1) is None, "more messages than were sent"
    finally:
        consumer.close()
    return received


def _user_id(value: bytes) -> str:
    return str(json.loads(value)["userId"])


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.gz"])
def test_replay_delivers_every_event_in_per_user_order(
    topic_settings: Settings, topic: str, unique: str, tmp_path: Path, sparkify_lines: list[bytes], compressed: bool
) -> None:
    lines, events = _replay_lines(sparkify_lines)
    path = tmp_path / ("events.jsonl.gz" if compressed else "events.jsonl")
    content = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(content) if compressed else content)

    report = replay_file(topic_settings, path)

    assert (report.sent, report.failed, report.skipped) == (len(events), 0, 1)
    assert report.guests == 6 * ROUNDS
    assert report.lines == len(lines)
    assert report.malformed == len(MALFORMED)
    assert [n for n, _ in report.malformed_lines] == [n for n, _, _ in MALFORMED]
    for (_, reason), (_, _, expected) in zip(report.malformed_lines, MALFORMED, strict=True):
        assert reason.startswith(expected)

    received = _consume(topic_settings, topic, f"test-{unique}", len(events))
    assert sorted(value for _, _, value in received) == sorted(events)
    # The key is the userId; guests have none; one user, one partition, order kept.
    by_user: dict[str, list[bytes]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for partition, key, value in received:
        user = _user_id(value)
        assert key == (user.encode() if user else None)
        if user:
            by_user[user].append(value)
            partitions[user].add(partition)
    assert len(by_user) == 5 * ROUNDS
    for user, values in by_user.items():
        assert values == [e for e in events if _user_id(e) == user], f"order changed for user {user}"
        assert len(partitions[user]) == 1


def test_publish_lines_from_memory_creates_the_topics(
    settings: Settings, unique: str, sparkify_lines: list[bytes]
) -> None:
    name = f"test-events-{unique}"
    mem_settings = load_settings(events_topic=name, dlq_topic=f"{name}.dlq")
    try:
        report = publish_lines(mem_settings, iter([*sparkify_lines, b"{oops"]))
        assert (report.sent, report.malformed, report.failed) == (100, 1, 0)
        assert report.malformed_lines[0][0] == 101
        received = _consume(mem_settings, name, f"test-{unique}", 100)
        assert sorted(v for _, _, v in received) == sorted(sparkify_lines)
    finally:
        delete_topics(settings, [name, f"{name}.dlq"])


def test_ensure_topics_is_idempotent(settings: Settings, unique: str) -> None:
    name = f"test-events-{unique}"
    admin_settings = load_settings(events_topic=name, dlq_topic=f"{name}.dlq", topic_partitions=3)
    try:
        assert sorted(ensure_topics(admin_settings)) == [name, f"{name}.dlq"]
        assert ensure_topics(admin_settings) == []
        topics = AdminClient(kafka_config(settings)).list_topics(timeout=10).topics
        assert len(topics[name].partitions) == 3
        assert len(topics[f"{name}.dlq"].partitions) == 3
    finally:
        delete_topics(settings, [name, f"{name}.dlq"])


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(ServiceUnavailableError, match=r"Kafka at 127\.0\.0\.1:1 cannot be reached"):
        ensure_topics(load_settings(kafka_port=1), timeout=2)


def test_cli_reports_malformed_line_numbers(
    topic: str, unique: str, tmp_path: Path, sparkify_lines: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([*sparkify_lines[:10], b"garbage", *sparkify_lines[10:20]]) + b"\n")
    monkeypatch.setenv("CHURN_EVENTS_TOPIC", topic)
    monkeypatch.setenv("CHURN_DLQ_TOPIC", f"{topic}.dlq")
    try:
        result = CliRunner().invoke(app, ["produce", "--replay", str(path)])
    finally:
        delete_topics(load_settings(), [f"{topic}.dlq"])
    assert result.exit_code == 0, result.output
    assert "sent 20 " in result.output
    assert "malformed 1 " in result.output
    assert "malformed line 11: malformed JSON" in result.output


def test_cli_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["produce", "--replay", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "cannot open the replay file" in result.output


def test_an_events_topic_on_the_producers_clock_is_reported(settings: Settings, unique: str) -> None:
    """The future-event guard compares event times with the broker's clock only on a topic that
    stamps LogAppendTime (those `ensure_topics` creates); one made with CreateTime is reported."""
    created = load_settings(events_topic=f"test-events-{unique}", dlq_topic=f"test-events-{unique}.dlq")
    by_hand = load_settings(events_topic=f"test-create-time-{unique}", dlq_topic=f"test-create-time-{unique}.dlq")
    admin = AdminClient(kafka_config(settings))
    futures = admin.create_topics([NewTopic(by_hand.events_topic, 1, config={"message.timestamp.type": "CreateTime"})])
    try:
        futures[by_hand.events_topic].result(10)
        ensure_topics(created)
        assert producer_clock_warning(created) is None
        warning = producer_clock_warning(by_hand)
        assert warning is not None
        assert "CreateTime" in warning
        assert by_hand.events_topic in warning
        assert f"--bootstrap-server {settings.bootstrap_servers}" in warning  # kafka-configs.sh needs it
    finally:
        delete_topics(settings, [created.events_topic, created.dlq_topic, by_hand.events_topic])
