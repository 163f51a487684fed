"""Where the scorer keeps each user's engine state (and so its last applied offsets) between runs.

Redis in production (one msgpack value per user), a dict in unit tests. Saving the state
after the features are written is what makes replays after a crash recognisable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import redis

from churn.errors import ServiceUnavailableError
from features.online import STATE_DECODER, STATE_ENCODER, UserState


class StateStore(Protocol):
    """Loads and saves per-user engine states."""

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one; raises ServiceUnavailableError."""
        ...

    def save(self, states: Mapping[str, UserState]) -> int:
        """Saves the states; returns the bytes written; raises ServiceUnavailableError."""
        ...


class InMemoryStateStore:
    """A StateStore in a dict (serialised, so tests see exactly what Redis would hold)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one."""
        return {u: STATE_DECODER.decode(self.blobs[u]) for u in user_ids if u in self.blobs}

    def save(self, states: Mapping[str, UserState]) -> int:
        """Saves the states; returns the bytes written."""
        written = 0
        for user_id, state in states.items():
            blob = STATE_ENCODER.encode(state)
            self.blobs[user_id] = blob
            written += len(blob)
        return written


class RedisStateStore:
    """States as `<prefix>state:<layout>:<user_id>` msgpack values, read with MGET and written
    with MSET; `layout` is the engine's `state_layout` (states of another layout are not read)."""

    def __init__(self, client: redis.Redis, prefix: str, layout: str) -> None:
        self.client = client
        self.prefix = f"{prefix}state:{layout}:"

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one; raises ServiceUnavailableError."""
        ids = list(user_ids)
        if not ids:
            return {}
        try:
            blobs = self.client.mget([self.prefix + u for u in ids])
        except redis.RedisError as exc:
            msg = f"Redis unavailable while loading user states: {exc}"
            raise ServiceUnavailableError(msg) from exc
        return {u: STATE_DECODER.decode(b) for u, b in zip(ids, blobs, strict=True) if b is not None}

    def save(self, states: Mapping[str, UserState]) -> int:
        """Saves the states in one MSET; returns the bytes written; raises ServiceUnavailableError."""
        if not states:
            return 0
        blobs = {self.prefix + u: STATE_ENCODER.encode(s) for u, s in states.items()}
        try:
            self.client.mset(blobs)  # type: ignore[arg-type]
        except redis.RedisError as exc:
            msg = f"Redis unavailable while saving user states: {exc}"
            raise ServiceUnavailableError(msg) from exc
        return sum(len(b) for b in blobs.values())
