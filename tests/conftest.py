"""Shared fixtures: settings from the environment, per-test names for topics and groups, and
the process's signal handlers put back after each test."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest

from core.settings import Settings, load_settings
from tests.support import FIXTURES


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings `make test` exported (test ports and state folder)."""
    return load_settings()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and key names of one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def sparkify_lines() -> list[bytes]:
    """The first 100 rows of the public Sparkify mini dataset (real format, incl. guests)."""
    return (FIXTURES / "sparkify_mini_first100.jsonl").read_bytes().splitlines()


@pytest.fixture(autouse=True)
def _signal_handlers_put_back() -> Iterator[None]:
    """Restores the SIGINT and SIGTERM handlers after each test. A scorer, an archiver or a CLI
    command run in-process installs its own; one left behind turns a later test's SIGINT into a
    call to a finished process's handler instead of KeyboardInterrupt (a test that interrupts
    itself then hangs, as one did in CI)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None:  # None: installed outside Python, which Python cannot put back
            signal.signal(sig, handler)
