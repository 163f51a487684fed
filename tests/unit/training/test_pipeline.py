"""Training end to end on a small simulated log: reproducibility, MLflow registry round trip,
promotion gates, and the model's behaviour."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bench.harness import SMALL_SIMULATION, SMALL_TRAIN_OPTIONS
from core.settings import Settings, load_settings
from events.log import load_events, write_partitioned
from models import registry as model_registry
from models.artifact import load_artifact
from sim.simulator import simulate
from training import dataset, evaluate, fit, registry
from training.pipeline import TrainResult, build_training_set, train

OPTIONS = SMALL_TRAIN_OPTIONS


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("log")
    sim = simulate(SMALL_SIMULATION)
    write_partitioned(sim.events, root / "events")
    return root / "events"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Floors below the defaults: a 300-user population cannot promise 0.70 reliably.
    return load_settings(state_dir=tmp_path_factory.mktemp("state"), gate_min_roc_auc=0.55, gate_min_pr_auc=0.02)


@pytest.fixture(scope="module")
def first(log: Path, state: Settings) -> TrainResult:
    return train(state, log, OPTIONS)


def test_first_model_is_registered_and_promoted(first: TrainResult, state: Settings) -> None:
    assert first.promoted, first.reasons
    assert model_registry.champion_version(state) == first.version
    loaded = model_registry.load_champion(state)
    assert loaded is not None
    model, version = loaded
    assert version == first.version
    assert datetime.fromisoformat(model.meta["promoted_at"]).tzinfo is not None  # shown by /models/current
    local = load_artifact(first.artifact_dir)
    x = np.random.default_rng(0).random((50, len(model.features))) * 10
    assert np.array_equal(model.predict(x), local.predict(x))
    # Artifacts live in the configured folder, never in ./mlruns.
    assert any(state.artifacts_dir.rglob("model.txt"))
    assert (Path(first.artifact_dir) / "plots" / "roc.png").exists()


def test_same_seed_same_metrics_and_champion_kept(first: TrainResult, log: Path, state: Settings) -> None:
    second = train(state, log, OPTIONS)
    assert second.metrics == first.metrics
    assert second.version != first.version
    assert second.previous_champion_roc_auc == pytest.approx(first.metrics["roc_auc"])
    assert second.promoted  # equal on the same test set passes the not-worse gate


def test_worse_model_is_not_promoted(first: TrainResult, log: Path, state: Settings) -> None:
    labelled, _, times = build_training_set(load_events(log), OPTIONS, 7)
    parts = {name: labelled.filter(pl.col("as_of").is_in(list(getattr(times, name)))) for name in ("train", "valid")}
    test = labelled.filter(pl.col("as_of").is_in(list(times.test)))
    shuffled = np.random.default_rng(0).permutation(parts["train"]["label"].to_numpy()).astype(bool)
    result = fit.fit(
        dataset.feature_matrix(parts["train"]),
        shuffled,
        dataset.feature_matrix(parts["valid"]),
        parts["valid"]["label"].to_numpy().astype(bool),
        parts["valid"]["user_id"].to_numpy(),
        replace(OPTIONS.fit, refit=False),  # a refit would learn the real validation labels
    )
    scores = np.asarray(result.booster.predict(dataset.feature_matrix(test)))
    worse = evaluate.evaluate(test["label"].to_numpy(), scores)
    decision = registry.decide(state, worse, test, model_registry.load_champion(state))
    assert not decision.promote
    assert any(reason.startswith("fail: test ROC-AUC") and "champion" in reason for reason in decision.reasons)
    strict = load_settings(state_dir=state.state_dir, gate_min_roc_auc=0.99)
    assert not registry.decide(strict, first.metrics, test, None).promote


def test_more_dislikes_adverts_and_falling_trend_never_lower_risk(first: TrainResult) -> None:
    model = load_artifact(first.artifact_dir)
    rng = np.random.default_rng(1)
    base = np.abs(rng.normal(5, 5, (300, len(model.features))))
    worse = base.copy()
    index = {name: i for i, name in enumerate(model.features)}
    for name in ("thumbs_down_7d", "thumbs_down_28d", "adverts_7d", "adverts_28d"):
        worse[:, index[name]] += rng.integers(1, 20, 300)
    for name in ("thumbs_down_per_song_28d", "adverts_per_song_7d", "adverts_per_song_28d"):
        worse[:, index[name]] += rng.random(300)
    for name in ("songs_trend_7d_vs_21d", "sessions_trend_7d_vs_21d"):
        worse[:, index[name]] *= rng.random(300)
    assert np.all(model.predict(worse) >= model.predict(base) - 1e-12)


def test_model_contributions_and_tiers(first: TrainResult) -> None:
    model = load_artifact(first.artifact_dir)
    x = np.abs(np.random.default_rng(2).normal(5, 5, (3, len(model.features))))
    contributions = model.contributions(x)
    assert list(contributions[0]) == list(model.features)
    raw = model.booster.predict(x, raw_score=True)
    bias = np.asarray(model.booster.predict(x, pred_contrib=True))[:, -1]
    assert np.allclose([sum(c.values()) for c in contributions] + bias, raw)
    cuts = model.meta["tiers"]
    assert model.tier(cuts["high"]) == "high"
    assert model.tier(cuts["medium"]) == "medium"
    assert model.tier(0.0) == "low"


def test_refit_uses_train_and_valid_with_the_early_stopped_tree_count() -> None:
    rng = np.random.default_rng(4)
    features = ("a", "b", "c")
    x = rng.normal(size=(4000, 3))
    y = rng.random(4000) < 1 / (1 + np.exp(3 - 1.5 * x[:, 0]))
    groups = np.arange(1000).astype(str)
    config = fit.FitConfig(imbalance=("none",), max_rounds=300)
    plain = fit.fit(x[:3000], y[:3000], x[3000:], y[3000:], groups, replace(config, refit=False), features)
    refit = fit.fit(x[:3000], y[:3000], x[3000:], y[3000:], groups, config, features)
    assert refit.refit
    assert not plain.refit
    assert refit.best_iteration == plain.best_iteration
    assert refit.booster.num_trees() == refit.best_iteration
    assert refit.calibration == plain.calibration
    # Tier cuts come from the early-stopped booster's out-of-sample validation scores.
    assert np.allclose(refit.valid_scores, plain.valid_scores)
    early = plain.booster.predict(x[3000:], num_iteration=plain.best_iteration)
    assert not np.allclose(refit.booster.predict(x[3000:]), early)
    # The leaf size shrinks with small training sets (2% of rows, at least 20).
    assert refit.params["min_data_in_leaf"] == 60
    assert fit.min_data_in_leaf(config, 10**6) == config.min_data_in_leaf
    assert fit.min_data_in_leaf(config, 100) == 20
