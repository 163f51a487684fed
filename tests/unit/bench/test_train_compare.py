"""`churn bench train --compare --booster-seeds`: both procedures' models refitted with other
LightGBM seeds, the first draw being the registered models themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import train as train_bench
from core.settings import Settings


def test_the_booster_draws_start_from_the_registered_models_and_refit_the_others(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    result = train_bench.compare_train(settings, users=300, days=44, seeds=(0,), future_days=1, booster_seeds=3)
    run = result["runs"][0]
    draws = run["booster_draws"]
    assert draws["seeds"] == [7, 8, 9]
    # The first draw is the registered pair (the refit with its own seed reproduced the booster).
    assert draws["after_roc_auc"][0] == pytest.approx(run["after_roc_auc"], abs=1e-12)
    assert draws["before_roc_auc"][0] == pytest.approx(run["before_roc_auc"], abs=1e-12)
    # Other seeds are other boosters: bagging and feature sampling draw differently.
    assert len(set(draws["after_roc_auc"])) == 3
    assert len(set(draws["before_roc_auc"])) == 3
    pairs = [a - b for a in draws["after_roc_auc"] for b in draws["before_roc_auc"]]
    spread = draws["after_minus_before"]
    assert spread["min"] == min(pairs)
    assert spread["max"] == max(pairs)
    assert spread["mean"] == pytest.approx(np.mean(draws["after_roc_auc"]) - np.mean(draws["before_roc_auc"]))
    assert result["after_mean_not_worse_on_every_seed"] == (spread["mean"] >= 0)


def test_a_refit_that_does_not_reproduce_the_registered_booster_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench rebuilds the final rows itself: if they ever drift from the pipeline's, the
    draws would compare other models, so it stops instead."""
    real = train_bench._final_rows
    monkeypatch.setattr(train_bench, "_final_rows", lambda *args: real(*args).head(-50))
    settings = Settings(state_dir=tmp_path / "state")
    with pytest.raises(RuntimeError, match="differs from it"):
        train_bench.compare_train(settings, users=300, days=44, seeds=(0,), future_days=1, booster_seeds=2)
