"""Commands to a Redis Cluster sent to each master on a connection of its own, replies in order.

redis-py's cluster pipeline builds an object per command and, after a node fails, re-sends that
node's commands one at a time: with a hung master each one waits out the socket timeout, so a
pipeline waits at least two. Here every master's commands go out packed on one pooled
connection, all masters are written before any reply is read (they work in parallel), and a
failure is raised at once, after what redis-py does for its own commands: the failed node goes
to the end of the nodes asked for the slot map, and the map is asked again (after a MOVED or
ASK reply too), so the caller's retry goes to the node that serves the slot now.

Uses redis-py's nodes manager (`move_node_to_end_of_cached_nodes`, `initialize`): redis is
pinned to the tested minor in pyproject.toml, with a contract test in the cluster suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import Any

from hiredis import pack_command
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, ResponseError, SlotNotCoveredError

# Packed items per socket write.
_CHUNK_ITEMS = 64


class _Master:
    """One master's share of a batch: its node, the positions of its items, their bytes."""

    __slots__ = ("items", "node", "positions")

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.positions: list[int] = []
        self.items: list[bytes] = []


def execute_by_master(
    cluster: RedisCluster, keyed: Iterable[tuple[bytes | str, bytes]], replies_each: int = 1
) -> list[Any]:
    """Sends each packed item (`replies_each` commands on keys of one slot, routed by the key
    given with it) to the master of that slot in the client's slot map, and returns every reply
    in the order of the items (`replies_each` per item).

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: a master is unreachable (the other
            masters' commands may have run; the slot map is asked again).
        redis.exceptions.ResponseError: a master refused a command, or answered MOVED / ASK (the
            first refusal in item order, after every reply was read; the map is asked again
            after MOVED / ASK).
        redis.exceptions.SlotNotCoveredError: the slot map names no master for a key's slot (it
            is asked again).
    """
    try:
        masters, count = _group_by_master(cluster, keyed)
    except SlotNotCoveredError:
        _ask_for_the_slot_map(cluster)
        raise
    replies: list[Any] = [None] * (count * replies_each)
    opened: list[tuple[_Master, ConnectionPool, Connection]] = []
    current: _Master | None = None
    try:
        for master in masters:
            current = master
            pool = cluster.get_redis_connection(master.node).connection_pool
            connection = pool.get_connection()
            opened.append((master, pool, connection))
            items = master.items
            for at in range(0, len(items), _CHUNK_ITEMS):
                connection.send_packed_command([b"".join(items[at : at + _CHUNK_ITEMS])], check_health=False)
        for master, _, connection in opened:
            current = master
            for position in master.positions:
                at = position * replies_each
                for offset in range(replies_each):
                    try:
                        replies[at + offset] = connection.read_response()
                    except ResponseError as exc:
                        replies[at + offset] = exc
    except BaseException as exc:
        for _, _, connection in opened:
            connection.disconnect()  # replies may be unread: never reuse these connections
        if isinstance(exc, RedisError) and current is not None:
            nodes: Any = cluster.nodes_manager  # redis-py's stubs lack this method
            nodes.move_node_to_end_of_cached_nodes(current.node.name)
            _ask_for_the_slot_map(cluster)
        raise
    finally:
        for _, pool, connection in opened:
            pool.release(connection)
    refusal = next((reply for reply in replies if isinstance(reply, ResponseError)), None)
    if refusal is not None:
        if isinstance(refusal, MovedError | AskError):
            _ask_for_the_slot_map(cluster)
        raise refusal
    return replies


def execute_commands_by_master(cluster: RedisCluster, commands: Iterable[Sequence[Any]], key_at: int = 1) -> list[Any]:
    """Returns `execute_by_master` of the commands (each its arguments, as `execute_command`
    takes them, packed here), each routed by its argument at `key_at`: 1, the first key of most
    commands; 3 for `EVAL script numkeys key ...`.

    Raises:
        What `execute_by_master` raises.
    """
    return execute_by_master(cluster, ((command[key_at], pack_command(tuple(command))) for command in commands))


def _group_by_master(cluster: RedisCluster, keyed: Iterable[tuple[bytes | str, bytes]]) -> tuple[list[_Master], int]:
    """Returns the items grouped by the master of their key's slot, and how many there are.

    Raises:
        redis.exceptions.SlotNotCoveredError: the client's slot map names no master for a slot.
    """
    by_name: dict[str, _Master] = {}
    position = -1
    for position, (key, item) in enumerate(keyed):
        node = cluster.get_node_from_key(key)
        if node is None:  # redis-py raises SlotNotCoveredError first; its stubs allow None
            msg = f"the slot of {key!r} is not covered by the cluster"
            raise SlotNotCoveredError(msg)
        master = by_name.get(node.name)
        if master is None:
            master = by_name[node.name] = _Master(node)
        master.positions.append(position)
        master.items.append(item)
    return list(by_name.values()), position + 1


def _ask_for_the_slot_map(cluster: RedisCluster) -> None:
    """Asks the cluster for its slot map again; a cluster that does not answer now is asked at
    the next command (the caller raises its own error)."""
    with suppress(RedisError, RedisClusterException):
        cluster.nodes_manager.initialize()
