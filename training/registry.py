"""MLflow: one run per training, the model registry, promotion gates and champion loading.

The tracking store is `settings.tracking_uri` (SQLite in the state folder by default); with
it, the experiment's artifacts go to `settings.artifacts_dir`, never to ./mlruns. The model
artifact directory (model.txt + meta.json) is logged under the run's `model/` path and
registered as `settings.model_name`. A new version gets the alias `challenger`; it also gets
`champion` when it passes the gates (see `decide`). Serving loads model.txt + meta.json
through `load_champion`, never a pickle.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from churn.errors import ServiceUnavailableError
from churn.settings import Settings, mask_url
from training import metrics
from training.artifact import ChurnModel, load_artifact
from training.dataset import feature_matrix

EXPERIMENT = "churn"
ARTIFACT_PATH = "model"
CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED_AT_TAG = "promoted_at"  # model-version tag: when the version became champion (UTC ISO 8601)


@dataclass
class Decision:
    """Whether the new version becomes champion, and why (one reason per gate)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None
    champion_roc_auc: float | None = None


def _client(settings: Settings) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


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
    from mlflow.exceptions import MlflowException

    try:
        client = _client(settings)
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
    from mlflow.exceptions import MlflowException

    try:
        client = _client(settings)
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


def champion_version(settings: Settings) -> str | None:
    """Returns the version number the `champion` alias points at, or None if there is none.
    One registry lookup: cheap enough to poll for hot reload.

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(settings).get_model_version_by_alias(settings.model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc


def load_version(settings: Settings, version: str) -> ChurnModel:
    """Returns the model of registry `version`, downloaded once into the local cache
    (<state_dir>/model_cache/<registry hash>/<model_name>/<version>/).

    Raises:
        ServiceUnavailableError: the registry or artifact store cannot be reached.
        InvalidInputError: the downloaded files are not a model artifact.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    # Keyed by registry too: two registries sharing a state folder each number from 1.
    registry = hashlib.sha256(settings.tracking_uri.encode()).hexdigest()[:12]
    cache = settings.state_dir.resolve() / "model_cache" / registry / settings.model_name / version
    if not (cache / "meta.json").exists():
        try:
            source = _client(settings).get_model_version(settings.model_name, version).source
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Download beside the cache and rename: a reader never sees a half-written folder.
            staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{version}-"))
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=settings.tracking_uri
            )
            if cache.exists():
                shutil.rmtree(cache)
            Path(local).rename(cache)
            shutil.rmtree(staging, ignore_errors=True)
        except MlflowException as exc:
            msg = f"MLflow at {mask_url(settings.tracking_uri)}: cannot fetch {settings.model_name} v{version}: {exc}"
            raise ServiceUnavailableError(msg) from exc
    return load_artifact(cache)


def load_champion(settings: Settings) -> tuple[ChurnModel, str] | None:
    """Returns (model, version) of the current `champion`, or None if no version is champion.

    Raises:
        ServiceUnavailableError: the registry or artifact store cannot be reached.
        InvalidInputError: the champion's files are not a model artifact.
    """
    from mlflow.exceptions import MlflowException

    version = champion_version(settings)
    if version is None:
        return None
    model = load_version(settings, version)
    try:
        tags = _client(settings).get_model_version(settings.model_name, version).tags
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: cannot read {settings.model_name} v{version}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    # The artifact is written before the decision; the promotion time lives on the version.
    model.meta["promoted_at"] = tags.get(PROMOTED_AT_TAG)
    return model, version
