"""The simulator's contract (wire format, order, churn, levels, drift) and the oracle's honesty."""

from __future__ import annotations

import gzip
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from core.errors import InvalidInputError
from events.schema import CHURN_PAGE, KNOWN_PAGES, ErrorRecord, Event, parse_event
from sim.ground_truth import DAY_MS, GroundTruth, load_truth, save_truth
from sim.oracle import daily_points, oracle_at, oracle_probability, oracle_report, roc_auc
from sim.simulator import SimConfig, Simulation, simulate, truth_path_for

SMALL = SimConfig(users=150, days=30, seed=7, start=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def larger() -> Simulation:
    return simulate(SimConfig(users=800, days=45, seed=3))


def test_same_seed_gives_identical_output_and_another_seed_does_not(sim: Simulation) -> None:
    again = simulate(SMALL)
    assert again.events.equals(sim.events)
    np.testing.assert_array_equal(again.truth.churn_ms, sim.truth.churn_ms)
    np.testing.assert_array_equal(again.truth.state, sim.truth.state)
    assert not simulate(replace(SMALL, seed=8)).events.equals(sim.events)


def test_every_line_is_a_valid_wire_event_and_guests_are_rare(sim: Simulation, tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    sim.write_events(path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == sim.events.height
    parsed = [parse_event(line) for line in lines]
    assert [p.reason for p in parsed if isinstance(p, ErrorRecord)] == []
    events = [p for p in parsed if isinstance(p, Event)]
    assert {e.page for e in events} <= KNOWN_PAGES
    assert 0 < len(parsed) - len(events) < 0.05 * len(parsed)  # logged-out guests, like real logs
    assert all(e.registration is not None and e.location and e.user_agent and e.first_name for e in events)
    assert all((e.page == "NextSong") == (e.song is not None and e.length is not None) for e in events)
    in_memory = [e for e in sim.to_events() if e.user_id]
    assert in_memory == events
    gz = tmp_path / "events.jsonl.gz"
    sim.write_events(gz)
    assert gzip.decompress(gz.read_bytes()) == path.read_bytes()


def test_events_are_in_time_order_and_items_count_within_sessions(sim: Simulation) -> None:
    ts = sim.events["ts"].to_numpy()
    assert np.all(np.diff(ts) >= 0)
    assert ts.min() >= sim.truth.start_ms
    assert ts.max() < sim.truth.end_ms
    sessions = sim.events.group_by("sessionId").agg(
        pl.col("itemInSession").alias("items"), pl.col("userId").filter(pl.col("userId") != "").n_unique().alias("n")
    )
    for items, n_users in zip(sessions["items"].to_list(), sessions["n"].to_list(), strict=True):
        assert items == list(range(len(items)))
        assert n_users == 1


def test_churners_end_with_cancellation_and_emit_nothing_after(sim: Simulation) -> None:
    truth = sim.truth
    churned = {str(u): int(c) for u, c in zip(truth.user_ids, truth.churn_ms, strict=True) if c >= 0}
    assert churned
    by_user = sim.events.filter(pl.col("userId") != "").group_by("userId").agg(pl.col("page"), pl.col("ts"))
    for user, pages, times in by_user.iter_rows():
        if user in churned:
            assert pages[-2:] == ["Cancel", CHURN_PAGE]
            assert times[-1] == churned[user]
        assert pages.count(CHURN_PAGE) == (user in churned)


def test_free_users_see_adverts_and_paid_users_almost_none(sim: Simulation) -> None:
    share = sim.events.group_by("level").agg((pl.col("page") == "Roll Advert").mean().alias("ads"))
    ads = dict(share.iter_rows())
    assert ads["free"] > 0.02
    assert ads["paid"] < 0.003


def test_drift_shifts_only_the_documented_behaviours() -> None:
    drift_at = datetime(2026, 1, 11, tzinfo=UTC)
    config = SimConfig(users=300, days=20, seed=5)
    base, drifted = simulate(config), simulate(replace(config, drift_at=drift_at, drift_strength=1.0))
    np.testing.assert_array_equal(base.truth.churn_ms, drifted.truth.churn_ms)
    np.testing.assert_array_equal(base.truth.state, drifted.truth.state)

    def after(sim: Simulation) -> dict[str, float]:
        late = sim.events.filter((pl.col("ts") >= int(drift_at.timestamp() * 1000)) & (pl.col("userId") != ""))
        songs = late.group_by("sessionId").agg((pl.col("page") == "NextSong").sum())["page"].mean()
        free = late.filter(pl.col("level") == "free")
        return {
            "songs_per_session": float(songs),  # type: ignore[arg-type]
            "advert_share_free": float((free["page"] == "Roll Advert").mean()),  # type: ignore[arg-type]
            "error_share": float((late["page"] == "Error").mean()),  # type: ignore[arg-type]
        }

    b, d = after(base), after(drifted)
    assert d["songs_per_session"] < 0.8 * b["songs_per_session"]
    assert d["advert_share_free"] > 1.4 * b["advert_share_free"]
    assert d["error_share"] > 1.8 * b["error_share"]


def test_oracle_probabilities_are_valid_and_rank_soon_churners_higher(larger: Simulation) -> None:
    report = oracle_report(larger.truth, horizon_days=14)
    assert 0.75 < report["oracle_auc"] < 0.97
    assert 0.02 < report["churn_rate"] < 0.4
    points = daily_points(larger.truth, 14)
    p = oracle_at(larger.truth, points["user_index"], points["ts_ms"], 14)
    assert np.all((p >= 0) & (p <= 1))
    assert p[points["label"]].mean() > 3 * p[~points["label"]].mean()
    # Calibrated in aggregate: the oracle expects about as many churns as happen.
    assert p.mean() == pytest.approx(points["label"].mean(), rel=0.35)


def test_oracle_matches_a_monte_carlo_of_the_dynamics() -> None:
    states = np.array([-1.0, 0.5, 2.0])
    truth = GroundTruth(
        dynamics=SMALL.dynamics, start_ms=1_767_225_600_000, days=3, user_ids=np.array(["a", "b", "c"], dtype=object),
        registration_ms=np.zeros(3, np.int64), churn_ms=np.full(3, -1), state=np.repeat(states[:, None], 3, 1),
        events_per_day=np.ones((3, 3), np.int32),
    )  # fmt: skip
    exact = oracle_probability(truth, [("a", truth.start_ms), ("b", truth.start_ms), ("c", truth.start_ms)], 7)
    rng, dyn = np.random.default_rng(0), truth.dynamics
    paths = np.repeat(states, 20_000)
    exposure = dyn.hazard(paths)
    for _ in range(6):
        paths = dyn.step(paths, rng)
        exposure += dyn.hazard(paths)
    simulated = (1 - np.exp(-exposure)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(exact, simulated, rtol=0.05, atol=3e-4)  # Monte Carlo noise
    assert np.isnan(oracle_at(truth, np.array([0]), np.array([truth.start_ms - DAY_MS]), 7)[0])


def test_roc_auc_helper() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_truth_round_trips_through_parquet(sim: Simulation, tmp_path) -> None:
    path = truth_path_for(tmp_path / "events.jsonl.gz")
    assert path.name == "events.truth.parquet"
    save_truth(sim.truth, path)
    loaded = load_truth(path)
    assert loaded.dynamics == sim.truth.dynamics
    assert (loaded.start_ms, loaded.days) == (sim.truth.start_ms, sim.truth.days)
    np.testing.assert_array_equal(loaded.user_ids, sim.truth.user_ids)
    np.testing.assert_array_equal(loaded.churn_ms, sim.truth.churn_ms)
    np.testing.assert_array_equal(loaded.state, sim.truth.state)
    np.testing.assert_array_equal(loaded.events_per_day, sim.truth.events_per_day)


def test_new_users_register_inside_the_window(sim: Simulation) -> None:
    registered = sim.truth.registration_ms
    assert (registered < sim.truth.start_ms).any()
    new = registered >= sim.truth.start_ms
    assert new.any()
    assert np.all(np.isnan(sim.truth.state[new, 0][registered[new] >= sim.truth.start_ms + DAY_MS]))


def test_invalid_config_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        simulate(replace(SMALL, start=datetime(2026, 1, 1)))  # noqa: DTZ001 - the point of the test
    with pytest.raises(InvalidInputError, match="at least 1"):
        simulate(replace(SMALL, users=0))
