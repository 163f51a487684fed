"""`GET /users/{user_id}/risk` and `POST /users/risk`: probability, tier and reasons."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from core.errors import NotFoundError
from serving.deps import DepsDep
from serving.routes.errors import ERRORS
from serving.schemas import USER_ID_PATTERN, BatchAnswer, BatchRequest, Problem, UserAnswer

router = APIRouter(tags=["risk"])


@router.get(
    "/users/{user_id}/risk",
    response_model=UserAnswer,
    responses={**ERRORS, 404: {"model": Problem, "description": "Unknown user"}},
)
def user_risk(
    deps: DepsDep,
    user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description="1-64 of A-Z a-z 0-9 _ . : @ -")],
    explain: Annotated[bool, Query(description="Include the top 5 reasons")] = True,
) -> Response:
    """Churn probability within the horizon for one user, with tier and reasons; a user who has
    cancelled is answered with `status: "cancelled"` and the cancellation time, no probability."""
    # A sync route, so FastAPI runs it in its thread pool: the Redis reads (Feast's online
    # store is a blocking client, with multi-second timeouts) never hold the event loop, so a
    # slow Redis cannot stall `/health/live` or other requests. An async Redis client would
    # mean a second read path beside Feast's; the thread hop costs ~0.1 ms.
    answers, _ = deps.service.answer([user_id], explain=explain)
    if not answers:
        msg = f"unknown user {user_id!r}: no features in the online store"
        raise NotFoundError(msg)
    # The answer was validated when it was built: serialise it once, without FastAPI's
    # second validation pass through `response_model` (which stays for the document).
    return Response(answers[0].model_dump_json(), media_type="application/json")


@router.post(
    "/users/risk",
    response_model=BatchAnswer,
    responses={
        **ERRORS,
        400: {"model": Problem, "description": "The body cannot be parsed"},
        413: {"model": Problem, "description": "The body is larger than CHURN_API_MAX_BODY_BYTES"},
    },
)
def users_risk(deps: DepsDep, body: BatchRequest) -> Response:
    """Up to 1,000 users in one call (one feature read, one predict); unknown ids are listed;
    cancelled users are answered as in the single-user route."""
    ids = list(dict.fromkeys(body.user_ids))
    answers, unknown = deps.service.answer(ids, explain=body.explain)
    batch = BatchAnswer(results=answers, unknown_user_ids=unknown)
    return Response(batch.model_dump_json(), media_type="application/json")
