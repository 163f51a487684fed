"""Where the scorer keeps each user's engine state (and so its last applied offsets) between runs.

Redis in production (one msgpack value per user), a dict in unit tests. Saving the state
after the features are written is what makes replays after a crash recognisable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import redis

from core.redis import redis_errors
from features.online import STATE_DECODER, UserState


class StateStore(Protocol):
    """Loads and saves per-user engine states."""

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one; raises ServiceUnavailableError."""
        ...

    def save(self, blobs: Mapping[str, bytes]) -> int:
        """Saves states encoded with `STATE_ENCODER` (the caller encodes: the scorer does it
        right after each user's update); returns the bytes written; raises
        ServiceUnavailableError."""
        ...


class InMemoryStateStore:
    """A StateStore in a dict (serialised, so tests see exactly what Redis would hold)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one."""
        return {u: STATE_DECODER.decode(self.blobs[u]) for u in user_ids if u in self.blobs}

    def save(self, blobs: Mapping[str, bytes]) -> int:
        """Saves encoded states; returns the bytes written."""
        self.blobs.update(blobs)
        return sum(map(len, blobs.values()))


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
        with redis_errors("loading user states"):
            blobs = self.client.mget([self.prefix + u for u in ids])
        return {u: STATE_DECODER.decode(b) for u, b in zip(ids, blobs, strict=True) if b is not None}

    def save(self, blobs: Mapping[str, bytes]) -> int:
        """Saves encoded states in one MSET; returns the bytes written; raises ServiceUnavailableError."""
        if not blobs:
            return 0
        with redis_errors("saving user states"):
            self.client.mset({self.prefix + u: b for u, b in blobs.items()})
        return sum(map(len, blobs.values()))
