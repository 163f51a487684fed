"""API keys: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in constant time.

Both ways are declared as OpenAPI security schemes (`ApiKey`, `Bearer`), so the document and
`/docs` show them; a route that needs a key lists both as alternatives.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

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
        if not self._keys:
            return
        given = api_key if api_key is not None else bearer.credentials if bearer is not None else None
        if given is not None:
            candidate = _digest(given)
            # Compare with every key, without stopping early, so timing says nothing about which matched.
            matched = False
            for key in self._keys:
                matched |= hmac.compare_digest(candidate, key)
            if matched:
                return
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key (send X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _digest(key: str) -> bytes:
    """Returns the SHA-256 of `key` (fixed length, for the constant-time comparison)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
