"""The shared performance state: per snapshot day, the expected figures (at the snapshot) and the
realized ones (once labelled), as JSON in Redis (`<redis_prefix>performance`).

The scorer writes it (`PerformancePublisher`), the API serves it (`GET /monitoring/performance`)
and `churn retrain --if-degraded` decides from it (`degraded_decision`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from monitoring.metrics import Metrics
from monitoring.prediction_log import day_of

log = logging.getLogger(__name__)
KEEP_DAYS = 120  # days of history kept in the state (the prediction log keeps everything)


def performance_key(prefix: str) -> str:
    """Returns the Redis key of the performance state for a key prefix."""
    return f"{prefix}performance"


def read_performance(client: Any, prefix: str) -> dict[str, Any] | None:
    """Returns the performance state ({"days": {date: entry}, "latest_expected", "latest_realized"}),
    or None before the first snapshot.

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    raw = client.get(performance_key(prefix))
    return None if raw is None else json.loads(raw)


def json_figures(figures: Mapping[str, float]) -> dict[str, float | None]:
    """Returns `figures` with every value that is not finite as None (JSON has no NaN)."""
    return {k: (v if math.isfinite(v) else None) for k, v in figures.items()}


def _set_figures(gauge: Gauge, figures: Mapping[str, float | None]) -> None:
    """Replaces every series of `gauge` (label: the metric) with the figures that are numbers:
    one that could not be computed (e.g. ROC-AUC of a day without churners) has no series,
    rather than an earlier day's value under a newer as-of. Counts are not gauged."""
    gauge.clear()
    for name, value in figures.items():
        if name not in ("rows", "churners") and value is not None and math.isfinite(value):
            gauge.labels(name).set(value)


