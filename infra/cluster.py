"""Local real clusters on 127.0.0.1 (`churn infra up --cluster`): a 3-broker KRaft Kafka from the
same Maven jars as the single broker, and a Redis Cluster of 3 masters + 3 replicas from Debian's
`redis-server`.

Ports come from the single-node ones, so a `TEST_PORT_OFFSET` moves them too: broker i (0-2)
listens on `kafka_port + 100 + 2i` (its controller on the next port), Redis node j (0-5) on
`redis_port + 100 + j` (and its cluster bus on that + 10000). `client_settings` points the
clients at them. Data, logs and pid files live under `<state>/cluster/`; everything is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import string
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from infra.local import (
    INFRA_DIR,
    ServiceState,
    _kafka_java,
    _port_open,
    _run,
    install,
    running_pid_in,
    sigkill_and_wait,
)

BROKERS = 3
REDIS_NODES = 6  # the first three become masters, each of the others a replica
PORT_SHIFT = 100  # cluster ports sit this far above the single node's
# A master unreachable this long is failed over to its replica (seconds of not-ready scorers).
NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class ClusterPorts:
    """Where the cluster's nodes listen."""

    brokers: tuple[int, ...]  # client ports; each broker's controller listens on the next port
    redis: tuple[int, ...]


def ports(settings: Settings) -> ClusterPorts:
    """Returns the cluster's ports, derived from the single node's (see the module doc)."""
    kafka = settings.kafka_port + PORT_SHIFT
    redis = settings.redis_port + PORT_SHIFT
    return ClusterPorts(tuple(kafka + 2 * i for i in range(BROKERS)), tuple(redis + j for j in range(REDIS_NODES)))


def client_settings(settings: Settings) -> Settings:
    """Returns `settings` pointed at the local clusters: every broker as bootstrap, the first Redis
    node as the seed of a cluster client (it discovers the others)."""
    where = ports(settings)
    return settings.model_copy(
        update={
            "kafka_bootstrap": ",".join(f"127.0.0.1:{p}" for p in where.brokers),
            "redis_url": f"redis://127.0.0.1:{where.redis[0]}",
            "redis_cluster": True,
        }
    )


def client_env(settings: Settings) -> dict[str, str]:
    """Returns the environment variables that point `churn` processes at the local clusters."""
    cluster = client_settings(settings)
    return {
        "CHURN_KAFKA_BOOTSTRAP": cluster.kafka_bootstrap,
        "CHURN_REDIS_URL": cluster.redis_url,
        "CHURN_REDIS_CLUSTER": "true",
    }


def _root(settings: Settings) -> Path:
    path = settings.state_dir.resolve() / "cluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def broker_name(index: int) -> str:
    """Returns the service name of broker `index` (0-2): its pid file and log under `cluster/`."""
    return f"kafka-{index + 1}"


def redis_name(index: int) -> str:
    """Returns the service name of Redis node `index` (0-5)."""
    return f"redis-{index}"


def _pid_file(settings: Settings, name: str) -> Path:
    return _root(settings) / f"{name}.pid"


def running_pid(settings: Settings, name: str) -> int | None:
    """Returns the pid of the cluster node `name` if it runs (a zombie counts as stopped)."""
    return running_pid_in(_pid_file(settings, name))


