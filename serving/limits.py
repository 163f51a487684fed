"""Request body limits, as a plain ASGI middleware (like `serving.timing`): size and time.

Without it a client could make the API read and hold a body of any size before validation
refuses it. A declared `Content-Length` over the limit is refused with 413 before a byte of
the body is read; a body without one (chunked) is counted as it arrives and refused as soon
as it passes the limit, so the server never holds more than the limit plus one chunk.

A body must also arrive within `read_timeout_s` of the first read (else 408): uvicorn has no
such timeout, and a client that declared a body and sent it slowly, or never, held one of the
worker's few in-flight slots (`serving.admission`) for as long as it liked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, status

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]


class BodySizeLimit:
    """Answers 413 `{"detail": ...}` to HTTP requests whose body is larger than `max_bytes`, and
    408 to those whose body has not arrived `read_timeout_s` after the app began to read it."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 5.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        """Refuses an oversized declared body at once, otherwise counts the body as the app reads it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            detail = f"request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes"
            await _refuse(send, status.HTTP_413_CONTENT_TOO_LARGE, detail)
            return
        received = 0
        started = False
        deadline: float | None = None

        async def counted_receive() -> Message:
            nonlocal received, deadline
            loop = asyncio.get_running_loop()
            deadline = deadline if deadline is not None else loop.time() + self.read_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message: Message = await receive()
            except TimeoutError:
                detail = f"request body not received within {self.read_timeout_s:g} s"
                raise HTTPException(status.HTTP_408_REQUEST_TIMEOUT, detail) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI lets an HTTPException raised while reading the body through to its
                    # handler, which answers with this status and detail.
                    detail = f"request body exceeds the limit of {self.max_bytes} bytes"
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail)
            return message

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, noting_send)
        except HTTPException as exc:  # raised while reading, outside a handler that turns it into a response
            if started or exc.status_code not in (status.HTTP_413_CONTENT_TOO_LARGE, status.HTTP_408_REQUEST_TIMEOUT):
                raise
            await _refuse(send, exc.status_code, str(exc.detail))


def _content_length(scope: Scope) -> int | None:
    """Returns the declared body length, or None if the request does not declare a valid one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the server (h11) refuses such requests before they reach the app
                return None
    return None


async def _refuse(send: Callable[[Message], Any], code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code,
            # Close: the unread body must not be taken for the next request on this connection.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
