"""Shared fixtures: settings from the environment and per-test names for topics and groups."""

from __future__ import annotations

import uuid

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
