"""API keys: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status


class ApiKeys:
    """Checks a request's key against the configured ones; no keys configured = open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        """Returns True if requests must carry a key."""
        return bool(self._keys)

    async def __call__(self, request: Request) -> None:
        """FastAPI dependency: raises 401 when keys are configured and none of them matches.

        Async although it never awaits: FastAPI runs a sync dependency in its thread pool, and
        a thread hop per request costs more than this whole check.
        """
        if not self._keys:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token if scheme.lower() == "bearer" else None
        if given is not None:
            candidate = given.encode()
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
