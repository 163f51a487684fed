"""`GET /users/{user_id}/risk` and `POST /users/risk`: probability, tier and reasons;
`GET /users/at-risk`: a tier's users, highest probability or newest score first."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from starlette.convertors import Convertor, register_url_convertor

from core.errors import InvalidInputError, NotFoundError
from events.schema import USER_ID_PATTERN
from serving.deps import DepsDep
from serving.risk import at_risk_page
from serving.routes.errors import ERRORS
from serving.schemas import USER_ID_DESCRIPTION, AtRiskPage, BatchAnswer, BatchRequest, Problem, Tier, UserAnswer

router = APIRouter(tags=["risk"])


class AnyTextConvertor(Convertor[str]):
    """A path parameter of any characters, "/" and line breaks included (Starlette's `path`
    stops at a line break, and its default at "/"), or none: the pattern of the parameter judges
    it (an empty id gets its 422, not a 404 for a route that does not exist)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any", AnyTextConvertor())


@router.get(
    # `any`: an id with "/" (the stream accepts it) is sent as %2F, which arrives decoded.
    "/users/{user_id:any}/risk",
    response_model=UserAnswer,
    responses={**ERRORS, 404: {"model": Problem, "description": "Unknown user"}},
)
async def user_risk(
    request: Request,
    deps: DepsDep,
    user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description=USER_ID_DESCRIPTION)],
    explain: Annotated[bool, Query(description="Include the top 5 reasons")] = True,
) -> Response:
    """Churn probability within the horizon for one user, with tier and reasons; a user who has
    cancelled is answered with `status: "cancelled"` and the cancellation time, no probability."""
    _require_utf8_path(request)
    # Redis is read without blocking the event loop (an asyncio client, or the blocking clients
    # in a worker thread where there is none: see `RiskService.answer_async`), so a slow Redis
    # cannot stall `/health/live` or other requests.
    answers, _ = await deps.service.answer_async([user_id], explain=explain)
    if not answers:
        msg = f"unknown user {user_id!r}: no features in the online store"
        raise NotFoundError(msg)
    # The answer was validated when it was built: serialise it once, without FastAPI's
    # second validation pass through `response_model` (which stays for the document).
    return Response(answers[0].model_dump_json(), media_type="application/json")


async def _require_utf8_body(request: Request) -> None:
    """Refuses a body that is not UTF-8 (RFC 8259): the JSON parser also reads UTF-16 and
    UTF-32, with or without a byte order mark. A NUL byte, which UTF-8 JSON never holds raw,
    marks those without one. The body is already read: FastAPI keeps it on the request.

    Raises:
        InvalidInputError: it is not.
    """
    body = await request.body()
    try:
        body.decode("utf-8")
        utf8 = b"\x00" not in body
    except UnicodeDecodeError:
        utf8 = False
    if not utf8:
        msg = "invalid request: the body is not JSON: it is not UTF-8"
        raise InvalidInputError(msg)


Utf8Body = Annotated[None, Depends(_require_utf8_body)]


def _require_utf8_path(request: Request) -> None:
    """Refuses a path whose percent-escapes are not UTF-8 (/users/%FF/risk): Starlette decodes
    them with replacement characters, which would ask for another user ("\ufffd").

    Raises:
        InvalidInputError: they are not.
    """
    raw = request.scope.get("raw_path") or b""
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"invalid request: the path {raw[:120].decode('ascii', 'replace')!r} is not UTF-8 once unescaped"
        raise InvalidInputError(msg) from exc


@router.post(
    "/users/risk",
    response_model=BatchAnswer,
    responses={
        **ERRORS,
        408: {"model": Problem, "description": "The body did not arrive within CHURN_API_BODY_TIMEOUT_SECONDS"},
        413: {"model": Problem, "description": "The body is larger than CHURN_API_MAX_BODY_BYTES"},
    },
)
def users_risk(deps: DepsDep, body: BatchRequest, _: Utf8Body) -> Response:
    """Up to 1,000 users in one call (one feature read, one predict); unknown ids are listed;
    cancelled users are answered as in the single-user route."""
    ids = list(dict.fromkeys(body.user_ids))
    answers, unknown = deps.service.answer(ids, explain=body.explain)
    batch = BatchAnswer(results=answers, unknown_user_ids=unknown)
    return Response(batch.model_dump_json(), media_type="application/json")


@router.get("/users/at-risk", response_model=AtRiskPage, responses=ERRORS)
def users_at_risk(
    deps: DepsDep,
    tier: Annotated[Tier, Query(description="The risk tier to list")] = "high",
    order: Annotated[
        Literal["probability", "newest"], Query(description="Highest probability first, or newest score first")
    ] = "probability",
    limit: Annotated[int, Query(ge=1, le=1000, description="Users per page")] = 100,
    offset: Annotated[int, Query(ge=0, le=100_000_000, description="Users to skip (the previous `next_offset`)")] = 0,
) -> Response:
    """The users of a tier as the stream scorer last scored them, paged: from sorted sets the
    scorer keeps beside the risk rows (O(log n + limit) per page), joined with the rows."""
    page = at_risk_page(deps.at_risk, deps.service.risks, tier, order, offset, limit)
    return Response(page.model_dump_json(), media_type="application/json")
