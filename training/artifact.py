"""The model artifact: a directory with the booster as LightGBM text (`model.txt`) and `meta.json`.

`meta.json` holds (format_version 1): `features` (ordered model inputs), `horizon_days`,
`spec_version`, `tiers` (probability cut points: `high` = the validation score's 90th
percentile, so about the top 10% riskiest are high; `medium` = the 70th, the next 20%),
`calibration` (see `training.calibration`), `metrics`, `data_window`, `params`, `imbalance`,
`best_iteration`, and `reference` distributions of every feature and of the score (see
`training.reference`). No pickle anywhere: both files are text and load in any process.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from churn.errors import InvalidInputError
from training import calibration

MODEL_FILE = "model.txt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
TIERS = ("low", "medium", "high")


@dataclass(frozen=True)
class ChurnModel:
    """A loaded churn model. Inputs are float64 matrices with columns in `features` order
    (NaN = missing); outputs are calibrated P(churn within `horizon_days`)."""

    booster: lgb.Booster
    meta: dict[str, Any]
    # OpenMP threads per predict call; 0 = LightGBM's default (every core). A server scoring one
    # row per request sets 1: a thread team costs milliseconds per call when the cores are busy,
    # while the row itself takes microseconds (concurrency comes from requests and workers).
    threads: int = 0

    @property
    def features(self) -> tuple[str, ...]:
        """Returns the ordered feature names the model expects."""
        return tuple(self.meta["features"])

    @property
    def horizon_days(self) -> int:
        """Returns the horizon H of the predicted probability."""
        return int(self.meta["horizon_days"])

    @property
    def spec_version(self) -> str:
        """Returns the feature spec version the model was trained on."""
        return str(self.meta["spec_version"])

    def _matrix(self, matrix: np.ndarray) -> np.ndarray:
        rows = np.asarray(matrix, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] != len(self.features):
            msg = f"expected a matrix of {len(self.features)} feature columns, got shape {rows.shape}"
            raise InvalidInputError(msg)
        return rows

    def predict_raw(self, matrix: np.ndarray) -> np.ndarray:
        """Returns the booster's uncalibrated probabilities for each row.

        Raises:
            InvalidInputError: the matrix does not have one column per feature.
        """
        return np.asarray(self.booster.predict(self._matrix(matrix), num_threads=self.threads), dtype=np.float64)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Returns the calibrated churn probabilities, one per row (a 1-D row counts as one row).

        Raises:
            InvalidInputError: the matrix does not have one column per feature.
        """
        return calibration.apply(self.meta["calibration"], self.predict_raw(matrix))

    def contributions(self, matrix: np.ndarray) -> list[dict[str, float]]:
        """Returns, per row, each feature's signed contribution to the booster's log-odds
        (LightGBM `pred_contrib`; before calibration, which is monotone so signs keep their
        meaning). The bias term is left out; it is the same for every row.

        Raises:
            InvalidInputError: the matrix does not have one column per feature.
        """
        contrib = np.asarray(self.booster.predict(self._matrix(matrix), pred_contrib=True, num_threads=self.threads))
        names = self.features
        return [dict(zip(names, row[:-1].tolist(), strict=True)) for row in contrib]

    def tier(self, probability: float) -> str:
        """Returns "high", "medium" or "low" for one probability (cut points in meta `tiers`)."""
        cuts = self.meta["tiers"]
        if probability >= cuts["high"]:
            return "high"
        return "medium" if probability >= cuts["medium"] else "low"

    def tiers(self, probabilities: np.ndarray) -> np.ndarray:
        """Returns the tier of each probability as an array of str."""
        cuts = self.meta["tiers"]
        index = (probabilities >= cuts["medium"]).astype(int) + (probabilities >= cuts["high"]).astype(int)
        return np.asarray(TIERS, dtype=object)[index]


def tier_cuts(validation_scores: np.ndarray, high_share: float = 0.1, medium_share: float = 0.2) -> dict[str, Any]:
    """Returns the tier cut points from a score distribution: the top `high_share` are high,
    the next `medium_share` medium."""
    scores = np.asarray(validation_scores, dtype=np.float64)
    return {
        "high": float(np.quantile(scores, 1 - high_share)),
        "medium": float(np.quantile(scores, 1 - high_share - medium_share)),
        "rule": f"high: top {high_share:.0%} of validation scores; medium: next {medium_share:.0%}",
    }


def save_artifact(directory: Path, booster: lgb.Booster, meta: dict[str, Any]) -> Path:
    """Writes model.txt (best iteration only) and meta.json into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(directory / MODEL_FILE), num_iteration=meta.get("best_iteration") or None)
    payload = {"format_version": FORMAT_VERSION, **meta}
    (directory / META_FILE).write_text(json.dumps(_finite(payload), indent=1, sort_keys=True))
    return directory


def load_artifact(directory: Path | str) -> ChurnModel:
    """Returns the model stored in `directory` by `save_artifact`.

    Raises:
        InvalidInputError: a file is missing or unreadable, or the booster's features differ
            from meta.json's.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        booster = lgb.Booster(model_file=str(directory / MODEL_FILE))
    except (OSError, ValueError, lgb.basic.LightGBMError) as exc:
        msg = f"{directory}: not a churn model artifact ({MODEL_FILE} + {META_FILE}): {exc}"
        raise InvalidInputError(msg) from exc
    if meta.get("format_version") != FORMAT_VERSION:
        msg = f"{directory}: meta.json format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        raise InvalidInputError(msg)
    if booster.feature_name() != list(meta["features"]):
        msg = f"{directory}: the booster's features differ from meta.json's"
        raise InvalidInputError(msg)
    return ChurnModel(booster, meta)


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
