"""The human-readable summary of a training run (the `churn train` table)."""

from __future__ import annotations

from training.pipeline import TrainResult

_BACKTEST_LABELS = {
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "recall_top10": "recall top 10%",
    "precision_top10": "precision top 10%",
    "brier": "Brier",
    "brier_no_skill": "Brier, base rate",  # a constant forecast of each fold's training churn rate
}


def format_summary(summary: TrainResult) -> str:
    """Returns the training summary as an aligned two-column table."""
    m = summary.metrics
    rows: list[tuple[str, str]] = []
    if summary.registered:
        if summary.promoted:
            decision = "promoted to champion"
        elif summary.challenger:
            decision = "challenger (not promoted)"
        else:
            decision = "refused (not served, not challenger)"
        rows.append(("model version", f"{summary.version}  {decision}"))
        rows.extend(("  gate", reason) for reason in summary.reasons)
        rows.append(("run id", str(summary.run_id)))
    window = summary.data_window
    final = summary.final
    rows += [
        ("events", f"{window['first_event']} .. {window['last_event']}"),
        ("final model saw", f"{window['final_points'][0]} .. {window['final_points'][1]}  {final['rows']} rows"
                            f" from {final['days']} days, {final['users']} users, {final['churners']} churners"),
        *[
            (f"selection {name}", f"{window[f'{name}_points'][0]} .. {window[f'{name}_points'][1]}  "
             f"{size['rows']} rows, {size['churners']} churners")
            for name, size in summary.sizes.items() if f"{name}_points" in window
        ],
        ("horizon", f"{summary.horizon_days} days; grid {window['grid_hours']} h; spec {summary.spec_version}"),
        ("model", f"{summary.best_iteration} trees, imbalance {summary.imbalance}, "
                  f"calibration {summary.calibration}"),
        ("search", f"{len(summary.search)} trial(s), chose trial {summary.chosen_trial}: "
                   + ", ".join(f"{k} {v}" for k, v in summary.search[summary.chosen_trial]["params"].items())),
        ("backtest", f"{len(summary.folds)} fold(s): mean [95% interval over users]"),
        *[
            (f"  {_BACKTEST_LABELS.get(name, name)}", f"{v['mean']:.4f}  [{v['low']:.4f}, {v['high']:.4f}]")
            for name, v in summary.backtest.items()
        ],
        *[
            (f"  fold {i + 1}", f"test {f['test_first'][:10]} .. {f['test_last'][:10]}: {f['test_rows']} rows,"
                                f" {f['test_churners']} churners, ROC-AUC {f['roc_auc']:.4f}")
            for i, f in enumerate(summary.folds)
        ],
        ("latest fold", f"ROC-AUC {m['roc_auc']:.4f}, PR-AUC {m['pr_auc']:.4f} (base rate {m['base_rate']:.4f})"),
    ]  # fmt: skip
    if "oracle_roc_auc" in m:
        rows.append(("oracle ROC-AUC", f"{m['oracle_roc_auc']:.4f}  (model / oracle = {m['auc_vs_oracle']:.3f})"))
    rows.append(("tiers", f"high >= {summary.tiers['high']:.4f}, medium >= {summary.tiers['medium']:.4f}"))
    warnings = summary.data_report.get("warnings", [])
    rows.extend(("data warning", w) for w in warnings)
    if not warnings:
        rows.append(("data checks", "no warnings"))
    s = summary.seconds
    rows.append(
        ("seconds", f"checks {s['checks']:.1f}, build {s['build']:.1f}, search {s['search']:.1f}, "
                    f"final fit {s['final_fit']:.1f}, total {s['total']:.1f}")
    )  # fmt: skip
    rows.append(("artifact", str(summary.artifact_dir)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
