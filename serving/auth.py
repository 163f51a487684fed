"""API keys: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in constant time.

Both ways are declared as OpenAPI security schemes (`ApiKey`, `Bearer`), so the document and
`/docs` show them; a route that needs a key lists both as alternatives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute

from monitoring.metrics import Metrics
from serving.timing import observe_request

# auto_error=False: they only read the header; a missing or wrong key is one 401 from ApiKeys.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", description="One of CHURN_API_KEYS", auto_error=False
)
BEARER = HTTPBearer(scheme_name="Bearer", description="One of CHURN_API_KEYS, as a bearer token", auto_error=False)


class ApiKeys:
    """Checks a request's key against the configured ones; no keys configured = open."""

    def __init__(self, keys: list[str]) -> None:
        # Only digests are kept and compared: equal lengths, so the time of a comparison does not
        # even reveal a key's length, and the keys themselves are not held by this object.
        self._keys = [_digest(k) for k in keys if k]

    @property
    def enabled(self) -> bool:
        """Returns True if requests must carry a key."""
        return bool(self._keys)

    async def __call__(
        self,
        api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
    ) -> None:
        """FastAPI dependency: checks `X-API-Key`, or else the bearer token.

        Async although it never awaits: FastAPI runs a sync dependency in its thread pool, and
        a thread hop per request costs more than this whole check.

        Raises:
            HTTPException: 401 when keys are configured and none of them matches.
        """
        given = api_key if api_key is not None else bearer.credentials if bearer is not None else None
        if not self.accepts(given):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=UNAUTHORIZED, headers=CHALLENGE)

    def accepts(self, given: str | None) -> bool:
        """Returns True if no keys are configured or `given` is one of them."""
        if not self._keys:
            return True
        if given is None:
            return False
        candidate = _digest(given)
        # Compare with every key, without stopping early, so timing says nothing about which matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


UNAUTHORIZED = "missing or invalid API key (send X-API-Key or Authorization: Bearer)"
CHALLENGE = {"WWW-Authenticate": "Bearer"}
# Methods whose requests carry a body: the ones a slow sender could hold an in-flight slot with.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class KeyGate:
    """A plain ASGI middleware in front of admission control: a request with a body but without
    a valid key gets its 401 from the headers alone, before it takes an in-flight slot and before
    anything reads its body. Why: admission takes a slot on arrival and the route checks the key
    only after reading the body, so four keyless requests that declared a body and never sent it
    held every slot of a worker, and keyed traffic was shed (503). Other requests are checked by
    the routes (`ApiKeys` as a dependency), which also keeps the OpenAPI document's schemes."""

    def __init__(
        self, app: Any, keys: ApiKeys, metrics: Callable[[], Metrics | None], routes: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.routes = routes  # the app's routes, to label a refusal with its route's template

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Answers 401 to a keyless request with a body (counted in the request histogram as
        the routes' 401s are: outside the timer, it would be missing from the dashboards);
        passes everything else on."""
        if scope["type"] == "http" and scope["method"] in BODY_METHODS and not self.keys.accepts(_key_of(scope)):
            started = time.perf_counter()
            body = json.dumps({"detail": UNAUTHORIZED}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(b"www-authenticate", b"Bearer"), (b"connection", b"close")]  # the body goes unread
            await send({"type": "http.response.start", "status": status.HTTP_401_UNAUTHORIZED, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            observe_request(
                self.metrics(), scope, status.HTTP_401_UNAUTHORIZED, time.perf_counter() - started, self.routes
            )
            return
        await self.app(scope, receive, send)


def _key_of(scope: dict[str, Any]) -> str | None:
    """Returns the key a request's headers carry (`X-API-Key`, else a bearer token), or None:
    read as the routes' `ApiKeys` reads them (the first of each header counts, and an empty
    `X-API-Key` is absent), so the gate and the routes accept the same requests."""
    api_key = bearer = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key" and api_key is None:
            api_key = bytes(value).decode("latin-1") or None  # as Starlette decodes header values
        elif name == b"authorization" and bearer is None:
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return api_key if api_key is not None else bearer or None


def _digest(key: str) -> bytes:
    """Returns the SHA-256 of `key` (fixed length, for the constant-time comparison)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
