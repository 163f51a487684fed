"""A lean asyncio client for one job: a pipeline of read commands on one Redis server, in one round trip.

The API's single-user route reads a user's features, stored risk row and the watermark in one
pipeline per request. On redis-py's asyncio client that pipeline cost 0.22 ms of CPU, against
0.07 ms for the same three commands packed and parsed here (`churn` session 13, one process on
the same Redis): about an eighth of the route's CPU per request. The wire work is the same in
both (hiredis packs the commands and parses the replies, as it does for redis-py when
installed); what is left out is redis-py's per-command machinery (retry wrapper, pool locks,
response callbacks, event hooks), which a fixed read does not need.

What it does: `redis://` and `rediss://` URLs with user, password and db (the URLs
`features.feast_repo` accepts); connect and reply timeouts; a pool of idle connections; the
replies as Redis sends them (bytes, integers, lists, None: what redis-py returns without
`decode_responses` for the reads the API sends, but without its response callbacks, so an
HGETALL would be a flat list). Errors are redis-py's exception classes, so
`core.redis.redis_errors` classifies them as it does for every other client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[str | bytes | int | float]


def pack(commands: Sequence[Command]) -> bytes:
    """Returns `commands` in the Redis protocol, one after the other."""
    # hiredis's stub types the argument as a one-element tuple; any length is packed.
    return b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]


# Refusals that redis-py raises as AuthenticationError (`core.redis.classify` maps it to AUTH).
_AUTH_CODES = frozenset({"NOAUTH", "WRONGPASS"})
# `ERR` replies redis-py raises as another class (its parser's table): a full server is
# unavailable for now, a password the server does not expect is an authentication failure.
_ERR_MESSAGES: tuple[tuple[str, type[RedisError]], ...] = (
    ("ERR max number of clients reached", RedisConnectionError),
    ("ERR invalid password", AuthenticationError),
    ("ERR AUTH <password> called without any password configured", AuthenticationError),
    ("ERR Client sent AUTH, but no password is set", AuthenticationError),
)
_READ_SIZE = 65536


def refusal(reply: hiredis.ReplyError) -> RedisError:
    """Returns the exception redis-py raises for an error reply: AuthenticationError for NOAUTH,
    WRONGPASS and a password the server does not expect, ConnectionError for a server at its
    client limit, ResponseError with Redis's message (its first word is the code) otherwise."""
    message = str(reply)
    if message.split(" ", 1)[0] in _AUTH_CODES:
        return AuthenticationError(message)
    for start, kind in _ERR_MESSAGES:
        if message.startswith(start):
            return kind(message)
    return ResponseError(message)


