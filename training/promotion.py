"""`churn promote` and `churn rollback`: moving the `champion` alias on evidence, with a record.

The rule (`judge`): the challenger becomes champion only if its realized performance on the
users both versions scored during the shadow or canary period is not worse than the champion's.
The evidence is the prediction log: every labelled daily snapshot where the same user has a row
from each version (a served row and a shadow row; without shadow scoring, canary users have a
row of one version only and give no pair). On those (day, user) rows the paired bootstrap over
users (`training.backtest.paired_auc_difference`: a user's days stay together) bounds ROC-AUC
(challenger) - ROC-AUC(champion); the challenger is promoted when the one-sided 95% lower bound
is at least -`promote_auc_margin` (non-inferiority: "not worse" must be shown, not assumed).
Fewer than `promote_min_users` paired users or `promote_min_churners` churners among them is too
little evidence: refused, saying how many there are. With no champion to compare with, the
challenger must pass the floors its training gates apply, on its recorded backtests
(`judge_against_floors`). `--force` (with a reason) overrides the
rule, never the spec check. A refusal leaves every alias as it was. The aliases are read again
just before the move: if a `churn train` registered a new challenger or promoted a champion while
the step judged, the step is refused (MLflow has no compare-and-set of an alias, so the window
left is that last read's milliseconds, not the judging's seconds).

`rollback` points `champion` back at the version the current champion replaced (its
`previous_champion` tag, see `training.registry.move_champion`); the scorer and the API swap to
it by their usual polling. A challenger alias on the rolled-back version is removed, so a bad
model stops being served to the canary slice too. Every step goes to the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.errors import InvalidInputError, NotFoundError, ServiceUnavailableError
from core.settings import Settings, mask_url
from models import audit
from models.artifact import ChurnModel
from models.registry import CHALLENGER, champion_version, check_against_spec, load_version, registry_client
from monitoring.prediction_log import read_log
from training import backtest, metrics
from training.registry import PREVIOUS_CHAMPION_TAG, backtest_gates, move_champion, record_step

PAIR_SCHEMA = {
    "as_of": pl.Int64,
    "user_id": pl.Utf8,
    "churned": pl.Boolean,
    "champion": pl.Float64,
    "challenger": pl.Float64,
}


@dataclass
class Judgement:
    """Whether the evidence lets the challenger replace the champion, why, and the figures."""

    promote: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class Step:
    """The outcome of `promote` or `rollback`: the audit entry as written (`outcome` is
    `accepted`, `refused`, `forced` or `done`)."""

    entry: dict[str, Any]

    @property
    def accepted(self) -> bool:
        """Returns True when the champion alias moved."""
        return self.entry["outcome"] != "refused"


def paired_outcomes(root: Path, champion: str, challenger: str) -> pl.DataFrame:
    """Returns one row per (labelled snapshot, user) of the prediction log under `root` that both
    versions scored (any role: served, shadow): as_of, user_id, churned, and each version's
    probability as `champion` and `challenger`. Empty when there is none (or no log)."""
    try:
        log = read_log(root, role=None)
    except InvalidInputError:
        return pl.DataFrame(schema=PAIR_SCHEMA)
    labelled = log.filter(pl.col("churned").is_not_null()).with_columns(pl.col("model_version").cast(pl.Utf8))

    def scores(version: str, name: str) -> pl.DataFrame:
        rows = labelled.filter(pl.col("model_version") == version)
        return rows.select("as_of", "user_id", "churned", pl.col("churn_probability").alias(name)).unique(
            ["as_of", "user_id"], keep="first"
        )

    pairs = scores(champion, "champion").join(
        scores(challenger, "challenger").drop("churned"), on=["as_of", "user_id"], how="inner"
    )
    return pairs.select(list(PAIR_SCHEMA)).cast(PAIR_SCHEMA).sort("as_of", "user_id")  # type: ignore[arg-type]


def judge(
    pairs: pl.DataFrame,
    champion: str,
    challenger: str,
    margin: float,
    min_users: int,
    min_churners: int,
    samples: int = 500,
    seed: int = 0,
) -> Judgement:
    """Returns the decision of the rule (module doc) on `pairs` (as `paired_outcomes` gives them):
    promote when there are at least `min_users` users and `min_churners` churning users (and a
    user who stayed), and the one-sided 95% lower bound of the paired bootstrap (`samples`
    replicates) of ROC-AUC(challenger) - ROC-AUC(champion) is >= -`margin`."""
    labels = pairs["churned"].to_numpy().astype(bool)
    users = pairs["user_id"].n_unique()
    churners = pairs.filter(pl.col("churned"))["user_id"].n_unique()
    stayers = pairs.filter(~pl.col("churned"))["user_id"].n_unique()
    figures: dict[str, float] = {
        "rows": float(pairs.height),
        "users": float(users),
        "churners": float(churners),
        "days": float(pairs["as_of"].n_unique()),
        "margin": margin,
    }
    evidence = (
        f"{users} labelled users scored by both champion v{champion} and challenger v{challenger}"
        f" ({churners} churned, {pairs.height} user-days over {int(figures['days'])} snapshot(s))"
    )
    if users < min_users or churners < min_churners or stayers == 0:
        reason = (
            f"too little evidence: {evidence}; the rule needs at least {min_users} users and {min_churners}"
            " churners (CHURN_PROMOTE_MIN_USERS, CHURN_PROMOTE_MIN_CHURNERS) and a user who stayed. Keep the"
            " challenger in shadow or canary until more snapshots are labelled (H days after each), or --force"
        )
        return Judgement(False, reason, figures)
    new, old = pairs["challenger"].to_numpy(), pairs["champion"].to_numpy()
    paired = backtest.paired_auc_difference(labels, new, old, pairs["user_id"].to_numpy(), samples, seed)
    figures.update(
        {
            "champion_roc_auc": metrics.roc_auc(labels, old),
            "challenger_roc_auc": metrics.roc_auc(labels, new),
            "champion_pr_auc": metrics.average_precision(labels, old),
            "challenger_pr_auc": metrics.average_precision(labels, new),
            "roc_auc_difference": paired["difference"],
            "difference_low": paired["low"],
            "difference_high": paired["high"],
        }
    )
    promote = bool(np.isfinite(paired["low"]) and paired["low"] >= -margin)
    reason = (
        f"realized ROC-AUC challenger v{challenger} {figures['challenger_roc_auc']:.4f} vs champion v{champion}"
        f" {figures['champion_roc_auc']:.4f} on {evidence}: difference {paired['difference']:+.4f}, one-sided"
        f" 95% lower bound {paired['low']:+.4f} {'>=' if promote else '<'} -{margin:g} (CHURN_PROMOTE_AUC_MARGIN)"
        + ("" if promote else ": not shown to be no worse")
    )
    return Judgement(promote, reason, figures)


def _checked(settings: Settings, version: str) -> ChurnModel:
    """Loads `version`, checks it against the running spec (the holders would refuse it) and
    returns it.

    Raises:
        ModelRefusedError: it does not fit the running spec.
        ServiceUnavailableError: the registry cannot be reached.
    """
    model = load_version(settings, version)
    check_against_spec(model, version)
    return model


def judge_against_floors(settings: Settings, meta: dict[str, Any]) -> Judgement:
    """Returns the judgement of a challenger when there is no champion to compare it with: the
    gates its training applied on its own backtest figures (`registry.backtest_gates`: the
    ROC-AUC and PR-AUC floors, the calibration's Brier) on the backtest its training recorded
    (`meta["metrics"]["backtest"]`). Without it, a version its training refused for a floor
    became champion through `churn promote` as "accepted"."""
    backtest = (meta.get("metrics") or {}).get("backtest") or {}
    figures = {
        f"backtest_{metric}": float(backtest[metric]["mean"])
        for metric in ("roc_auc", "pr_auc", "brier")
        if (backtest.get(metric) or {}).get("mean") is not None
    }
    verdicts = backtest_gates(settings, backtest)
    passed = not any(v.startswith("fail") for v in verdicts)
    return Judgement(passed, "; ".join(["no current champion", *verdicts]), figures)


def _moved_since(settings: Settings, champion: str | None, challenger: str) -> str | None:
    """Returns why the step must be refused when `champion` or `challenger` is no longer where it
    was when the step read them (a `churn train` promoted or registered meanwhile), else None.

    Raises:
        ServiceUnavailableError: the registry cannot be reached.
    """
    now = champion_version(settings), champion_version(settings, CHALLENGER)
    if now == (champion, challenger):
        return None
    then = f"champion {_named(champion)} and challenger v{challenger}"
    return (
        f"refused: the aliases moved while this step judged ({then}; now champion {_named(now[0])}, challenger"
        f" {_named(now[1])}); run `churn promote` again"
    )


def _named(version: str | None) -> str:
    return f"v{version}" if version else "none"


def promote(settings: Settings, *, force: bool = False, reason: str = "", actor: str = "") -> Step:
    """Moves `challenger` to `champion` when `judge` allows it (or `force`, which needs a
    `reason`); records the step either way. Returns the step (`accepted` False: refused, aliases
    untouched).

    Raises:
        NotFoundError: there is no challenger.
        InvalidInputError: the challenger is already champion, or `force` without a reason.
        ModelRefusedError: the challenger does not fit the running spec.
        ServiceUnavailableError: the registry cannot be reached or the audit log written.
    """
    if force and not reason.strip():
        msg = "--force needs --reason: the audit log records why the rule was overridden"
        raise InvalidInputError(msg)
    current = champion_version(settings)
    challenger = champion_version(settings, CHALLENGER)
    if challenger is None:
        where = mask_url(settings.tracking_uri)
        msg = f"no `challenger` version of {settings.model_name} at {where}; `churn train` registers one"
        raise NotFoundError(msg)
    if challenger == current:
        msg = f"challenger v{challenger} is already the champion: nothing to promote"
        raise InvalidInputError(msg)
    model = _checked(settings, challenger)
    if current is None:
        judgement = judge_against_floors(settings, model.meta or {})
    else:
        pairs = paired_outcomes(settings.predictions_dir, current, challenger)
        judgement = judge(
            pairs,
            current,
            challenger,
            settings.promote_auc_margin,
            settings.promote_min_users,
            settings.promote_min_churners,
            settings.promote_bootstrap_samples,
        )
    outcome = "accepted" if judgement.promote else ("forced" if force else "refused")
    # MLflow has no compare-and-set of an alias: check again just before moving it.
    moved = _moved_since(settings, current, challenger) if outcome != "refused" else None
    if moved:
        outcome, judgement = "refused", Judgement(False, moved, judgement.figures)
    entry = {
        "action": "promote",
        "trigger": "command",
        "outcome": outcome,
        "actor": audit.who(actor or settings.actor),
        "reason": moved or reason.strip() or judgement.reason,
        "rule": judgement.reason,
        "from_version": current,
        "to_version": challenger,
        "figures": judgement.figures,
    }
    if outcome == "refused":  # only the challenger is concerned: the champion's record stays as it was
        return Step(record_step(settings, entry, [challenger]))
    move_champion(settings, challenger, replaced=current)
    return Step(record_step(settings, entry, [v for v in (current, challenger) if v]))


def rollback(settings: Settings, *, reason: str = "", actor: str = "") -> Step:
    """Points `champion` back at the version the current champion replaced, removes a
    `challenger` alias from the rolled-back version, and records the step. Returns the step.

    Raises:
        NotFoundError: there is no champion, or it has no previous champion recorded.
        ModelRefusedError: the previous champion does not fit the running spec.
        ServiceUnavailableError: the registry cannot be reached or the audit log written.
    """
    from mlflow.exceptions import MlflowException  # heavy (seconds): imported on first use

    current = champion_version(settings)
    if current is None:
        msg = f"no champion version of {settings.model_name}: nothing to roll back"
        raise NotFoundError(msg)
    name = settings.model_name
    try:
        client = registry_client(settings)
        previous = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG)
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    if not previous:
        msg = f"champion v{current} records no previous champion (it was the first one): nothing to roll back to"
        raise NotFoundError(msg)
    _checked(settings, previous)
    move_champion(settings, previous, replaced=None)
    withdrawn = champion_version(settings, CHALLENGER) == current
    if withdrawn:
        try:
            client.delete_registered_model_alias(name, CHALLENGER)
        except MlflowException as exc:
            msg = f"MLflow at {mask_url(settings.tracking_uri)}: champion is v{previous} again, but {exc}"
            raise ServiceUnavailableError(msg) from exc
    entry = {
        "action": "rollback",
        "trigger": "command",
        "outcome": "done",
        "actor": audit.who(actor or settings.actor),
        "reason": reason.strip() or "(no reason given)",
        "from_version": current,
        "to_version": previous,
        "challenger_withdrawn": withdrawn,
    }
    return Step(record_step(settings, entry, [current, previous]))
