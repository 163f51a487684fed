"""Fixtures of the cluster suite (`make test-cluster`)."""

from __future__ import annotations

import pytest

from core.settings import Settings
from infra import cluster as infra_cluster


@pytest.fixture(scope="module")
def cluster(settings: Settings) -> Settings:
    """The clusters' client settings; starts the clusters if they are not up (idempotent)."""
    infra_cluster.up(settings)
    return infra_cluster.client_settings(settings)
