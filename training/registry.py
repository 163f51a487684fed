"""MLflow, write side: one run per training, new registry versions, promotion gates.

The tracking store is `settings.tracking_uri` (SQLite in the state folder by default); with
it, the experiment's artifacts go to `settings.artifacts_dir`, never to ./mlruns. The model
artifact directory (model.txt + meta.json) is logged under the run's `model/` path and
registered as `settings.model_name`. A new version gets the alias `challenger`; it also gets
`champion` when it passes the gates (see `decide`). Loading the champion is
`models.registry`.

Every move of `champion` (`move_champion`) records the version it replaced as the new
champion's `previous_champion` tag (a promotion) and points the alias `previous-champion` at
the champion's recorded predecessor, the version `churn rollback` restores. Every step is also
recorded (`record_step`): a line in the local audit log and an `audit.<action>` tag on each
version it concerns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.errors import InvalidInputError, ServiceUnavailableError
from core.settings import Settings, mask_url
from core.timeutil import ms_to_iso, parse_utc, to_ms
from features.spec import DAY_MS
from models import audit
from models.artifact import ChurnModel
from models.registry import CHALLENGER, CHAMPION, PROMOTED_AT_TAG, champion_version, registry_client
from training import backtest, fit, metrics
from training.dataset import feature_matrix

EXPERIMENT = "churn"
ARTIFACT_PATH = "model"
PREVIOUS_CHAMPION = "previous-champion"  # alias: the version `churn rollback` would restore
PREVIOUS_CHAMPION_TAG = "previous_champion"  # model-version tag: the champion this version replaced


@dataclass
class Decision:
    """Whether the new version becomes champion, and why (one reason per gate)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None
    champion_roc_auc: float | None = None
    # How the champion's side was scored: "served" (its registered model) or "refitted" (its
    # recorded settings fitted on the gate's training rows), so `champion_roc_auc` reads right.
    champion_compared_as: str | None = None
    paired: dict[str, float] | None = None  # the paired bootstrap of the ROC-AUC difference
    # The gates passed but the training was told not to promote (`churn train --no-promote`).
    held: bool = False
    # The version was named `challenger` (set by `apply_decision`): served to the canary slice
    # and in shadow, and what `churn promote` judges next.
    challenger: bool = False


def _experiment_id(client: Any, settings: Settings) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return str(found.experiment_id)
    # With a local store, artifacts go to the state folder; a tracking server decides its own.
    local = settings.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in settings.tracking_uri
    location = settings.artifacts_dir.as_uri() if local else None
    if local:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    return str(client.create_experiment(EXPERIMENT, artifact_location=location))


