"""`bench.loadgen`: the open-loop schedule, and the latency it reports against a local server."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.loadgen import due_count, run


def test_a_request_is_due_at_its_scheduled_time_not_one_interval_later() -> None:
    assert due_count(-0.001, 1000) == 0
    assert due_count(0.0, 1000) == 1  # request 0 is scheduled at the start
    assert due_count(0.0009, 1000) == 1
    assert due_count(0.001, 1000) == 2
    assert due_count(1.0, 200) == 201


async def _answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def test_latency_is_measured_from_the_scheduled_time() -> None:
    async def scenario() -> dict[str, Any]:
        server = await asyncio.start_server(_answer_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run("127.0.0.1", port, "/users/{id}/risk", 10, rate=50, seconds=1.0, connections=2, warmup=0.2)

    figures = asyncio.run(scenario())
    assert figures["errors"] == 0
    assert figures["statuses"] == {"200": figures["requests"]}
    # A server that answers at once is charged about its own time, not the 20 ms
    # between two requests at 50/s.
    latency = figures["latency"]
    assert isinstance(latency, dict)
    assert latency["p50_ms"] < 10, latency
