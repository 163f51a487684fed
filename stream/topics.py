"""Topic admin: make sure the events topic and its dead-letter topic exist.

Brokers run with `auto.create.topics.enable=false`, so every producer calls `ensure_topics`
first; it is idempotent and safe to race with another process doing the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from stream.kafka import run_unless_stopped

log = logging.getLogger(__name__)


def _admin(settings: Settings, errors: list[KafkaError] | None = None) -> AdminClient:
    # log_level 0: connection failures surface as one ServiceUnavailableError, not log spam;
    # `errors` collects the client's background errors (a refused login only shows there).
    sink = errors if errors is not None else []
    return AdminClient(kafka_config(settings, log_level=0, error_cb=sink.append))


_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


def ensure_topics(settings: Settings, *, timeout: float = 10.0) -> list[str]:
    """Creates `settings.events_topic` and `settings.dlq_topic` if they are missing.

    Both get `settings.topic_partitions` partitions and the broker's default replication
    factor. Existing topics are left as they are (their partition count is not changed).

    Returns:
        The names of the topics this call created (empty when both already existed).

    Raises:
        ServiceUnavailableError: the broker cannot be reached, or refused to create a topic.
    """
    background: list[KafkaError] = []
    admin = _admin(settings, background)
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        admin.poll(0)  # serves the client's error callbacks: a refused login is reported there
        refused = [e for e in [exc.args[0], *background] if e.code() in _AUTH_ERRORS]
        if refused:
            msg = (
                f"Kafka at {settings.bootstrap_servers} refused the credentials of CHURN_KAFKA_SASL_USERNAME="
                f"{settings.kafka_sasl_username!r} ({settings.kafka_sasl_mechanism}): {refused[0].str()}"
            )
        else:
            msg = f"Kafka at {settings.bootstrap_servers} cannot be reached: {exc.args[0].str()}"
        raise ServiceUnavailableError(msg) from exc
    missing = [name for name in (settings.events_topic, settings.dlq_topic) if name not in existing]
    if not missing:
        return []
    # The events topic stamps each message with the broker's clock (LogAppendTime): the
    # consumer's future-event guard compares event times with it, and a producer cannot forge it.
    configs = {settings.events_topic: {"message.timestamp.type": "LogAppendTime"}}
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=settings.topic_partitions, config=configs.get(name, {})) for name in missing],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    return _await(settings, futures, "create", KafkaError.TOPIC_ALREADY_EXISTS, timeout)


def recreate_if_deleted(
    settings: Settings, name: str, partitions: int, stopping: threading.Event, *, timeout: float = 5.0
) -> bool:
    """Creates topic `name` again, with `partitions` partitions, if the broker no longer knows
    it; returns whether this call created it. For a topic the process only writes to (a
    dead-letter topic), which an operator may delete while it runs: brokers here never create a
    topic by themselves, so every delivery to it would fail until a restart.

    Kafka down, a metadata error other than "unknown topic" or a refused creation return False
    (logged; the caller's retry goes on). The check runs on a thread of its own and is given up
    as soon as `stopping` is set (returns False; the thread ends within its `timeout`): it runs
    after a failed delivery, which is often Kafka being down, and a stop signal must not wait
    on a dead broker.
    """
    if stopping.is_set():
        return False
    outcome: list[bool] = []
    finished = run_unless_stopped(
        lambda: outcome.append(_create_if_unknown(settings, name, partitions, timeout)), stopping, "topic-check"
    )
    return finished and bool(outcome) and outcome[0]


def _create_if_unknown(settings: Settings, name: str, partitions: int, timeout: float) -> bool:
    """`recreate_if_deleted`'s work, without the stop signal."""
    admin = _admin(settings)
    try:
        topic = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
    except KafkaException as exc:
        log.info("could not check whether topic %r still exists: %s", name, exc.args[0])
        return False
    if topic is not None and (topic.error is None or topic.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART):
        return False  # there, or unknown for another reason (a leader election, say): not ours to create
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions)], operation_timeout=timeout, request_timeout=timeout
    )
    try:
        created = bool(_await(settings, futures, "create", KafkaError.TOPIC_ALREADY_EXISTS, timeout))
    except ServiceUnavailableError as exc:
        log.warning("topic %r is gone and could not be created again: %s", name, exc)
        return False
    if created:
        log.warning("topic %r was gone (deleted while this process ran?): created it again", name)
    return created


