"""The scorer's stores on a Redis Cluster whose master hangs (SIGSTOP) with no replica allowed
to take over (`cluster-replica-no-failover`): each write or read fails within one socket
timeout, whatever the number of slot groups or commands on that master (the at-risk sets and
the snapshot activity keys included: their few keys took 7 timeouts, 35 s, for the at-risk
update, and one per row for the snapshot's captured rows). Through redis-py's cluster
pipeline, which re-sends a timed-out node's commands one by one, an attempt waited out one
timeout per slot group (about 21 of the 64 on each of 3 masters: minutes), and the scorer heeds
a stop signal only between attempts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.cluster import RedisCluster

from bench.harness import wait_for
from core.errors import ServiceUnavailableError
from core.redis import TIMEOUTS, redis_client, user_key
from core.settings import Settings
from features.feast_store import FeastFeatureStore
from features.online import STATE_ENCODER, OnlineEngine
from features.state_store import RedisStateStore
from infra import cluster as infra_cluster
from stream.at_risk import RedisAtRiskIndex
from stream.risk_store import RedisRiskStore, RiskRow
from stream.snapshot import RedisActivity
from tests.support import applied_feast, feast_scratch, record_figures, sample_feature_row

pytestmark = pytest.mark.cluster

SOCKET_TIMEOUT_S = TIMEOUTS["batch"][0]  # the scorer's Redis socket timeout
T0 = 1_767_225_600_000  # a UTC midnight
USERS = [f"h{i}" for i in range(400)]  # spread over every slot group


@pytest.fixture
def feast(cluster: Settings, unique: str, tmp_path: Path) -> Iterator[Any]:
    with applied_feast(feast_scratch(cluster, unique, tmp_path)) as store:
        yield store


def _nodes(cluster: Settings) -> list[Redis]:
    """Returns a plain client of every node of the Redis Cluster."""
    return [Redis(port=port, socket_timeout=5) for port in infra_cluster.ports(cluster).redis]


def _healthy(settings: Settings) -> bool:
    """Whether every node of the Redis Cluster answers and sees every slot served."""
    return all(
        infra_cluster.redis_ready(settings, index)[0] for index in range(len(infra_cluster.ports(settings).redis))
    )


def _prefix_on_master(client: RedisCluster, master: str, unique: str) -> str:
    """Returns a key prefix whose at-risk set (high, by probability), activity set and captured
    rows of midnight T0 all sit on `master` (the per-user keys spread over every master whatever
    the prefix: their slot is their group's hash tag)."""
    for n in range(10_000):
        prefix = f"hung{unique}-{n}:"
        at_risk, activity = RedisAtRiskIndex(client, prefix), RedisActivity(client, prefix)
        keys = [at_risk.key("high", "probability"), activity.active_key, f"{prefix}capture:{T0}"]
        if all(client.get_node_from_key(key).name == master for key in keys):  # type: ignore[union-attr]
            return prefix
    msg = f"no prefix puts every single key on {master}"
    raise AssertionError(msg)


def _calls(client: RedisCluster, feast: Any, prefix: str) -> dict[str, Callable[[], object]]:
    """Returns each Redis path of the scorer and the API, by name: the project's stores on
    `client`, Feast's rows on the Feast store's own client."""
    engine = OnlineEngine()
    states = RedisStateStore(client, prefix, engine.state_layout)
    risks = RedisRiskStore(client, prefix, ttl_seconds=3600)
    features = FeastFeatureStore(feast)
    at_risk = RedisAtRiskIndex(client, prefix)
    activity = RedisActivity(client, prefix)
    blobs = {user: STATE_ENCODER.encode(engine.new_state()) for user in USERS}
    rows = [sample_feature_row(user, T0 + i) for i, user in enumerate(USERS)]
    tiers = ("high", "medium", "low")
    risk_rows = [RiskRow(user, 0.5, tiers[i % 3], "1", T0, T0, None, f"p-{user}") for i, user in enumerate(USERS)]
    return {
        "state_save": lambda: states.save(blobs, {"events:0": 10}, {}),
        "state_load": lambda: states.load(USERS),
        "applied_offsets": lambda: states.applied(["events:0"]),
        "risk_write": lambda: risks.write(risk_rows),
        "risk_read": lambda: risks.read(USERS),
        "feature_write": lambda: features.write_rows(rows),
        "feature_read": lambda: features.read_rows(USERS),
        "at_risk_update": lambda: at_risk.update(risk_rows),
        "at_risk_page": lambda: at_risk.page("high", "probability", 0, 50),
        "at_risk_prune": lambda: at_risk.prune("high", "probability", {"nobody": 0.5}),
        "activity_track": lambda: activity.track(dict.fromkeys(USERS, T0), {USERS[1]: T0}),
        "snapshot_capture": lambda: activity.capture(T0, rows),
        "snapshot_passed": lambda: activity.mark_passed(T0),
    }


def _seconds_to_fail(call: Callable[[], object]) -> float:
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        call()
    return time.monotonic() - started


def test_each_store_fails_within_one_socket_timeout_on_a_hung_master_no_replica_replaces(
    settings: Settings, cluster: Settings, feast: Any, unique: str
) -> None:
    client = redis_client(cluster)
    assert isinstance(client, RedisCluster)
    master = client.get_node_from_key(user_key("any:", USERS[0]))
    assert master is not None
    prefix = _prefix_on_master(client, master.name, unique)
    clients: list[RedisCluster] = []
    writes: dict[str, Callable[[], object]] = {}
    for name in _calls(client, feast, prefix):
        # Each path on a client of its own, as each meets the hang first in the scorer or the API
        # (a client that failed on the hung master before may fail the next call sooner).
        own = redis_client(cluster)
        assert isinstance(own, RedisCluster)
        clients.append(own)
        writes[name] = _calls(own, feast, prefix)[name]
    for call in writes.values():  # every path works, and every client knows the slot map
        call()

    index = infra_cluster.ports(cluster).redis.index(int(master.port))
    pid = infra_cluster.running_pid(settings, infra_cluster.redis_name(index))
    assert pid is not None
    nodes = _nodes(cluster)
    replicas = [node for node in nodes if node.info("replication")["role"] == "slave"]
    assert len(replicas) == 3
    seconds: dict[str, float] = {}
    try:
        for replica in replicas:
            replica.config_set("cluster-replica-no-failover", "yes")
        os.kill(pid, signal.SIGSTOP)
        for name, call in writes.items():
            seconds[name] = round(_seconds_to_fail(call), 2)
    finally:
        os.kill(pid, signal.SIGCONT)
        for replica in replicas:
            replica.config_set("cluster-replica-no-failover", "no")
        wait_for(lambda: _healthy(settings), 120, "the cluster to be healthy again")
        for each in [client, *clients]:
            each.close()
    record_figures(settings, "cluster_hung_master_no_failover", {"seconds_to_fail": seconds})

    # One socket timeout (connecting is at once: the kernel accepts for a stopped process), plus
    # the slot map asked again, not one timeout per slot group of the hung master.
    assert all(took < SOCKET_TIMEOUT_S + 2.5 for took in seconds.values()), seconds
