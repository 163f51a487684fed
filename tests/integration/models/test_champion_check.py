"""A champion that does not fit the running spec is refused on the real MLflow registry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.settings import Settings
from features import spec
from models.holder import ModelHolder
from models.registry import champion_loader
from monitoring.metrics import Metrics
from tests.support import register_champion, small_model


def _holder(settings: Settings, uri: str, tmp_path: Path, metrics: Metrics) -> ModelHolder:
    scratch = settings.model_copy(update={"mlflow_tracking_uri": uri, "state_dir": tmp_path / "serving"})
    return ModelHolder(
        *champion_loader(scratch), on_swap=metrics.model_swapped("api"), on_refuse=metrics.model_refused("api")
    )


def _misordered() -> tuple[str, ...]:
    features = list(spec.MODEL_FEATURES)
    features[0], features[1] = features[1], features[0]
    return tuple(features)


@pytest.mark.parametrize(
    ("bad_meta", "expected"),
    [
        ({"features": _misordered()}, "same features in another order"),
        ({"spec_version": "0123456789ab"}, "trained on spec 0123456789ab"),
    ],
    ids=["misordered-features", "other-spec-version"],
)
def test_a_champion_unlike_the_spec_is_refused_and_the_old_one_serves(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad_meta: dict[str, object], expected: str
) -> None:
    metrics = Metrics()
    uri = register_champion(tmp_path, settings)
    holder = _holder(settings, uri, tmp_path, metrics)
    assert holder.refresh()
    assert holder.current is not None
    good = holder.current
    assert good.version == "1"

    features = bad_meta.get("features", spec.MODEL_FEATURES)
    meta = {k: v for k, v in bad_meta.items() if k != "features"}
    bad = small_model(features=tuple(features), **meta)  # type: ignore[arg-type]
    register_champion(tmp_path, settings, bad)  # version 2 becomes champion in the registry
    with caplog.at_level(logging.ERROR, logger="models.holder"):
        assert not holder.refresh()
        assert not holder.refresh()  # refused once: not downloaded, logged or counted again
    assert holder.current is good
    assert str(holder.refused).startswith("2@")  # version 2, told apart by its artifact source
    refusals = [r.getMessage() for r in caplog.records if r.name == "models.holder"]
    assert len(refusals) == 1
    assert "model version 2 refused" in refusals[0]
    assert expected in refusals[0]
    assert metrics.model_refused_total.labels("api")._value.get() == 1
    assert metrics.model_loaded.labels("api")._value.get() == 1

    # A fitting champion after it is loaded as usual.
    register_champion(tmp_path, settings)
    assert holder.refresh()
    assert holder.current is not None
    assert holder.current.version == "3"
