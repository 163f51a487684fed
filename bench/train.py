"""Training benchmarks: the seconds of each training step on simulated events, and the
before/after comparison of the training procedure on the simulator."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.errors import InvalidInputError
from core.settings import Settings
from core.timeutil import to_ms
from events.log import load_events, load_events_with_positions, write_partitioned
from features import offline, spec
from models.artifact import ChurnModel, load_artifact
from models.calibration import apply as apply_calibration
from sim.ground_truth import save_truth
from sim.oracle import oracle_for
from sim.simulator import SimConfig, simulate
from training import backtest, dataset, fit, metrics, split
from training.pipeline import TrainOptions, build_training_set, train


def _scratch_parent(settings: Settings) -> Path:
    """Returns the state dir, created if missing (a fresh `CHURN_STATE_DIR`): the scratch logs
    go there rather than to /tmp, which may be a small RAM disk."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return settings.state_dir.resolve()


def bench_train(settings: Settings, users: int, days: int) -> dict[str, Any]:
    """Returns {users, days, events, simulate_seconds, checks_seconds, build_seconds,
    search_seconds, search_trials, final_fit_seconds, train_seconds, backtest_roc_auc (mean, low,
    high), latest_fold_roc_auc, oracle_roc_auc}: simulates the population, writes it as a
    date-partitioned Parquet log and trains on it (default options) without registering.

    Raises:
        InvalidInputError: the population is too small or short to train on.
    """
    began = time.perf_counter()
    sim = simulate(SimConfig(users=users, days=days, seed=0))
    simulated = time.perf_counter() - began
    with tempfile.TemporaryDirectory(dir=_scratch_parent(settings)) as folder:
        root = Path(folder)
        write_partitioned(sim.events, root / "events")
        save_truth(sim.truth, root / "truth.parquet")
        summary = train(
            settings, root / "events", TrainOptions(oracle=oracle_for(root / "truth.parquet"), register=False)
        )
    return {
        "users": users,
        "days": days,
        "events": sim.events.height,
        "simulate_seconds": round(simulated, 2),
        "checks_seconds": round(summary.seconds["checks"], 2),
        "build_seconds": round(summary.seconds["build"], 2),
        "search_seconds": round(summary.seconds["search"], 2),
        "search_trials": len(summary.search),
        "final_fit_seconds": round(summary.seconds["final_fit"], 2),
        "train_seconds": round(summary.seconds["total"], 2),
        "backtest_roc_auc": summary.backtest["roc_auc"],
        "latest_fold_roc_auc": summary.metrics["roc_auc"],
        "oracle_roc_auc": summary.metrics.get("oracle_roc_auc"),
    }


def _before_model(events: pl.LazyFrame, horizon: int, booster_seed: int = fit.FitConfig.seed) -> ChurnModel:
    """Returns the model main's procedure (before issue 21) registers for the log: daily grid,
    unweighted rows, split train | H | valid | H | test, early stopping on valid, calibration
    on valid, refit on train + valid only (the test period and the gaps never reach it).
    `booster_seed` is LightGBM's (bagging and feature sampling)."""
    options = TrainOptions(horizon_days=horizon, grid_hours=24, fit=fit.FitConfig(seed=booster_seed))
    labelled, _, times = build_training_set(events, options, horizon, 24)
    train_part, valid_part = split.take(labelled, times.train), split.take(labelled, times.valid)
    fitted = fit.fit(
        dataset.feature_matrix(train_part),
        train_part["label"].to_numpy().astype(bool),
        dataset.feature_matrix(valid_part),
        valid_part["label"].to_numpy().astype(bool),
        valid_part["user_id"].to_numpy(),
        replace(options.fit, refit=True),
    )
    return ChurnModel(fitted.booster, {"features": list(spec.MODEL_FEATURES), "calibration": fitted.calibration})


def _final_rows(settings: Settings, events_path: Path, horizon: int) -> pl.DataFrame:
    """Returns the observation points `training.pipeline.train` fits its final model on for the
    log at `events_path` (default options): every point whose label window ends within the log.
    `_booster_draws` checks that the registered booster's own seed refits it exactly."""
    logged = load_events_with_positions(events_path)
    events = offline.as_streamed(logged, settings.allowed_lateness_seconds * 1000).collect().lazy()
    options = TrainOptions(horizon_days=horizon)
    labelled, window, _ = build_training_set(events, options, horizon, settings.train_grid_hours)
    times = split.labelled_times(labelled["as_of"].to_numpy(), window.last_event_ms, horizon)
    return split.take(labelled, tuple(int(t) for t in times))


