"""The human-readable summary of a training run (the `churn train` table)."""

from __future__ import annotations

from training.pipeline import TrainResult


def format_summary(summary: TrainResult) -> str:
    """Returns the training summary as an aligned two-column table."""
    m = summary.metrics
    rows: list[tuple[str, str]] = []
    if summary.registered:
        decision = "promoted to champion" if summary.promoted else "challenger only (not promoted)"
        rows.append(("model version", f"{summary.version}  {decision}"))
        rows.extend(("  gate", reason) for reason in summary.reasons)
        rows.append(("run id", str(summary.run_id)))
    window = summary.data_window
    rows += [
        ("events", f"{window['first_event']} .. {window['last_event']}"),
        *[
            (f"{name} points", f"{window[f'{name}_points'][0]} .. {window[f'{name}_points'][1]}  "
             f"{size['rows']} rows, {size['positives']} churners")
            for name, size in summary.sizes.items()
        ],
        ("horizon", f"{summary.horizon_days} days; spec {summary.spec_version}"),
        ("model", f"{summary.best_iteration} trees, imbalance {summary.imbalance}, "
                  f"calibration {summary.calibration}"),
        ("test ROC-AUC", f"{m['roc_auc']:.4f}"),
        ("test PR-AUC", f"{m['pr_auc']:.4f}  (base rate {m['base_rate']:.4f})"),
        ("top 10%", f"recall {m['recall_top10']:.3f}, precision {m['precision_top10']:.3f}, "
                    f"lift {m['lift_top10']:.2f}"),
        ("Brier", f"{m['brier']:.5f}"),
    ]  # fmt: skip
    if "oracle_roc_auc" in m:
        rows.append(("oracle ROC-AUC", f"{m['oracle_roc_auc']:.4f}  (model / oracle = {m['auc_vs_oracle']:.3f})"))
    rows.append(("tiers", f"high >= {summary.tiers['high']:.4f}, medium >= {summary.tiers['medium']:.4f}"))
    seconds = summary.seconds
    rows.append(("seconds", f"build {seconds['build']:.1f}, fit {seconds['fit']:.1f}, total {seconds['total']:.1f}"))
    rows.append(("artifact", str(summary.artifact_dir)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