def producer_clock_warning(settings: Settings, *, timeout: float = 10.0) -> str | None:
    """Returns a warning when the existing events topic stamps messages with the producer's
    clock (`message.timestamp.type=CreateTime`: a topic made before `ensure_topics` set
    LogAppendTime, or by hand), under which the future-event guard trusts each producer's clock;
    None when it uses the broker's, or the broker does not say (no DescribeConfigs right)."""
    admin = _admin(settings)
    resource = ConfigResource(ResourceType.TOPIC, settings.events_topic)
    try:
        described = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
    except (KafkaException, TimeoutError):
        return None
    entry = described.get("message.timestamp.type")
    if entry is None or entry.value != "CreateTime":
        return None
    return (
        f"topic {settings.events_topic!r} stamps messages with the producer's clock (CreateTime): an event "
        "dated ahead is refused against that clock, not the broker's. Set it with: kafka-configs.sh "
        f"--bootstrap-server {settings.bootstrap_servers} --alter --entity-type topics "
        f"--entity-name {settings.events_topic} --add-config message.timestamp.type=LogAppendTime"
    )


def keyless_events_warning(settings: Settings, assigned: Iterable[int]) -> str | None:
    """Returns a warning when keyless events are accepted (`CHURN_REQUIRE_EVENT_KEY=false`) while
    the events topic has more than one partition, as a partition number above 0 among
    `assigned` shows (every scorer or archiver given one reports it); None otherwise. Read
    at each assignment: a topic that gains partitions rebalances its consumers."""
    highest = max(assigned, default=0)
    if settings.require_event_key or highest == 0:
        return None
    return (
        f"CHURN_REQUIRE_EVENT_KEY=false on topic {settings.events_topic!r}, which has at least "
        f"{highest + 1} partitions: a keyless event lands on any partition, so on a scorer that may "
        "not own its user, whose copy of the user's state then overwrites the owner's. Key every "
        "event by user id and set CHURN_REQUIRE_EVENT_KEY=true, or keep the topic at one partition"
    )


def delete_topics(settings: Settings, names: list[str], *, timeout: float = 30.0) -> None:
    """Deletes topics (benchmarks and tests clean up theirs); a topic already gone is fine.

    Raises:
        ServiceUnavailableError: the broker cannot be reached or refused the deletion.
    """
    if not names:
        return
    admin = _admin(settings)  # keep a reference: a collected client cancels its futures
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    _await(settings, futures, "delete", KafkaError.UNKNOWN_TOPIC_OR_PART, timeout)


def _await(settings: Settings, futures: dict[str, Any], verb: str, done_already: int, timeout: float) -> list[str]:
    """Waits for each topic operation; returns the topics it changed. An error `done_already`
    means another process did it first (created, or deleted), which is success.

    Raises:
        ServiceUnavailableError: the broker refused the operation or never answered.
    """
    changed = []
    for name, future in futures.items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() == done_already:
                continue
            msg = f"could not {verb} topic {name!r} on {settings.bootstrap_servers}: {exc.args[0].str()}"
            raise ServiceUnavailableError(msg) from exc
        except TimeoutError as exc:  # concurrent.futures' timeout: the broker never answered
            msg = f"could not {verb} topic {name!r}: {settings.bootstrap_servers} did not answer in {timeout:.0f}s"
            raise ServiceUnavailableError(msg) from exc
        changed.append(name)
    return changed
