"""The stream benchmark's peer: the per-user rolling aggregation a user would write with Quix
Streams instead of this project, run as its own process on the same topic.

Per logged-in user (the message key), hourly tiles of page counts over 28 days and the 28-day
totals per page, kept in Quix's state store (RocksDB, with its changelog topic: Quix's default
durability) through a stateful `apply`. Guests (empty `userId`) are filtered out, as the scorer
skips them. Nothing else: no Feast rows, no model, no risk rows, which the scorer does on top.

Run as `python -m bench.quix_peer --broker ... --topic ... --group ... --count N --state-dir D`;
prints one JSON object: logged-in events/s and CPU seconds of the whole process (every thread,
from `getrusage`) from its first message to the checkpoint that made its `count`-th durable
(state flushed to RocksDB and the changelog, offsets committed: Quix's checkpoint, which it runs
every `commit_interval`, 5 s by default, and once more at a stop), excluding start-up and
recovery. The scorer's figures end where its state is durable too (counted after its Redis
write), so stopping the peer's clock at its last message would leave its state writes out: a
short run may hold no checkpoint at all. That figure is reported beside it.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time
from typing import Any, Final

import orjson
from quixstreams import Application, State

HOUR_MS: Final = 3_600_000
TILES: Final = 28 * 24  # hourly tiles over 28 days
# Quix Streams logs each checkpoint it commits at DEBUG from this logger (3.28: "Committed a
# checkpoint; forced=..., time_elapsed=...s"), after its state and offsets are written.
CHECKPOINT_LOGGER: Final = "quixstreams.processing.context"
CHECKPOINT_COMMITTED: Final = "Committed a checkpoint"


class CheckpointClock(logging.Filter):
    """Notes the wall time and process CPU of every checkpoint Quix commits, from its own log
    record, and keeps those DEBUG records from its handlers (the logger is set to DEBUG only for
    this)."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: list[tuple[float, float]] = []  # (perf_counter, CPU seconds) per checkpoint

    def filter(self, record: logging.LogRecord) -> bool:
        """Returns whether the record goes on to the handlers: every record above DEBUG."""
        if record.levelno <= logging.DEBUG:
            if record.getMessage().startswith(CHECKPOINT_COMMITTED):
                self.committed.append((time.perf_counter(), _cpu_seconds()))
            return False
        return True

    @classmethod
    def install(cls) -> CheckpointClock:
        """Returns a clock attached to Quix's checkpoint logger (set to DEBUG)."""
        clock = cls()
        checkpoint_logger = logging.getLogger(CHECKPOINT_LOGGER)
        checkpoint_logger.setLevel(logging.DEBUG)
        checkpoint_logger.addFilter(clock)
        return clock


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
    been seen or none came for `idle_s` seconds; returns the figures (see the module doc):
    `complete` only when the `count`-th message was seen and a checkpoint committed after it."""
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
    clock = CheckpointClock.install()
    # `timeout` is Quix's idle stop (no message for that long after start-up): a safety net only.
    app.run(timeout=idle_s, collect=False)
    last_message = marks.get("end_wall", math.inf)
    # The stop's checkpoint: the first committed after the count-th message.
    durable = next(((wall, cpu) for wall, cpu in clock.committed if wall >= last_message), None)
    events = seen["logged_in"]
    figures: dict[str, Any] = {
        "messages": seen["messages"],
        "logged_in_events": events,
        "checkpoints": len(clock.committed),
        "timed": "first message to the checkpoint that committed the last one (state and offsets written)",
        "complete": seen["messages"] >= count and durable is not None,
    }
    if marks and durable is not None:
        seconds, cpu = durable[0] - marks["wall"], durable[1] - marks["cpu"]
        figures |= {
            "seconds": round(seconds, 3),
            "events_per_second": round(events / seconds) if seconds else 0,
            "cpu_seconds": round(cpu, 3),
            "cpu_us_per_event": round(1e6 * cpu / events, 1) if events else None,
        }
    if "end_wall" in marks:
        to_last = marks["end_wall"] - marks["wall"]
        figures["to_last_message"] = {
            "seconds": round(to_last, 3),
            "events_per_second": round(events / to_last) if to_last else 0,
            "cpu_us_per_event": round(1e6 * (marks["end_cpu"] - marks["cpu"]) / events, 1) if events else None,
            "checkpoints": sum(wall < marks["end_wall"] for wall, _ in clock.committed),
        }
    return figures


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
