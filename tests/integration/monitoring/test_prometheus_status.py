"""`churn alerts` against the real local Prometheus: targets, active alerts, alerts seen."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from churn.cli import app
from core.errors import ServiceUnavailableError
from core.settings import Settings
from monitoring import prometheus_status as status
from tests.support import free_port


def _base(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prometheus_port}"


def test_prometheus_scrapes_itself_and_every_active_alert_was_seen(settings: Settings) -> None:
    base = _base(settings)
    targets = status.targets(base)
    assert any(t.job == "prometheus" and t.health == "up" for t in targets)
    active = status.active_alerts(base)
    seen = {(a.name, tuple(sorted(a.labels.items()))) for a in status.alerts_seen(base, 600)}
    # Evaluated every 15 s, recorded in ALERTS at each evaluation: what is active now was seen.
    for alert in active:
        assert alert.state in ("pending", "firing")
        assert (alert.name, tuple(sorted(alert.labels.items()))) in seen


def test_alerts_command_reports_json_and_its_check_agrees(settings: Settings) -> None:
    result = CliRunner().invoke(app, ["alerts", "--window", "120", "--check"])
    report = json.loads(result.stdout)
    unhealthy = (
        any(t["health"] != "up" for t in report["targets"])
        or report["alerts_active"]
        or report["alerts_seen_in_last_120s"]
    )
    assert result.exit_code == (1 if unhealthy else 0)
    assert report["prometheus"] == _base(settings)


def test_a_prometheus_that_does_not_answer_is_a_clear_error() -> None:
    with pytest.raises(ServiceUnavailableError, match="did not answer"):
        status.targets(f"http://127.0.0.1:{free_port()}")
