"""The hot-swap holder (`models.holder`): what it does when the alias it follows moves, is
removed, or cannot be read."""

from __future__ import annotations

from core.errors import ServiceUnavailableError
from models.holder import ModelHolder
from models.runtime import LoadedModel
from tests.support import StandInModel


def _holder(alias: list[str | None], drop_when_unset: bool) -> ModelHolder:
    """A holder following `alias[0]` (None: no alias; "down": the registry cannot be reached)."""

    def identity() -> str | None:
        if alias[0] == "down":
            msg = "MLflow unreachable"
            raise ServiceUnavailableError(msg)
        return alias[0]

    def load() -> LoadedModel:
        return LoadedModel(StandInModel(), "churn-lightgbm", str(alias[0]))

    return ModelHolder(identity, load, drop_when_unset=drop_when_unset)


def test_a_challenger_whose_alias_is_removed_is_dropped_but_kept_through_a_registry_outage() -> None:
    """`churn rollback` removes the challenger alias: the canary slice and the shadow scores must
    stop using that model at the next poll, not at the next restart."""
    alias: list[str | None] = ["2"]
    challenger = _holder(alias, drop_when_unset=True)
    assert challenger.refresh()
    alias[0] = "down"
    assert not challenger.refresh()
    assert challenger.current is not None  # an outage says nothing of the alias
    alias[0] = None
    assert challenger.refresh()
    assert challenger.current is None
    assert not challenger.refresh()


def test_a_champion_whose_alias_is_removed_keeps_serving() -> None:
    alias: list[str | None] = ["1"]
    champion = _holder(alias, drop_when_unset=False)
    assert champion.refresh()
    alias[0] = None
    assert not champion.refresh()
    assert champion.current is not None
    assert champion.current.version == "1"
