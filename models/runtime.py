"""What a process needs of a model at run time: the `Model` protocol, a model with its registry
identity, and the matrix the model reads from online feature rows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from features import spec
from features.store import FeatureRow


class Model(Protocol):
    """A churn model as the scorer and the API use it (`models.artifact.ChurnModel` in production)."""

    @property
    def meta(self) -> dict[str, Any]:
        """Returns the artifact's meta.json: features, horizon, tiers, metrics, reference distributions."""
        ...

    @property
    def features(self) -> tuple[str, ...]:
        """Returns the ordered feature names the model reads."""
        ...

    @property
    def horizon_days(self) -> int:
        """Returns the horizon H of the predicted probability."""
        ...

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Returns churn probabilities for rows of `features.spec.MODEL_FEATURES`."""
        ...

    def contributions(self, matrix: np.ndarray) -> list[dict[str, float]]:
        """Returns, per row, each feature's signed contribution to the log-odds."""
        ...

    def tier(self, probability: float) -> str:
        """Returns 'low', 'medium' or 'high'."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    """A model together with its registry identity."""

    model: Model
    name: str
    version: str


def feature_matrix(rows: Sequence[FeatureRow], now_ms: Sequence[int] | None = None) -> np.ndarray:
    """Returns rows as a float64 matrix in `spec.MODEL_FEATURES` order.

    The request-time `seconds_since_last_event` is `now - last event` (0 when `now_ms` is None,
    i.e. scoring as of each user's latest event, as the stream does).
    """
    stored = spec.STORED_FEATURES
    matrix = np.empty((len(rows), len(spec.MODEL_FEATURES)), dtype=np.float64)
    for i, row in enumerate(rows):
        values = row.values
        matrix[i, : len(stored)] = [values[name] for name in stored]
    if now_ms is None:
        matrix[:, len(stored)] = 0.0
    else:
        last = np.fromiter((r.last_event_ms for r in rows), dtype=np.float64, count=len(rows))
        matrix[:, len(stored)] = (np.asarray(now_ms, dtype=np.float64) - last) * spec.SECONDS_PER_MS
    return matrix


def prediction_id(model_version: str, user_id: str, features_at_ms: int, as_of_ms: int) -> str:
    """Returns the id of one prediction: 24 hex characters of a BLAKE2b digest of what made it
    (the model version, the user, the event time of the features and the clock used).

    Deterministic on purpose: the same prediction made again (a replayed batch, a snapshot taken
    again after a crash) carries the same id, so a tier-change event, a stored risk row and a
    prediction-log row that share an id are the same answer, traced without a lookup table."""
    key = f"{model_version}|{user_id}|{features_at_ms}|{as_of_ms}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()
