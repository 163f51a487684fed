"""`GET /models/current`: the champion this process serves."""

from __future__ import annotations

from fastapi import APIRouter

from core.errors import ServiceUnavailableError
from serving.deps import DepsDep, SettingsDep
from serving.model_info import model_info
from serving.routes.errors import ERRORS
from serving.schemas import ModelInfo

router = APIRouter(tags=["models"])


@router.get("/models/current", response_model=ModelInfo, responses=ERRORS)
def model_current(deps: DepsDep, settings: SettingsDep) -> ModelInfo:
    """The champion in use: version, metrics, training window."""
    loaded = deps.models.current
    if loaded is None:
        msg = "no champion model is loaded yet"
        raise ServiceUnavailableError(msg)
    return model_info(loaded, loaded.model.meta, settings.horizon_days)
