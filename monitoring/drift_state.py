"""The shared drift state: the latest `DriftReport` as JSON in Redis (`<redis_prefix>drift`),
with how long each feature and the score have been at alert level.

The scorer publishes it (`DriftPublisher`), the API serves it (`GET /monitoring/drift`) and
`churn retrain --if-drift` decides from it (`sustained_alerts`). `alert_since` (epoch seconds)
is carried over from the previous JSON, so a scorer restart does not reset the clock.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitoring.drift import DriftReport, DriftWindow, Thresholds
from monitoring.metrics import Metrics

log = logging.getLogger(__name__)
SCORE = "score"  # the name the score goes by in `sustained_alerts`


def drift_key(prefix: str) -> str:
    """Returns the Redis key of the drift state for a key prefix (settings `redis_prefix`)."""
    return f"{prefix}drift"


def with_alert_history(report: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Returns `report` (DriftReport.to_dict) with `alert_since` on every feature and the score:
    the start of the current run of "alert" statuses (kept from `previous`), or None."""
    old_features = (previous or {}).get("features") or {}
    old_score = (previous or {}).get("score") or {}

    def since(entry: dict[str, Any] | None, old: dict[str, Any]) -> float | None:
        if entry is None or entry.get("status") != "alert":
            return None
        previous_since = old.get("alert_since")
        return report["computed_at"] if previous_since is None else previous_since

    for name, entry in report["features"].items():
        entry["alert_since"] = since(entry, old_features.get(name) or {})
    if report.get("score") is not None:
        report["score"]["alert_since"] = since(report["score"], old_score)
    return report


def read_drift(client: Any, prefix: str) -> dict[str, Any] | None:
    """Returns the latest drift state, or None if no scorer has published one yet.

    Raises:
        redis.RedisError: Redis cannot be reached (callers map it to their own errors).
    """
    raw = client.get(drift_key(prefix))
    return None if raw is None else json.loads(raw)


def sustained_alerts(state: dict[str, Any], minutes: float, now: float) -> dict[str, float]:
    """Returns {feature or "score": minutes at alert level} for those at alert for >= `minutes`
    as of `now` (epoch seconds)."""
    entries = {**(state.get("features") or {}), SCORE: state.get("score") or {}}
    out: dict[str, float] = {}
    for name, entry in entries.items():
        since = entry.get("alert_since")
        if since is not None and now - since >= minutes * 60:
            out[name] = (now - since) / 60
    return out


@dataclass
class DriftPublisher:
    """Computes the window's report, sets the drift gauges and writes the state to Redis
    (`client`, under `prefix`); `clock` gives epoch seconds."""

    window: DriftWindow
    thresholds: Thresholds
    metrics: Metrics
    client: Any
    prefix: str
    clock: Callable[[], float] = time.time

    def publish(self, model: Any, name: str = "", version: str = "") -> dict[str, Any] | None:
        """Reports drift against `model`'s reference (its `meta["reference"]`); returns the state
        written, or None when there is nothing to compare (no model, no reference, empty window).
        Never raises: monitoring must not stop scoring."""
        reference = (getattr(model, "meta", None) or {}).get("reference")
        if reference is None or not len(self.window):
            return None
        try:
            report = self.window.compute(reference, self.thresholds, now=self.clock(), rescore=model.predict)
            self._set_gauges(report)
            state = report.to_dict()
            state["model"] = {"name": name, "version": version}
            state["thresholds"] = {"warn": self.thresholds.warn, "alert": self.thresholds.alert}
            key = drift_key(self.prefix)
            state = with_alert_history(state, read_drift(self.client, self.prefix))
            self.client.set(key, json.dumps(state))
        except Exception:  # Redis down or a bad reference: log, keep scoring, try next period
            log.exception("could not publish the drift report")
            return None
        return state

    def _set_gauges(self, report: DriftReport) -> None:
        m = self.metrics
        for feature, drift in report.features.items():
            for gauge, value in (
                (m.feature_psi, drift.psi),
                (m.feature_ks, drift.ks_statistic),
                (m.feature_ks_pvalue, drift.ks_pvalue),
            ):
                if np.isfinite(value):  # an empty column has no KS; leave the gauge unset
                    gauge.labels(feature).set(value)
        if report.score is not None:
            m.score_psi.set(report.score.psi)
        m.drift_window_rows.set(report.rows)


def retrain_decision(state: dict[str, Any] | None, minutes: float, now: float) -> tuple[bool, str]:
    """Returns (retrain?, why) for `churn retrain --if-drift` from the drift state (or None)."""
    if state is None:
        return False, "no drift report in Redis yet (is the scorer running with a champion?)"
    sustained = sustained_alerts(state, minutes, now)
    if sustained:
        listed = ", ".join(f"{name} {held:.1f} min" for name, held in sorted(sustained.items(), key=lambda kv: -kv[1]))
        return True, f"at alert level for at least {minutes:g} min: {listed}"
    alerting = sustained_alerts(state, 0, now)
    if alerting:
        name, held = max(alerting.items(), key=lambda kv: kv[1])
        return False, f"{len(alerting)} at alert level, the longest ({name}) for {held:.1f} min < {minutes:g} min"
    age = now - float(state.get("computed_at") or now)
    return False, f"nothing at alert level in the latest report ({age:.0f} s old, {state.get('rows')} rows)"
