"""The stream benchmark's peer: the per-user rolling aggregation a user would write with Quix
Streams instead of this project, run as its own process on the same topic.

Per logged-in user (the message key), hourly tiles of page counts over 28 days and the 28-day
totals per page, kept in Quix's state store (RocksDB, with its changelog topic: Quix's default
durability) through a stateful `apply`. Guests (empty `userId`) are filtered out, as the scorer
skips them. Nothing else: no Feast rows, no model, no risk rows, which the scorer does on top.

Run as `python -m bench.quix_peer --broker ... --topic ... --group ... --count N --state-dir D`;
prints one JSON object: logged-in events/s and CPU seconds of the whole process (every thread,
from `getrusage`) from its first message to its `count`-th, excluding start-up and recovery.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from typing import Any, Final

import orjson
from quixstreams import Application, State

HOUR_MS: Final = 3_600_000
TILES: Final = 28 * 24  # hourly tiles over 28 days


def aggregate(value: dict[str, Any], state: State) -> dict[str, Any]:
    """Adds one event to its user's hourly tile and 28-day totals (dropping tiles older than
    28 days from both); returns the user's 28-day page counts."""
    hour = int(value["ts"]) // HOUR_MS
    tiles: dict[str, dict[str, int]] = state.get("tiles", {})
    totals: dict[str, int] = state.get("totals", {})
    page = str(value["page"])
    tile = tiles.setdefault(str(hour), {})
    tile[page] = tile.get(page, 0) + 1
    totals[page] = totals.get(page, 0) + 1
    oldest = hour - TILES + 1
    for expired in [h for h in tiles if int(h) < oldest]:
        for p, n in tiles.pop(expired).items():
            totals[p] -= n
    state.set("tiles", tiles)
    state.set("totals", totals)
    return {"user_id": value["userId"], "page_counts_28d": totals}


def run_peer(broker: str, topic: str, group: str, count: int, state_dir: str, idle_s: float) -> dict[str, Any]:
    """Consumes `topic` from the start with Quix Streams until `count` messages (guests too) have
    been seen or none came for `idle_s` seconds; returns the figures (see the module doc)."""
    app = Application(
        broker_address=broker,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    seen = {"messages": 0, "logged_in": 0}
    marks: dict[str, Any] = {}

    def logged_in(value: dict[str, Any]) -> bool:
        if not marks:
            marks["wall"], marks["cpu"] = time.perf_counter(), _cpu_seconds()
        seen["messages"] += 1
        if seen["messages"] >= count:
            marks["end_wall"], marks["end_cpu"] = time.perf_counter(), _cpu_seconds()
            app.stop()
        ok = bool(value.get("userId"))
        seen["logged_in"] += ok
        return ok

    sdf = app.dataframe(app.topic(topic, value_deserializer="json"))
    sdf = sdf.filter(logged_in)
    sdf = sdf.apply(aggregate, stateful=True)
    # `timeout` is Quix's idle stop (no message for that long after start-up): a safety net only.
    app.run(timeout=idle_s, collect=False)
    end_wall = marks.get("end_wall", time.perf_counter())
    end_cpu = marks.get("end_cpu", _cpu_seconds())
    seconds = end_wall - marks["wall"] if marks else 0.0
    cpu = end_cpu - marks["cpu"] if marks else 0.0
    return {
        "messages": seen["messages"],
        "logged_in_events": seen["logged_in"],
        "seconds": round(seconds, 3),
        "events_per_second": round(seen["logged_in"] / seconds) if seconds else 0,
        "cpu_seconds": round(cpu, 3),
        "cpu_us_per_event": round(1e6 * cpu / seen["logged_in"], 1) if seen["logged_in"] else None,
        "complete": seen["messages"] >= count,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, runs the peer and prints its figures as JSON on stdout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = run_peer(args.broker, args.topic, args.group, args.count, args.state_dir, args.idle)
    sys.stdout.write(orjson.dumps(figures).decode() + "\n")


if __name__ == "__main__":
    main()
