"""What Prometheus says about the deployment: its scrape targets, the alerts active now and the
alerts that were active at any point of a recent window (`churn alerts`).

The window matters for a health check: an alert that went pending and resolved between two
looks is invisible in `/api/v1/alerts`, but Prometheus records every pending or firing
instant in its `ALERTS` series.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from core.errors import ServiceUnavailableError


@dataclass(frozen=True)
class Target:
    """One scrape target: its job, address, `health` (up/down/unknown) and last scrape error."""

    job: str
    instance: str
    health: str
    last_error: str


@dataclass(frozen=True)
class Alert:
    """One alert instance: its rule, state (pending/firing), labels and since when (ISO)."""

    name: str
    state: str
    labels: dict[str, str]
    active_since: str


@dataclass(frozen=True)
class SeenAlert:
    """An alert that was active in the window: its rule, labels, the worst state it reached
    (firing beats pending) and for how many seconds of the window it was active."""

    name: str
    labels: dict[str, str]
    worst_state: str
    active_seconds: float


def _get(base_url: str, path: str, params: dict[str, str] | None = None) -> Any:
    """Returns the `data` of a Prometheus API answer.

    Raises:
        ServiceUnavailableError: Prometheus does not answer, or answers with an error.
    """
    url = f"{base_url.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the configured Prometheus
            body = json.load(response)
    except (OSError, ValueError) as exc:
        msg = f"Prometheus at {base_url} did not answer {path}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    if body.get("status") != "success":
        msg = f"Prometheus refused {path}: {body.get('error', body)}"
        raise ServiceUnavailableError(msg)
    return body["data"]


def targets(base_url: str) -> list[Target]:
    """Returns the active scrape targets, sorted by job and instance.

    Raises:
        ServiceUnavailableError: Prometheus does not answer.
    """
    data = _get(base_url, "/api/v1/targets", {"state": "active"})
    found = [
        Target(t["labels"].get("job", ""), t["labels"].get("instance", ""), t["health"], t.get("lastError", ""))
        for t in data["activeTargets"]
    ]
    return sorted(found, key=lambda t: (t.job, t.instance))


def active_alerts(base_url: str) -> list[Alert]:
    """Returns the alerts pending or firing now, sorted by name.

    Raises:
        ServiceUnavailableError: Prometheus does not answer.
    """
    data = _get(base_url, "/api/v1/alerts")
    found = [
        Alert(a["labels"]["alertname"], a["state"], _rest(a["labels"]), a.get("activeAt", "")) for a in data["alerts"]
    ]
    return sorted(found, key=lambda a: (a.name, sorted(a.labels.items())))


def alerts_seen(base_url: str, window_seconds: float, step_seconds: float = 5.0) -> list[SeenAlert]:
    """Returns every alert that was pending or firing at some evaluation in the last
    `window_seconds` (from the `ALERTS` series, sampled every `step_seconds`), sorted by name.

    Raises:
        ServiceUnavailableError: Prometheus does not answer.
    """
    end = time.time()
    data = _get(
        base_url,
        "/api/v1/query_range",
        {"query": "ALERTS", "start": f"{end - window_seconds:.3f}", "end": f"{end:.3f}", "step": f"{step_seconds:g}"},
    )
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]] = {}
    for series in data["result"]:
        metric = series["metric"]
        labels = {k: v for k, v in _rest(metric).items() if k not in ("alertstate", "__name__")}
        key = (metric["alertname"], tuple(sorted(labels.items())))
        worst, seconds = seen.get(key, ("pending", 0.0))
        if metric.get("alertstate") == "firing":
            worst = "firing"
        seen[key] = (worst, seconds + len(series["values"]) * step_seconds)
    return [SeenAlert(name, dict(labels), worst, secs) for (name, labels), (worst, secs) in sorted(seen.items())]


def _rest(labels: dict[str, str]) -> dict[str, str]:
    """Returns the labels without the alert's name (already a field)."""
    return {k: v for k, v in labels.items() if k != "alertname"}
