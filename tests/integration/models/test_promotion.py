"""`churn promote` and `churn rollback` on a real MLflow registry, with the real `churn` CLI, a
running `churn consume` scorer on the real Kafka/Redis and the real API: a worse challenger is
refused (aliases untouched), a better one promoted, a rollback restores the previous champion in
both processes without a restart, and every step is in the audit log and `GET /models/history`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bench.harness import wait_for
from core.settings import Settings
from core.timeutil import parse_utc, to_ms
from models.registry import registry_client
from serving.app import create_app
from tests.support import (
    Deployment,
    produce_paced,
    register_challenger,
    register_champion,
    small_model,
    wave_events,
    write_shadow_log,
)

CHURN = str(Path(sys.executable).parent / "churn")
LOG_DAYS_BEFORE = -100  # the fixture's snapshots lie far before the stream's days (no overlap with its own)


def _churn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHURN, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def _aliases(settings: Settings) -> dict[str, str]:
    aliases = registry_client(settings).get_registered_model(settings.model_name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def _version_tags(settings: Settings, version: str) -> dict[str, str]:
    return dict(registry_client(settings).get_model_version(settings.model_name, version).tags)


@pytest.mark.soak  # a scorer, an API and four CLI runs: ~4 min
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_promote_refuses_worse_accepts_better_and_rollback_restores_the_previous_in_scorer_and_api(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    folder = tmp_path / "registry"
    uri = register_champion(folder, settings, small_model())
    d = Deployment(settings, uri, tmp_path, f"pro{unique}", topic, model_poll_seconds=0.5)
    env = {**d.env, "CHURN_ACTOR": "release-bot"}
    scorer = d.start_scorer()
    try:
        scorer.wait_ready()
        with TestClient(create_app(d.settings)) as api:

            def serving(version: str) -> bool:
                labels = {"component": "scorer", "name": d.settings.model_name, "version": version}
                in_scorer = scorer.samples().get(("churn_model_info", frozenset(labels.items())))
                return in_scorer == 1 and api.get("/models/current").json().get("version") == version

            assert serving("1")
            # A worse challenger: on the users both scored (a shadow period), its ranking is noise.
            assert register_challenger(folder, settings, small_model(rounds=3)) == "2"
            write_shadow_log(
                d.settings.predictions_dir, "1", "2", users=300, days=3, served_skill=1.5, shadow_skill=0.0,
                first_day=LOG_DAYS_BEFORE,
            )  # fmt: skip
            refused = _churn(env, "promote")
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "not shown to be no worse" in refused.stdout
            assert _aliases(d.settings) == {"champion": "1", "challenger": "2"}
            unforced = _churn(env, "promote", "--force")
            assert unforced.returncode == 2
            assert "--reason" in unforced.stderr
            assert _aliases(d.settings) == {"champion": "1", "challenger": "2"}

            # A better challenger, shadowed on other days.
            assert register_challenger(folder, settings, small_model(rounds=10)) == "3"
            write_shadow_log(
                d.settings.predictions_dir, "1", "3", users=300, days=3, served_skill=0.7, shadow_skill=2.0,
                first_day=LOG_DAYS_BEFORE + 10, seed=1,
            )  # fmt: skip
            accepted = _churn(env, "promote", "--reason", "shadow week looked good")
            assert accepted.returncode == 0, accepted.stdout + accepted.stderr
            assert _aliases(d.settings) == {"champion": "3", "challenger": "3", "previous-champion": "1"}
            wait_for(lambda: serving("3"), 60, "scorer and API on v3")
            users = 40
            waves = wave_events(users, 2, seed=11)
            ids = sorted({e.user_id for e in waves[0]})

            def stored_by(version: str, wave: int) -> bool:
                """Every user's stored stream score is of their event in `wave`, by `version`."""
                results = api.post("/users/risk", json={"user_ids": ids}).json()["results"]
                latest = {e.user_id: e.ts for e in waves[wave]}
                stored = {r["user_id"]: r.get("stored_risk") for r in results}
                if any(s is None or to_ms(parse_utc(s["event_time"])) != latest[u] for u, s in stored.items()):
                    return False  # not every user's event of the wave is scored yet
                return {s["model_version"] for s in stored.values() if s is not None} == {version}

            produce_paced(d.settings, waves[0], rate=100_000)
            wait_for(lambda: stored_by("3", 0), 120, "the stream's scores of wave 0 by v3")

            rolled = _churn(env, "rollback", "--reason", "complaints from the CRM team")
            assert rolled.returncode == 0, rolled.stdout + rolled.stderr
            # The rolled-back version stops being the challenger too (no canary or shadow of it).
            assert _aliases(d.settings) == {"champion": "1"}
            wait_for(lambda: serving("1"), 60, "scorer and API back on v1 (an older version) without a restart")
            produce_paced(d.settings, waves[1], rate=100_000)
            wait_for(lambda: stored_by("1", 1), 120, "the stream's scores of wave 1 by v1")  # the stream scores with v1
            answers = api.post("/users/risk", json={"user_ids": ids}).json()["results"]
            assert {a["model"]["version"] for a in answers} == {"1"}  # and so does the API
            assert [a for a in answers if a.get("shadow") is not None] == []  # v3 withdrawn: no shadow of it
            again = _churn(env, "rollback")
            assert again.returncode == 2
            assert "records no previous champion" in again.stderr

            history = api.get("/models/history").json()
            steps = [(e["action"], e["outcome"], e["from_version"], e["to_version"]) for e in history["entries"]]
            assert steps == [
                ("rollback", "done", "3", "1"),
                ("promote", "accepted", "1", "3"),
                ("promote", "refused", "1", "2"),
            ]
            assert {e["actor"] for e in history["entries"]} == {"release-bot"}
            assert history["entries"][0]["reason"] == "complaints from the CRM team"
            figures = history["entries"][1]["figures"]
            assert figures["challenger_roc_auc"] > figures["champion_roc_auc"]
            assert figures["users"] == 300
        lines = [json.loads(line) for line in d.settings.audit_log_path.read_text().splitlines()]
        assert [(e["action"], e["to_version"]) for e in lines] == [
            ("promote", "2"),
            ("promote", "3"),
            ("rollback", "1"),
        ]
        assert json.loads(_version_tags(d.settings, "2")["audit.promote"])["outcome"] == "refused"
        assert json.loads(_version_tags(d.settings, "3")["audit.rollback"])["to_version"] == "1"
        assert _version_tags(d.settings, "3")["previous_champion"] == "1"
        assert scorer.stop() == 0
    finally:
        if scorer.proc.poll() is None:
            scorer.proc.kill()
            scorer.proc.wait()
        d.cleanup()


