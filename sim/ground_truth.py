"""The hidden churn state of simulated users: its dynamics, the ground-truth sidecar and the oracle.

Every user carries a hidden dissatisfaction level `d`, constant within a UTC day and updated at
midnight by a mean-reverting random walk with occasional upward shocks (a bad week, a price rise):

    d' = rho * d + (1 - rho) * mean + noise_sd * N(0, 1) + shock,  shock ~ Bernoulli(shock_rate) * Exp(shock_mean)

The churn hazard per day is `churn_level * base_hazard * exp(beta * d)`: a function of `d` only.
The oracle knows `d` at time t and these dynamics, but not the future noise and shocks, so its
probabilities are the best any model could achieve; they are computed exactly (up to a fine grid)
from the transition kernel, never from the realised future.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import InvalidInputError
from core.timeutil import DAY_MS

_META_KEY = b"churn.simulation"


@dataclass(frozen=True, slots=True)
class Dynamics:
    """Parameters of the hidden state process and of the churn hazard (per day)."""

    # Dissatisfaction is persistent (half-life ~46 days) and spread (stationary sd ~1.2), so churn
    # concentrates in a visible minority; rare shocks (~1 per 100 days) add unforeseeable churn.
    rho: float = 0.985
    mean: float = -0.5
    noise_sd: float = 0.2
    shock_rate: float = 0.01
    shock_mean: float = 1.0
    base_hazard: float = 0.00015  # ~15% of users churn in 60 days at churn_level 1
    beta: float = 2.0
    churn_level: float = 1.0

    def hazard(self, state: np.ndarray) -> np.ndarray:
        """Returns the churn hazard per day for hidden states `state` (same shape)."""
        return self.churn_level * self.base_hazard * np.exp(self.beta * state)

    def step(self, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Returns tomorrow's states drawn from today's `state` (one draw per element)."""
        shocks = (rng.random(state.shape) < self.shock_rate) * rng.exponential(self.shock_mean, state.shape)
        noise = self.noise_sd * rng.standard_normal(state.shape)
        return self.rho * state + (1 - self.rho) * self.mean + noise + shocks

    def stationary(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Returns `size` draws from (a close approximation of) the stationary distribution."""
        state = np.full(size, self.mean + self.shock_rate * self.shock_mean / (1 - self.rho))
        for _ in range(int(10 / (1 - self.rho))):  # ten mean-reversion times forget the start
            state = self.step(state, rng)
        return state


@dataclass(slots=True)
class GroundTruth:
    """What the simulator knows and the model must not: hidden states and churn times.

    Arrays are indexed by user (the order of `user_ids`) and by day since `start_ms` (UTC midnight).
    `state[u, k]` is the hidden state over day k: NaN before the registration day and after the
    churn day. `churn_ms[u]` is the ts of the user's Cancellation Confirmation, -1 if none.
    `events_per_day[u, k]` counts the user's logged-in events on day k (observable, kept so
    observation points can be chosen from the truth alone).
    """

    dynamics: Dynamics
    start_ms: int
    days: int
    user_ids: np.ndarray
    registration_ms: np.ndarray
    churn_ms: np.ndarray
    state: np.ndarray
    events_per_day: np.ndarray

    @property
    def end_ms(self) -> int:
        """Returns the end of the simulated window (exclusive), epoch ms."""
        return self.start_ms + self.days * DAY_MS

    def hazard_per_day(self) -> np.ndarray:
        """Returns the realised churn hazard per day, shape (users, days), NaN where `state` is."""
        return self.dynamics.hazard(self.state)


def save_truth(truth: GroundTruth, path: Path) -> None:
    """Writes the truth as Parquet: one row per user, daily state/hazard/activity as fixed-size lists."""
    days = truth.days

    def daily(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type=kind), days)

    table = pa.table(
        {
            "user_id": pa.array(truth.user_ids.astype(str), type=pa.string()),
            "registration_ms": pa.array(truth.registration_ms, type=pa.int64()),
            "churn_ms": pa.array(truth.churn_ms, mask=truth.churn_ms < 0, type=pa.int64()),
            "state": daily(truth.state, pa.float64()),
            "hazard_per_day": daily(truth.hazard_per_day(), pa.float64()),
            "events_per_day": daily(truth.events_per_day, pa.int32()),
        }
    )
    meta = {"start_ms": truth.start_ms, "days": days, "dynamics": asdict(truth.dynamics)}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def load_truth(path: Path) -> GroundTruth:
    """Returns the truth written by `save_truth`.

    Raises:
        InvalidInputError: the file is not a simulation ground-truth Parquet file.
    """
    table = pq.read_table(path)
    raw_meta = (table.schema.metadata or {}).get(_META_KEY)
    if raw_meta is None:
        msg = f"{path}: no '{_META_KEY.decode()}' metadata; expected a file written by `churn simulate --truth`"
        raise InvalidInputError(msg)
    meta: dict[str, Any] = json.loads(raw_meta)
    days = int(meta["days"])

    def daily(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, days)

    return GroundTruth(
        dynamics=Dynamics(**meta["dynamics"]),
        start_ms=int(meta["start_ms"]),
        days=days,
        user_ids=np.asarray(table.column("user_id").to_pylist(), dtype=object),
        registration_ms=table.column("registration_ms").to_numpy(),
        churn_ms=table.column("churn_ms").fill_null(-1).to_numpy(),
        state=daily("state").astype(np.float64),
        events_per_day=daily("events_per_day").astype(np.int32),
    )
