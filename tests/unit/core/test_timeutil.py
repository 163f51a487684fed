"""`core.timeutil.ms_to_iso` against exact datetime arithmetic, on random and edge instants."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from core.timeutil import ms_to_iso

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _exact(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def test_every_instant_reads_as_exact_utc_iso_text_with_milliseconds() -> None:
    rng = random.Random(7)
    instants = [rng.randint(-2_000_000_000_000, 4_000_000_000_000) for _ in range(50_000)]
    edges = [0, 1, 999, 1000, -1, -999, -1000, 86_399_999, 86_400_000, 1_767_225_600_123, 253_402_300_799_999]
    for ms in instants + edges:
        assert ms_to_iso(ms) == _exact(ms), ms


def test_a_fraction_of_a_millisecond_is_dropped() -> None:
    assert ms_to_iso(1_767_225_600_123.9) == "2026-01-01T00:00:00.123Z"  # type: ignore[arg-type]
    assert ms_to_iso(-0.4) == "1969-12-31T23:59:59.999Z"  # type: ignore[arg-type]
