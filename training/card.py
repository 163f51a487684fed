"""The model card: Markdown generated from a trained model's meta.json, logged with the model
(`card.md`, and `card` in meta.json so the API serves it without another download)."""

from __future__ import annotations

from typing import Any

from features import spec

SECTIONS = (
    "Intended use",
    "Training data",
    "Features",
    "Backtest",
    "Calibration",
    "Risk tiers",
    "Hyper-parameters",
    "Data report",
    "Known limitations",
)


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def render(meta: dict[str, Any]) -> str:
    """Returns the card of the model described by `meta` (the artifact's meta.json as the
    training pipeline writes it): one `## ` section per entry of `SECTIONS`, in that order."""
    horizon = meta["horizon_days"]
    window = meta.get("data_window", {})
    final = meta.get("final", {})
    backtest = meta.get("metrics", {}).get("backtest", {})
    folds = meta.get("metrics", {}).get("folds", [])
    calibration = meta.get("calibration", {})
    tiers = meta.get("tiers", {})
    report = meta.get("data_report", {})
    search = meta.get("search", {})
    descriptions = spec.describe()
    lines = [f"# Model card: {meta.get('model_name', 'churn model')}", ""]

    lines += [
        "## Intended use",
        "",
        f"Ranks logged-in listeners by their probability of cancelling (`Cancellation Confirmation`)"
        f" within the next **{horizon} days**, from their rolling activity features (spec"
        f" {meta.get('spec_version')}). Meant for retention targeting and monitoring, scored per user"
        " by the stream scorer and the API. Not meant for decisions about individuals without a human"
        " review, nor for horizons other than the one above.",
        "",
    ]
    lines += [
        "## Training data",
        "",
        f"- event log: {window.get('first_event')} .. {window.get('last_event')}",
        f"- observation grid: every {window.get('grid_hours')} h, users active in the last"
        f" {window.get('lookback_days')} days; each user-day weighs 1 whatever the grid",
        f"- final model fitted on observation points {_span(window.get('final_points'))}:"
        f" {final.get('rows')} rows from {final.get('days')} distinct days,"
        f" {final.get('users')} users, {final.get('churners')} churners;"
        f" only points whose {horizon}-day label window ends within the log",
        f"- model selection (tree count, imbalance) on train {_span(window.get('train_points'))},"
        f" validation {_span(window.get('valid_points'))}, gaps of {horizon} days",
        "",
    ]
    lines += ["## Features", "", "| feature | description |", "| --- | --- |"]
    lines += [f"| `{name}` | {descriptions.get(name, '')} |" for name in meta.get("features", [])]
    lines.append("")
    lines += [
        "## Backtest",
        "",
        f"Rolling origin over {len(folds)} test period(s), each after a {horizon}-day gap from its"
        " training data; mean over the folds and 95% bootstrap interval over users (`brier_no_skill`:"
        " the Brier score of a constant forecast of each fold's training churn rate).",
        "",
        "| metric | mean | 95% interval |",
        "| --- | --- | --- |",
    ]
    for name, value in backtest.items():
        lines.append(
            f"| {name} | {_number(value.get('mean'))} | [{_number(value.get('low'))}, {_number(value.get('high'))}] |"
        )
    lines += ["", "| test period | rows | churners | ROC-AUC | PR-AUC |", "| --- | --- | --- | --- | --- |"]
    for fold in folds:
        lines.append(
            f"| {fold.get('test_first')} .. {fold.get('test_last')} | {fold.get('test_rows')} |"
            f" {fold.get('test_churners')} | {_number(fold.get('roc_auc'))} | {_number(fold.get('pr_auc'))} |"
        )
    lines.append("")
    selection = calibration.get("selection", {})
    lines += [
        "## Calibration",
        "",
        f"Method: **{calibration.get('method')}**, fitted on the backtest folds' out-of-sample scores (the"
        " final model's procedure, moved to its intercept), chosen by out-of-fold log loss"
        f" ({calibration.get('scheme', 'leave-one-fold-out')}; a method is used only if it beats the raw"
        " probabilities).",
        "",
        *[
            f"- {name}: Brier {_number(s.get('brier'), 5)}, log loss {_number(s.get('log_loss'))}"
            for name, s in selection.items()
        ],
        "",
    ]
    lines += [
        "## Risk tiers",
        "",
        f"{tiers.get('rule', '')}: high >= {_number(tiers.get('high'))}, medium >= {_number(tiers.get('medium'))}.",
        "",
    ]
    chosen = search.get("chosen", {})
    lines += [
        "## Hyper-parameters",
        "",
        f"{search.get('trials', 0)} trial(s) of a seeded search in {_number(search.get('seconds'), 1)} s,"
        " judged on the backtest mean ROC-AUC (trial 0, the default, is left only for a trial that"
        " beats it on the same rows beyond the bootstrap noise); chosen: "
        + ", ".join(f"{k} {v}" for k, v in chosen.get("params", {}).items())
        + f"; {meta.get('best_iteration')} trees; imbalance {meta.get('imbalance')}.",
        *([f"Why: {search['choice']['reason']}."] if search.get("choice") else []),
        "",
    ]
    warnings = report.get("warnings", [])
    lines += [
        "## Data report",
        "",
        f"- {report.get('events')} events, {report.get('users')} users",
        f"- duplicated events {report.get('duplicated_events')}, sessions out of order"
        f" {report.get('sessions_out_of_order')}, unknown pages {sum((report.get('unknown_pages') or {}).values())},"
        f" users active after cancelling {report.get('users_active_after_cancellation')},"
        f" late events left out {report.get('late_events', 0)}",
        f"- churners per split: {report.get('churners_per_split')}",
        *([f"- warning: {w}" for w in warnings] or ["- no warnings"]),
        "",
    ]
    lines += [
        "## Known limitations",
        "",
        "- Trained on one event log: behaviour changes after its last event are unseen (watch drift).",
        "- The calibration is fitted on the backtest folds' scores and each fold's figures use a map"
        " fitted on the other folds, later ones included: the calibration figures are mildly optimistic.",
        "- Backtest folds reuse the tree count chosen on the selection split, and"
        " the search picks the best of a few trials on the same folds: the figures are mildly optimistic.",
        "- Consecutive days of one user are correlated: the intervals resample users, and folds share users.",
        f"- The final model is fitted on the newest {horizon} labelled days too: no held-out figure"
        " exists for it itself; the backtests describe the procedure.",
        "- The final fit keeps the tree count early stopping chose on the (smaller) selection training"
        " set; more data might carry a few more trees.",
        "- Users with little history get features near zero; their scores are less reliable.",
        "",
    ]
    return "\n".join(lines)


def _span(span: Any) -> str:
    if isinstance(span, list | tuple) and len(span) == 2:
        return f"{span[0]} .. {span[1]}"
    return "n/a"
