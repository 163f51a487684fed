"""The offline retrain: event log -> point-in-time training set -> LightGBM -> evaluation ->
artifact -> MLflow run, registry version and promotion decision."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.settings import Settings, mask_url
from core.timeutil import ms_to_iso
from events.log import load_events
from features import spec
from models import registry as model_registry
from models.artifact import ChurnModel, save_artifact, tier_cuts
from training import dataset, evaluate, fit, reference, registry, split


@dataclass(frozen=True)
class TrainOptions:
    """What to train on: the horizon (None: settings.horizon_days), the observation grid, the
    split shares, the booster settings, and optionally an oracle: a function giving the true
    churn probability of each test row (rows with user_id, as_of; the horizon in days), which
    a simulator can supply (`sim.oracle.oracle_for`) to report the model's ratio to it."""

    horizon_days: int | None = None
    grid_hours: int = 24
    lookback_days: int = 28
    valid_share: float = 0.2
    test_share: float = 0.2
    fit: fit.FitConfig = field(default_factory=fit.FitConfig)
    oracle: Callable[[pl.DataFrame, int], np.ndarray] | None = None
    register: bool = True


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the model's figures and, when it was registered, its
    registry version and the promotion decision (None fields when not registered)."""

    artifact_dir: Path
    horizon_days: int
    spec_version: str
    imbalance: str
    calibration: str
    best_iteration: int
    refit: bool
    tiers: dict[str, Any]
    sizes: dict[str, dict[str, int]]
    data_window: dict[str, Any]
    metrics: dict[str, float]  # test metrics (numbers only)
    seconds: dict[str, float]  # build, fit, total
    run_id: str | None = None
    version: str | None = None
    promoted: bool = False
    reasons: tuple[str, ...] = ()
    previous_champion: str | None = None
    previous_champion_roc_auc: float | None = None

    @property
    def registered(self) -> bool:
        """Returns True when the model was logged to MLflow and registered."""
        return self.version is not None

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as plain JSON-ready values (`churn train --json`)."""
        out = asdict(self)
        out["artifact_dir"] = str(self.artifact_dir)
        out["reasons"] = list(self.reasons)
        return out


def build_training_set(
    events: pl.LazyFrame, options: TrainOptions, horizon_days: int
) -> tuple[pl.DataFrame, dataset.DataWindow, split.TimeSplit]:
    """Returns (labelled rows, data window, time split) for the events.

    Raises:
        InvalidInputError: the log is empty, has no churner, or is too short for the horizon.
    """
    grid = dataset.GridConfig(horizon_days, options.grid_hours, options.lookback_days)
    frame, window = dataset.build(events, grid)
    labelled = frame.filter(pl.col("label").is_not_null())
    times = split.split_times(labelled["as_of"].to_numpy(), horizon_days, options.valid_share, options.test_share)
    return labelled, window, times


