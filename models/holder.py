"""The hot-swap holder: the current champion of one process, replaced between batches or
requests when the registry's `champion` alias moves (in-flight work keeps the model it took)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.gc_policy import release_frozen
from models.runtime import LoadedModel

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the current champion and swaps it when the registry changes."""

    def __init__(
        self,
        version_of_champion: Callable[[], str | None],
        load: Callable[[], LoadedModel | None],
        on_swap: Callable[[LoadedModel], None] = lambda _: None,
    ) -> None:
        self._version_of_champion = version_of_champion
        self._load = load
        self._on_swap = on_swap  # e.g. the model-version gauge of the process
        self.current: LoadedModel | None = None

    def refresh(self) -> bool:
        """Loads the champion if its version changed; returns True on a swap. Never raises."""
        try:
            version = self._version_of_champion()
            if version is None or (self.current is not None and self.current.version == version):
                return False
            loaded = self._load()
        except Exception:  # a registry hiccup must not stop scoring with the model we have
            log.exception("could not refresh the champion model; keeping %s", self.current and self.current.version)
            return False
        if loaded is None:
            return False
        self.current = loaded
        release_frozen()  # the old model's objects may sit in frozen reference cycles
        self._on_swap(loaded)
        log.info("now scoring with %s version %s", loaded.name, loaded.version)
        return True