@dataclass
class PerformancePublisher:
    """Writes expected and realized figures to Redis and the gauges; `floor` is the promotion
    floor of ROC-AUC (exported so the alert rule compares against the configured value)."""

    metrics: Metrics
    client: Any
    prefix: str
    floor: float

    def __post_init__(self) -> None:
        self.metrics.performance_floor.labels("roc_auc").set(self.floor)

    def expected(self, as_of_ms: int, version: str, figures: dict[str, float]) -> None:
        """Records the figures a snapshot's probabilities imply; never raises."""
        _set_figures(self.metrics.expected, figures)
        self._update(as_of_ms, {"as_of_ms": as_of_ms, "model_version": version, "expected": json_figures(figures)})

    def realized(self, as_of_ms: int, figures: dict[str, float]) -> None:
        """Records a labelled snapshot's realized figures; never raises."""
        _set_figures(self.metrics.realized, figures)
        self.metrics.realized_as_of.set(as_of_ms / 1000)
        self._update(as_of_ms, {"realized": json_figures(figures)})

    def mirror(self) -> None:
        """Sets the expected and realized gauges from the state in Redis (the latest snapshot any
        scorer took and labelled). Never raises.

        Why: one scorer takes each daily snapshot and the others skip it, so their gauges kept
        the figures of the last one they took themselves (the alert takes the max over scorers:
        a stale high realized ROC-AUC hid a drop below the floor), and a restarted scorer had
        none until the next midnight."""
        try:
            state = read_performance(self.client, self.prefix)
        except Exception:  # Redis down: the gauges stay as they were until the next snapshot
            log.exception("could not read the performance state for the gauges")
            return
        if state is None:
            return
        days = state["days"]
        if state.get("latest_expected") in days:
            _set_figures(self.metrics.expected, days[state["latest_expected"]]["expected"])
            self._mirror_models("expected", days[state["latest_expected"]])
        if state.get("latest_realized") in days:
            day = state["latest_realized"]
            _set_figures(self.metrics.realized, days[day]["realized"])
            midnight = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
            self.metrics.realized_as_of.set(midnight.timestamp())
            self._mirror_models("realized", days[day])

    def _mirror_models(self, kind: str, day: dict[str, Any]) -> None:
        """Sets the per-model `kind` gauges from one day of the state (`model_figures` wrote it):
        a restarted scorer had none until its next snapshot, and one that skipped a snapshot
        kept the figures of the last one it took."""
        gauge = self.metrics.model_expected if kind == "expected" else self.metrics.model_realized
        for version, entry in (day.get("models") or {}).items():
            if kind in entry:
                figures = {
                    k: (math.nan if v is None else v) for k, v in entry[kind].items() if k not in ("rows", "churners")
                }
                self.metrics.set_model_figures(gauge, entry["role"], version, figures)

    def model_figures(self, kind: str, as_of_ms: int, role: str, version: str, figures: dict[str, float]) -> None:
        """Records one model's `kind` ("expected" or "realized") figures over every user of a
        snapshot (served or in shadow; `role` is "served" for the champion, "shadow" for the
        challenger): the `churn_model_*_performance` gauges and `models.<version>` of the day in
        the state. Never raises."""
        gauge = self.metrics.model_expected if kind == "expected" else self.metrics.model_realized
        try:
            kept = {k: v for k, v in figures.items() if k not in ("rows", "churners")}
            self.metrics.set_model_figures(gauge, role, version, kept)
        except Exception:
            log.exception("could not set the %s gauges of model v%s", kind, version)
        try:
            state = read_performance(self.client, self.prefix) or {"days": {}}
            models = state["days"].get(day_of(as_of_ms), {}).get("models", {})
        except Exception:
            log.exception("could not read the performance state")
            return
        models[version] = {**models.get(version, {}), "role": role, kind: json_figures(figures)}
        self._update(as_of_ms, {"models": models})

    def _update(self, as_of_ms: int, entry: dict[str, Any]) -> None:
        try:
            state = read_performance(self.client, self.prefix) or {"days": {}}
            day = day_of(as_of_ms)
            state["days"][day] = {**state["days"].get(day, {}), **entry}
            for old in sorted(state["days"])[:-KEEP_DAYS]:
                del state["days"][old]
            days = state["days"]
            state["latest_expected"] = next((d for d in sorted(days, reverse=True) if "expected" in days[d]), None)
            state["latest_realized"] = next((d for d in sorted(days, reverse=True) if "realized" in days[d]), None)
            state["floor"] = {"roc_auc": self.floor}
            self.client.set(performance_key(self.prefix), json.dumps(state))
        except Exception:  # Redis down: log and keep scoring; the prediction log keeps the figures
            log.exception("could not publish the performance state")


def degraded_decision(
    state: dict[str, Any] | None, floor: float, days: int, champion: str | None = None
) -> tuple[bool, str]:
    """Returns (retrain?, why) for `churn retrain --if-degraded`: retrain when the realized ROC-AUC
    of each of the latest `days` labelled snapshots is below `floor`. With `champion` (its
    version), only snapshots it scored count: a replaced model's labelled days (they keep coming
    for H days after a promotion) say nothing of the new one, and would retrain at every check."""
    if state is None:
        return False, "no performance state in Redis yet (is the scorer running with a champion?)"
    labelled = [
        (d, e["realized"].get("roc_auc"))
        for d, e in sorted(state["days"].items())
        if e.get("realized") and (champion is None or e.get("model_version") == champion)
    ]
    if not labelled:
        whose = "" if champion is None else f" scored by the champion v{champion}"
        return False, f"no snapshot{whose} is labelled yet (labels arrive H days after each snapshot)"
    recent = labelled[-days:]
    listed = ", ".join(f"{d} {'n/a' if v is None else f'{v:.3f}'}" for d, v in recent)
    if len(recent) == days and all(v is not None and v < floor for _, v in recent):
        return True, f"realized ROC-AUC below {floor:g} on the latest {days} labelled day(s): {listed}"
    return False, f"realized ROC-AUC not below {floor:g} on all of the latest {days} labelled day(s): {listed}"