def train(
    settings: Settings,
    events_path: Path,
    options: TrainOptions | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Trains, evaluates, logs and (if `options.register`) registers a model; returns what it
    did: test metrics, split sizes, data window, timings, the local artifact directory and,
    when registered, the version, run id and promotion decision.

    Raises:
        InvalidInputError: the event log is unreadable, empty, has no churner, or is too short.
        ServiceUnavailableError: MLflow cannot be reached.
    """
    options = options or TrainOptions()
    horizon = options.horizon_days or settings.horizon_days
    started = time.perf_counter()
    progress(f"reading events from {events_path}")
    events = load_events(events_path)
    progress(f"building the training set (grid {options.grid_hours} h, horizon {horizon} d)")
    labelled, window, times = build_training_set(events, options, horizon)
    build_seconds = time.perf_counter() - started
    parts = {name: split.take(labelled, getattr(times, name)) for name in ("train", "valid", "test")}
    sizes = {name: {"rows": part.height, "positives": int(part["label"].sum())} for name, part in parts.items()}
    progress(
        f"training set built in {build_seconds:.1f} s: "
        + ", ".join(f"{k} {v['rows']} rows / {v['positives']} churners" for k, v in sizes.items())
    )

    x = {name: dataset.feature_matrix(part) for name, part in parts.items()}
    y = {name: part["label"].to_numpy().astype(bool) for name, part in parts.items()}
    fit_started = time.perf_counter()
    fitted = fit.fit(x["train"], y["train"], x["valid"], y["valid"], parts["valid"]["user_id"].to_numpy(), options.fit)
    fit_seconds = time.perf_counter() - fit_started
    progress(
        f"trained in {fit_seconds:.1f} s: imbalance {fitted.imbalance}, {fitted.best_iteration} trees"
        f"{' (refit on train + valid)' if fitted.refit else ''}, calibration {fitted.calibration['method']}"
    )

    meta: dict[str, Any] = {
        "model_name": settings.model_name,
        "features": list(spec.MODEL_FEATURES),
        "horizon_days": horizon,
        "spec_version": spec.spec_version(),
        "calibration": fitted.calibration,
        "best_iteration": fitted.best_iteration,
        "refit": fitted.refit,
        "imbalance": fitted.imbalance,
        "params": fitted.params,
        "tiers": {"high": 1.0, "medium": 1.0},
    }
    model = ChurnModel(fitted.booster, meta)
    # Out-of-sample validation scores (a refit booster has seen the validation rows).
    meta["tiers"] = tier_cuts(fitted.valid_scores)
    test_scores = model.predict(x["test"])
    oracle = options.oracle(parts["test"], horizon) if options.oracle else None
    test_metrics = evaluate.evaluate(y["test"], test_scores, oracle)
    meta["metrics"] = {"test": test_metrics, "candidates": fitted.candidates}
    meta["data_window"] = {
        "first_event": ms_to_iso(window.first_event_ms),
        "last_event": ms_to_iso(window.last_event_ms),
        **{f"{name}_points": [ms_to_iso(a), ms_to_iso(b)] for name, (a, b) in times.bounds().items()},
        "grid_hours": options.grid_hours,
        "lookback_days": options.lookback_days,
        "sizes": sizes,
    }
    # The test period is the latest out-of-sample data: the closest picture of production.
    meta["reference"] = reference.references(x["test"], spec.MODEL_FEATURES, test_scores, seed=options.fit.seed)

    artifact_dir = Path(tempfile.mkdtemp(prefix="churn-model-", dir=_scratch(settings)))
    save_artifact(artifact_dir, fitted.booster, meta)
    importance = dict(zip(spec.MODEL_FEATURES, fitted.booster.feature_importance("gain").tolist(), strict=True))
    evaluate.save_plots(artifact_dir / "plots", y["test"], test_scores, importance, oracle)
    trained = TrainResult(
        artifact_dir=artifact_dir,
        horizon_days=horizon,
        spec_version=meta["spec_version"],
        imbalance=fitted.imbalance,
        calibration=fitted.calibration["method"],
        best_iteration=fitted.best_iteration,
        refit=fitted.refit,
        tiers=meta["tiers"],
        sizes=sizes,
        data_window=meta["data_window"],
        metrics={k: v for k, v in test_metrics.items() if k != "calibration_curve"},
        seconds={"build": build_seconds, "fit": fit_seconds},
    )
    if options.register:
        trained = _register(settings, options, trained, parts["test"], test_metrics, progress)
    trained.seconds["total"] = time.perf_counter() - started
    return trained


def _register(
    settings: Settings,
    options: TrainOptions,
    trained: TrainResult,
    test_frame: pl.DataFrame,
    test_metrics: dict[str, Any],
    progress: Callable[[str], None],
) -> TrainResult:
    """Logs the run, registers the artifact and applies the gates; returns `trained` with the
    registry fields set."""
    progress(f"logging to MLflow at {mask_url(settings.tracking_uri)}")
    champion = model_registry.load_champion(settings)
    decision = registry.decide(settings, test_metrics, test_frame, champion)
    params = {
        "horizon_days": trained.horizon_days,
        "grid_hours": options.grid_hours,
        "lookback_days": options.lookback_days,
        "imbalance": trained.imbalance,
        "calibration": trained.calibration,
        "best_iteration": trained.best_iteration,
        "spec_version": trained.spec_version,
        **{f"fit.{k}": v for k, v in asdict(options.fit).items()},
        **{f"window.{k}": v for k, v in trained.data_window.items() if k != "sizes"},
    }
    run_metrics = {f"test_{k}": float(v) for k, v in trained.metrics.items() if isinstance(v, int | float)}
    run_metrics.update({f"{k}_seconds": v for k, v in trained.seconds.items()})
    tags = {"spec_version": trained.spec_version, "horizon_days": str(trained.horizon_days)}
    run_id, version = registry.log_run(settings, trained.artifact_dir, params, run_metrics, tags)
    registry.apply_decision(settings, run_id, version, decision)
    progress(
        f"registered {settings.model_name} v{version}: "
        + ("promoted to champion" if decision.promote else "challenger only, not promoted")
    )
    return replace(
        trained,
        run_id=run_id,
        version=version,
        promoted=decision.promote,
        reasons=tuple(decision.reasons),
        previous_champion=decision.champion_version,
        previous_champion_roc_auc=decision.champion_roc_auc,
    )


def _scratch(settings: Settings) -> Path:
    path = settings.state_dir.resolve() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
