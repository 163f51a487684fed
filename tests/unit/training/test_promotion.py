"""The promotion rule (`training.promotion.judge`) on prediction logs written as the scorer writes
them, and the audit log's file format."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from models import audit
from monitoring.prediction_log import write_labels, write_snapshot
from tests.support import START_MS, write_shadow_log
from training.promotion import Judgement, judge, paired_outcomes

MARGIN = 0.01


def rule(
    pairs: pl.DataFrame, champion: str = "1", margin: float = MARGIN, min_users: int = 200, min_churners: int = 20
) -> Judgement:
    """The rule with the default thresholds (fewer bootstrap replicates: a unit test)."""
    return judge(pairs, champion, "2", margin, min_users, min_churners, samples=300)


def test_pairs_are_the_labelled_users_both_versions_scored_whatever_the_role(tmp_path: Path) -> None:
    write_shadow_log(tmp_path, "1", "2", users=50, days=2, served_skill=1.0, shadow_skill=1.0)
    # A canary-only day written before the `role` column: each user has one version's row, no pair.
    canary_day = START_MS + 5 * 86_400_000
    write_snapshot(
        tmp_path,
        canary_day,
        pl.DataFrame(
            {
                "user_id": ["a", "b"],
                "as_of": [canary_day] * 2,
                "churn_probability": [0.2, 0.9],
                "risk_tier": ["low", "high"],
                "model_version": ["1", "2"],
                "prediction_id": ["x", "y"],
            }
        ),
    )
    write_labels(tmp_path, canary_day, pl.DataFrame({"user_id": ["a", "b"], "churned": [False, True]}), {})
    # A shadowed day not labelled yet gives no pair either.
    write_shadow_log(tmp_path / "unlabelled", "1", "2", users=5, days=1, served_skill=1.0, shadow_skill=1.0)
    unlabelled = next((tmp_path / "unlabelled").glob("date=*"))
    (unlabelled / "labels.parquet").unlink()
    unlabelled.rename(tmp_path / "date=2026-02-01")

    pairs = paired_outcomes(tmp_path, "1", "2")
    assert pairs.height == 100
    assert pairs["as_of"].n_unique() == 2
    assert pairs.select("as_of", "user_id").is_unique().all()
    swapped = paired_outcomes(tmp_path, "2", "1")  # roles do not matter: served or shadow, a score is a score
    assert swapped["champion"].to_list() == pairs["challenger"].to_list()
    assert paired_outcomes(tmp_path, "1", "3").is_empty()
    assert paired_outcomes(tmp_path / "nothing", "1", "2").is_empty()


def test_a_worse_challenger_is_refused_and_a_better_or_equal_one_accepted(tmp_path: Path) -> None:
    write_shadow_log(tmp_path / "worse", "1", "2", users=400, days=3, served_skill=1.5, shadow_skill=0.0)
    write_shadow_log(tmp_path / "better", "1", "2", users=400, days=3, served_skill=0.7, shadow_skill=2.0)
    worse = rule(paired_outcomes(tmp_path / "worse", "1", "2"))
    better = rule(paired_outcomes(tmp_path / "better", "1", "2"))
    same = judge(paired_outcomes(tmp_path / "worse", "1", "1"), "1", "1", MARGIN, 200, 20, samples=300)

    assert not worse.promote
    assert worse.figures["difference_low"] < -MARGIN
    assert worse.figures["challenger_roc_auc"] < worse.figures["champion_roc_auc"]
    assert "not shown to be no worse" in worse.reason
    assert better.promote
    assert better.figures["difference_low"] >= -MARGIN
    assert better.figures["challenger_roc_auc"] > better.figures["champion_roc_auc"]
    assert same.promote
    assert same.figures["roc_auc_difference"] == 0.0


def test_a_slightly_worse_challenger_needs_the_evidence_to_clear_the_margin(tmp_path: Path) -> None:
    write_shadow_log(tmp_path, "1", "2", users=400, days=3, served_skill=1.5, shadow_skill=1.3, seed=3)
    pairs = paired_outcomes(tmp_path, "1", "2")
    strict = rule(pairs, margin=0.0)
    lenient = rule(pairs, margin=0.2)
    assert strict.figures["roc_auc_difference"] < 0  # worse on these users
    assert not strict.promote
    assert lenient.promote
    assert strict.figures["difference_low"] == lenient.figures["difference_low"]


def test_too_few_labelled_users_or_churners_is_refused_with_the_counts(tmp_path: Path) -> None:
    write_shadow_log(tmp_path, "1", "2", users=150, days=1, served_skill=0.0, shadow_skill=3.0)
    pairs = paired_outcomes(tmp_path, "1", "2")
    few_users = rule(pairs)
    churners = int(pairs["churned"].sum())
    few_churners = rule(pairs, min_users=100, min_churners=churners + 1)
    enough = rule(pairs, min_users=100, min_churners=churners)
    all_churned = rule(pairs.with_columns(pl.lit(True).alias("churned")), min_users=1)

    for refused in (few_users, few_churners, all_churned):
        assert not refused.promote
        assert refused.reason.startswith("too little evidence")
        assert "difference_low" not in refused.figures  # no bootstrap on too little evidence
    assert "150 labelled users" in few_users.reason
    assert f"{churners} churned" in few_users.reason
    assert enough.promote  # the same rows with thresholds they meet: the skilled challenger wins


def test_the_audit_log_reads_newest_first_in_pages_and_skips_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "models.jsonl"
    assert audit.read(path, 10) == ([], 0)
    for n in range(5):
        audit.append(path, {"action": "promote", "to_version": str(n), "figures": {"low": float("nan")}})
    with path.open("a") as f:
        f.write('{"action": "rollb')  # a crash mid-write
    audit.append(path, {"action": "rollback", "to_version": "5"})

    first, total = audit.read(path, 2)
    second, _ = audit.read(path, 2, offset=2)
    assert total == 6
    assert [e["to_version"] for e in first + second] == ["5", "4", "3", "2"]
    assert all(e["at"].endswith("+00:00") for e in first)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["figures"] == {"low": None}  # strict JSON, no NaN
    assert audit.who("  ops-bot ") == "ops-bot"
    assert audit.who("")