def _booster_draws(
    settings: Settings,
    root: Path,
    models: dict[str, ChurnModel],
    horizon: int,
    x: np.ndarray,
    seeds: tuple[int, ...],
) -> dict[str, list[np.ndarray]]:
    """Returns each procedure's probabilities for `x` from its model refitted with each LightGBM
    seed of `seeds`; the first seed is the registered `models`' own, whose scores are used as
    they are. "after" refits the registered booster's parameters and tree count on its final
    rows and applies the registered calibration (monotone: the ranking is the booster's);
    "before" reruns main's procedure, calibration included.

    Raises:
        RuntimeError: the registered booster's own seed does not refit it (the final rows or
            parameters here are not the pipeline's).
    """
    after = models["after"]
    rows = _final_rows(settings, root / "train", horizon)
    matrix, labels = dataset.feature_matrix(rows), rows["label"].to_numpy().astype(bool)
    weights = rows["weight"].to_numpy()
    rounds = int(after.meta["best_iteration"])

    def refit_after(seed: int) -> np.ndarray:
        booster = fit.fit_rounds(matrix, labels, weights, {**after.meta["params"], "seed": seed}, rounds)
        return np.asarray(booster.predict(x))

    if not np.allclose(refit_after(seeds[0]), after.predict_raw(x), rtol=0, atol=1e-9):
        msg = "the refit with the registered booster's seed differs from it: the bench's final rows are stale"
        raise RuntimeError(msg)
    events = load_events(root / "train")
    draws = {name: [model.predict(x)] for name, model in models.items()}
    for seed in seeds[1:]:
        draws["after"].append(apply_calibration(after.meta["calibration"], refit_after(seed)))
        draws["before"].append(_before_model(events, horizon, seed).predict(x))
    return draws


