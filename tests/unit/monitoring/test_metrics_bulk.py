"""BulkHistogram exposes exactly what a prometheus_client Histogram would; the GC policy frees
cyclic garbage before freezing."""

from __future__ import annotations

import gc
import weakref

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from core.gc_policy import freeze_survivors, release_frozen
from monitoring.metrics import FRESHNESS_BUCKETS, BulkHistogram


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
