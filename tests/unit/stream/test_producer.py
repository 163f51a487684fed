"""The publish loop and pacing without a broker: keys, counts, line numbers, back-pressure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stream import producer as producer_module
from stream.pacing import Pacer, Pacing
from stream.producer import ProduceReport, publish


class FakeProducer:
    """Records what would be sent; can refuse the first N produce calls with BufferError."""

    def __init__(self, full_for: int = 0, undelivered: int = 0) -> None:
        self.sent: list[tuple[str, bytes, str | None]] = []
        self.full_for = full_for
        self.undelivered = undelivered
        self.polls = 0
        self.flushed = False

    def produce(self, topic: str, value: bytes, key: str | None) -> None:
        if self.full_for:
            self.full_for -= 1
            raise BufferError
        self.sent.append((topic, value, key))

    def poll(self, _timeout: float) -> int:
        self.polls += 1
        return 0

    def flush(self, _timeout: float) -> int:
        self.flushed = True
        return self.undelivered

    def __len__(self) -> int:
        return 0


def _event(user: object, ts: int = 1_538_352_117_000) -> bytes:
    return json.dumps({"userId": user, "ts": ts, "page": "NextSong"}).encode()


def _publish(producer: FakeProducer, lines: Any, **kwargs: Any) -> ProduceReport:
    return publish(producer, "events", lines, ProduceReport(), **kwargs)  # type: ignore[arg-type]


def test_keys_counts_and_line_numbers() -> None:
    lines = [
        _event("30") + b"\n",
        _event(""),  # guest: no key
        b"\n",  # blank: skipped
        b"not json\n",
        b"[1]",
        _event(30),  # odd userId type: published, the consumer dead-letters it
        b'{"page": "Home"}',  # no userId at all: a guest
        b"x" * 200,
    ]
    producer = FakeProducer()
    report = _publish(producer, lines, max_bytes=100)
    assert [key for _, _, key in producer.sent] == ["30", None, "30", None]
    assert producer.sent[0][1] == _event("30")  # newline stripped, bytes otherwise untouched
    assert (report.sent, report.guests, report.skipped, report.malformed, report.failed) == (4, 2, 1, 3, 0)
    assert [(n, r.split(":")[0]) for n, r in report.malformed_lines] == [
        (4, "malformed JSON"),
        (5, "expected a JSON object, got list"),
        (8, "line of 200 bytes exceeds the limit of 100"),
    ]
    assert report.lines == 8
    assert producer.flushed


def test_full_queue_waits_and_retries() -> None:
    producer = FakeProducer(full_for=3)
    report = _publish(producer, [_event("1"), _event("2")])
    assert [key for _, _, key in producer.sent] == ["1", "2"]
    assert report.sent == 2
    assert producer.polls >= 3


def test_unacknowledged_messages_count_as_failed() -> None:
    # flush_timeout: the stand-in's flush answers at once, where librdkafka's waits its slice.
    report = _publish(FakeProducer(undelivered=2), [_event("1"), _event("2"), _event("3")], flush_timeout=0.1)
    assert (report.sent, report.failed) == (1, 2)
    assert report.failure_reasons == {"not acknowledged before the flush timeout": 2}


def test_ctrl_c_flushes_and_reports() -> None:
    def lines() -> Iterator[bytes]:
        yield _event("1")
        raise KeyboardInterrupt

    producer = FakeProducer()
    report = _publish(producer, lines())
    assert report.interrupted
    assert report.sent == 1
    assert producer.flushed


def test_a_failing_input_is_flushed_then_raised() -> None:
    def lines() -> Iterator[bytes]:
        yield _event("1")
        raise EOFError("truncated gzip")

    producer = FakeProducer()
    with pytest.raises(EOFError):
        _publish(producer, lines())
    assert producer.flushed


def test_progress_gets_the_final_report() -> None:
    seen: list[int] = []
    _publish(FakeProducer(), [_event("1")] * 5, progress=lambda r: seen.append(r.sent))
    assert seen[-1] == 5


# --- pacing ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_spaces_events_evenly() -> None:
    pacer = Pacer(Pacing(rate=10), clock=FakeClock())
    assert [round(pacer.delay(None), 3) for _ in range(3)] == [0.0, 0.1, 0.2]


def test_speedup_follows_event_time() -> None:
    clock = FakeClock()
    pacer = Pacer(Pacing(speedup=60), clock=clock)
    t0 = 1_538_352_117_000
    assert pacer.delay(t0) == 0
    assert pacer.delay(t0 + 60_000) == pytest.approx(1.0)  # one minute of events per second
    clock.now += 5
    assert pacer.delay(t0 + 120_000) == pytest.approx(-3.0)  # behind schedule: send at once
    assert pacer.delay(t0 - 999_000) < 0  # out-of-order events never wait


def test_implausible_event_time_never_stalls() -> None:
    pacer = Pacer(Pacing(speedup=1), clock=FakeClock())
    pacer.delay(1_538_352_117_000)
    assert pacer.delay(253_402_300_799_000) <= 0  # year 9999
    assert pacer.delay("1538352117000") <= 0
    assert pacer.delay(True) <= 0


def test_both_limits_the_slower_wins() -> None:
    pacer = Pacer(Pacing(rate=1, speedup=1000), clock=FakeClock())
    t0 = 1_538_352_117_000
    pacer.delay(t0)
    assert pacer.delay(t0 + 1000) == pytest.approx(1.0)  # the rate, not the 1 ms of event time


@pytest.mark.parametrize("pacing", [{"rate": 0}, {"speedup": -1}])
def test_pacing_must_be_positive(pacing: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Pacing(**pacing)


def test_paced_publish_waits_between_events(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("stream.producer._sleep_serving", lambda _producer, seconds: waits.append(seconds))
    report = _publish(FakeProducer(), [_event("1"), _event("2"), _event("3")], pacing=Pacing(rate=100))
    assert report.sent == 3
    # Sleeping is stubbed out, so the schedule runs ahead of the clock: ~10 ms, then ~20 ms.
    assert [round(w, 2) for w in waits] == [0.01, 0.02]


class BrokerDown(FakeProducer):
    """A producer whose broker does not answer: every flush slice waits its whole timeout and
    nothing is acknowledged; `interrupt_at` raises KeyboardInterrupt (a signal) in that flush."""

    def __init__(self, interrupt_at: int = 0) -> None:
        super().__init__()
        self.slices: list[float] = []
        self.interrupt_at = interrupt_at

    def flush(self, timeout: float) -> int:
        self.slices.append(timeout)
        if len(self.slices) == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(timeout)
        return len(self.sent)

    def __len__(self) -> int:
        return len(self.sent)


def test_after_a_stop_the_flush_waits_seconds_not_the_message_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker stop` gives 10 s: waiting out the 60 s message timeout for a dead broker gained
    nothing and lost the summary to SIGKILL."""
    monkeypatch.setattr(producer_module, "STOPPED_FLUSH_SECONDS", 0.6)

    def lines() -> Iterator[bytes]:
        yield _event("1")
        yield _event("2")
        raise KeyboardInterrupt

    producer = BrokerDown()
    started = time.monotonic()
    report = _publish(producer, lines(), flush_timeout=90)
    assert time.monotonic() - started < 3
    assert report.interrupted
    assert report.failure_reasons == {"not acknowledged when stopped": 2}
    assert max(producer.slices) <= producer_module.FLUSH_SLICE_SECONDS


def test_a_signal_during_the_final_flush_ends_it_and_counts_as_a_stop() -> None:
    producer = BrokerDown(interrupt_at=2)
    report = _publish(producer, [_event("1")], flush_timeout=90)
    assert report.interrupted
    assert len(producer.slices) == 2
    assert report.failure_reasons == {"not acknowledged when stopped": 1}
