"""Training benchmark: seconds to build the training set and to train, on simulated events."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from core.settings import Settings
from events.log import write_partitioned
from sim.ground_truth import save_truth
from sim.oracle import oracle_for
from sim.simulator import SimConfig, simulate
from training.pipeline import TrainOptions, train


def bench_train(settings: Settings, users: int, days: int) -> dict[str, Any]:
    """Returns {users, days, events, simulate_seconds, build_seconds, fit_seconds, test_roc_auc,
    oracle_roc_auc}: simulates the population, writes it as a date-partitioned Parquet log and
    trains on it without registering.

    Raises:
        InvalidInputError: the population is too small or short to train on.
    """

    began = time.perf_counter()
    sim = simulate(SimConfig(users=users, days=days, seed=0))
    simulated = time.perf_counter() - began
    with tempfile.TemporaryDirectory(dir=settings.state_dir.resolve()) as folder:
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
        "build_seconds": round(summary.seconds["build"], 2),
        "fit_seconds": round(summary.seconds["fit"], 2),
        "test_roc_auc": summary.metrics["roc_auc"],
        "oracle_roc_auc": summary.metrics.get("oracle_roc_auc"),
    }
