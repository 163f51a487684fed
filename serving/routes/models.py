"""`GET /models/current`: the champion this process serves; `GET /models/current/card`: its model card."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from core.errors import NotFoundError, ServiceUnavailableError
from models.runtime import LoadedModel
from serving.deps import DepsDep, SettingsDep
from serving.model_info import model_info
from serving.routes.errors import ERRORS
from serving.schemas import ModelInfo, Problem

router = APIRouter(tags=["models"])


def _loaded(deps: DepsDep) -> LoadedModel:
    loaded = deps.models.current
    if loaded is None:
        msg = "no champion model is loaded yet"
        raise ServiceUnavailableError(msg)
    return loaded


@router.get("/models/current", response_model=ModelInfo, responses=ERRORS)
def model_current(deps: DepsDep, settings: SettingsDep) -> ModelInfo:
    """The champion in use: version, metrics, training window."""
    loaded = _loaded(deps)
    return model_info(loaded, loaded.model.meta, settings.horizon_days)


@router.get(
    "/models/current/card",
    # The card is Markdown; the errors stay JSON (a response_class would document them as text).
    responses={
        **ERRORS,
        200: {
            "content": {"text/markdown": {"schema": {"type": "string"}}},
            "description": "The model card",
            "headers": {"X-Model-Version": {"description": "The version it describes", "schema": {"type": "string"}}},
        },
        404: {"model": Problem, "description": "The champion was trained before model cards"},
    },
)
def model_current_card(deps: DepsDep) -> PlainTextResponse:
    """The champion's model card (Markdown): intended use, training window, features, backtest
    metrics with intervals, calibration, tiers, data report, limitations. Under its title, and
    in `X-Model-Version`, the registered version it describes (the card is written at training,
    before the registry numbers the model, so a card fetched around a promotion or a rollback
    says which model it is)."""
    loaded = _loaded(deps)
    card = loaded.model.meta.get("card")
    if not isinstance(card, str) or not card:
        msg = f"{loaded.name} v{loaded.version} has no model card (trained before cards); retrain to get one"
        raise NotFoundError(msg)
    title, _, sections = card.partition("\n")
    served = f"_The champion this API serves: {loaded.name} version {loaded.version}._"
    return PlainTextResponse(
        f"{title}\n\n{served}\n{sections}",
        media_type="text/markdown; charset=utf-8",
        headers={"X-Model-Version": loaded.version},
    )
