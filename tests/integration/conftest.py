"""Integration fixtures: the real local services must answer, or every test here fails.

They are started by `make test` (`churn infra up` with the test ports). A service that does
not answer is a failure, never a skip, so CI cannot pass without really exercising them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.kafka import kafka_config
from core.settings import Settings
from infra import local as infra
from stream.topics import delete_topics
from tests.support import wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _services_up(settings: Settings) -> None:
    down = [f"{s.name} ({s.address}): {s.detail}" for s in infra.status(settings) if not s.ready]
    if down:
        pytest.fail("local services not ready (run `make test` or `churn infra up`): " + "; ".join(down))


@pytest.fixture
def topic(settings: Settings, unique: str) -> Iterator[str]:
    """A fresh `events` topic with the configured partition count, deleted afterwards."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_config(settings))
    name = f"test-events-{unique}"
    admin.create_topics([NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1)])[name].result(
        30
    )

    def visible() -> bool:
        # Created is not yet visible: a metadata request right after the creation can miss the
        # topic (one `ensure_changes_topic` found "events topic does not exist").
        meta = admin.list_topics(name, timeout=5).topics.get(name)
        return meta is not None and meta.error is None and len(meta.partitions) == settings.topic_partitions

    wait_for(visible, 30, f"topic {name} in the metadata")
    yield name
    admin.delete_topics([name])[name].result(30)
    delete_topics(
        settings, [f"{name}.changes", f"{name}.changes.dlq"]
    )  # the scorer's tier-change topic, if it made one
