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
    """A model together with its registry identity: `identity` tells versions of one number apart
    (`models.registry.champion_identity`); empty, the version number stands for it."""

    model: Model
    name: str
    version: str
    identity: str = ""


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
    again after a crash) carries the same id, so an answer is traced to its model, user, features'
    event time and clock without a lookup table. The event time stands for the features: a late
    event that changes them without a newer event time keeps the id, so it is not a key for tier
    changes (each has its own `source_partition`, `source_offset`)."""
    key = f"{model_version}|{user_id}|{features_at_ms}|{as_of_ms}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


def in_canary(user_id: str, percent: float) -> bool:
    """Returns whether `user_id` is in the canary slice of `percent` % of users: its BLAKE2b digest
    (stable across processes and restarts, unlike Python's salted `hash`) falls in the first
    `percent * 100` of 10,000 buckets. The scorer and the API use it alike, so a user gets the
    same model everywhere, and raising the percentage only adds users to the slice."""
    if percent <= 0:
        return False
    bucket = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big") % 10_000
    return bucket < percent * 100


def split_canary(
    user_ids: Sequence[str], champion: LoadedModel, challenger: LoadedModel | None, percent: float
) -> list[tuple[LoadedModel, list[int]]]:
    """Returns (model, positions) groups: the canary slice's users (`in_canary`) to the
    challenger, the others to the champion (one group when there is no distinct challenger)."""
    if challenger is None or percent <= 0 or challenger.version == champion.version:
        return [(champion, list(range(len(user_ids))))]
    canary = [in_canary(u, percent) for u in user_ids]
    groups = [
        (champion, [i for i, c in enumerate(canary) if not c]),
        (challenger, [i for i, c in enumerate(canary) if c]),
    ]
    return [(model, positions) for model, positions in groups if positions]


def shadow_of(serving: LoadedModel, champion: LoadedModel, challenger: LoadedModel | None) -> LoadedModel | None:
    """Returns the model that scores in shadow beside `serving` (the champion or the canary's
    challenger): the other one of the two, or None when there is no distinct challenger."""
    if challenger is None or challenger.version == champion.version:
        return None
    return challenger if serving.version == champion.version else champion
