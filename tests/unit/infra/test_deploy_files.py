"""The deployment files are valid: docker-compose.yml, Prometheus config and alert rules, Grafana
provisioning and dashboards; and they only name metrics that monitoring/metrics.py defines.

Needs the `docker-compose` and `promtool` binaries (Debian's docker-compose and prometheus
packages, installed by `make test`); a missing binary fails the test rather than skipping it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings
from monitoring.metrics import Metrics
from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "monitoring" / "prometheus"
GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "prometheus"

# PromQL words that look like metric names but are not (functions are recognised by their "(").
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: install Debian's `{package}` package (`make test` does it)")
    return path


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def _compose(tmp_path: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Runs docker-compose on the repository's file with a clean environment: no `.env` file
    (an empty --env-file) and no GRAFANA_/CHURN_ variables from the caller's shell."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFANA_", "CHURN_"))}
    cmd = [_binary("docker-compose", "docker-compose"), "--env-file", str(empty_env_file), "-f", str(COMPOSE)]
    return _run([*cmd, *args], env={**env, **extra_env})


def _known_metric_names() -> set[str]:
    """Every series name a `Metrics()` registry can expose, incl. _total/_bucket/_count/_sum."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """Returns the metric names a PromQL expression selects (not labels, functions or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and other strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    # Not preceded by a digit or dot, so the unit of `5m` or the exponent of `1e3` is no name.
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        is_function = text[match.end() :].lstrip().startswith("(")
        if not is_function and match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows; rows themselves are left out."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def _panel_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every dashboard."""
    return [
        (path.name, panel["title"], target["expr"])
        for path in DASHBOARDS
        for panel in _panels(json.loads(path.read_text()))
        for target in panel["targets"]
    ]


# --- docker-compose ------------------------------------------------------------------------


# Every credential compose requires (`${VAR:?}`), with a stand-in value.
CREDENTIALS = {
    "GRAFANA_ADMIN_PASSWORD": "x",
    "REDIS_PASSWORD": "x",
    "KAFKA_CLIENT_PASSWORD": "x",
    "MLFLOW_ADMIN_PASSWORD": "x",
    "MLFLOW_READER_PASSWORD": "x",
    "CHURN_API_KEYS": '["x"]',
}


def test_compose_file_is_valid(tmp_path: Path) -> None:
    result = _compose(tmp_path, CREDENTIALS, "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(CREDENTIALS))
def test_compose_fails_fast_without_a_credential(tmp_path: Path, missing: str) -> None:
    result = _compose(tmp_path, {k: v for k, v in CREDENTIALS.items() if k != missing}, "config", "-q")
    assert result.returncode != 0
    assert missing in result.stderr


def test_compose_services_use_their_credentials(tmp_path: Path) -> None:
    result = _compose(tmp_path, {**CREDENTIALS, "REDIS_PASSWORD": "redis-pw"}, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "--requirepass" in services["redis"]["command"]
    for name in ("scorer", "api", "archiver", "producer", "feast-apply", "trainer"):
        env = services[name]["environment"]
        assert env["CHURN_REDIS_URL"] == "redis://:redis-pw@redis:6379/0"
        assert env["CHURN_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert env["CHURN_KAFKA_BOOTSTRAP"] == "kafka:9094"
    # Only the trainer (and the job creating the reader) act as the MLflow admin.
    admins = {n for n, s in services.items() if (s.get("environment") or {}).get("MLFLOW_TRACKING_USERNAME") == "admin"}
    assert admins == {"trainer", "mlflow-users"}
    assert "basic-auth" in " ".join(services["mlflow"]["command"])


def test_compose_has_no_version_key() -> None:
    # The Compose Specification format: `version:` is obsolete and would pin an old schema.
    assert "version" not in yaml.safe_load(COMPOSE.read_text())


def test_compose_churn_variables_are_settings(tmp_path: Path) -> None:
    result = _compose(tmp_path, CREDENTIALS, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    fields = {f"CHURN_{name.upper()}" for name in Settings.model_fields}
    used = {
        (service, variable)
        for service, spec in services.items()
        for variable in (spec.get("environment") or {})
        if variable.startswith("CHURN_")
    }
    assert used, "no service sets a CHURN_ variable"
    assert {(service, variable) for service, variable in used if variable not in fields} == set()


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    promtool = _binary("promtool", "prometheus")
    result = _run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid() -> None:
    promtool = _binary("promtool", "prometheus")
    result = _run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    promtool = _binary("promtool", "prometheus")
    result = _run([promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in _alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no `for:`, a single bad scrape would page"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - fired == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a not-firing case"


def test_every_alert_has_a_runbook_row_in_the_readme() -> None:
    """The README's runbook says what each alert means and what to do (a row per alert; two
    alerts may share a row, as `A` / `B`)."""
    readme = (ROOT / "README.md").read_text()
    runbook = readme[readme.index("### Runbook") :]
    runbook = runbook[: runbook.index("\n## ")]
    rows = [line for line in runbook.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`(Churn\w+)`", row.split(" | ")[0])}
    assert {rule["alert"] for rule in _alert_rules()} - named == set(), "alerts without a runbook row"


# --- Grafana -------------------------------------------------------------------------------


def test_datasource_is_provisioned_with_the_uid_dashboards_use() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert f"./monitoring/grafana/dashboards:{folder}:ro" in COMPOSE.read_text()


def test_there_are_three_dashboards_with_unique_uids() -> None:
    assert [path.name for path in DASHBOARDS] == ["api.json", "model.json", "pipeline.json"]
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_panels_query_the_prometheus_datasource(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    panels = _panels(dashboard)
    assert panels
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids), "duplicate panel ids"
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE_UID, title
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID, title
            assert target["expr"].strip(), f"{title}: empty expr"
            # Raw PromQL only: Grafana variables would not evaluate against Prometheus directly.
            assert "$" not in target["expr"], f"{title}: uses a Grafana variable"


def test_panel_expressions_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions without a server: one recording rule per panel query.
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, _, expr) in enumerate(_panel_exprs())]
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    promtool = _binary("promtool", "prometheus")
    result = _run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- metric names --------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(churn_x_bucket{status=~"5.."}[5m] offset 1m)))'
        " > 0.25 and on (job, instance) churn_y_count > 1e3 or on () vector(0)"
    )
    assert metric_names(expr) == {"churn_x_bucket", "churn_y_count"}


def test_dashboards_and_alerts_only_use_defined_metrics() -> None:
    known = _known_metric_names()
    exprs = [(f"{file} / {title}", expr) for file, title, expr in _panel_exprs()]
    exprs += [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()]
    assert exprs
    unknown = {}
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: selects no metric"
        if names - known:
            unknown[where] = sorted(names - known)
    assert unknown == {}
