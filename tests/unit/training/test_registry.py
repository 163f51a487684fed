"""`training.registry.apply_decision` and `training.promotion.promote` on a local MLflow store: a
promotion judged against a champion (or challenger) that another run has since replaced is
refused, not applied over it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, load_settings
from models import audit
from models.artifact import save_artifact
from models.registry import CHALLENGER, CHAMPION, champion_version, registry_client
from tests.support import small_model
from training import promotion, registry


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
    decision = registry.Decision(
        True, reasons=["pass: gates"], champion_version=first, champion_roc_auc=0.8, champion_compared_as="refitted"
    )
    registry.apply_decision(settings, late_run, late, decision)

    assert champion_version(settings) == early
    assert not decision.promote
    assert decision.reasons[-1].startswith(f"refused: the champion became v{early}")
    # It passed its gates, and its refusal says `churn promote` judges it again: it needs the
    # alias (before, none was set, and `churn promote` answered "no challenger version").
    assert champion_version(settings, CHALLENGER) == late
    assert decision.challenger
    assert registry_client(settings).get_run(late_run).data.tags["promotion.decision"] == "rejected"
    entries, _ = audit.read(settings.audit_log_path, limit=1)
    assert (entries[0]["to_version"], entries[0]["outcome"]) == (late, "refused")
    assert entries[0]["figures"] == {"champion_roc_auc": 0.8, "champion_compared_as": "refitted"}


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


def _register(settings: Settings, folder: Path) -> tuple[str, str]:
    """Registers a version as a training whose gates passed does with --no-promote: `challenger`."""
    model = small_model()
    artifact = save_artifact(folder / f"artifact-{time.time_ns()}", model.booster, model.meta)
    run, version = registry.log_run(settings, artifact, {}, {}, {})
    held = registry.Decision(True, champion_version=champion_version(settings))
    registry.apply_decision(settings, run, version, held, hold=True)
    return run, version


@pytest.mark.parametrize("meanwhile", ["a training registered a challenger", "a training promoted its model"])
def test_churn_promote_refuses_when_the_aliases_moved_while_it_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    first_run, first = _register(settings, tmp_path)
    registry.apply_decision(settings, first_run, first, registry.Decision(True))
    _, judged = _register(settings, tmp_path)
    landed: list[str] = []

    def judge_while_a_training_lands(*_: Any, **__: Any) -> promotion.Judgement:
        run, version = _register(settings, tmp_path)
        if meanwhile == "a training promoted its model":
            registry.apply_decision(settings, run, version, registry.Decision(True, champion_version=first))
        landed.append(version)
        return promotion.Judgement(True, "pass: the challenger is not worse")

    monkeypatch.setattr(promotion, "judge", judge_while_a_training_lands)
    step = promotion.promote(settings)

    assert not step.accepted
    assert step.entry["outcome"] == "refused"
    assert step.entry["reason"].startswith(f"refused: the aliases moved while this step judged (champion v{first}")
    if meanwhile == "a training promoted its model":
        assert champion_version(settings) == landed[0]  # not overwritten by the stale judgement
    else:
        assert champion_version(settings) == first
        assert champion_version(settings, CHALLENGER) == landed[0]
    assert judged != landed[0]


@pytest.mark.parametrize("gates_pass", [True, False], ids=["gates pass: held", "gates fail: refused"])
def test_a_hold_keeps_the_champion_and_records_what_the_gates_said(tmp_path: Path, gates_pass: bool) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    model = small_model()
    first_run, first = registry.log_run(settings, save_artifact(tmp_path / "a", model.booster, model.meta), {}, {}, {})
    registry.apply_decision(settings, first_run, first, registry.Decision(True))
    run, version = registry.log_run(settings, save_artifact(tmp_path / "b", model.booster, model.meta), {}, {}, {})
    decision = registry.Decision(gates_pass, reasons=["gate"], champion_version=first)
    registry.apply_decision(settings, run, version, decision, hold=True)

    assert champion_version(settings) == first
    # A refused version is not served as the challenger (canary, shadow) nor promotable.
    assert champion_version(settings, CHALLENGER) == (version if gates_pass else first)
    assert (decision.promote, decision.held, decision.challenger) == (False, gates_pass, gates_pass)
    outcome = "held" if gates_pass else "refused"
    assert registry_client(settings).get_run(run).data.tags["promotion.decision"] == (
        "held" if gates_pass else "rejected"
    )
    entries, _ = audit.read(settings.audit_log_path, limit=1)
    assert (entries[0]["to_version"], entries[0]["outcome"]) == (version, outcome)


def test_a_version_the_gates_refuse_does_not_replace_the_held_challenger(tmp_path: Path) -> None:
    """v1 champion, v2 held for a staged rollout, v3 refused by the gates: the canary slice and
    the shadow scores keep v2, and `churn promote` cannot move v3 to champion."""
    settings = load_settings(state_dir=tmp_path / "state")
    first_run, first = _register(settings, tmp_path)
    registry.apply_decision(settings, first_run, first, registry.Decision(True))
    _, held = _register(settings, tmp_path)
    model = small_model()
    run, refused = registry.log_run(
        settings, save_artifact(tmp_path / "refused", model.booster, model.meta), {}, {}, {}
    )
    registry.apply_decision(
        settings, run, refused, registry.Decision(False, reasons=["fail: floor"], champion_version=first)
    )

    assert (champion_version(settings), champion_version(settings, CHALLENGER)) == (first, held)
