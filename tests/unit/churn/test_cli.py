"""The CLI's stop signals: `churn actions tail` finishes what it holds on the first SIGTERM or
Ctrl-C (a stop event) and ends at once on the second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from churn import cli
from monitoring import multiprocess
from stream import actions, changes


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


def test_a_forced_stop_of_the_tail_is_not_reported_as_a_success_and_gives_the_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*_args: object, report: actions.TailReport, **_kwargs: object) -> None:
        report.delivered, report.dead_lettered, report.unreadable = 7, 2, 1
        raise KeyboardInterrupt  # the second signal, in the middle of a batch

    monkeypatch.setattr(actions, "tail", interrupted)
    monkeypatch.setattr(changes, "ensure_changes_topic", lambda _settings: None)
    result = CliRunner().invoke(cli.app, ["actions", "tail"])
    assert result.exit_code == 130
    assert "interrupted after delivered 7, dead-lettered 3: the batch in hand is delivered again" in result.output


VALUE_CLASS = "import churn.cli; from prometheus_client import values; print(values.ValueClass.__name__)"


@pytest.mark.parametrize("shared_by_serve", [False, True])
def test_a_churn_process_keeps_its_metrics_in_memory_unless_serve_shares_a_folder(
    tmp_path: Path, shared_by_serve: bool
) -> None:
    """A parent that imported Feast hands its children Feast's multiprocess folder; a `churn`
    process drops it (values in memory), except a `churn serve` worker, whose folder is named."""
    env = {**os.environ, multiprocess.ENV: str(tmp_path)}
    if shared_by_serve:
        env[multiprocess.FOLDER_ENV] = str(tmp_path)
    else:
        env.pop(multiprocess.FOLDER_ENV, None)
    done = subprocess.run([sys.executable, "-c", VALUE_CLASS], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ("MmapedValue" if shared_by_serve else "MutexValue")
