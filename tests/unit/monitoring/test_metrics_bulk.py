"""BulkHistogram exposes exactly what a prometheus_client Histogram would; the GC policy frees
cyclic garbage before freezing; the scorer's stage CPU clock works on the loop's own thread."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from core.gc_policy import freeze_survivors, release_frozen
from monitoring.metrics import FRESHNESS_BUCKETS, BulkHistogram, StageCpu


def test_bulk_histogram_exposition_equals_histogram() -> None:
    values = np.array([0.0, 0.01, 0.0100001, 0.3, 5.0, 59.9, 60.0, 61.0, 1e6])
    bulk_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h_seconds", "doc", FRESHNESS_BUCKETS, bulk_registry)
    plain = Histogram("h_seconds", "doc", buckets=FRESHNESS_BUCKETS, registry=plain_registry)
    bulk.observe_many(values[:4])
    bulk.observe_many(values[4:])
    bulk.observe_many(np.array([]))
    for value in values:
        plain.observe(float(value))

    def samples(registry: CollectorRegistry) -> list[str]:
        # prometheus_client adds a `_created` sample to its own histograms only.
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert samples(bulk_registry) == samples(plain_registry)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freeze_survivors_collects_new_cycles_and_freezes_the_rest() -> None:
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        kept = [_Node()]
        freeze_survivors()
        assert gone() is None  # the cycle was collected, not frozen
        assert gc.get_freeze_count() > 0
        assert kept[0] is not None
    finally:
        release_frozen()
        gc.unfreeze()


def test_a_loop_on_another_thread_than_its_builder_charges_its_own_cpu() -> None:
    """Thread CPU clocks are per thread: a scorer built on one thread and run on another starts
    the clock there, or its first mark is negative (this test thread has used seconds of CPU)."""
    registry = CollectorRegistry()
    cpu = StageCpu(Counter("stage_cpu_seconds", "doc", ["stage"], registry=registry))
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            cpu.start()
            sum(range(100_000))
            cpu.mark("engine")
            cpu.flush()
        except BaseException as exc:  # noqa: BLE001 (reported to the test thread)
            errors.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert errors == []
    charged = registry.get_sample_value("stage_cpu_seconds_total", {"stage": "engine"})
    assert charged is not None
    assert 0 < charged < 1
