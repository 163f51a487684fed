"""What `/models/current` says about the champion, read from its artifact's meta.json."""

from __future__ import annotations

from typing import Any

from models.runtime import LoadedModel
from serving.schemas import ModelInfo


def model_info(loaded: LoadedModel, meta: dict[str, Any], default_horizon_days: int) -> ModelInfo:
    """Returns the model's identity, test metrics, training window, calibration method and
    tier cuts.

    The artifact keeps the test metrics under `metrics.test` (beside the per-candidate
    validation figures); a flat `metrics` dict is read as the test metrics. Only numbers are
    reported (the calibration curve and other nested values are left out); the window's
    `[start, end]` pairs become ISO 8601 intervals `start/end`.
    """
    raw: dict[str, Any] = meta.get("metrics") or {}
    nested = raw.get("test")
    test: dict[str, Any] = nested if isinstance(nested, dict) else raw
    metrics = {
        k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None)
        for k, v in test.items()
        if v is None or isinstance(v, int | float)
    }
    window: dict[str, str | None] = {}
    for key, value in (meta.get("data_window") or {}).items():
        if isinstance(value, list | tuple):
            window[key] = "/".join(str(v) for v in value)
        elif value is None or isinstance(value, str | int | float):
            window[key] = None if value is None else str(value)
    promoted = meta.get("promoted_at")
    calibration = (meta.get("calibration") or {}).get("method")
    tiers = meta.get("tiers") or {}
    cuts = {name: float(tiers[name]) for name in ("medium", "high") if isinstance(tiers.get(name), int | float)}
    return ModelInfo(
        name=loaded.name,
        version=loaded.version,
        horizon_days=int(meta.get("horizon_days", default_horizon_days)),
        metrics=metrics,
        trained_window=window,
        spec_version=str(meta.get("spec_version", "")),
        promoted_at=None if promoted is None else str(promoted),
        calibration=None if calibration is None else str(calibration),
        tier_cuts=cuts or None,
    )
