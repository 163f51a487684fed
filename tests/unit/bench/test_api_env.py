"""`bench.api.open_api_env`: a benchmark's own `churn serve` reads the caller's Redis settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.api import open_api_env
from core.settings import load_settings


@pytest.mark.parametrize("cluster", [False, True])
def test_the_server_is_told_whether_redis_is_a_cluster(
    tmp_path: Path, cluster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller's environment says the opposite: the settings given win (a test passes settings).
    monkeypatch.setenv("CHURN_REDIS_CLUSTER", "false" if cluster else "true")
    settings = load_settings(state_dir=tmp_path, redis_url="redis://127.0.0.1:16479", redis_cluster=cluster)
    env = open_api_env(settings, 18123)
    assert env["CHURN_REDIS_CLUSTER"] == ("true" if cluster else "false")
    assert env["CHURN_REDIS_URL"] == "redis://127.0.0.1:16479"
    assert env["CHURN_API_PORT"] == "18123"
