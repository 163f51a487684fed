"""The shared drift state: the latest daily snapshot's `DriftReport` as JSON in Redis
(`<redis_prefix>drift`), with how long each feature and the score (overall and per segment) have
been at alert level.

The scorer publishes it (`DriftPublisher`), the API serves it (`GET /monitoring/drift`) and
`churn retrain --if-drift` decides from it (`sustained_alerts`). `alert_since` (epoch seconds)
is carried over from the previous JSON, so a scorer restart does not reset the clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitoring.agreement import Agreement
from monitoring.drift import DriftReport, Thresholds
from monitoring.metrics import Metrics
from monitoring.performance_state import json_figures
from monitoring.prediction_log import SERVED, SHADOW

log = logging.getLogger(__name__)
SCORE = "score"  # the name the score goes by in `sustained_alerts`
# A snapshot's per-model drift figures ({role: {version, feature_psi_max, score_psi}}) and its
# shadow agreement ({rows, same_tier, spearman, mean_abs_delta} or None), kept under `models_key`.
MODELS, AGREEMENT = "models", "shadow_agreement"


def drift_key(prefix: str) -> str:
    """Returns the Redis key of the drift state for a key prefix (settings `redis_prefix`)."""
    return f"{prefix}drift"


def with_alert_history(report: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Returns `report` (DriftReport.to_dict) with `alert_since` on every feature and the score:
    the start of the current run of "alert" statuses (kept from `previous` when that was a
    report of the same model: a new model's drift is against its own reference and starts its
    own run), or None."""
    if previous is not None and previous.get("model") != report.get("model"):
        previous = None
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
    old_segments = (previous or {}).get("segments") or {}
    for segment, drift in (report.get("segments") or {}).items():
        old = old_segments.get(segment) or {}
        for name, entry in drift["features"].items():
            entry["alert_since"] = since(entry, (old.get("features") or {}).get(name) or {})
        if drift.get("score") is not None:
            drift["score"]["alert_since"] = since(drift["score"], old.get("score") or {})
    return report


def models_key(prefix: str) -> str:
    """Returns the Redis key of the per-model drift figures and shadow agreement of a snapshot
    (kept apart from the drift state, so amending them never rewrites a newer snapshot's state)."""
    return f"{prefix}drift:models"


def read_drift(client: Any, prefix: str) -> dict[str, Any] | None:
    """Returns the latest drift state, with the per-model figures and the shadow agreement of
    the same snapshot (`models`, `shadow_agreement`) when they were recorded, or None if no
    scorer has published one yet.

    Raises:
        redis.RedisError: Redis cannot be reached (callers map it to their own errors).
    """
    raw = client.get(drift_key(prefix))
    if raw is None:
        return None
    state: dict[str, Any] = json.loads(raw)
    extra = client.get(models_key(prefix))
    amended = {} if extra is None else json.loads(extra)
    if amended.get("as_of_ms") == state.get("as_of_ms"):
        state.update({key: amended[key] for key in (MODELS, AGREEMENT) if key in amended})
    return state


def sustained_alerts(state: dict[str, Any], minutes: float, now: float) -> dict[str, float]:
    """Returns {feature or "score" (or "<segment>/<feature>"): minutes at alert level} for those at
    alert for >= `minutes` as of `now` (epoch seconds)."""
    entries = {**(state.get("features") or {}), SCORE: state.get("score") or {}}
    for segment, drift in (state.get("segments") or {}).items():
        entries.update({f"{segment}/{name}": entry for name, entry in (drift.get("features") or {}).items()})
        entries[f"{segment}/{SCORE}"] = drift.get("score") or {}
    out: dict[str, float] = {}
    for name, entry in entries.items():
        since = entry.get("alert_since")
        if since is not None and now - since >= minutes * 60:
            out[name] = (now - since) / 60
    return out


