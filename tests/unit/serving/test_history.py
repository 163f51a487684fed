"""`GET /models/history`: the audit log newest first, paged, behind the API key, 4xx on bad
paging; a hand-edited line that does not fit the schema is shown as unreadable, never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from fastapi.testclient import TestClient

from core.settings import load_settings
from models import audit
from models.holder import ModelHolder
from monitoring.metrics import Metrics
from serving.app import create_app
from serving.deps import Deps

KEY = {"X-API-Key": "k1"}


def test_history_pages_newest_first_behind_the_key(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    settings = load_settings(api_keys=["k1"], model_audit_log=log)
    deps = Deps(service=cast(Any, None), models=ModelHolder(lambda: None, lambda: None), metrics=Metrics())
    with TestClient(create_app(settings, deps)) as http:
        empty = http.get("/models/history", headers=KEY)
        assert empty.status_code == 200
        assert empty.json()["entries"] == []
        assert empty.json()["next_offset"] is None
        steps = [("promote", "refused", "2"), ("promote", "accepted", "3"), ("rollback", "done", "1")]
        for action, outcome, version in steps:
            audit.append(log, {"action": action, "outcome": outcome, "to_version": version, "actor": "ops"})

        first = http.get("/models/history", params={"limit": 2}, headers=KEY).json()
        rest = http.get("/models/history", params={"limit": 2, "offset": first["next_offset"]}, headers=KEY).json()
        assert first["total"] == 3
        seen = [(e["action"], e["outcome"], e["to_version"]) for e in first["entries"] + rest["entries"]]
        assert seen == steps[::-1]
        assert rest["next_offset"] is None
        assert http.get("/models/history").status_code == 401
        for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "ten"}):
            answer = http.get("/models/history", params=bad, headers=KEY)
            assert answer.status_code == 422, bad
            assert "invalid request" in answer.json()["detail"]


def test_a_line_that_does_not_fit_the_schema_is_shown_as_unreadable_and_the_page_answers(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    settings = load_settings(api_keys=["k1"], model_audit_log=log)
    deps = Deps(service=cast(Any, None), models=ModelHolder(lambda: None, lambda: None), metrics=Metrics())
    audit.append(log, {"action": "promote", "outcome": "accepted", "to_version": 3})  # a number, typed by hand
    audit.append(log, {"action": "rollback", "outcome": "done", "actor": ["ops"], "figures": "none"})
    with TestClient(create_app(settings, deps)) as http:
        answer = http.get("/models/history", headers=KEY)
    assert answer.status_code == 200
    unreadable, numbered = answer.json()["entries"]
    assert numbered["to_version"] == "3"
    assert unreadable["outcome"] == "unreadable"
    assert "actor" in unreadable["reason"]
    assert "figures" in unreadable["reason"]
    assert unreadable["line"]["actor"] == ["ops"]


def test_a_line_nested_too_deeply_to_parse_is_skipped_and_the_page_answers(tmp_path: Path) -> None:
    """Valid JSON nested deeper than the parser goes raised RecursionError out of
    `audit.read` (only JSONDecodeError was caught): `GET /models/history` answered 500."""
    log = tmp_path / "audit.jsonl"
    settings = load_settings(api_keys=["k1"], model_audit_log=log)
    deps = Deps(service=cast(Any, None), models=ModelHolder(lambda: None, lambda: None), metrics=Metrics())
    audit.append(log, {"action": "promote", "outcome": "accepted", "to_version": "3"})
    with log.open("a") as lines:
        lines.write('{"figures": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with TestClient(create_app(settings, deps)) as http:
        answer = http.get("/models/history", headers=KEY)
    assert answer.status_code == 200, answer.text
    assert [e["to_version"] for e in answer.json()["entries"]] == ["3"]
