"""`models.artifact.ChurnModel`: one-row predictions (LightGBM's fast path) equal the batch ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from core.errors import InvalidInputError
from models.artifact import ChurnModel, load_artifact, save_artifact

FEATURES = [f"f{i}" for i in range(12)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChurnModel:
    """A small binary booster saved and loaded as an artifact (identity calibration)."""
    rng = np.random.default_rng(0)
    x = rng.random((3000, len(FEATURES))) * 10
    x[rng.random(x.shape) < 0.1] = np.nan
    y = np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 3]) + rng.random(3000) * 5 > 11
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 15},
        lgb.Dataset(x, y, feature_name=FEATURES),
        num_boost_round=40,
    )
    meta = {"features": FEATURES, "horizon_days": 14, "calibration": {"method": "none"}, "tiers": {}}
    return load_artifact(save_artifact(Path(tmp_path_factory.mktemp("model")), booster, meta))


def _rows(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.random((count, len(FEATURES))) * 12 - 1
    rows[rng.random(rows.shape) < 0.15] = np.nan
    return rows


@pytest.mark.parametrize("threads", [0, 1])
def test_one_row_at_a_time_is_bit_identical_to_the_batch(model: ChurnModel, threads: int) -> None:
    model = replace(model, threads=threads)
    rows = _rows(500, seed=threads)
    batch = model.predict(rows)
    contributions = model.contributions(rows)
    for i, row in enumerate(rows):
        one = model.predict(row[np.newaxis, :])
        assert one.shape == (1,)
        assert one[0] == batch[i]
        assert model.predict(row)[0] == batch[i]  # a 1-D row counts as one row
        assert model.contributions(row) == [contributions[i]]
    # Not a view of a C-contiguous row: a column slice of a Fortran-ordered matrix.
    assert model.predict(np.asfortranarray(rows)[3:4])[0] == batch[3]


def test_the_booster_gives_the_same(model: ChurnModel) -> None:
    rows = _rows(50, seed=7)
    expected = np.asarray(model.booster.predict(rows))
    assert [model.predict_raw(row)[0] for row in rows] == expected.tolist()
    contrib = np.asarray(model.booster.predict(rows, pred_contrib=True))
    for row, want in zip(rows, contrib, strict=True):
        assert list(model.contributions(row)[0].values()) == want[:-1].tolist()


def test_a_row_of_the_wrong_width_is_refused(model: ChurnModel) -> None:
    with pytest.raises(InvalidInputError, match="12 feature columns"):
        model.predict(np.zeros((1, 11)))
