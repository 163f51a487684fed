"""`stream.changes.KafkaChangeLog` on the real broker: the tier-change topic deleted while the
scorer runs is created again (brokers here never create a topic by themselves)."""

from __future__ import annotations

import logging

import msgspec
import pytest
from confluent_kafka.admin import AdminClient

from bench.harness import wait_for
from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from stream.changes import KafkaChangeLog, TierChange, ensure_changes_topic
from stream.topics import delete_topics
from tests.support import tier_change


def _known(settings: Settings, name: str) -> bool:
    topic = AdminClient(kafka_config(settings, log_level=0)).list_topics(name, timeout=5).topics.get(name)
    return topic is not None and topic.error is None


def test_a_change_topic_deleted_while_the_scorer_runs_is_created_again(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, every publish waited out its timeout and failed until a restart: the scorer
    retried the batch forever. Now the failed publish creates the topic again, and the retry
    (the scorer's, of the whole batch) lands the change in its event's partition."""
    own = settings.model_copy(update={"events_topic": topic})
    ensure_changes_topic(own)
    log = KafkaChangeLog(own, own.tier_changes_topic, timeout_s=5.0)
    try:
        first = tier_change("before")
        log.publish([first])
        delete_topics(own, [own.tier_changes_topic])
        wait_for(lambda: not _known(own, own.tier_changes_topic), 30, "the deletion to be seen")
        last_partition = own.topic_partitions - 1
        later = msgspec.structs.replace(tier_change("after"), source_partition=last_partition, source_offset=9)
        with caplog.at_level(logging.WARNING, logger="stream.topics"), pytest.raises(ServiceUnavailableError):
            log.publish([later])
        assert _known(own, own.tier_changes_topic)
        assert "was gone (deleted while this process ran?): created it again" in caplog.text
        # The retry; the new topic may take a moment to reach the producer's metadata.
        wait_for(lambda: _published(log, later), 60, "the retried change to be published")
        assert log.published(later.source_partition, 0) == [later]
        assert log.published(first.source_partition, 0) == []  # the topic is new: its old changes went with it
    finally:
        log.close()


def _published(log: KafkaChangeLog, change: TierChange) -> bool:
    try:
        log.publish([change])
    except ServiceUnavailableError:
        return False
    return True