def _draw_spread(labels: np.ndarray, draws: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Returns each procedure's ROC-AUC per booster seed and after - before over every pair of
    draws: min, mean (the difference of the procedures' mean ROC-AUCs) and max."""
    aucs = {name: [metrics.roc_auc(labels, scores) for scores in draws[name]] for name in draws}
    pairs = [a - b for a in aucs["after"] for b in aucs["before"]]
    return {
        "after_roc_auc": aucs["after"],
        "before_roc_auc": aucs["before"],
        "after_minus_before": {"min": min(pairs), "mean": float(np.mean(pairs)), "max": max(pairs)},
    }


def _future_rows(events: pl.LazyFrame, start_ms: int, days: int, horizon: int) -> pl.DataFrame:
    """Returns the labelled observation points (daily grid) at the `days` UTC midnights from
    `start_ms`, with their features: what a deployed model is asked about after its log ends."""
    points, window = dataset.observation_points(events, dataset.GridConfig(horizon, 24, 28))
    moments = [start_ms + d * spec.DAY_MS for d in range(days)]
    points = points.filter(pl.col("as_of").is_in(moments))
    frame = offline.compute(events, points.select("user_id", "as_of")).with_columns(points["churn_ms"])
    horizon_ms = horizon * spec.DAY_MS
    if any(m + horizon_ms > window.last_event_ms for m in moments):
        msg = "the simulated log ends before the last future point's label window"
        raise InvalidInputError(msg)
    return frame.filter(
        pl.col("last_event_ms").is_not_null() & (pl.col("last_event_ms") >= pl.col("as_of") - 28 * spec.DAY_MS)
    ).with_columns(
        (pl.col("churn_ms").is_not_null() & (pl.col("churn_ms") <= pl.col("as_of") + horizon_ms))
        .cast(pl.Int8)
        .alias("label")
    )


def compare_train(
    settings: Settings,
    users: int,
    days: int,
    seeds: tuple[int, ...],
    horizon: int = 14,
    future_days: int = 3,
    progress: Callable[[str], None] = lambda _: None,
    booster_seeds: int = 1,
) -> dict[str, Any]:
    """Returns, per seed, the ROC-AUC of the model each procedure registers ("before": main's
    refit on train + valid; "after": this pipeline's final fit on every labelled point) on the
    same observation points of the `future_days` days after the training log ends (labels from
    the simulation's continuation), the oracle's ROC-AUC and each model's ratio to it, each
    model's mean probability over the oracle's (its calibration), and the
    paired bootstrap interval of after - before. Simulates `days + horizon + future_days` days
    and trains on the first `days`. Each seed's figures also go to `progress` as one JSON line
    as soon as they are known (a long comparison that is cut short keeps its finished seeds).
    Each model is one draw of LightGBM's random seed; with `booster_seeds` > 1 both procedures'
    models are refitted with that many seeds from the registered one's, and each seed's result
    gains `booster_draws` (each draw's ROC-AUC, and after - before over every pair), so a
    difference can be read against the draws' own spread.

    Raises:
        InvalidInputError: the population is too small or short to train on.
    """
    runs = []
    for seed in seeds:
        began = time.perf_counter()
        config = SimConfig(users=users, days=days + horizon + future_days, seed=seed)
        sim = simulate(config)
        cut_ms = to_ms(config.start) + days * spec.DAY_MS
        with tempfile.TemporaryDirectory(dir=_scratch_parent(settings)) as folder:
            root = Path(folder)
            write_partitioned(sim.events.filter(pl.col("ts") < cut_ms), root / "train")
            write_partitioned(sim.events, root / "full")
            save_truth(sim.truth, root / "truth.parquet")
            oracle = oracle_for(root / "truth.parquet")
            after_run = train(
                settings, root / "train", TrainOptions(horizon_days=horizon, register=False), progress=progress
            )
            after = load_artifact(after_run.artifact_dir)
            after_seconds = time.perf_counter() - began
            before = _before_model(load_events(root / "train"), horizon)
            before_seconds = time.perf_counter() - began - after_seconds
            rows = _future_rows(load_events(root / "full"), cut_ms, future_days, horizon)
            truth = oracle(rows, horizon)
            x = dataset.feature_matrix(rows)
            labels = rows["label"].to_numpy().astype(bool)
            draws = None
            draws_began = time.perf_counter()
            if booster_seeds > 1:
                first = int(after.meta["params"]["seed"])
                seeds_drawn = tuple(range(first, first + booster_seeds))
                draws = _draw_spread(
                    labels, _booster_draws(settings, root, {"after": after, "before": before}, horizon, x, seeds_drawn)
                )
                draws["seeds"] = list(seeds_drawn)
                draws["seconds"] = round(time.perf_counter() - draws_began, 1)
        known = ~np.isnan(truth)
        scores = {"before": before.predict(x), "after": after.predict(x)}
        oracle_auc = metrics.roc_auc(labels[known], truth[known])
        result: dict[str, Any] = {"seed": seed, "rows": rows.height, "churners": int(labels.sum())}
        for name, score in scores.items():
            result[f"{name}_roc_auc"] = metrics.roc_auc(labels, score)
            result[f"{name}_vs_oracle"] = metrics.roc_auc(labels[known], score[known]) / oracle_auc
            # Calibration: the mean served probability over the true one (1 is right).
            result[f"{name}_mean_probability_vs_oracle"] = float(score[known].mean() / truth[known].mean())
        result["oracle_roc_auc"] = oracle_auc
        result["after_minus_before"] = backtest.paired_auc_difference(
            labels, scores["after"], scores["before"], rows["user_id"].to_numpy(), samples=200, seed=seed
        )
        result["after_final_days"] = after_run.final["days"]
        result["after_backtest_roc_auc"] = after_run.backtest["roc_auc"]
        result["after_search_trials"] = len(after_run.search)
        if draws is not None:
            result["booster_draws"] = draws
        result["seconds"] = {"after_train": round(after_seconds, 1), "before_train": round(before_seconds, 1)}
        runs.append(result)
        progress(json.dumps(result))
    return {
        "users": users,
        "days": days,
        "horizon_days": horizon,
        "future_days": future_days,
        "runs": runs,
        "after_not_worse_on_every_seed": all(r["after_roc_auc"] >= r["before_roc_auc"] for r in runs),
        # The promotion gate's reading: worse only where the one-sided 95% upper bound of
        # after - before is below 0.
        "after_not_significantly_worse_on_every_seed": all(r["after_minus_before"]["high"] >= 0 for r in runs),
        # Over the booster draws: the procedures' mean ROC-AUCs, not one draw of each.
        **(
            {
                "after_mean_not_worse_on_every_seed": all(
                    r["booster_draws"]["after_minus_before"]["mean"] >= 0 for r in runs
                )
            }
            if booster_seeds > 1
            else {}
        ),
    }
