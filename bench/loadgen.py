"""An open-loop HTTP load generator, run as its own process by `bench.api`.

`python -m bench.loadgen --port P --path '/users/{id}/risk?explain=false' --ids 100000 --rate 1000
--seconds 10` sends GETs for random ids `bench-<n>` at a fixed rate over keep-alive HTTP/1.1
connections and prints one JSON object; with `--body` it POSTs that JSON template instead, where
`{id}` is one random id and `{ids}` a JSON list of `--batch` random ids. Open loop: each request
has a scheduled send time and its latency is measured from that time, so a stalled server is
charged for the requests that queue behind it (no coordinated omission). Raw asyncio streams,
not an HTTP client library, so the generator costs little of the CPU it shares with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import threading
import time
from typing import Any


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """Returns p50, p90, p99, p99.9 and max of `seconds`, in milliseconds (None if empty)."""
    if not seconds:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))], 3)

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1.0)}


def due_count(elapsed: float, rate: float) -> int:
    """Returns how many requests are due `elapsed` seconds after the start at `rate` per second:
    request i is scheduled at i / rate, so the first one at once."""
    return int(elapsed * rate) + 1 if elapsed >= 0 else 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one HTTP/1.1 response with a Content-Length body; returns its status code and
    whether it carries a `Retry-After` header."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    retry_after = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry_after = True
    if length:
        await reader.readexactly(length)
    return status, retry_after


def request_bytes(host: str, path: str, body: str | None, ids: list[str]) -> bytes:
    """Returns one HTTP/1.1 request: a GET of `path`, or a POST of the JSON `body` template when
    given; `{id}` becomes `ids[0]` (in the path and the body), `{ids}` the JSON list of `ids`."""
    target = path.replace("{id}", ids[0])
    if body is None:
        return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    content = body.replace("{ids}", json.dumps(ids)).replace("{id}", ids[0]).encode()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(content)}\r\n\r\n"
    )
    return head.encode() + content


def _release_on_time(
    loop: asyncio.AbstractEventLoop,
    due: asyncio.Queue[float | None],
    start: float,
    end: float,
    rate: float,
) -> None:
    """Hands each request's scheduled time to the connections at that time, until `end`.
    Runs in its own thread: `time.sleep` wakes within ~0.1 ms."""
    sent_count = 0
    while (now := time.perf_counter()) < end:
        target_count = due_count(now - start, rate)
        if target_count > sent_count:
            loop.call_soon_threadsafe(_put_all, due, [start + i / rate for i in range(sent_count, target_count)])
            sent_count = target_count
        time.sleep(max(0.0, start + sent_count / rate - time.perf_counter()))


def _put_all(due: asyncio.Queue[float | None], scheduled: list[float]) -> None:
    for when in scheduled:
        due.put_nowait(when)


async def run(
    host: str,
    port: int,
    path: str,
    ids: int,
    rate: float,
    seconds: float,
    connections: int,
    warmup: float,
    body: str | None = None,
    batch: int = 1,
    budget_ms: float = 10.0,
) -> dict[str, Any]:
    """Returns the figures of one run: achieved rate, latency percentiles (from the scheduled
    time, and from the actual send) of every request and of the 2xx ones, status counts, 503s
    without `Retry-After`, errors, and how many answers were a 2xx within `budget_ms` of their
    scheduled time (`ok_within_budget`). The gap between the two latencies says how late the
    generator itself was in sending."""
    rng = random.Random(0)  # noqa: S311 - which user to ask for, not a secret
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    ok_latencies: list[float] = []
    service: list[float] = []
    ok_service: list[float] = []
    statuses: dict[str, int] = {}
    unavailable_without_retry_after = 0
    errors: list[str] = []
    measure_from = time.perf_counter() + warmup

    async def connection() -> None:
        nonlocal unavailable_without_retry_after
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (scheduled := await due.get()) is not None:
                request = request_bytes(host, path, body, [f"bench-{rng.randrange(ids)}" for _ in range(batch)])
                sent = time.perf_counter()
                writer.write(request)
                try:
                    status, retry_after = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    errors.append(repr(exc))
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                done = time.perf_counter()
                if scheduled >= measure_from:
                    latencies.append(done - scheduled)
                    service.append(done - sent)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if 200 <= status < 300:
                        ok_latencies.append(done - scheduled)
                        ok_service.append(done - sent)
                    elif status == 503 and not retry_after:
                        unavailable_without_retry_after += 1
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start = time.perf_counter()
    end = measure_from + seconds
    loop = asyncio.get_running_loop()
    # The event loop's timers have 1 ms resolution (epoll's timeout), which would charge the
    # server ~0.5 ms of the generator's own lateness: a thread sleeps to each due time instead.
    timer = threading.Thread(target=_release_on_time, args=(loop, due, start, end, rate), daemon=True)
    timer.start()
    await loop.run_in_executor(None, timer.join)
    for _ in workers:
        due.put_nowait(None)
    drained = time.perf_counter()
    await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - measure_from
    return {
        "target_rate": rate,
        "achieved_rate": round(len(latencies) / elapsed, 1),
        "requests": len(latencies),
        "connections": connections,
        "seconds": round(elapsed, 2),
        "drain_seconds": round(time.perf_counter() - drained, 2),
        "statuses": statuses,
        "budget_ms": budget_ms,
        "ok_within_budget": sum(1 for latency in ok_latencies if latency <= budget_ms / 1000),
        "unavailable_without_retry_after": unavailable_without_retry_after,
        "errors": len(errors),
        "first_errors": errors[:3],
        "latency": percentiles_ms(latencies),
        "ok_latency": percentiles_ms(ok_latencies),
        "service_latency": percentiles_ms(service),
        "ok_service_latency": percentiles_ms(ok_service),
    }


def main() -> None:
    """Parses the arguments, runs the load and prints the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="with {id} where the user id goes")
    parser.add_argument("--ids", type=int, required=True, help="ids are bench-0 .. bench-<ids - 1>")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load not measured")
    parser.add_argument("--body", help="POST this JSON template ({id}: one id, {ids}: --batch ids)")
    parser.add_argument("--batch", type=int, default=1, help="ids per request in {ids}")
    parser.add_argument("--budget-ms", type=float, default=10.0, help="counts the 2xx answers within it")
    args = parser.parse_args()
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    figures = runner(
        run(
            args.host,
            args.port,
            args.path,
            args.ids,
            args.rate,
            args.seconds,
            args.connections,
            args.warmup,
            args.body,
            args.batch,
            args.budget_ms,
        )
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
