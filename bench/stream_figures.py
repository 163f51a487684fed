"""The stream benchmark's figures from its phases' readings: freshness quantiles from histogram
buckets, the capacity model's check, the goals as ratios, each throughput goal's budget and the
live loop's cost model. No I/O but the load average `report` reads once more: `bench.stream`
runs the phases and calls `report`."""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from bench.harness import machine

GOAL_FRESHNESS_P99_SECONDS: Final = 1.0  # at 50% of capacity
GOAL_TIMES_NAIVE: Final = 20.0
GOAL_TIMES_PEER: Final = 3.0
GOAL_SHARE_OF_BOUND: Final = 0.5
# Above it the cost model's intervals are too alike in shape to tell its costs apart (its columns
# scaled to a maximum of 1; two runs' six intervals measured 7-11).
MAX_CONDITION: Final = 1000.0


# --- freshness ----------------------------------------------------------------------------


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Returns the q-quantile of cumulative buckets [(le, count)], linear within the bucket that
    holds it (as Prometheus' histogram_quantile does)."""
    total = buckets[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, count
    return lower_le


def _bucket_of(buckets: list[tuple[float, float]], q: float) -> list[float | None]:
    """Returns [lower, upper] bounds of the bucket holding the q-quantile (the exact value is in
    it); upper None for the +Inf bucket."""
    rank = q * buckets[-1][1]
    lower = 0.0
    for le, count in buckets:
        if count >= rank:
            return [lower, None if math.isinf(le) else le]
        lower = le
    return [lower, None]


def freshness_figures(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict[str, Any]:
    """Returns p50/p99/max and the share within 1 s of the events observed between two cumulative
    histogram readings (same buckets). Quantiles are interpolated within their bucket and given
    with the bucket's bounds; the max is known only as its bucket."""
    earlier = dict(before)
    paced = [(le, count - earlier.get(le, 0.0)) for le, count in after]
    total = paced[-1][1] if paced else 0.0
    if not total:
        return {"events_observed": 0}
    nonempty = [i for i, (_, count) in enumerate(paced) if count > (paced[i - 1][1] if i else 0.0)]
    top = nonempty[-1]
    return {
        "events_observed": round(total),
        "p50_seconds": round(_quantile(paced, 0.50), 4),
        "p50_bucket_seconds": _bucket_of(paced, 0.50),
        "p99_seconds": round(_quantile(paced, 0.99), 4),
        "p99_bucket_seconds": _bucket_of(paced, 0.99),
        "max_bucket_seconds": [paced[top - 1][0] if top else 0.0, None if math.isinf(paced[top][0]) else paced[top][0]],
        "share_within_1s": round(dict(paced)[1.0] / total, 5),
    }


def report(**parts: Any) -> dict[str, Any]:
    """Returns the benchmark's JSON from `bench.stream`'s phases (`parts`, one keyword each: the
    run's `Sizes`, the catch-up drains, the capacity and backlog drains, the loads, the bound,
    the peer, the naive baseline...): the capacity model's check, the goals as ratios, the
    throughput budgets and the live loop's cost model beside them."""
    sizes = parts["sizes"]  # bench.stream.Sizes
    one, capacity, backlog, loads = parts["catch_up"][0], parts["capacity"], parts["backlog"], parts["loads"]
    scorer_rate = one["events_per_second"]
    cpu = one["cpu_us_per_event"]
    # The loop thread waits for Redis on every round trip, so both are on the serial path; the
    # other threads (librdkafka's fetch, the metrics server) run beside it on the other cores.
    serial_us = cpu["scorer_loop_thread"] + cpu["redis_server"]
    predicted = 1e6 / serial_us if serial_us else math.nan
    # On a shared machine the loop (and Redis, which it waits for) also queue for a CPU; the
    # model assumes a core of its own, so it is checked against the time without that queueing.
    queued = one["loop_threads_waited_for_cpu_seconds"] + one["redis_waited_for_cpu_seconds"]
    unqueued_rate = one["logged_in_events"] / max(one["seconds"] - queued, 1e-3)
    half = next(load for load in loads if load["share_of_capacity"] == 0.5)
    ratios = {
        "freshness_p99_seconds_at_50pct": half["freshness"].get("p99_seconds"),
        "times_naive": round(scorer_rate / parts["naive"]["events_per_second"], 1),
        "times_quix_peer": round(scorer_rate / parts["peer"]["events_per_second"], 2),
        "share_of_consume_decode_bound": round(scorer_rate / parts["bound"]["events_per_second"], 3),
    }
    # CPU per logged-in event, whole processes: what a busy shared machine disturbs least.
    bound = parts["bound"]
    bound_us = bound["cpu_us_per_message"] * bound["messages"] / bound["logged_in_events"]
    scorer_us = cpu["scorer_process"]
    cpu_ratios = {
        "scorer_cpu_us_per_event": scorer_us,
        "naive_over_scorer": round(parts["naive"]["cpu_us_per_event"] / scorer_us, 1),
        "quix_peer_over_scorer": round(parts["peer"]["cpu_us_per_event"] / scorer_us, 2),
        "bound_over_scorer": round(bound_us / scorer_us, 3),
    }
    base_rate = scorer_rate / one["scorer_cores_busy"] if one["scorer_cores_busy"] else math.nan
    scale_out = [
        {
            **{k: d[k] for k in ("processes", "events_per_second", "scorer_cores_busy", "machine_cores_busy")},
            "speedup": round(d["events_per_second"] / scorer_rate, 2),
            "efficiency_per_process": round(d["events_per_second"] / scorer_rate / d["processes"], 2),
            "events_per_scorer_core_second": round(d["events_per_second"] / d["scorer_cores_busy"])
            if d["scorer_cores_busy"]
            else None,
            "efficiency_per_core": round(d["events_per_second"] / d["scorer_cores_busy"] / base_rate, 2)
            if d["scorer_cores_busy"]
            else None,
        }
        for d in parts["catch_up"]
    ]
    return {
        "benchmark": "stream",
        "machine": {**parts["machine_before"], "load_average_after": machine()["load_average"]},
        "events": sizes.events,
        "users": sizes.users,
        "guests": parts["guests"],
        "services": parts["services"],
        "partitions": parts["settings"].topic_partitions,
        "max_batch_events": parts["settings"].max_batch_events,
        "produced": parts["produced"],
        "model_version": parts["version"],
        "setup_seconds": round(parts["setup_s"], 1),
        "throughput_counts": "logged-in events applied (outcome ok); guests are skipped by every consumer",
        "catch_up": parts["catch_up"],
        "scale_out": scale_out,
        "capacity_at_live_batch": {
            **capacity,
            "probe_at_50pct_of_catch_up": parts["probe"],
            # At or above 1 the probe was at or past this capacity: its batches had grown to what
            # the loop needs to keep up at that rate, and the capacity at them is about the probe's.
            "probe_rate_over_capacity": round(
                parts["probe"]["target_events_per_second"] / capacity["events_per_second"], 3
            )
            if capacity["events_per_second"]
            else None,
        },
        "capacity_timed": "one scorer draining the events from a topic of one partition (batches in time order, "
        "as live batches are) with batches of at most the probe's mean batch",
        # Not used for the loads: the same bound on a backlog of the usual partitions, whose
        # batches take each partition's messages in long runs and touch fewer users per event.
        "backlog_drain_at_live_batch": backlog,
        "freshness_timed": "per applied event: wall time its batch's risk rows were written minus its Kafka "
        "append time (LogAppendTime), from the scorer's histogram",
        "loads": loads,
        "bound_consume_decode": parts["bound"],
        "quix_streams_peer": parts["peer"],
        "naive": parts["naive"],
        "capacity_model_check": {
            "serial_cpu_us_per_event": round(serial_us, 2),
            "predicted_events_per_second_1_process": round(predicted),
            "measured_events_per_second_1_process": scorer_rate,
            "measured_over_predicted": round(scorer_rate / predicted, 3),
            "cpu_queueing_seconds": round(queued, 2),
            "measured_without_cpu_queueing_events_per_second": round(unqueued_rate),
            "measured_without_cpu_queueing_over_predicted": round(unqueued_rate / predicted, 3),
        },
        # Why a live loop's batches cost more per event than a catch-up's (see `loop_cost_model`).
        "live_loop_cost_model": loop_cost_model(serial_intervals(one, capacity, backlog, loads)),
        "redis_memory_per_user": parts["memory"],
        "kafka_bytes_per_message": parts["kafka"],
        "instrumentation": {
            **parts["cost"],
            "share_of_loop_cpu_at_live_batch": _cost_share(parts["cost"], capacity),
            "share_of_loop_cpu_at_25pct_load": _cost_share(parts["cost"], loads[0]),
        },
        "ratios": ratios,
        "cpu_per_event_ratios": cpu_ratios,
        "throughput_budgets": _throughput_budgets(one, serial_us, parts["peer"], parts["bound"]),
        "goals": {
            "freshness_p99_seconds_at_50pct": GOAL_FRESHNESS_P99_SECONDS,
            "times_naive": GOAL_TIMES_NAIVE,
            "times_quix_peer": GOAL_TIMES_PEER,
            "share_of_consume_decode_bound": GOAL_SHARE_OF_BOUND,
        },
        "meets": {
            "freshness_p99_seconds_at_50pct": (ratios["freshness_p99_seconds_at_50pct"] or math.inf)
            <= GOAL_FRESHNESS_P99_SECONDS,
            "times_naive": ratios["times_naive"] >= GOAL_TIMES_NAIVE,
            "times_quix_peer": ratios["times_quix_peer"] >= GOAL_TIMES_PEER,
            "share_of_consume_decode_bound": ratios["share_of_consume_decode_bound"] >= GOAL_SHARE_OF_BOUND,
        },
        "redis_keys_deleted": parts["deleted"],
        "scorer_logs": str(parts["logs"]),
    }


def _throughput_budgets(
    catch_up: dict[str, Any], serial_us: float, peer: dict[str, Any], bound: dict[str, Any]
) -> dict[str, Any]:
    """Returns, for the two throughput goals, the serial µs per logged-in event one scorer
    process may spend to meet them (1e6 / the goal's events/s), beside what the catch-up spent
    on its serial path (`serial_us`: loop thread + Redis, which the loop waits for): in all, in the engine
    (the stage of pure-Python arithmetic), and a floor: the loop thread without the engine,
    without `changes` (a catch-up announces every new user's first tier) and with Redis hidden
    behind it. Each goal's `ratio_at_floor` is what a scorer at that floor would reach."""
    cpu = catch_up["cpu_us_per_event"]
    stages = cpu["loop_thread_by_stage"]
    engine = stages.get("engine", 0.0)
    floor = cpu["scorer_loop_thread"] - engine - stages.get("changes", 0.0)
    floor_rate = 1e6 / floor if floor > 0 else math.inf
    goals = {
        "times_quix_peer": (GOAL_TIMES_PEER, peer["events_per_second"]),
        "share_of_consume_decode_bound": (GOAL_SHARE_OF_BOUND, bound["events_per_second"]),
    }
    return {
        "catch_up_serial_us_per_event": round(serial_us, 2),
        "catch_up_engine_us_per_event": round(engine, 2),
        "floor_us_per_event": round(floor, 2),
        "floor_is": "the catch-up's loop thread without its engine and changes stages, Redis not waited for",
        **{
            name: {
                "goal_events_per_second": round(goal * rate),
                "serial_us_per_event": round(1e6 / (goal * rate), 2) if rate else None,
                "ratio_at_floor": round(floor_rate / rate, 3) if rate and math.isfinite(floor_rate) else None,
            }
            for name, (goal, rate) in goals.items()
        },
    }


def loop_cost_model(intervals: list[tuple[str, float, float, float]]) -> dict[str, Any]:
    """Fits the scorer's serial cost per applied event (loop thread + Redis, which the loop waits
    for) as `per_event + per_user * users scored per event + per_batch / events per batch` by
    least squares over the intervals of one run, given as (name, users scored per event, applied
    events per batch, serial us per event).

    A batch pays each touched user's row, Feast write, score, risk row and state once, and its
    own round trips and commit once, so a live loop whose small batches touch one user per event
    pays both on every event, a catch-up whose large batches hold several events per user a
    fraction of them.

    Returns:
        the three costs (us per event, per scored user, per batch) and, per interval, its
        measured figure, the fit's and the one fitted without that interval (its check); the
        costs are None, with the reason, when the intervals cannot pin them down: no more
        intervals than costs plus one, shapes too alike (the columns, scaled, have a condition
        number above `MAX_CONDITION`), or a cost below zero.
    """
    unfit = {"per_event_us": None, "per_user_us": None, "per_batch_us": None}
    if len(intervals) <= 3 + 1:  # each check fits the three costs without its own interval
        return {**unfit, "why_not": f"{len(intervals)} intervals for 3 costs and their check", "intervals": []}
    x = np.array([[1.0, users, 1.0 / per_batch] for _, users, per_batch, _ in intervals], dtype=np.float64)
    y = np.array([serial for *_, serial in intervals], dtype=np.float64)
    scaled = x / np.abs(x).max(axis=0)
    condition = float(np.linalg.cond(scaled))
    if not condition < MAX_CONDITION:
        return {**unfit, "why_not": f"the intervals' shapes are too alike (condition {condition:.3g})", "intervals": []}
    costs = np.linalg.lstsq(x, y, rcond=None)[0]
    if (costs < 0).any():
        return {**unfit, "why_not": f"a fitted cost is below zero ({np.round(costs, 2).tolist()})", "intervals": []}
    checks = []
    for i, (name, users, per_batch, serial) in enumerate(intervals):
        others = np.arange(len(intervals)) != i
        without = np.linalg.lstsq(x[others], y[others], rcond=None)[0]
        checks.append(
            {
                "interval": name,
                "users_scored_per_event": users,
                "events_per_batch": round(per_batch, 1),
                "measured_us_per_event": round(serial, 2),
                "fitted_us_per_event": round(float(x[i] @ costs), 2),
                "predicted_without_it_us_per_event": round(float(x[i] @ without), 2),
            }
        )
    return {
        "per_event_us": round(float(costs[0]), 2),
        "per_user_us": round(float(costs[1]), 2),
        "per_batch_us": round(float(costs[2])),
        "condition": round(condition, 1),
        "intervals": checks,
    }


def serial_intervals(
    catch_up: dict[str, Any], capacity: dict[str, Any], backlog: dict[str, Any], loads: list[dict[str, Any]]
) -> list[tuple[str, float, float, float]]:
    """Returns (name, users scored per event, applied events per batch, loop thread + Redis us
    per event) of the run's one-process intervals: the catch-up, the two drains at the live
    batch, each load; intervals without events, batches or a figure are left out."""
    out = []
    drains = (
        ("catch_up_1_process", catch_up),
        ("capacity_at_live_batch", capacity),
        ("backlog_at_live_batch", backlog),
    )
    for name, interval in drains:
        cpu = interval["cpu_us_per_event"]
        serial = cpu["scorer_loop_thread"] + cpu["redis_server"]
        out.append(
            (name, interval["users_scored_per_event"], interval["logged_in_events"], interval["batches"], serial)
        )
    for load in loads:
        serial = load["loop_thread_cpu_us_per_event"] + load["redis_server_cpu_us_per_event"]
        name = f"load_{round(load['share_of_capacity'] * 100)}pct"
        out.append((name, load["users_scored_per_event"], load["logged_in_events"], load["batches"], serial))
    return [
        (name, users, events / batches, serial)
        for name, users, events, batches, serial in out
        if users is not None and batches and events and math.isfinite(serial)
    ]


def _cost_share(cost: dict[str, Any], interval: dict[str, Any]) -> float | None:
    """Returns the instrumentation's share of the loop thread's CPU over an interval."""
    loop_us = interval.get("loop_thread_cpu_us_per_event")
    if loop_us is None:
        loop_us = interval["cpu_us_per_event"]["scorer_loop_thread"]
    if not interval["batches"] or not loop_us:
        return None
    return round(cost["us_per_batch"] * interval["batches"] / (loop_us * interval["logged_in_events"]), 5)
