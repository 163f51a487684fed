"""The hot-swap holder: the current champion of one process, replaced between batches or
requests when the registry's `champion` alias moves (in-flight work keeps the model it took)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.errors import ModelRefusedError
from core.gc_policy import release_frozen
from models.runtime import LoadedModel

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the current champion and swaps it when the registry changes."""

    def __init__(
        self,
        identity_of_champion: Callable[[], str | None],
        load: Callable[[], LoadedModel | None],
        on_swap: Callable[[LoadedModel], None] = lambda _: None,
        on_refuse: Callable[[str, str], None] = lambda _version, _reason: None,
        drop_when_unset: bool = False,
    ) -> None:
        """`drop_when_unset`: when the alias points nowhere any more, let the model go (the
        challenger: `churn rollback` and a promotion that ends a trial remove its alias, and it
        must stop serving the canary slice and shadow scores); else keep the one it has (the
        champion: a process never stops answering for want of an alias)."""
        self._drop_when_unset = drop_when_unset
        self._identity_of_champion = identity_of_champion
        self._load = load
        self._on_swap = on_swap  # e.g. the model-version gauge of the process
        self._on_refuse = on_refuse  # (version, reason), e.g. the refused-models counter
        self.current: LoadedModel | None = None
        self.refused: str | None = None  # the champion identity refused last (not loaded again)

    def refresh(self) -> bool:
        """Loads the champion if its identity changed (`identity_of_champion`: its version, or
        `<version>@<source key>`, which also tells a re-created registry's v1 from the old v1), or
        drops it when its alias is gone and `drop_when_unset`; returns True on a swap or a drop.
        A champion that does not fit the running spec is refused once (logged, `on_refuse` with
        its version number) and the current model keeps serving. Never raises."""
        try:
            identity = self._identity_of_champion()
            if identity is None and self._drop_when_unset and self.current is not None:
                log.info("%s version %s withdrawn (its alias was removed)", self.current.name, self.current.version)
                self.current = None
                release_frozen()
                return True
            if identity is None or (
                self.current is not None and (self.current.identity or self.current.version) == identity
            ):
                return False
            if identity == self.refused:
                return False
            loaded = self._load()
        except ModelRefusedError as exc:
            self.refused = identity
            log.error("%s; keeping %s", exc, self.current and self.current.version)
            self._on_refuse(str(identity).partition("@")[0], str(exc))
            return False
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
