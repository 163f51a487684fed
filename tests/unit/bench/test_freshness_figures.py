"""`bench.stream_figures.freshness_figures`: quantiles of the events observed between two
readings of a cumulative histogram, interpolated within their bucket as Prometheus does."""

from __future__ import annotations

import math

from bench.stream_figures import freshness_figures

INF = math.inf


def test_only_the_events_between_the_readings_count_and_quantiles_interpolate_in_their_bucket() -> None:
    # Before: 50 events, all within 0.1 s (an earlier phase). Between the readings: 100 events,
    # 40 within 0.1 s, 50 in (0.1, 0.5], 9 in (0.5, 1], 1 in (1, 2.5].
    before = [(0.1, 50.0), (0.5, 50.0), (1.0, 50.0), (2.5, 50.0), (INF, 50.0)]
    after = [(0.1, 90.0), (0.5, 140.0), (1.0, 149.0), (2.5, 150.0), (INF, 150.0)]
    figures = freshness_figures(before, after)
    assert figures["events_observed"] == 100
    # Rank 50 is the 10th of the 50 events in (0.1, 0.5]: 0.1 + 0.4 * 10 / 50.
    assert math.isclose(figures["p50_seconds"], 0.18)
    assert figures["p50_bucket_seconds"] == [0.1, 0.5]
    # Rank 99 is the last of the 9 in (0.5, 1].
    assert math.isclose(figures["p99_seconds"], 1.0)
    assert figures["p99_bucket_seconds"] == [0.5, 1.0]
    assert figures["max_bucket_seconds"] == [1.0, 2.5]
    assert figures["share_within_1s"] == 0.99


def test_no_event_between_the_readings_gives_no_quantiles() -> None:
    reading = [(0.1, 5.0), (1.0, 7.0), (INF, 7.0)]
    assert freshness_figures(reading, reading) == {"events_observed": 0}


def test_an_event_past_the_last_finite_bucket_has_no_upper_bound() -> None:
    before = [(0.1, 0.0), (1.0, 0.0), (INF, 0.0)]
    after = [(0.1, 0.0), (1.0, 0.0), (INF, 2.0)]
    figures = freshness_figures(before, after)
    assert figures["max_bucket_seconds"] == [1.0, None]
    assert figures["p99_bucket_seconds"] == [1.0, None]
    assert figures["p99_seconds"] == 1.0  # the +Inf bucket's quantile is its lower bound
    assert figures["share_within_1s"] == 0.0