def log_run(
    settings: Settings,
    artifact_dir: Path,
    params: dict[str, Any],
    run_metrics: dict[str, float],
    tags: dict[str, str],
    children: list[tuple[str, dict[str, Any], dict[str, float]]] = (),  # type: ignore[assignment]
) -> tuple[str, str]:
    """Logs one training run (params, metrics, tags, the artifact directory under `model/`)
    with `children` as nested runs (name, params, metrics; e.g. the search trials), and
    registers the artifact as a new version of `settings.model_name`, with no alias yet
    (`apply_decision` names it `challenger` unless the gates refused it). Returns (run_id, version).

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    try:
        client = registry_client(settings)
        # The run holds the registered model: the final fit (selection and search are its children).
        run = client.create_run(_experiment_id(client, settings), tags=tags, run_name="train: final fit")
        run_id = run.info.run_id
        _log_values(client, run_id, params, run_metrics)
        client.log_artifacts(run_id, str(artifact_dir), ARTIFACT_PATH)
        client.set_terminated(run_id)
        for name, child_params, child_metrics in children:
            child = client.create_run(
                run.info.experiment_id, tags={**tags, "mlflow.parentRunId": run_id}, run_name=name
            ).info.run_id
            _log_values(client, child, child_params, child_metrics)
            client.set_terminated(child)
        if not client.search_registered_models(filter_string=f"name = '{settings.model_name}'"):
            client.create_registered_model(settings.model_name)
        version = client.create_model_version(
            settings.model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id
        ).version
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    return run_id, str(version)


def _log_values(client: Any, run_id: str, params: dict[str, Any], run_metrics: dict[str, float]) -> None:
    """Logs params (as text, cut to MLflow's limit) and the finite metrics of one run in one batch."""
    from mlflow.entities import Metric, Param  # heavy: imported on first use

    stamp = int(datetime.now(UTC).timestamp() * 1000)
    metric_list = [Metric(k, float(v), stamp, 0) for k, v in run_metrics.items() if np.isfinite(v)]
    param_list = [Param(k, str(v)[:6000]) for k, v in params.items()]
    # MLflow takes at most 100 params and 1,000 metrics per batch.
    for start in range(0, max(len(metric_list), len(param_list), 1), 100):
        client.log_batch(run_id, metrics=metric_list[start : start + 100], params=param_list[start : start + 100])


@dataclass(frozen=True)
class GateRows:
    """What the champion/challenger gate compares on: the latest backtest fold's test rows
    (user_id, as_of, label and the feature columns), the challenger's out-of-sample scores on
    them (the fold's booster) and the fold's training rows (every labelled point at least H
    before the test rows, with their `weight`), on which the champion's settings are refitted
    when the champion itself learned from the test period (see `decide`)."""

    train: pl.DataFrame
    test: pl.DataFrame
    scores: np.ndarray
    # The end of the latest label window the challenger's final model learned from (see
    # `knew_outcomes_until_ms`); None when unknown.
    knew_outcomes_until_ms: int | None = None


def champion_last_point_ms(meta: dict[str, Any]) -> int | None:
    """Returns the latest observation time (epoch ms) a model was fitted on, from its meta
    `data_window` (`final_points` end; for models from before the final fit, `valid_points` end,
    as they were refit on train + validation), or None when the window does not say."""
    window = meta.get("data_window") or {}
    for key in ("final_points", "valid_points"):
        span = window.get(key)
        if isinstance(span, list | tuple) and len(span) == 2:
            try:
                return to_ms(parse_utc(str(span[1]), key))
            except InvalidInputError:
                return None
    return None


def knew_outcomes_until_ms(meta: dict[str, Any]) -> int | None:
    """Returns the end (epoch ms) of the latest label window a model was fitted on: its last
    observation point + its horizon. Rows observed at or after it are new to the model: it knew
    neither them nor any outcome in their label windows. None when its meta does not say."""
    last = champion_last_point_ms(meta)
    horizon = meta.get("horizon_days")
    if last is None or not isinstance(horizon, int | float):
        return None
    return last + int(horizon) * DAY_MS


def recorded_settings(meta: dict[str, Any]) -> tuple[fit.FitConfig, str, int, dict[str, Any]] | None:
    """Returns how a model was fitted, from its meta: (booster settings, imbalance, tree count,
    calibration), to fit the same procedure on other rows; None when its meta lacks any of them
    (a model registered by other means than `churn train`). The leaf size is the search's
    setting before `fit.booster_params` capped it for the final fit's rows (capped again for
    the rows it is fitted on); without it, the final fit's."""
    params = meta.get("params") or {}
    chosen = ((meta.get("search") or {}).get("chosen") or {}).get("params") or {}
    try:
        config = fit.FitConfig(
            seed=int(params["seed"]),
            learning_rate=float(params["learning_rate"]),
            num_leaves=int(params["num_leaves"]),
            min_data_in_leaf=int(chosen.get("min_data_in_leaf", params["min_data_in_leaf"])),
            feature_fraction=float(params["feature_fraction"]),
        )
        return config, str(meta["imbalance"]), int(meta["best_iteration"]), dict(meta["calibration"])
    except (KeyError, TypeError, ValueError):
        return None


def backtest_gates(settings: Settings, backtest_summary: dict[str, Any]) -> list[str]:
    """Returns the verdicts ("pass: ...", "fail: ..." or "skip: ...") of the gates on a model's
    own backtest figures (`backtest.summarize`: {metric: {mean, low, high}}): the ROC-AUC and
    PR-AUC floors (a missing figure fails), and the Brier score at most
    `gate_brier_tolerance` (relative) above that of a constant forecast of each fold's training
    churn rate (skipped for a summary without that reference: trained before it was recorded).
    `churn train` (`decide`) and `churn promote` with no champion apply the same gates."""
    verdicts = []
    for metric, label, floor in (
        ("roc_auc", "ROC-AUC", settings.gate_min_roc_auc),
        ("pr_auc", "PR-AUC", settings.gate_min_pr_auc),
    ):
        figure = backtest_summary.get(metric) or {}
        if figure.get("mean") is None:
            verdicts.append(f"fail: no backtest {label} recorded")
            continue
        mean, passed = float(figure["mean"]), float(figure["mean"]) >= floor
        interval = f" [{figure['low']:.4f}, {figure['high']:.4f}]" if figure.get("low") is not None else ""
        verdicts.append(f"{'pass' if passed else 'fail'}: backtest {label} {mean:.4f}{interval} vs floor {floor:.4f}")
    brier = (backtest_summary.get("brier") or {}).get("mean")
    no_skill = (backtest_summary.get(backtest.NO_SKILL) or {}).get("mean")
    if brier is None or no_skill is None or not np.isfinite(no_skill):
        verdicts.append("skip: no backtest Brier of a constant forecast recorded (the calibration gate)")
        return verdicts
    ceiling = no_skill * (1 + settings.gate_brier_tolerance)
    verdicts.append(
        f"{'pass' if brier <= ceiling else 'fail'}: backtest Brier {brier:.4f} vs {ceiling:.4f} (a constant"
        f" forecast of the training churn rate scores {no_skill:.4f}, tolerance {settings.gate_brier_tolerance:.0%})"
    )
    return verdicts


def decide(
    settings: Settings,
    backtest_summary: dict[str, Any],
    gate_rows: GateRows,
    champion: tuple[ChurnModel, str] | None,
    samples: int = 200,
    seed: int = 0,
) -> Decision:
    """Returns the promotion decision for a challenger. Gates: backtest mean ROC-AUC >=
    settings.gate_min_roc_auc and PR-AUC >= settings.gate_min_pr_auc (`backtest_summary` as
    `backtest.summarize` gives it), and, against the champion, a paired bootstrap of the
    ROC-AUC difference on the same test rows of `gate_rows` (users resampled, `samples`
    replicates): the challenger is refused when it is significantly worse, i.e. the one-sided
    95% upper bound of challenger - champion is below -settings.gate_auc_tolerance. Its
    backtest mean Brier must not exceed that of a constant forecast of each fold's training
    churn rate by more than settings.gate_brier_tolerance (relative): probabilities far off the
    base rate are refused whatever their ranking.

    The challenger is scored out of sample, and the champion, wherever it can be, too:
    - when every test row is new to the champion (observed at or after the end of its latest
      label window, `knew_outcomes_until_ms`: a retrain about H + the test block's days
      after the champion's), the champion as served: is the retrained model at least as good
      as the one it replaces;
    - otherwise (a daily, weekly or fortnightly retrain, or one on the same log) the champion
      learned the outcomes of those rows' users, and would win on memory. Its recorded settings
      (`recorded_settings`) are fitted on the fold's training rows instead, and both procedures
      are compared out of sample on the same information;
    - a champion whose training end or settings are not recorded (registered by other means
      than `churn train`) is compared as served, which can only favour it.
    A challenger whose final model learned outcomes only up to more than a day before the
    champion's (`gate_rows.knew_outcomes_until_ms`: trained on an older log) is refused.
    `champion_roc_auc` is that of the champion's side as compared. Skipped, with a reason, when
    there is no champion or it needs features the rows lack."""
    decision = Decision(promote=True)

    def gate(passed: bool, text: str) -> None:
        decision.reasons.append(("pass: " if passed else "fail: ") + text)
        decision.promote = decision.promote and passed

    for verdict in backtest_gates(settings, backtest_summary):
        decision.reasons.append(verdict)
        decision.promote = decision.promote and not verdict.startswith("fail")
    if champion is None:
        decision.reasons.append("pass: no current champion")
        return decision
    model, version = champion
    decision.champion_version = version
    test = gate_rows.test
    missing = [name for name in model.features if name not in test.columns]
    if missing:
        decision.reasons.append(f"skip: champion v{version} needs features the new rows lack: {missing[:5]}")
        return decision
    features = tuple(model.features)
    known_until = knew_outcomes_until_ms(model.meta)
    recorded = recorded_settings(model.meta)
    learned_until = gate_rows.knew_outcomes_until_ms
    if learned_until is not None and known_until is not None and learned_until < known_until - DAY_MS:
        # The comparisons below judge procedures on the same rows; a challenger from an older
        # log would pass with an equal procedure and replace a model that knows later outcomes.
        # A day's slack: on the same log, observation grids of 1-24 hours end up to a day apart.
        gate(
            False,
            f"challenger learned outcomes up to {_iso(learned_until)}, champion v{version} up to"
            f" {_iso(known_until)}: its log is older; train on the current log",
        )
    if known_until is not None and known_until <= int(test["as_of"].min()):  # type: ignore[arg-type]
        champion_scores = model.predict(feature_matrix(test, model.features))
        decision.champion_compared_as = "served"
        how = f"champion v{version} as served; rows new to both"
    elif recorded is None:
        champion_scores = model.predict(feature_matrix(test, model.features))
        decision.champion_compared_as = "served"
        how = (
            f"champion v{version} as served: it records no settings to refit, and its labels may reach into"
            f" the rows (to {_iso(known_until)}), which can only favour it"
        )
    else:
        config, imbalance, rounds, calibration = recorded
        champion_scores = backtest.fit_and_score(
            gate_rows.train, test, config, imbalance, rounds, calibration, features
        )
        decision.champion_compared_as = "refitted"
        how = f"champion v{version}'s settings refitted on the same {gate_rows.train.height} earlier rows"
    labels = test["label"].to_numpy().astype(bool)
    paired = backtest.paired_auc_difference(
        labels, gate_rows.scores, champion_scores, test["user_id"].to_numpy(), samples, seed
    )
    decision.champion_roc_auc = metrics.roc_auc(labels, champion_scores)
    decision.paired = paired
    tolerance = settings.gate_auc_tolerance
    gate(
        bool(paired["high"] >= -tolerance),
        f"ROC-AUC challenger - champion v{version} on the same {test.height} rows, out of sample ({how}):"
        f" {paired['difference']:+.4f}, 95% upper bound {paired['high']:+.4f} vs -{tolerance}",
    )
    return decision


def _iso(ms: int | None) -> str:
    return ms_to_iso(ms) if ms is not None else "an unrecorded time"


def apply_decision(settings: Settings, run_id: str, version: str, decision: Decision, *, hold: bool = False) -> None:
    """Records the decision as run tags and in the audit log (action `promote`, trigger `train`),
    names `version` `challenger` unless the gates refuse it while there is a champion (the
    alias then stays where it was), and, if it promotes, moves the `champion` alias to `version`
    (`move_champion`). A promotion
    is refused instead when the champion is no longer the one the decision judged against
    (`decision.champion_version`): another run promoted meanwhile, and this model was never
    compared with it (`churn promote` judges it again). With `hold`, a version the gates would
    promote stays `challenger` (outcome `held`: a staged rollout, where `churn promote` moves it
    after its shadow or canary period). `decision` is updated to what was done (`promote` False
    and the reason, then; `held` True when held; `challenger` True when named so).

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached or the audit log written.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    champion_moved = False
    if decision.promote:
        current = champion_version(settings)
        if current != decision.champion_version:
            champion_moved = True
            judged = f"v{decision.champion_version}" if decision.champion_version else "no champion"
            now = f"became v{current}" if current else "alias was removed"
            decision.promote = False
            decision.reasons.append(
                f"refused: the champion {now} while this model was judged against {judged};"
                " judge it again with `churn promote`"
            )
    if decision.promote and hold:
        decision.promote, decision.held = False, True
        alone = "" if decision.champion_version else " (there is no champion: nothing is served until `churn promote`)"
        decision.reasons.append(f"held: trained with --no-promote; `churn promote` decides{alone}")
    outcome = "accepted" if decision.promote else ("held" if decision.held else "refused")
    try:
        client = registry_client(settings)
        client.set_tag(
            run_id, "promotion.decision", {"accepted": "promoted", "refused": "rejected"}.get(outcome, outcome)
        )
        client.set_tag(run_id, "promotion.reasons", "; ".join(decision.reasons)[:5000])
        client.set_tag(run_id, "promotion.previous_champion", decision.champion_version or "")
        client.set_tag(run_id, "registry.version", version)
        # With a champion, a version the gates refused is never `challenger`: scorers and APIs
        # serve the challenger to the canary slice and score it in shadow, and `churn promote`
        # judges it on that shadow evidence alone. With none, nothing is served, and `churn
        # promote` judges a refused first model against the floors again (say, after they were
        # lowered). One the gates passed but whose champion moved meanwhile is a challenger
        # (its refusal says `churn promote` judges it again: that needs the alias).
        if outcome != "refused" or champion_moved or champion_version(settings) is None:
            client.set_registered_model_alias(settings.model_name, CHALLENGER, version)
            decision.challenger = True
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    if decision.promote:
        move_champion(settings, version, replaced=decision.champion_version)
    entry = {
        "action": "promote",
        "trigger": "train",
        "outcome": outcome,
        "actor": audit.who(settings.actor),
        "reason": "; ".join(decision.reasons),
        "from_version": decision.champion_version,
        "to_version": version,
        "figures": {
            "champion_roc_auc": decision.champion_roc_auc,
            "champion_compared_as": decision.champion_compared_as,
            **(decision.paired or {}),
        },
    }
    record_step(settings, entry, [version])


def move_champion(settings: Settings, version: str, replaced: str | None) -> None:
    """Points `champion` at `version` and stamps its `promoted_at`. With `replaced` (a promotion:
    the champion it replaces), records it as the version's `previous_champion` tag; without it (a
    rollback), the version keeps the predecessor it recorded when it was promoted. Then points the
    `previous-champion` alias at that predecessor (removed when there is none).

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    name = settings.model_name
    try:
        client = registry_client(settings)
        if replaced is not None and replaced != version:
            client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, replaced)
        client.set_registered_model_alias(name, CHAMPION, version)
        promoted_at = datetime.now(UTC).isoformat(timespec="seconds")
        client.set_model_version_tag(name, version, PROMOTED_AT_TAG, promoted_at)
        previous = client.get_model_version(name, version).tags.get(PREVIOUS_CHAMPION_TAG)
        if previous:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
        elif PREVIOUS_CHAMPION in (client.get_registered_model(name).aliases or {}):
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc


def record_step(settings: Settings, entry: dict[str, Any], versions: list[str]) -> dict[str, Any]:
    """Appends `entry` to the audit log (`settings.audit_log_path`) and tags each of `versions`
    with it (`audit.<action>`: the entry as JSON, the latest step of that kind); returns the entry
    as written.

    Raises:
        ServiceUnavailableError: the audit log cannot be written or the tracking store reached.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    try:
        written = audit.append(settings.audit_log_path, entry)
    except OSError as exc:
        msg = f"cannot write the audit log {settings.audit_log_path}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    try:
        client = registry_client(settings)
        text = json.dumps(written, default=str)[:5000]
        for version in sorted({v for v in versions if v}):
            client.set_model_version_tag(settings.model_name, version, f"audit.{entry['action']}", text)
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc} (the audit log has the step)"
        raise ServiceUnavailableError(msg) from exc
    return written