def test_force_needs_a_reason_overrides_too_little_evidence_and_rollback_walks_back_once(
    settings: Settings, tmp_path: Path
) -> None:
    uri = register_champion(tmp_path, settings, small_model())
    assert register_challenger(tmp_path, settings, small_model(rounds=3)) == "2"
    scratch = settings.model_copy(update={"mlflow_tracking_uri": uri, "state_dir": tmp_path / "state"})
    env = {**os.environ, "CHURN_MLFLOW_TRACKING_URI": uri, "CHURN_STATE_DIR": str(scratch.state_dir)}

    no_evidence = _churn(env, "promote", "--actor", "alice")
    assert no_evidence.returncode == 1
    assert "too little evidence: 0 labelled users" in no_evidence.stdout
    assert _aliases(scratch) == {"champion": "1", "challenger": "2"}
    forced = _churn(env, "promote", "--force", "--reason", "hotfix for the pricing change", "--actor", "alice")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert _aliases(scratch) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    tag = json.loads(_version_tags(scratch, "2")["audit.promote"])
    assert (tag["outcome"], tag["reason"], tag["actor"]) == ("forced", "hotfix for the pricing change", "alice")
    assert tag["rule"].startswith("too little evidence")

    assert _churn(env, "rollback", "--actor", "bob").returncode == 0
    assert _aliases(scratch) == {"champion": "1"}
    lines = [json.loads(line) for line in scratch.audit_log_path.read_text().splitlines()]
    assert [(e["action"], e["trigger"], e["outcome"], e["to_version"]) for e in lines] == [
        ("promote", "train", "accepted", "1"),  # register_champion applies the training gates' decision
        ("promote", "train", "held", "2"),  # register_challenger: gates passed, held (--no-promote)
        ("promote", "command", "refused", "2"),
        ("promote", "command", "forced", "2"),
        ("rollback", "command", "done", "1"),
    ]
    assert [e["actor"] for e in lines[2:]] == ["alice", "alice", "bob"]
    assert lines[-1]["challenger_withdrawn"] is True
