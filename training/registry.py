"""MLflow, write side: one run per training, new registry versions, promotion gates.

The tracking store is `settings.tracking_uri` (SQLite in the state folder by default); with
it, the experiment's artifacts go to `settings.artifacts_dir`, never to ./mlruns. The model
artifact directory (model.txt + meta.json) is logged under the run's `model/` path and
registered as `settings.model_name`. A new version gets the alias `challenger`; it also gets
`champion` when it passes the gates (see `decide`). Loading the champion is
`models.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.errors import ServiceUnavailableError
from core.settings import Settings, mask_url
from models.artifact import ChurnModel
from models.registry import CHALLENGER, CHAMPION, PROMOTED_AT_TAG, registry_client
from training import metrics
from training.dataset import feature_matrix

EXPERIMENT = "churn"
ARTIFACT_PATH = "model"


@dataclass
class Decision:
    """Whether the new version becomes champion, and why (one reason per gate)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None
    champion_roc_auc: float | None = None


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
) -> tuple[str, str]:
    """Logs one training run (params, metrics, tags, the artifact directory under `model/`)
    and registers the artifact as a new version of `settings.model_name` with alias
    `challenger`. Returns (run_id, version).

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    try:
        client = registry_client(settings)
        run = client.create_run(_experiment_id(client, settings), tags=tags, run_name="train")
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        for key, value in run_metrics.items():
            if np.isfinite(value):
                client.log_metric(run_id, key, float(value))
        client.log_artifacts(run_id, str(artifact_dir), ARTIFACT_PATH)
        client.set_terminated(run_id)
        if not client.search_registered_models(filter_string=f"name = '{settings.model_name}'"):
            client.create_registered_model(settings.model_name)
        version = client.create_model_version(
            settings.model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id
        ).version
        client.set_registered_model_alias(settings.model_name, CHALLENGER, str(version))
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    return run_id, str(version)


def decide(
    settings: Settings,
    test_metrics: dict[str, Any],
    test_frame: pl.DataFrame,
    champion: tuple[ChurnModel, str] | None,
) -> Decision:
    """Returns the promotion decision for a model with `test_metrics` on `test_frame` (which
    carries `label` and the feature columns). Gates: ROC-AUC >= settings.gate_min_roc_auc,
    PR-AUC >= settings.gate_min_pr_auc, and ROC-AUC not below the champion's ROC-AUC on the
    same test rows minus settings.gate_auc_tolerance (skipped, with a reason, when there is no
    champion or it needs features the test set lacks)."""
    decision = Decision(promote=True)
    roc, pr = test_metrics["roc_auc"], test_metrics["pr_auc"]

    def gate(passed: bool, text: str) -> None:
        decision.reasons.append(("pass: " if passed else "fail: ") + text)
        decision.promote = decision.promote and passed

    gate(bool(roc >= settings.gate_min_roc_auc), f"test ROC-AUC {roc:.4f} vs floor {settings.gate_min_roc_auc:.4f}")
    gate(bool(pr >= settings.gate_min_pr_auc), f"test PR-AUC {pr:.4f} vs floor {settings.gate_min_pr_auc:.4f}")
    if champion is None:
        decision.reasons.append("pass: no current champion")
        return decision
    model, version = champion
    decision.champion_version = version
    missing = [name for name in model.features if name not in test_frame.columns]
    if missing:
        decision.reasons.append(f"skip: champion v{version} needs features the new test set lacks: {missing[:5]}")
        return decision
    labels = test_frame["label"].to_numpy().astype(bool)
    champion_roc = metrics.roc_auc(labels, model.predict(feature_matrix(test_frame, model.features)))
    decision.champion_roc_auc = champion_roc
    floor = champion_roc - settings.gate_auc_tolerance
    gate(
        bool(roc >= floor),
        f"test ROC-AUC {roc:.4f} vs champion v{version} {champion_roc:.4f} on the same rows"
        f" (tolerance {settings.gate_auc_tolerance})",
    )
    return decision


def apply_decision(settings: Settings, run_id: str, version: str, decision: Decision) -> None:
    """Records the decision as run tags and, if it promotes, moves the `champion` alias to `version`.

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    try:
        client = registry_client(settings)
        client.set_tag(run_id, "promotion.decision", "promoted" if decision.promote else "rejected")
        client.set_tag(run_id, "promotion.reasons", "; ".join(decision.reasons)[:5000])
        client.set_tag(run_id, "promotion.previous_champion", decision.champion_version or "")
        client.set_tag(run_id, "registry.version", version)
        if decision.promote:
            client.set_registered_model_alias(settings.model_name, CHAMPION, version)
            promoted_at = datetime.now(UTC).isoformat(timespec="seconds")
            client.set_model_version_tag(settings.model_name, version, PROMOTED_AT_TAG, promoted_at)
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc
