"""`training.registry.apply_decision` on a local MLflow store: a promotion judged against a
champion that another run has since replaced is refused, not applied over it."""

from __future__ import annotations

import time
from pathlib import Path

from core.settings import load_settings
from models import audit
from models.artifact import save_artifact
from models.registry import CHAMPION, champion_version, registry_client
from tests.support import small_model
from training import registry


def test_a_promotion_judged_against_a_replaced_champion_is_refused(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    model = small_model()

    def register() -> tuple[str, str]:
        artifact = save_artifact(tmp_path / f"artifact-{time.time_ns()}", model.booster, model.meta)
        return registry.log_run(settings, artifact, {}, {}, {})

    first_run, first = register()
    registry.apply_decision(settings, first_run, first, registry.Decision(True))
    # Two trainings judged against the first champion; the second one's decision lands last.
    (early_run, early), (late_run, late) = register(), register()
    registry.apply_decision(settings, early_run, early, registry.Decision(True, champion_version=first))
    decision = registry.Decision(True, reasons=["pass: gates"], champion_version=first)
    registry.apply_decision(settings, late_run, late, decision)

    assert champion_version(settings) == early
    assert not decision.promote
    assert decision.reasons[-1].startswith(f"refused: the champion became v{early}")
    assert registry_client(settings).get_run(late_run).data.tags["promotion.decision"] == "rejected"
    entries, _ = audit.read(settings.audit_log_path, limit=1)
    assert (entries[0]["to_version"], entries[0]["outcome"]) == (late, "refused")


def test_a_promotion_judged_against_a_champion_whose_alias_was_removed_is_refused(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    model = small_model()
    artifact = save_artifact(tmp_path / "first", model.booster, model.meta)
    first_run, first = registry.log_run(settings, artifact, {}, {}, {})
    registry.apply_decision(settings, first_run, first, registry.Decision(True))
    run, version = registry.log_run(settings, save_artifact(tmp_path / "second", model.booster, model.meta), {}, {}, {})
    registry_client(settings).delete_registered_model_alias(settings.model_name, CHAMPION)
    decision = registry.Decision(True, champion_version=first)
    registry.apply_decision(settings, run, version, decision)

    assert champion_version(settings) is None
    assert not decision.promote
    assert decision.reasons[-1].startswith(
        f"refused: the champion alias was removed while this model was judged against v{first}"
    )
