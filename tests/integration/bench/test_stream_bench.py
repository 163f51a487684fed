"""Smoke test of `churn bench stream` on tiny sizes: every phase runs against the real services
and its figures are consistent with each other (not fast: that is the benchmark's job)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.stream import Sizes, bench_stream
from core.settings import Settings
from infra import cluster as infra_cluster
from monitoring.metrics import SCORER_STAGES

TINY = Sizes(
    events=6_000,
    users=200,
    processes=(1, 2),
    peer_events=3_000,
    naive_events=150,
    naive_warmup=20,
    probe_seconds=1.0,
    capacity_events=4_000,
    load_seconds=1.5,
    timeout_s=240.0,
)


@pytest.mark.soak  # minutes on a busy machine: six scorer start-ups and a training
@pytest.mark.timeout(900)
def test_every_phase_of_the_stream_benchmark_runs_and_agrees_with_itself(settings: Settings) -> None:
    lines: list[str] = []
    figures = bench_stream(settings, TINY, say=lines.append)
    json.dumps(figures, allow_nan=False)  # the CLI prints it: no NaN or infinity anywhere

    assert len(lines) >= 8  # one progress line per phase
    assert [d["processes"] for d in figures["catch_up"]] == [1, 2]
    assert all(d["events_per_second"] > 0 for d in figures["catch_up"])
    cpu = figures["catch_up"][0]["cpu_us_per_event"]
    # The stages that do most of each batch's work were charged. The light stages (parse, state
    # load, offset check: ~1 us per event) are not asserted one by one: on a run this small one CI
    # run showed parse at 0.00 us per event after rounding.
    for stage in ("consume", "engine", "feast_write", "score", "risk_write"):
        assert cpu["loop_thread_by_stage"][stage] > 0, (stage, cpu)
    assert set(cpu["loop_thread_by_stage"]) == set(SCORER_STAGES)
    # The stages account for the loop thread's CPU as /proc sees it. Checked on the paced loads,
    # whose readings fall between loop turns: a catch-up reading taken mid-batch counts that
    # batch's stages but not its CPU before the reading (up to a fifth of a tiny run).
    for load in figures["loads"]:
        assert 0.98 <= load["stages_cover_share_of_loop_thread"] <= 1.02, load
    # Redis' time by command: the Feast rows' HSETs and the scorer's scripts are charged, and
    # the commands' running time fits in Redis' CPU plus its waits for a CPU (the time is wall
    # time; a script's commands count twice, under their names and in `evalsha`).
    for commands in [cpu["redis_commands"], *(load["redis_commands_us_per_event"] for load in figures["loads"])]:
        assert {"hset", "evalsha"} <= set(commands), commands
    _assert_commands_within_redis_time(figures["catch_up"][0])

    # A batch writes at most one risk row per user, and only for users it applied events of (no
    # replays here). Under the same batch bound, the one-partition drain's batches (in time order,
    # as live ones) touch at least as many users per event as the backlog's runs per partition.
    capacity, backlog = figures["capacity_at_live_batch"], figures["backlog_drain_at_live_batch"]
    for interval in [figures["catch_up"][0], capacity, backlog, *figures["loads"]]:
        assert 0 < interval["users_scored_per_event"] <= 1, interval
    assert capacity["users_scored_per_event"] >= backlog["users_scored_per_event"]
    # The cost model is fitted on the run's six one-process intervals, or says why it cannot be
    # (tiny runs' intervals may be too alike in shape).
    model = figures["live_loop_cost_model"]
    if model["per_user_us"] is None:
        assert model["why_not"]
    else:
        assert len(model["intervals"]) == 6
        assert min(model["per_event_us"], model["per_user_us"], model["per_batch_us"]) >= 0

    # Freshness counts every applied event of each load once, and only those.
    assert [load["share_of_capacity"] for load in figures["loads"]] == [0.25, 0.5, 0.75]
    for load in figures["loads"]:
        assert load["freshness"]["events_observed"] == load["logged_in_events"] > 0
        assert 0.0 <= load["freshness"]["share_within_1s"] <= 1.0

    # The other consumers ran to completion on the same topic; guests are not throughput.
    assert figures["bound_consume_decode"]["complete"]
    assert figures["bound_consume_decode"]["logged_in_events"] == TINY.events - figures["guests"]
    # The peer's clock stops once its state for the last message is committed (as the scorer's
    # stops once its state is written): at the stop's checkpoint, after its last message.
    peer = figures["quix_streams_peer"]
    assert peer["complete"]
    assert peer["checkpoints"] >= 1
    assert peer["seconds"] >= peer["to_last_message"]["seconds"] > 0
    # Each throughput goal's budget is the serial time per event its rate leaves one process.
    budgets = figures["throughput_budgets"]
    assert budgets["times_quix_peer"]["serial_us_per_event"] == pytest.approx(
        1e6 / (3 * peer["events_per_second"]), rel=0.01
    )
    assert 0 < budgets["floor_us_per_event"] < budgets["catch_up_serial_us_per_event"]
    assert budgets["times_quix_peer"]["ratio_at_floor"] > figures["ratios"]["times_quix_peer"]
    assert figures["naive"]["complete"]
    assert figures["naive"]["events"] == TINY.naive_events

    assert figures["redis_memory_per_user"]["users_stored"] > 0
    assert all(v and v > 0 for v in figures["redis_memory_per_user"]["memory_usage_per_key_bytes"].values())
    assert figures["instrumentation"]["share_of_loop_cpu_at_live_batch"] < 0.01
    assert set(figures["ratios"]) == set(figures["goals"]) == set(figures["meets"])


def _assert_commands_within_redis_time(interval: dict[str, Any]) -> None:
    """The commands' running time (wall time) is positive and fits in Redis's CPU (a cluster's
    masters) plus its waits for a CPU over the interval."""
    cpu = interval["cpu_us_per_event"]
    waited_us = interval["redis_waited_for_cpu_seconds"] * 1e6 / interval["logged_in_events"]
    assert 0 < sum(cpu["redis_commands"].values()) < cpu["redis_server"] + waited_us, interval


@pytest.mark.cluster  # the local clusters (`make test-cluster`), minutes
@pytest.mark.timeout(900)
def test_the_stream_benchmark_runs_on_the_clusters_and_counts_every_redis_master(settings: Settings) -> None:
    infra_cluster.up(settings)
    on_clusters = infra_cluster.client_settings(settings)
    figures = bench_stream(on_clusters, TINY, say=lambda _: None)

    assert figures["services"] == {"kafka_brokers": 3, "redis": "cluster", "redis_masters": 3, "redis_replicas": 3}
    # Scale-out against the clusters: every process count drained the whole backlog.
    assert [d["processes"] for d in figures["scale_out"]] == [1, 2]
    assert all(d["events_per_second"] > 0 and d["efficiency_per_core"] for d in figures["scale_out"])
    # Redis CPU is every master's (the loop waits for each), the replicas' apart; memory too.
    cpu = figures["catch_up"][0]["cpu_us_per_event"]
    assert cpu["redis_server"] > 0
    assert cpu["redis_replicas"] > 0
    # Every master's commands, none of a replica's: within the masters' CPU plus their waits.
    assert "hset" in cpu["redis_commands"]
    _assert_commands_within_redis_time(figures["catch_up"][0])
    memory = figures["redis_memory_per_user"]
    assert 0 < memory["users_stored"] <= TINY.users
    # Every user's keys are on the masters together: growth per user at least its keys' sizes.
    assert memory["used_memory_growth_per_user_bytes"] >= memory["sum_of_keys_bytes"]
