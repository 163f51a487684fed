"""The model artifact: a directory with the booster as LightGBM text (`model.txt`) and `meta.json`.

`meta.json` holds (format_version 1): `features` (ordered model inputs), `horizon_days`,
`spec_version`, `tiers` (probability cut points: `high` = the validation score's 90th
percentile, so about the top 10% riskiest are high; `medium` = the 70th, the next 20%),
`calibration` (see `training.calibration`), `metrics`, `data_window`, `params`, `imbalance`,
`best_iteration`, `reference` distributions of every feature and of the score (see
`training.reference`), and from issue 21 on `final` (what the registered model was fitted on),
`data_report`, `search` and `card` (the model card, Markdown; see `training.card`). No pickle
anywhere: both files are text and load in any process.
"""

from __future__ import annotations

import ctypes
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from lightgbm.basic import _LIB, _safe_call

from core.errors import InvalidInputError
from models import calibration

MODEL_FILE = "model.txt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
TIERS = ("low", "medium", "high")
# LightGBM C API constants (C_API_PREDICT_NORMAL, C_API_PREDICT_CONTRIB, C_API_DTYPE_FLOAT64).
_PREDICT_NORMAL = 0
_PREDICT_CONTRIB = 3
_FLOAT64 = 1


class OneRowPredictor:
    """LightGBM's single-row fast path (`LGBM_BoosterPredictForMatSingleRowFast`) for one
    booster and predict type. `Booster.predict` parses its parameters and sets up a predictor
    on every call, four times the cost of scoring one row (~17 us against ~4 us); here that is
    done once. Same trees, same code inside LightGBM: the results are bit-identical.
    """

    def __init__(self, booster: lgb.Booster, predict_type: int, threads: int) -> None:
        """Sets up the predictor (iterations as `Booster.predict` picks them by default).

        Raises:
            lightgbm.basic.LightGBMError: LightGBM refused the setup.
        """
        self._booster = booster  # the C config points into the booster: it must outlive this
        width = booster.num_feature()
        per_row = width + 1 if predict_type == _PREDICT_CONTRIB else 1
        self._outputs = per_row * booster.num_model_per_iteration()
        self._handle = ctypes.c_void_p()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle,
                ctypes.c_int(predict_type),
                ctypes.c_int(0),  # start iteration
                ctypes.c_int(booster.best_iteration),  # <= 0: all
                ctypes.c_int(_FLOAT64),
                ctypes.c_int32(width),
                ctypes.c_char_p(f"num_threads={threads}".encode()),
                ctypes.byref(self._handle),
            )
        )

    def __call__(self, row: np.ndarray) -> np.ndarray:
        """Returns what `Booster.predict` returns for the one-row matrix `row` (float64,
        C-contiguous, one value per feature): shape (1,) for one output, (1, k) for k.

        Raises:
            lightgbm.basic.LightGBMError: the row does not have one value per feature.
        """
        out = np.empty(self._outputs, dtype=np.float64)
        length = ctypes.c_int64()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFast(
                self._handle,
                row.ctypes.data_as(ctypes.c_void_p),
                ctypes.byref(length),
                out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
            )
        )
        return out if out.size == 1 else out.reshape(1, -1)

    def __del__(self) -> None:
        if self._handle:
            _LIB.LGBM_FastConfigFree(self._handle)


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
    # One-row predictors by predict type, set up on first use (each copy of the model has its own).
    _one_row: dict[int, OneRowPredictor] = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def _predict(self, matrix: np.ndarray, predict_type: int) -> np.ndarray:
        rows = self._matrix(matrix)
        if rows.shape[0] != 1:
            contrib = predict_type == _PREDICT_CONTRIB
            return np.asarray(self.booster.predict(rows, pred_contrib=contrib, num_threads=self.threads))
        predictor = self._one_row.get(predict_type)
        if predictor is None:  # two threads may both build one; either will do
            built = OneRowPredictor(self.booster, predict_type, self.threads)
            predictor = self._one_row.setdefault(predict_type, built)
        return predictor(np.ascontiguousarray(rows[0]))

    def predict_raw(self, matrix: np.ndarray) -> np.ndarray:
        """Returns the booster's uncalibrated probabilities for each row.

        Raises:
            InvalidInputError: the matrix does not have one column per feature.
        """
        return np.asarray(self._predict(matrix, _PREDICT_NORMAL), dtype=np.float64)

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
        contrib = self._predict(matrix, _PREDICT_CONTRIB)
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


def tier_cuts(
    scores: np.ndarray, high_share: float = 0.1, medium_share: float = 0.2, source: str = "validation scores"
) -> dict[str, Any]:
    """Returns the tier cut points from a score distribution: the top `high_share` are high,
    the next `medium_share` medium; `source` names the scores in the rule's text."""
    values = np.asarray(scores, dtype=np.float64)
    return {
        "high": float(np.quantile(values, 1 - high_share)),
        "medium": float(np.quantile(values, 1 - high_share - medium_share)),
        "rule": f"high: top {high_share:.0%} of {source}; medium: next {medium_share:.0%}",
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