def _spawn(settings: Settings, name: str, cmd: list[str]) -> None:
    log = (_root(settings) / f"{name}.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(settings, name).write_text(str(proc.pid))


# --- Kafka ---------------------------------------------------------------------------------


def _start_broker(settings: Settings, index: int) -> None:
    where = ports(settings)
    root = _root(settings) / broker_name(index)
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    voters = ",".join(f"{i + 1}@127.0.0.1:{p + 1}" for i, p in enumerate(where.brokers))
    config = root / "server.properties"
    template = string.Template((INFRA_DIR / "kafka" / "cluster.properties.template").read_text())
    config.write_text(
        template.substitute(
            node_id=index + 1,
            voters=voters,
            port=where.brokers[index],
            controller_port=where.brokers[index] + 1,
            data_dir=data,
        )
    )
    if not (data / "meta.properties").exists():
        # One cluster id for the three nodes, kept beside them.
        id_file = _root(settings) / "kafka-cluster.id"
        if not id_file.exists():
            id_file.write_text(str(uuid.uuid4()))
        _run(_kafka_java(settings, "kafka.tools.StorageTool", "format", "-t", id_file.read_text(), "-c", str(config)))
    _spawn(settings, broker_name(index), _kafka_java(settings, "kafka.Kafka", str(config)))


def broker_ready(settings: Settings, index: int, timeout: float = 2.0) -> tuple[bool, str]:
    """Returns (ready, detail) after a metadata request to broker `index` alone: ready once it
    answers and sees all three brokers."""
    from confluent_kafka.admin import AdminClient

    port = ports(settings).brokers[index]
    if not _port_open(port):
        return False, "port closed"
    try:
        alone = settings.model_copy(
            update={"kafka_bootstrap": f"127.0.0.1:{port}", "kafka_security_protocol": "PLAINTEXT"}
        )
        meta = AdminClient(kafka_config(alone, log_level=0)).list_topics(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any client failure means "not ready"
        return False, f"metadata request failed: {exc}"
    return len(meta.brokers) == BROKERS, f"sees {len(meta.brokers)} of {BROKERS} brokers, {len(meta.topics)} topic(s)"


# --- Redis ---------------------------------------------------------------------------------


def _start_redis(settings: Settings, index: int) -> None:
    port = ports(settings).redis[index]
    data = _root(settings) / redis_name(index)
    data.mkdir(parents=True, exist_ok=True)
    # As the single node (AOF fsynced every second, noeviction), plus cluster mode. The node's
    # view of the cluster (ids, roles, slots) lives in nodes.conf: a restarted node rejoins.
    _spawn(
        settings,
        redis_name(index),
        [
            "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--shutdown-on-sigterm", "save",
            "--daemonize", "no", "--protected-mode", "yes",
        ],
    )  # fmt: skip


def _cluster_info(port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        text = client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()
    raw = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in raw.split() if ":" in line)


def redis_ready(settings: Settings, index: int) -> tuple[bool, str]:
    """Returns (ready, detail): the node answers and sees the cluster as `ok` (every slot served)."""
    import redis

    port = ports(settings).redis[index]
    try:
        info = _cluster_info(port)
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        role = client.info("replication")["role"]
        client.close()
    except Exception as exc:  # noqa: BLE001 - any client failure means "not ready"
        return False, f"CLUSTER INFO failed: {exc}"
    state = info.get("cluster_state", "?")
    return state == "ok", f"{role}, cluster {state}, {info.get('cluster_known_nodes', '?')} nodes known"


def _create_redis_cluster(settings: Settings) -> None:
    """Joins the six nodes into one cluster (3 masters, a replica each) unless they already are."""
    where = ports(settings)
    if int(_cluster_info(where.redis[0]).get("cluster_slots_assigned", "0")) > 0:
        return
    try:
        _run(
            [
                "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in where.redis),
                "--cluster-replicas", "1", "--cluster-yes",
            ]
        )  # fmt: skip
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        detail = (getattr(exc, "stdout", "") or "") + (getattr(exc, "stderr", "") or "") or str(exc)
        msg = f"redis-cli --cluster create failed: {detail.strip()[-800:]}"
        raise ServiceUnavailableError(msg) from exc


# --- the whole cluster ---------------------------------------------------------------------


def _nodes() -> list[tuple[str, str, int]]:
    """(service name, kind, index) of every node."""
    return [(broker_name(i), "kafka", i) for i in range(BROKERS)] + [
        (redis_name(j), "redis", j) for j in range(REDIS_NODES)
    ]


def _ready(settings: Settings, kind: str, index: int) -> tuple[bool, str]:
    return broker_ready(settings, index) if kind == "kafka" else redis_ready(settings, index)


def _address(settings: Settings, kind: str, index: int) -> str:
    where = ports(settings)
    return f"127.0.0.1:{(where.brokers if kind == 'kafka' else where.redis)[index]}"


def status(settings: Settings) -> list[ServiceState]:
    """Returns the state of every cluster node, each checked with a real request."""
    states = []
    for name, kind, index in _nodes():
        ready, detail = _ready(settings, kind, index)
        running = running_pid(settings, name) is not None
        states.append(ServiceState(name, _address(settings, kind, index), running, ready, detail))
    return states


def start_node(settings: Settings, name: str) -> None:
    """Starts one stopped node (`kafka-1`..`kafka-3`, `redis-0`..`redis-5`) from its own files."""
    if running_pid(settings, name) is not None:
        return
    for node, kind, index in _nodes():
        if node == name:
            (_start_broker if kind == "kafka" else _start_redis)(settings, index)
            return
    msg = f"no cluster node named {name!r}"
    raise ValueError(msg)


def kill_node(settings: Settings, name: str) -> None:
    """SIGKILLs one node (a crash: nothing saved, nothing closed) and waits for its exit."""
    sigkill_and_wait(_pid_file(settings, name))


def _wait(settings: Settings, deadline: float, timeout: float) -> None:
    for name, kind, index in _nodes():
        while True:
            ready, detail = _ready(settings, kind, index)
            if ready:
                break
            if running_pid(settings, name) is None:
                log = _root(settings) / f"{name}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                msg = f"{name} exited during start-up ({detail}); last log lines:\n{tail}"
                raise ServiceUnavailableError(msg)
            if time.monotonic() > deadline:
                msg = f"{name} not ready after {timeout:.0f}s: {detail}"
                raise ServiceUnavailableError(msg)
            time.sleep(0.3)


def up(settings: Settings, timeout: float = 180.0) -> list[ServiceState]:
    """Installs what is missing, starts every node not running, joins the Redis nodes into a
    cluster once, and waits until each node is ready. Returns the final states.

    Raises:
        ServiceUnavailableError: a node exited or was not ready in time, or the cluster could not be formed.
    """
    install(settings)
    for name, _, _ in _nodes():
        start_node(settings, name)
    deadline = time.monotonic() + timeout
    where = ports(settings)
    for index, port in enumerate(where.redis):
        while not _port_open(port):
            if running_pid(settings, redis_name(index)) is None or time.monotonic() > deadline:
                msg = f"{redis_name(index)} did not open port {port}; see {_root(settings) / redis_name(index)}.log"
                raise ServiceUnavailableError(msg)
            time.sleep(0.1)
    _create_redis_cluster(settings)
    _wait(settings, deadline, timeout)
    return status(settings)


def down(settings: Settings, timeout: float = 30.0) -> None:
    """Stops every cluster node of this state folder (SIGTERM, then SIGKILL after `timeout`)."""
    for name, _, _ in _nodes():
        pid = running_pid(settings, name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, _, _ in _nodes():
        pid = running_pid(settings, name)
        while pid is not None and running_pid(settings, name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if running_pid(settings, name) is not None and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _pid_file(settings, name).unlink(missing_ok=True)