class PipelineConnection:
    """One TCP (or TLS) connection and the parser of its replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    async def exchange(self, payload: bytes, count: int) -> list[Any]:
        """Writes `payload` (`count` packed commands) and returns their `count` replies, error
        replies included as `hiredis.ReplyError` values.

        Raises:
            redis.exceptions.ConnectionError: Redis closed the connection, or sent what is not RESP.
            OSError: the socket failed.
        """
        self.writer.write(payload)
        replies: list[Any] = []
        while len(replies) < count:
            try:
                reply = self.parser.gets()
            except hiredis.ProtocolError as exc:
                msg = f"unreadable reply from Redis: {exc}"
                raise RedisConnectionError(msg) from exc
            if reply is not False:
                replies.append(reply)
                continue
            data = await self.reader.read(_READ_SIZE)
            if not data:
                msg = "Redis closed the connection"
                raise RedisConnectionError(msg)
            self.parser.feed(data)
        return replies

    def close(self) -> None:
        """Closes the socket (without waiting for the close to complete)."""
        self.writer.close()


class AsyncPipelineClient:
    """Sends a list of read commands to the Redis at `url` in one round trip (`execute`).

    Connections open on the event loop that first needs one, and go back to an idle pool after a
    complete exchange; one whose exchange failed or was cancelled is closed (its replies would be
    out of step). The commands must be reads: a pipeline whose pooled connection failed (Redis
    may have closed it since it was last used, e.g. in a restart) is sent again on the next pooled
    one, or on a new one. Nothing else is retried: a request path fails fast (an HTTP 503).
    """

    def __init__(self, url: str, socket_timeout: float, connect_timeout: float) -> None:
        """Raises ValueError: `url` is not a `redis://` or `rediss://` URL with a host (and
        perhaps a user, a password and a db number), or carries query options."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query:
            shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no credentials
            msg = f"expected a redis://[user:password@]host:port/db URL without options, got {shown!r}"
            raise ValueError(msg)
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        db = int(parts.path.strip("/") or 0)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        setup: list[Command] = []  # authenticate, then pick the database
        if username:  # as redis-py: an ACL user may have no password (`nopass`)
            setup.append(("AUTH", username, password or ""))
        elif password:
            setup.append(("AUTH", password))
        if db:
            setup.append(("SELECT", db))
        # Sent first on every new connection.
        self.greeting, self._greeting_replies = pack(setup), len(setup)
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._idle: list[PipelineConnection] = []
        self._busy: set[PipelineConnection] = set()
        self._closed = False

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Returns the replies to `commands`, in order, as Redis sent them (bytes, integers, lists, None).

        Raises:
            redis.exceptions.ConnectionError: Redis cannot be reached, or closed the connection.
            redis.exceptions.TimeoutError: no connection within `connect_timeout`, or not every
                reply within `socket_timeout`.
            redis.exceptions.ResponseError: Redis refused a command (AuthenticationError for
                NOAUTH / WRONGPASS); the first refusal, once every reply has been read.
        """
        payload = pack(commands)
        while True:
            if self._closed:
                msg = "the Redis pipeline client is closed"
                raise RedisConnectionError(msg)
            pooled = bool(self._idle)
            connection = self._idle.pop() if pooled else await self._connect()
            self._busy.add(connection)
            try:
                replies = await self._exchange(connection, payload, len(commands))
            except RedisConnectionError:
                connection.close()
                if pooled:  # perhaps closed by Redis while idle: again, on another connection
                    continue
                raise
            except BaseException:  # a timeout, a cancellation: the replies may still come
                connection.close()
                raise
            finally:
                self._busy.discard(connection)
            if self._closed:
                connection.close()
            else:
                self._idle.append(connection)
            _raise_first_refusal(replies)
            return replies

    async def aclose(self) -> None:
        """Closes every connection, idle or in use (an exchange in flight then fails); `execute`
        raises from then on."""
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()

    async def _exchange(self, connection: PipelineConnection, payload: bytes, count: int) -> list[Any]:
        try:
            async with asyncio.timeout(self.socket_timeout):
                return await connection.exchange(payload, count)
        except TimeoutError as exc:
            msg = f"no reply from Redis at {self.host}:{self.port} within {self.socket_timeout} s"
            raise RedisTimeoutError(msg) from exc
        except OSError as exc:
            msg = f"connection to Redis at {self.host}:{self.port} failed: {exc}"
            raise RedisConnectionError(msg) from exc

    async def _connect(self) -> PipelineConnection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        except TimeoutError as exc:
            msg = f"could not connect to Redis at {self.host}:{self.port} within {self.connect_timeout} s"
            raise RedisTimeoutError(msg) from exc
        except OSError as exc:
            msg = f"could not connect to Redis at {self.host}:{self.port}: {exc}"
            raise RedisConnectionError(msg) from exc
        connection = PipelineConnection(reader, writer)
        if self._greeting_replies:
            try:
                replies = await self._exchange(connection, self.greeting, self._greeting_replies)
                _raise_first_refusal(replies)
            except BaseException:
                connection.close()
                raise
        return connection


def _raise_first_refusal(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise refusal(reply)
