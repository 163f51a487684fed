"""The CLI's stop signals: `churn actions tail` finishes what it holds on the first SIGTERM or
Ctrl-C (a stop event) and ends at once on the second."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from churn import cli


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_sets_the_stop_event_and_the_second_interrupts(sig: signal.Signals) -> None:
    stopping = threading.Event()
    cli._stop_on_signals(stopping)  # the autouse fixture puts the handlers back
    os.kill(os.getpid(), sig)
    assert stopping.wait(5)
    with pytest.raises(KeyboardInterrupt):
        _signal_and_wait(sig)


def _signal_and_wait(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the handler runs here at the latest