@dataclass
class DriftPublisher:
    """Sets the drift gauges from a snapshot's `DriftReport` and writes the state to Redis
    (`client`, under `prefix`)."""

    thresholds: Thresholds
    metrics: Metrics
    client: Any
    prefix: str

    def __post_init__(self) -> None:
        # Exported so the alert rules compare against the configured levels, as the API's
        # statuses and `churn retrain --if-drift` do, not a number written into the rules.
        self.metrics.drift_psi_threshold.labels("warn").set(self.thresholds.warn)
        self.metrics.drift_psi_threshold.labels("alert").set(self.thresholds.alert)

    def publish(self, report: DriftReport, name: str = "", version: str = "") -> dict[str, Any] | None:
        """Publishes `report` (of model `name` v`version`); returns the state written, or None if
        Redis refused it. Never raises: monitoring must not stop scoring."""
        try:
            state = report.to_dict()
            self._set_gauges(state)
            state["model"] = {"name": name, "version": version}
            state["thresholds"] = {"warn": self.thresholds.warn, "alert": self.thresholds.alert}
            state = with_alert_history(state, read_drift(self.client, self.prefix))
            self.client.set(drift_key(self.prefix), json.dumps(state))
        except Exception:  # Redis down: log, keep scoring, the next snapshot tries again
            log.exception("could not publish the drift report")
            return None
        return state

    def publish_model(self, report: DriftReport, role: str, version: str) -> None:
        """Sets the per-model drift gauges (`churn_model_score_psi`, `churn_model_feature_psi_max`)
        of the model of `role` ("served": the champion, "shadow": the challenger) from its report
        against its own reference, and records them for the snapshot (`models_key`; `read_drift`
        shows them as `models`), which the gauges of other and restarted scorers follow. Never
        raises."""
        try:
            psi_max = max((d.psi for d in report.features.values()), default=float("nan"))
            score = report.score.psi if report.score is not None else float("nan")
            figures = {"version": version, **json_figures({"feature_psi_max": psi_max, "score_psi": score})}
            self._set_model_gauges(role, figures)
            self._amend(report.as_of_ms, lambda state: state.setdefault(MODELS, {}).update({role: figures}))
        except Exception:
            log.exception("could not publish the drift figures of model v%s", version)

    def publish_agreement(self, figures: Agreement | None, as_of_ms: int | None = None) -> None:
        """Sets the agreement gauges of the snapshot of `as_of_ms` (`monitoring.agreement`), or
        clears them and the shadow model's per-model gauges for a snapshot without a shadow
        model, and records them for the snapshot (`models_key`; `read_drift` shows them as
        `shadow_agreement`). Never raises."""
        recorded = None
        if figures is not None:
            recorded = {"rows": figures.rows, **json_figures(figures.figures())}
        try:
            self._set_agreement_gauges(recorded)
            self._amend(as_of_ms, lambda state: state.update({AGREEMENT: recorded}))
        except Exception:
            log.exception("could not publish the shadow agreement")

    def _amend(self, as_of_ms: int | None, change: Callable[[dict[str, Any]], None]) -> None:
        """Applies `change` to the per-model record of the snapshot of `as_of_ms` in Redis
        (`models_key`; a record of another snapshot is replaced). `read_drift` shows it with the
        drift state of the same snapshot only."""
        if as_of_ms is None:
            return
        raw = self.client.get(models_key(self.prefix))
        record = {} if raw is None else json.loads(raw)
        if record.get("as_of_ms") != as_of_ms:
            record = {"as_of_ms": as_of_ms}
        change(record)
        self.client.set(models_key(self.prefix), json.dumps(record))

    def _set_model_gauges(self, role: str, figures: dict[str, Any] | None) -> None:
        """Sets (or, with None, removes) the per-model drift gauges of `role`'s model."""
        m = self.metrics
        version = None if figures is None else figures["version"]
        for gauge, field in ((m.model_feature_psi_max, "feature_psi_max"), (m.model_score_psi, "score_psi")):
            value = None if figures is None else figures.get(field)
            m.set_model_figures(gauge, role, version, {"": float("nan") if value is None else value})

    def _set_agreement_gauges(self, recorded: dict[str, Any] | None) -> None:
        """Sets the shadow agreement gauges (None: no shadow model, so none, and no shadow
        per-model series)."""
        m = self.metrics
        m.shadow_agreement.clear()
        if recorded is None:
            m.shadow_snapshot_rows.set(0)
            for gauge in (m.model_score_psi, m.model_feature_psi_max, m.model_expected):
                m.set_model_figures(gauge, "shadow", None, {})
            return
        m.shadow_snapshot_rows.set(recorded["rows"])
        for name, value in recorded.items():
            if name != "rows" and value is not None:
                m.shadow_agreement.labels(name).set(value)

    def mirror(self) -> None:
        """Sets the drift gauges from the state in Redis (the latest snapshot any scorer took).
        Never raises.

        Why: one scorer takes each daily snapshot and the others skip it, so their gauges kept
        the last snapshot they took themselves, and a restarted scorer had none until the next
        midnight. The alert rules take the max over scorers: a stale high PSI kept an alert
        firing after the drift was gone, and a restart resolved a real one."""
        try:
            state = read_drift(self.client, self.prefix)
            if state is None:
                return
            self._set_gauges(state)
            if MODELS in state:  # a state written before the per-model figures were kept has none
                for role in (SERVED, SHADOW):
                    self._set_model_gauges(role, state[MODELS].get(role))
            if AGREEMENT in state:
                self._set_agreement_gauges(state[AGREEMENT])
        except Exception:  # Redis down: the gauges stay as they were until the next snapshot
            log.exception("could not read the drift state for the gauges")

    def _set_gauges(self, state: dict[str, Any]) -> None:
        """Sets the gauges from a drift state (`DriftReport.to_dict`: a figure it could not
        compute is None). Every labelled series is replaced, so a feature without a figure in
        this snapshot has none, rather than the value of an earlier day under a newer as-of."""
        m = self.metrics
        gauges = {"psi": m.feature_psi, "ks_statistic": m.feature_ks, "ks_pvalue": m.feature_ks_pvalue}
        for gauge in gauges.values():
            gauge.clear()
        for feature, drift in state["features"].items():
            for field, gauge in gauges.items():
                if drift.get(field) is not None:  # e.g. an empty column has no KS
                    gauge.labels(feature).set(drift[field])
        score = state.get("score") or {}
        m.score_psi.set(score["psi"] if score.get("psi") is not None else float("nan"))
        m.drift_window_rows.set(state["rows"])
        if state.get("as_of_ms") is not None:
            m.snapshot_as_of.set(state["as_of_ms"] / 1000)
        m.segment_feature_psi_max.clear()
        m.segment_score_psi.clear()
        for segment, part in (state.get("segments") or {}).items():
            if not part["judged"]:  # too few rows: its PSI is noise, so no gauge an alert could read
                continue
            psis = [d["psi"] for d in part["features"].values() if d.get("psi") is not None]
            m.segment_feature_psi_max.labels(segment).set(max(psis, default=0.0))
            if (part.get("score") or {}).get("psi") is not None:
                m.segment_score_psi.labels(segment).set(part["score"]["psi"])


def retrain_decision(
    state: dict[str, Any] | None, minutes: float, now: float, champion: str | None = None
) -> tuple[bool, str]:
    """Returns (retrain?, why) for `churn retrain --if-drift` from the drift state (or None). With
    `champion` (its version), a report of another model does not count: after a promotion the
    state describes the replaced model until the first daily snapshot the new one scores, and
    a retrain on it would retrain (and promote) again at every check until then."""
    if state is None:
        return False, "no drift report in Redis yet (is the scorer running with a champion?)"
    reported = (state.get("model") or {}).get("version")
    if champion is not None and reported != champion:
        return False, (
            f"the latest drift report is of v{reported}, not of the champion v{champion}: waiting for the"
            " champion's first daily snapshot"
        )
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
