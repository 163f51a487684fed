"""The offline retrain: event log -> data checks -> point-in-time training set -> model
selection and hyper-parameter search on time splits -> rolling-origin backtests -> final fit on
every labelled point -> artifact and model card -> MLflow run, registry version and promotion
decision."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.errors import InvalidInputError
from core.settings import Settings, mask_url
from core.timeutil import ms_to_iso
from events.log import load_events_with_positions
from features import spec
from features.offline import as_streamed
from models import registry as model_registry
from models.artifact import ChurnModel, save_artifact, tier_cuts
from models.calibration import apply as calibration_apply
from training import backtest, card, checks, dataset, evaluate, fit, reference, registry, search, split


@dataclass(frozen=True)
class TrainOptions:
    """What to train on: the horizon (None: settings.horizon_days), the observation grid (None:
    settings.train_grid_hours), the selection split's shares, the backtests and search (None:
    the `train_*` settings), the booster settings (the search's trial 0), and optionally an
    oracle: a function giving the true churn probability of each row (rows with user_id,
    as_of; the horizon in days), which a simulator can supply (`sim.oracle.oracle_for`) to
    report the model's ratio to it."""

    horizon_days: int | None = None
    grid_hours: int | None = None
    lookback_days: int = 28
    valid_share: float = 0.2
    test_share: float = 0.2
    backtest_days: int | None = None
    backtest_folds: int | None = None
    min_train_days: int = 7
    search_seconds: float | None = None
    search_trials: int | None = None
    bootstrap_samples: int | None = None
    fit: fit.FitConfig = field(default_factory=fit.FitConfig)
    oracle: Callable[[pl.DataFrame, int], np.ndarray] | None = None
    register: bool = True
    # False: a registered version the gates pass stays `challenger` (a staged rollout).
    promote: bool = True


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the model's figures and, when it was registered, its
    registry version and the promotion decision (None fields when not registered).
    `metrics` are the latest backtest fold's out-of-sample test figures; `backtest` the mean
    and 95% interval of each figure over the folds; `final` what the registered model saw."""

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
    metrics: dict[str, float]  # the latest fold's test metrics (numbers only)
    seconds: dict[str, float]  # checks, build, search, final_fit, fit, total
    backtest: dict[str, dict[str, float]] = field(default_factory=dict)
    folds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    search: list[dict[str, Any]] = field(default_factory=list)
    chosen_trial: int = 0
    selection: dict[str, float] = field(default_factory=dict)  # the chosen imbalance's validation figures
    data_report: dict[str, Any] = field(default_factory=dict)
    card: str = ""
    run_id: str | None = None
    version: str | None = None
    promoted: bool = False
    challenger: bool = False  # named `challenger` (not promoted: canary, shadow, `churn promote`)
    reasons: tuple[str, ...] = ()
    previous_champion: str | None = None
    previous_champion_roc_auc: float | None = None
    previous_champion_compared_as: str | None = None  # "served" or "refitted" (`registry.Decision`)

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
    events: pl.LazyFrame, options: TrainOptions, horizon_days: int, grid_hours: int = 24
) -> tuple[pl.DataFrame, dataset.DataWindow, split.TimeSplit]:
    """Returns (labelled rows with a `weight` column, data window, selection split) for the events.

    Raises:
        InvalidInputError: the log is empty, has no churner, or is too short for the horizon.
    """
    grid = dataset.GridConfig(horizon_days, options.grid_hours or grid_hours, options.lookback_days)
    frame, window = dataset.build(events, grid)
    labelled = dataset.with_weights(frame.filter(pl.col("label").is_not_null()))
    times = split.split_times(labelled["as_of"].to_numpy(), horizon_days, options.valid_share, options.test_share)
    return labelled, window, times


@dataclass(frozen=True)
class _Resolved:
    """TrainOptions with every None replaced by its setting."""

    horizon: int
    grid_hours: int
    backtest_days: int
    backtest_folds: int
    search_seconds: float
    search_trials: int
    bootstrap_samples: int


def _resolve(settings: Settings, options: TrainOptions) -> _Resolved:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return _Resolved(
        horizon=pick(options.horizon_days, settings.horizon_days),
        grid_hours=pick(options.grid_hours, settings.train_grid_hours),
        backtest_days=pick(options.backtest_days, settings.train_backtest_days),
        backtest_folds=pick(options.backtest_folds, settings.train_backtest_folds),
        search_seconds=pick(options.search_seconds, settings.train_search_seconds),
        search_trials=pick(options.search_trials, settings.train_search_trials),
        bootstrap_samples=pick(options.bootstrap_samples, settings.train_bootstrap_samples),
    )


def min_log_days(settings: Settings, options: TrainOptions | None = None) -> int:
    """Returns the fewest whole days an event log must span (from a UTC midnight to the end of
    its last day) for `train` to pass its split and backtest checks with these settings: each
    length is tried on the observation grid such a log gives (from the end of its first grid
    step to H days before its end), by the same `split` functions training calls.

    Raises:
        InvalidInputError: no log of up to ten years would do (settings that cannot train).
    """
    options = options or TrainOptions()
    resolved = _resolve(settings, options)
    step = resolved.grid_hours * spec.HOUR_MS
    for days in range(1, 3651):
        last_event_ms = days * spec.DAY_MS - 1
        times = np.arange(step, last_event_ms - resolved.horizon * spec.DAY_MS + 1, step, dtype=np.int64)
        try:
            split.split_times(times, resolved.horizon, options.valid_share, options.test_share)
            split.backtest_folds(
                times, resolved.horizon, resolved.backtest_days, options.min_train_days, resolved.backtest_folds
            )
        except InvalidInputError:
            continue
        return days
    msg = f"no event log of up to ten years can be trained on with a {resolved.horizon}-day horizon"
    raise InvalidInputError(msg)


def _size(frame: pl.DataFrame) -> dict[str, int]:
    positive = frame.filter(pl.col("label") == 1)
    return {"rows": frame.height, "positives": positive.height, "churners": positive["user_id"].n_unique()}


def train(
    settings: Settings,
    events_path: Path,
    options: TrainOptions | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Checks the log, selects and backtests a model, fits the final model on every labelled
    observation point, logs and (if `options.register`) registers it; returns what it did:
    backtest figures with intervals, the latest fold's test metrics, split sizes, data window,
    data report, search trials, timings, the local artifact directory and, when registered, the
    version, run id and promotion decision.

    Steps: data checks; observation points on the grid (weights: one per user-day); the
    selection split (train | H | valid | H | test) chooses imbalance and tree count for each
    search trial; every trial runs the rolling-origin backtests; the best trial's choice is
    refitted on every point whose label window ends within the log, and calibrated on the
    chosen trial's backtest scores (`backtest.calibrate`).

    Raises:
        InvalidInputError: the event log is unreadable, empty, has no churner (in a split), or is too short.
        ServiceUnavailableError: MLflow cannot be reached.
    """
    options = options or TrainOptions()
    resolved = _resolve(settings, options)
    horizon = resolved.horizon
    started = time.perf_counter()
    progress(f"reading events from {events_path}")
    logged = load_events_with_positions(events_path)
    # The events the scorer applies: features trained on must be those it computes.
    lateness_ms = settings.allowed_lateness_seconds * 1000
    events = as_streamed(logged, lateness_ms).collect().lazy()
    report = checks.check_events(events)
    late = logged.select(pl.len()).collect().item() - events.select(pl.len()).collect().item()
    checks.record_late(report, late, lateness_ms)
    for warning in report.warnings:
        progress(f"data warning: {warning}")
    checks_seconds = time.perf_counter() - started
    progress(f"building the training set (grid {resolved.grid_hours} h, horizon {horizon} d)")
    labelled, window, times = build_training_set(events, options, horizon, resolved.grid_hours)
    folds = split.backtest_folds(
        labelled["as_of"].to_numpy(), horizon, resolved.backtest_days, options.min_train_days, resolved.backtest_folds
    )
    build_seconds = time.perf_counter() - started - checks_seconds
    parts = {name: split.take(labelled, getattr(times, name)) for name in ("train", "valid", "test")}
    sizes = {name: _size(part) for name, part in parts.items()}
    for index, fold in enumerate(folds):
        sizes[f"backtest {index + 1}"] = _size(split.take(labelled, fold.test))
    for name, size in sizes.items():
        checks.record_churners(report, name, size["churners"], size["rows"])
    for name in ("train", "valid"):
        if sizes[name]["churners"] == 0:
            msg = f"the {name} split ({sizes[name]['rows']} rows) has no churner: nothing to select a model on"
            raise InvalidInputError(msg)
    progress(
        f"training set built in {build_seconds:.1f} s: "
        + ", ".join(
            f"{k} {v['rows']} rows ({v['positives'] / max(v['rows'], 1):.1%} positive) / {v['churners']} churners"
            for k, v in sizes.items()
        )
    )

    search_started = time.perf_counter()
    trials = search.search(
        labelled, times, folds, options.fit, resolved.search_trials, resolved.search_seconds, progress
    )
    choice = search.best(trials, resolved.bootstrap_samples, options.fit.seed)
    chosen = choice.trial
    search_seconds = time.perf_counter() - search_started
    if not chosen.folds:
        msg = "no backtest fold has a churner on both its training and test side: cannot estimate the model"
        raise InvalidInputError(msg)
    selection = chosen.selection
    progress(
        f"search: {len(trials)} trial(s) in {search_seconds:.1f} s;"
        f" chose trial {chosen.number} ({choice.reason}):"
        f" imbalance {selection.imbalance}, {selection.best_iteration} trees"
    )

    final_started = time.perf_counter()
    final_times = split.labelled_times(labelled["as_of"].to_numpy(), window.last_event_ms, horizon)
    final_rows = split.take(labelled, tuple(int(t) for t in final_times))
    final_params = fit.booster_params(chosen.config, spec.MODEL_FEATURES, selection.imbalance, final_rows.height)
    booster = fit.fit_rounds(
        dataset.feature_matrix(final_rows),
        final_rows["label"].to_numpy().astype(bool),
        final_rows["weight"].to_numpy(),
        final_params,
        selection.best_iteration,
    )
    final_seconds = time.perf_counter() - final_started
    final = {
        "rows": final_rows.height,
        "days": len(np.unique(final_times // spec.DAY_MS)),
        "users": final_rows["user_id"].n_unique(),
        "churners": _size(final_rows)["churners"],
    }
    progress(
        f"final fit in {final_seconds:.1f} s on {final['rows']} rows from {final['days']} days"
        f" ({ms_to_iso(int(final_times[0]))} .. {ms_to_iso(int(final_times[-1]))})"
    )

    # The selection split's calibration maps the early-stopped selection booster's scores (fitted
    # on the train split alone); the final model is fitted by the backtest folds' procedure
    # instead, so its calibration is fitted on their out-of-sample scores, and the folds'
    # figures use scores calibrated without their own fold.
    final_raw = np.asarray(booster.predict(dataset.feature_matrix(final_rows)))
    final_center = backtest.center(final_raw, final_rows["weight"].to_numpy())
    final_calibration, calibrated_folds = backtest.calibrate(chosen.folds, final_center)
    summary = backtest.summarize(calibrated_folds, resolved.bootstrap_samples, seed=options.fit.seed)
    latest = calibrated_folds[-1]
    oracle = options.oracle(latest.test, horizon) if options.oracle else None
    test_metrics = evaluate.evaluate(latest.labels, latest.scores, oracle)
    fold_details = [_fold_row(result) for result in calibrated_folds]
    meta: dict[str, Any] = {
        "model_name": settings.model_name,
        "features": list(spec.MODEL_FEATURES),
        "horizon_days": horizon,
        "spec_version": spec.spec_version(),
        "calibration": final_calibration,
        "best_iteration": selection.best_iteration,
        "refit": True,
        "imbalance": selection.imbalance,
        "params": final_params,
        # The backtest folds' out-of-sample scores, calibrated as the final model's are.
        "tiers": tier_cuts(
            calibration_apply(
                final_calibration, np.concatenate([backtest.aligned(r, final_center) for r in calibrated_folds])
            ),
            source="the backtest folds' scores",
        ),
        "final": final,
        "data_report": report.to_dict(),
        "search": {
            "trials": len(trials),
            "seconds": search_seconds,
            "chosen": chosen.describe(),
            "choice": {"reason": choice.reason, "paired": choice.paired},
            "all": [t.describe() for t in trials],
        },
    }
    meta["metrics"] = {
        "test": test_metrics,
        "backtest": summary,
        "folds": fold_details,
        "candidates": selection.candidates,
    }
    meta["data_window"] = {
        "first_event": ms_to_iso(window.first_event_ms),
        "last_event": ms_to_iso(window.last_event_ms),
        **{f"{name}_points": [ms_to_iso(a), ms_to_iso(b)] for name, (a, b) in times.bounds().items()},
        "final_points": [ms_to_iso(int(final_times[0])), ms_to_iso(int(final_times[-1]))],
        "grid_hours": resolved.grid_hours,
        "lookback_days": options.lookback_days,
        "sizes": sizes,
    }
    model = ChurnModel(booster, meta)
    latest_x = dataset.feature_matrix(latest.test)
    # The latest labelled period is the closest picture of production; scored by the final model.
    meta["reference"] = reference.references(
        latest_x, spec.MODEL_FEATURES, model.predict(latest_x), seed=options.fit.seed
    )
    meta["card"] = card.render(meta)

    artifact_dir = Path(tempfile.mkdtemp(prefix="churn-model-", dir=_scratch(settings)))
    save_artifact(artifact_dir, booster, meta)
    (artifact_dir / "card.md").write_text(meta["card"])
    (artifact_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    importance = dict(zip(spec.MODEL_FEATURES, booster.feature_importance("gain").tolist(), strict=True))
    evaluate.save_plots(artifact_dir / "plots", latest.labels, latest.scores, importance, oracle)
    trained = TrainResult(
        artifact_dir=artifact_dir,
        horizon_days=horizon,
        spec_version=meta["spec_version"],
        imbalance=selection.imbalance,
        calibration=final_calibration["method"],
        best_iteration=selection.best_iteration,
        refit=True,
        tiers=meta["tiers"],
        sizes=sizes,
        data_window=meta["data_window"],
        metrics={k: v for k, v in test_metrics.items() if k != "calibration_curve"},
        seconds={
            "checks": checks_seconds,
            "build": build_seconds,
            "search": search_seconds,
            "final_fit": final_seconds,
            "fit": search_seconds + final_seconds,
        },
        backtest=summary,
        folds=fold_details,
        final=final,
        search=meta["search"]["all"],
        chosen_trial=chosen.number,
        selection={k.removeprefix("valid_"): v for k, v in selection.candidates[selection.imbalance].items()},
        data_report=report.to_dict(),
        card=meta["card"],
    )
    if options.register:
        learned_until = registry.knew_outcomes_until_ms(
            {"data_window": trained.data_window, "horizon_days": trained.horizon_days}
        )
        # The final calibration on the fold booster's raw scores: what the champion's recorded
        # procedure (settings and calibration) gives when refitted on the same rows.
        gate_scores = calibration_apply(final_calibration, latest.raw)
        gate_rows = registry.GateRows(split.take(labelled, latest.train_times), latest.test, gate_scores, learned_until)
        trained = _register(settings, options, resolved, trained, gate_rows, progress)
    trained.seconds["total"] = time.perf_counter() - started
    return trained


def _register(
    settings: Settings,
    options: TrainOptions,
    resolved: _Resolved,
    trained: TrainResult,
    gate_rows: registry.GateRows,
    progress: Callable[[str], None],
) -> TrainResult:
    """Logs the run (the final model, its selection and backtest figures; one child run per
    search trial), registers the artifact and applies the gates; returns `trained` with the
    registry fields set."""
    progress(f"logging to MLflow at {mask_url(settings.tracking_uri)}")
    champion = model_registry.load_champion(settings)
    decision = registry.decide(
        settings, trained.backtest, gate_rows, champion, resolved.bootstrap_samples, options.fit.seed
    )
    chosen = trained.search[trained.chosen_trial]
    params = {
        "horizon_days": trained.horizon_days,
        "grid_hours": resolved.grid_hours,
        "lookback_days": options.lookback_days,
        "imbalance": trained.imbalance,
        "calibration": trained.calibration,
        "best_iteration": trained.best_iteration,
        "spec_version": trained.spec_version,
        "backtest.days": resolved.backtest_days,
        "backtest.folds": len(trained.folds),
        "search.trials": len(trained.search),
        "search.seconds_budget": resolved.search_seconds,
        **{f"fit.{k}": v for k, v in asdict(options.fit).items()},
        **{f"chosen.{k}": v for k, v in chosen["params"].items()},
        **{f"window.{k}": v for k, v in trained.data_window.items() if k != "sizes"},
    }
    run_metrics = {f"latest_fold_{k}": float(v) for k, v in trained.metrics.items() if isinstance(v, int | float)}
    for name, figure in trained.backtest.items():
        run_metrics.update({f"backtest_{name}_{k}": v for k, v in figure.items()})
    run_metrics.update({f"final_{k}": float(v) for k, v in trained.final.items()})
    run_metrics.update({f"selection_valid_{k}": v for k, v in trained.selection.items()})
    report = trained.data_report
    run_metrics.update(
        {
            "data_events": report["events"],
            "data_duplicated_events": report["duplicated_events"],
            "data_sessions_out_of_order": report["sessions_out_of_order"],
            "data_unknown_page_events": sum(report["unknown_pages"].values()),
            "data_users_active_after_cancellation": report["users_active_after_cancellation"],
            "data_late_events": report.get("late_events", 0),
            "data_warnings": len(report["warnings"]),
            **{f"data_null_rate_{k}": v for k, v in report["null_rates"].items()},
        }
    )
    run_metrics.update({f"{k}_seconds": v for k, v in trained.seconds.items()})
    tags = {"spec_version": trained.spec_version, "horizon_days": str(trained.horizon_days)}
    children = [
        (
            f"selection: search trial {t['number']}" + (" (chosen)" if t["number"] == trained.chosen_trial else ""),
            {**t["params"], "imbalance": t["imbalance"]},
            {k: float(t[k]) for k in ("backtest_roc_auc", "backtest_pr_auc", "best_iteration", "folds", "seconds")},
        )
        for t in trained.search
    ]
    run_id, version = registry.log_run(settings, trained.artifact_dir, params, run_metrics, tags, children)
    registry.apply_decision(settings, run_id, version, decision, hold=not options.promote)
    if decision.promote:
        done = "promoted to champion"
    elif decision.held:
        done = "held as challenger (--no-promote)"
    elif decision.challenger:
        done = "challenger, not promoted"
    else:
        done = "refused, not served (the challenger alias stays where it was)"
    progress(f"registered {settings.model_name} v{version}: {done}")
    return replace(
        trained,
        run_id=run_id,
        version=version,
        promoted=decision.promote,
        challenger=decision.challenger,
        reasons=tuple(decision.reasons),
        previous_champion=decision.champion_version,
        previous_champion_roc_auc=decision.champion_roc_auc,
        previous_champion_compared_as=decision.champion_compared_as,
    )


def _fold_row(result: backtest.FoldResult) -> dict[str, Any]:
    """Returns a fold's description with its times as ISO 8601 (for meta.json and the summary)."""
    row = result.describe()
    return {**row, **{k: ms_to_iso(row[k]) for k in ("train_first", "train_last", "test_first", "test_last")}}


def _scratch(settings: Settings) -> Path:
    path = settings.state_dir.resolve() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
