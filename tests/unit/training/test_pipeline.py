"""Training end to end on a small simulated log: reproducibility, MLflow registry round trip,
promotion gates, the final fit's data, backtests, the model card, and the model's behaviour."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pytest

from bench.harness import SMALL_SIMULATION, SMALL_TRAIN_OPTIONS
from core.settings import Settings, load_settings
from core.timeutil import parse_utc, to_ms
from events.log import load_events, write_partitioned
from events.schema import Event, parse_event
from features import spec
from features.online import LATE, OnlineEngine
from models import registry as model_registry
from models.artifact import load_artifact
from sim.simulator import simulate
from training import backtest, dataset, fit, promotion, registry
from training import card as model_card
from training.pipeline import TrainResult, build_training_set, train
from training.report import format_summary

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
    assert second.backtest == first.backtest
    assert second.version != first.version
    # The champion saw the gate rows: its settings, refitted on the fold's earlier rows, give the
    # challenger's own fold booster, so the paired difference is zero.
    assert second.promoted, second.reasons
    assert any("settings refitted" in reason and ": +0.0000" in reason for reason in second.reasons)


def test_no_promote_keeps_a_model_the_gates_pass_as_challenger(log: Path, state: Settings) -> None:
    champion = model_registry.champion_version(state)
    held = train(state, log, replace(OPTIONS, promote=False))
    assert held.registered
    assert not held.promoted
    assert any(reason.startswith("pass: ") for reason in held.reasons)  # the gates did pass
    assert held.reasons[-1].startswith("held: trained with --no-promote")
    assert model_registry.champion_version(state) == champion
    assert model_registry.champion_version(state, model_registry.CHALLENGER) == held.version
    assert "held" in format_summary(held)
    assert held.challenger
    assert "challenger (not promoted)" in format_summary(held)
    # One the gates refused while there is a champion is not named challenger: not said to be.
    assert "refused (not served, not challenger)" in format_summary(replace(held, challenger=False))


def test_churn_promote_with_no_champion_applies_the_floors_the_training_refused_for(log: Path, tmp_path: Path) -> None:
    strict = load_settings(state_dir=tmp_path, gate_min_roc_auc=0.99, gate_min_pr_auc=0.02)
    first_ever = train(strict, log, OPTIONS)
    assert first_ever.registered
    assert not first_ever.promoted
    assert model_registry.champion_version(strict) is None
    refused = promotion.promote(strict)
    assert refused.entry["outcome"] == "refused"
    assert "fail: backtest ROC-AUC" in refused.entry["rule"]
    assert model_registry.champion_version(strict) is None
    # The same version under floors it meets (the deployment lowered them) is promoted.
    lenient = load_settings(state_dir=tmp_path, gate_min_roc_auc=0.55, gate_min_pr_auc=0.02)
    accepted = promotion.promote(lenient)
    assert accepted.entry["outcome"] == "accepted", accepted.entry["rule"]
    assert accepted.entry["rule"].startswith("no current champion; pass: backtest ROC-AUC")
    assert model_registry.champion_version(strict) == first_ever.version


def test_training_leaves_out_the_events_the_scorer_ignores_as_late(log: Path, tmp_path: Path) -> None:
    """The archived log in Kafka order, where a few users' Thumbs Down arrive three hours late
    (the allowed lateness is one): the scorer ignores them (LATE), and so must training."""
    wire = pl.read_parquet(sorted(log.rglob("*.parquet"))).sort("ts", maintain_order=True)
    late_rows = wire.with_row_index("row").filter(pl.col("page") == "Thumbs Down")["row"].to_list()[:25:5]
    arrival = (
        wire.with_row_index("row")
        .with_columns(arrives=pl.col("ts") + pl.when(pl.col("row").is_in(late_rows)).then(3 * 3_600_000).otherwise(0))
        .sort("arrives", "row")
    )
    positioned = arrival.with_columns(
        kafkaPartition=pl.lit(0, pl.Int64), kafkaOffset=pl.int_range(pl.len(), dtype=pl.Int64)
    ).drop("row", "arrives")
    write_partitioned(positioned, tmp_path / "events")
    engine = OnlineEngine()  # the default lateness, as the settings below
    ignored = 0
    for offset, row in enumerate(positioned.drop("kafkaPartition", "kafkaOffset").iter_rows(named=True)):
        event = parse_event(msgspec.json.encode(row))
        if isinstance(event, Event):
            ignored += engine.apply(event, 0, offset) == LATE
    assert ignored > 0
    settings = load_settings(state_dir=tmp_path / "state", gate_min_roc_auc=0.55, gate_min_pr_auc=0.02)
    result = train(settings, tmp_path / "events", OPTIONS)
    assert result.data_report["late_events"] == ignored
    assert any("the scorer ignores them, and so does training" in w for w in result.data_report["warnings"])


def test_worse_model_is_not_promoted(first: TrainResult, log: Path, state: Settings) -> None:
    labelled, _, _ = build_training_set(load_events(log), OPTIONS, 7)
    latest = first.folds[-1]  # the gate's rows: the latest backtest fold
    as_of = pl.col("as_of")
    train = labelled.filter(as_of <= to_ms(parse_utc(latest["train_last"])))
    test = labelled.filter(
        as_of.is_between(to_ms(parse_utc(latest["test_first"])), to_ms(parse_utc(latest["test_last"])))
    )
    # A challenger with its labels inverted (a bug in the label join): it ranks backwards.
    inverted = train.with_columns(label=1 - pl.col("label"))
    scores = backtest.fit_and_score(inverted, test, OPTIONS.fit, "none", first.best_iteration, {"method": "none"})
    rows = registry.GateRows(train, test, scores)
    decision = registry.decide(state, first.backtest, rows, model_registry.load_champion(state))
    assert not decision.promote
    assert any(reason.startswith("fail: ROC-AUC challenger - champion") for reason in decision.reasons)
    strict = load_settings(state_dir=state.state_dir, gate_min_roc_auc=0.99)
    assert not registry.decide(strict, first.backtest, rows, None).promote


def test_final_fit_sees_every_finished_label_window_and_no_other(first: TrainResult, log: Path) -> None:
    events = load_events(log)
    frame, window = dataset.build(events, dataset.GridConfig(7, 24, 28))
    finished = frame.filter(pl.col("as_of") + 7 * spec.DAY_MS <= window.last_event_ms)
    unfinished = frame.filter(pl.col("as_of") + 7 * spec.DAY_MS > window.last_event_ms)
    assert unfinished.height > 0  # the log has points the final fit must leave out
    assert first.final["rows"] == finished.height
    assert first.final["days"] == finished["as_of"].n_unique()
    last_seen = to_ms(parse_utc(first.data_window["final_points"][1]))
    assert last_seen == finished["as_of"].max()
    assert last_seen + 7 * spec.DAY_MS <= window.last_event_ms
    # It saw the newest labelled days that the selection split held back for testing.
    assert last_seen > to_ms(parse_utc(first.data_window["valid_points"][1]))


def test_backtests_summary_and_card(first: TrainResult, state: Settings) -> None:
    assert len(first.folds) >= 2
    for name, figure in first.backtest.items():
        assert figure["low"] <= figure["mean"] <= figure["high"], name
    text = format_summary(first)
    assert re.search(r"ROC-AUC\s+0\.\d{4}\s+\[0\.\d{4}, 0\.\d{4}\]", text), text
    assert "final model saw" in text
    loaded = model_registry.load_champion(state)
    assert loaded is not None
    card = first.card
    assert card == (first.artifact_dir / "card.md").read_text()
    assert loaded[0].meta["card"].startswith("# Model card")  # the registered champion carries its own
    headings = re.findall(r"^## (.+)$", card, flags=re.MULTILINE)
    assert headings == list(model_card.SECTIONS)
    for section, body in zip(headings, re.split(r"^## .+$", card, flags=re.MULTILINE)[1:], strict=True):
        assert len(body.strip()) > 20, section
    assert "None" not in card
    assert "n/a" not in card
    for feature in spec.MODEL_FEATURES:
        assert f"`{feature}`" in card
    assert f"{first.final['days']} distinct days" in card
    assert len(first.search) == 2  # two trials, each a child run of the final fit's run
    client = model_registry.registry_client(state)
    parent = client.get_run(first.run_id)
    assert parent.info.run_name == "train: final fit"
    assert parent.data.metrics["final_days"] == first.final["days"]
    assert "backtest_roc_auc_low" in parent.data.metrics
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'"
    )
    names = sorted(run.info.run_name for run in children)
    assert len(names) == 2
    assert sum(name.endswith("(chosen)") for name in names) == 1
    assert all("backtest_roc_auc" in run.data.metrics for run in children)
    data_report = json.loads((first.artifact_dir / "data_report.json").read_text())
    assert data_report["churners_per_split"]["train"] > 0


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
    # The refit is another booster than the early-stopped one.
    early = plain.booster.predict(x[3000:], num_iteration=plain.best_iteration)
    assert not np.allclose(refit.booster.predict(x[3000:]), early)
    # The leaf size shrinks with small training sets (2% of rows, at least 20).
    assert refit.params["min_data_in_leaf"] == 60
    assert fit.min_data_in_leaf(config, 10**6) == config.min_data_in_leaf
    assert fit.min_data_in_leaf(config, 100) == 20
