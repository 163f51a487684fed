"""The storage boundary for feature rows: one small protocol, two implementations.

`features.feast_store.FeastFeatureStore` (Feast's Redis online store) runs in production;
`InMemoryFeatureStore` here serves unit tests and needs no services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """A user's stored features (`features.spec.STORED_FEATURES`) as of their latest event."""

    user_id: str
    last_event_ms: int
    values: dict[str, float]


class FeatureStore(Protocol):
    """Reads and writes feature rows by user id."""

    def write_rows(self, rows: Sequence[FeatureRow]) -> None:
        """Writes (upserts) the rows; raises ServiceUnavailableError if the store is down."""
        ...

    def read_rows(self, user_ids: Sequence[str]) -> list[FeatureRow | None]:
        """Returns one row per id, `None` for unknown users; raises ServiceUnavailableError."""
        ...


class InMemoryFeatureStore:
    """A dict-backed FeatureStore for unit tests."""

    def __init__(self) -> None:
        self.rows: dict[str, FeatureRow] = {}

    def write_rows(self, rows: Sequence[FeatureRow]) -> None:
        """Stores the rows, replacing earlier ones of the same users."""
        for row in rows:
            self.rows[row.user_id] = row

    def read_rows(self, user_ids: Sequence[str]) -> list[FeatureRow | None]:
        """Returns the stored rows in the order asked, `None` for unknown ids."""
        return [self.rows.get(user_id) for user_id in user_ids]
