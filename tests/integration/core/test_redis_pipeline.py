"""`core.redis_pipeline` on the real Redis: replies as redis-py gives them, credentials and
databases, refusals, a connection Redis closed, and a server that never answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
import redis.exceptions as rex

from bench.harness import free_port
from core.errors import ServiceUnavailableError, StoreRefusedError
from core.redis import redis_errors
from core.redis_pipeline import AsyncPipelineClient
from core.settings import Settings


def _client(url: str, socket_timeout: float = 2.0) -> AsyncPipelineClient:
    return AsyncPipelineClient(url, socket_timeout, connect_timeout=1.0)


def _address(settings: Settings) -> tuple[str, int]:
    pool = redis.Redis.from_url(settings.redis_address).connection_pool.connection_kwargs
    return pool["host"], pool["port"]


def test_replies_are_those_redis_py_gives_for_the_same_reads(settings: Settings, unique: str) -> None:
    plain = redis.Redis.from_url(settings.redis_address)
    h, s = f"test:pipe{unique}:h", f"test:pipe{unique}:s"
    plain.hset(h, mapping={"a": b"\x00\x01", "b": "2"})
    plain.set(s, "7")
    commands: list[tuple[Any, ...]] = [
        ("HMGET", h, "a", "b", "missing"),
        ("MGET", s, f"{s}:none"),
        ("GET", s),
        ("GET", f"{s}:none"),
        ("EXISTS", h, s),
        ("HLEN", h),
    ]

    async def ours() -> list[Any]:
        client = _client(settings.redis_address)
        try:
            return [await client.execute(commands), await client.execute(commands[:1])]  # a pooled connection
        finally:
            await client.aclose()

    try:
        expected = plain.pipeline(transaction=False)
        for command in commands:
            expected.execute_command(*command)
        assert asyncio.run(ours()) == [expected.execute(), [[b"\x00\x01", b"2", None]]]
    finally:
        plain.delete(h, s)
        plain.close()


def test_a_user_and_password_and_a_database_from_the_url(settings: Settings, unique: str) -> None:
    host, port = _address(settings)
    admin = redis.Redis(host=host, port=port)
    user, key = f"pipe{unique}", f"test:pipe{unique}:k"
    admin.acl_setuser(user, enabled=True, passwords=["+right pass"], keys=["test:*"], commands=["+get", "+select"])
    in_db3 = redis.Redis(host=host, port=port, db=3)
    in_db3.set(key, "db3")
    admin.set(key, "db0")

    async def read(url: str) -> list[Any]:
        client = _client(url)
        try:
            with redis_errors("reading a key"):
                return await client.execute([("GET", key)])
        finally:
            await client.aclose()

    try:
        assert asyncio.run(read(f"redis://{user}:right%20pass@{host}:{port}/3")) == [b"db3"]
        assert asyncio.run(read(f"redis://{user}:right%20pass@{host}:{port}/0")) == [b"db0"]
        with pytest.raises(StoreRefusedError) as refused:
            asyncio.run(read(f"redis://{user}:wrong@{host}:{port}/3"))
        assert refused.value.reason == "AUTH"
    finally:
        admin.acl_deluser(user)
        admin.delete(key)
        in_db3.delete(key)
        admin.close()
        in_db3.close()


def test_a_refused_command_raises_after_every_reply_is_read_and_the_connection_stays_usable(
    settings: Settings, unique: str
) -> None:
    plain = redis.Redis.from_url(settings.redis_address)
    key = f"test:pipe{unique}:string"
    plain.set(key, "not a hash")

    async def run() -> tuple[int, str, list[Any]]:
        client = _client(settings.redis_address)
        try:
            [before] = await client.execute([("CLIENT", "ID")])
            with pytest.raises(StoreRefusedError) as refused, redis_errors("reading rows"):
                await client.execute([("HMGET", key, "a"), ("GET", key)])
            return before, refused.value.reason, await client.execute([("CLIENT", "ID"), ("EXISTS", key)])
        finally:
            await client.aclose()

    try:
        before, reason, after = asyncio.run(run())
    finally:
        plain.delete(key)
        plain.close()
    assert reason == "WRONGTYPE"
    # The same connection, in step: a GET reply left unread would have been taken for CLIENT ID.
    assert after == [before, 1]


def test_a_pooled_connection_redis_closed_is_replaced_without_an_error(settings: Settings) -> None:
    admin = redis.Redis.from_url(settings.redis_address)

    async def run() -> tuple[int, int]:
        client = _client(settings.redis_address)
        try:
            [first] = await client.execute([("CLIENT", "ID")])
            admin.client_kill_filter(_id=first)  # as a Redis restart or its idle timeout would
            [second] = await client.execute([("CLIENT", "ID")])
            return first, second
        finally:
            await client.aclose()

    try:
        first, second = asyncio.run(run())
    finally:
        admin.close()
    assert second != first


def test_an_unreachable_redis_is_unavailable_at_once() -> None:
    async def run() -> None:
        client = _client(f"redis://127.0.0.1:{free_port()}/0")
        with redis_errors("reading rows"):
            await client.execute([("GET", "k")])

    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="could not connect"):
        asyncio.run(run())
    assert time.monotonic() - started < 2.0  # no retries with backoff (seconds)


def test_a_server_that_never_answers_times_out_and_a_cancelled_or_closed_read_closes_its_connection() -> None:
    async def run() -> tuple[float, list[bytes]]:
        received: list[bytes] = []
        closed = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):  # reads, never answers
                received.append(data)
            closed.set()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = _client(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(rex.TimeoutError, match="no reply from Redis"):
            await client.execute([("GET", "k")])
        waited = time.monotonic() - started
        await asyncio.wait_for(closed.wait(), 2.0)  # the timed-out connection was closed, not pooled
        closed.clear()
        reading = asyncio.create_task(client.execute([("GET", "k2")]))
        while len(received) < 2:  # the request reached the server: the client is reading
            await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await asyncio.wait_for(closed.wait(), 2.0)  # cancelled mid-read: closed too
        closed.clear()
        in_flight = asyncio.create_task(client.execute([("GET", "k3")]))
        while len(received) < 3:
            await asyncio.sleep(0.01)
        await client.aclose()  # closes the connection in use, too
        await asyncio.wait_for(closed.wait(), 2.0)
        with pytest.raises(rex.ConnectionError, match="closed"):
            await in_flight
        server.close()
        await server.wait_closed()
        return waited, received

    waited, received = asyncio.run(run())
    assert 0.3 <= waited < 2.0
    assert received == [b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in (b"k", b"k2", b"k3")]
