"""The event contract (eventsim / Sparkify log format) and its fast validation.

Parsing never raises: each message becomes an `Event`, a guest marker (empty `userId`,
skipped and counted), or an `ErrorRecord` that keeps the original bytes, the reason and
where the message came from, ready for the dead-letter topic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import msgspec

KNOWN_PAGES: Final = frozenset(
    {
        "NextSong", "Home", "Thumbs Up", "Thumbs Down", "Add to Playlist", "Add Friend",
        "Roll Advert", "Logout", "Login", "Settings", "Save Settings", "Help", "About", "Error",
        "Upgrade", "Submit Upgrade", "Downgrade", "Submit Downgrade", "Cancel",
        "Cancellation Confirmation", "Register", "Submit Registration",
    }
)  # fmt: skip
LEVELS: Final = frozenset({"free", "paid"})
CHURN_PAGE: Final = "Cancellation Confirmation"

# Plausible event-time range (2000-01-01 .. 2100-01-01, epoch ms): anything outside is a bug upstream.
MIN_TS_MS: Final = 946_684_800_000
MAX_TS_MS: Final = 4_102_444_800_000
MAX_STRING_CHARS: Final = 2048
# A user id is 1-64 characters, none of them a control character: the same rule in the stream
# (which dead-letters any other id; empty is a guest) and the API (which answers 422), so every
# user the stream scores can be looked up. Unicode, spaces and punctuation are fine: Redis and
# Feast keys are binary-safe.
USER_ID_PATTERN: Final = r"^[^\x00-\x1f\x7f]{1,64}$"
# The stream's check of it past msgspec's length check: a search for a control character, only
# in an id that is not all printable (a msgspec pattern doubled the parse: 0.45 -> 0.93 µs per
# event; a search in every id cost 0.15 µs).
_CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x1f\x7f]").search
MAX_SONG_SECONDS: Final = 24 * 3600.0
# Counts (sessionId, itemInSession) end up in the msgpack user state and Feast's Int64 columns: a
# larger integer is valid JSON but would fail the state write for good (a poison message).
MAX_INT64: Final = 2**63 - 1

Str = Annotated[str, msgspec.Meta(max_length=MAX_STRING_CHARS)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STRING_CHARS)]
EpochMs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]


class Event(msgspec.Struct, rename="camel", gc=False):
    """One valid, logged-in user event in the wire format. Times are epoch ms of event time.

    `registration` is a float because some exports write it so (pandas); it is still epoch ms.
    """

    ts: EpochMs
    user_id: Annotated[str, msgspec.Meta(max_length=64)]  # empty: a guest; see `USER_ID_PATTERN`
    session_id: Count
    item_in_session: Count
    page: Name
    auth: Name
    level: Literal["free", "paid"]
    registration: Annotated[float, msgspec.Meta(ge=0, le=MAX_TS_MS)] | None = None
    length: Annotated[float, msgspec.Meta(ge=0, le=MAX_SONG_SECONDS)] | None = None
    status: Annotated[int, msgspec.Meta(ge=100, le=599)] | None = None
    song: Str | None = None
    artist: Str | None = None
    method: Str | None = None
    location: Str | None = None
    user_agent: Str | None = None
    gender: Str | None = None
    first_name: Str | None = None
    last_name: Str | None = None

    def to_json(self) -> bytes:
        """Returns the event as one JSON object in the wire format (camelCase keys)."""
        return _ENCODER.encode(self)


@dataclass(slots=True)
class ErrorRecord:
    """A message that failed validation, with everything needed to dead-letter it."""

    raw: bytes
    reason: str
    topic: str = ""
    partition: int = -1
    offset: int = -1


@dataclass(slots=True)
class ParsedBatch:
    """The outcome of parsing a batch.

    `events[i]` came from the message at index `sources[i]` of the batch; guests (empty
    `userId`) and unknown pages are counted; invalid messages are in `errors`.
    """

    events: list[Event] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    guests: int = 0
    unknown_pages: int = 0


_DECODER: Final = msgspec.json.Decoder(Event)
_ENCODER: Final = msgspec.json.Encoder()


def parse_event(raw: bytes, *, max_bytes: int = 64 * 1024) -> Event | ErrorRecord | None:
    """Parses one message.

    Returns the `Event`, `None` for a logged-out guest (empty `userId`), or an `ErrorRecord`
    whose reason says what was wrong and where (e.g. "Expected `int`, got `str` - at `$.ts`").
    Never raises.
    """
    if len(raw) > max_bytes:
        return ErrorRecord(raw[:max_bytes], f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        event = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        if raw.lstrip()[:1] != b"{":
            return ErrorRecord(raw, f"expected a JSON object: {exc}")
        return ErrorRecord(raw, f"invalid event: {exc}")
    except msgspec.DecodeError as exc:
        return ErrorRecord(raw, f"malformed JSON: {exc}")
    except UnicodeDecodeError as exc:
        # msgspec raises the stdlib error (not a DecodeError) for invalid UTF-8 inside a string.
        return ErrorRecord(raw, f"malformed JSON: invalid UTF-8 in a string ({exc.reason})")
    except RecursionError:
        return ErrorRecord(raw, "malformed JSON: nested too deeply")
    if not event.user_id:
        return None
    if not event.user_id.isprintable() and _CONTROL_CHARACTER(event.user_id) is not None:
        return ErrorRecord(raw, f"invalid event: userId {event.user_id!r} has a control character - at `$.userId`")
    return event


def future_skew_reason(event: Event, append_ms: int, max_future_skew_ms: int) -> str | None:
    """Returns why `event` is refused for being dated too far ahead of `append_ms` (its Kafka
    append time), or None if it is not (or the broker gave no time: `append_ms` < 0)."""
    if append_ms < 0 or event.ts <= append_ms + max_future_skew_ms:
        return None
    ahead_s = (event.ts - append_ms) / 1000
    return (
        f"event time ts={event.ts} is {ahead_s:.0f} s ahead of its Kafka append time {append_ms} "
        f"(more than CHURN_MAX_FUTURE_SKEW_SECONDS={max_future_skew_ms // 1000})"
    )


def key_mismatch_reason(event: Event, key: bytes | None, *, key_required: bool = False) -> str | None:
    """Returns why `event` is refused when its Kafka message key is not its userId (the key
    decides the partition, and one user's events must reach the one scorer that owns the user:
    another scorer applying it would overwrite, or be overwritten by, the owner's saved state),
    or when it has no key and `key_required` (a keyless message lands on any partition of the
    topic); None when the key is the userId, or absent and not required."""
    if key is None:
        if not key_required:
            return None
        return (
            f"message has no key; the key must be the userId {event.user_id!r} (one user's events must"
            " share a partition; on a topic of one partition, CHURN_REQUIRE_EVENT_KEY=false accepts keyless events)"
        )
    if key == event.user_id.encode():
        return None
    shown = key[:80].decode("utf-8", "replace")
    return f"message key {shown!r} is not the event's userId {event.user_id!r} (the key must be the userId)"


def parse_message(
    value: bytes,
    append_ms: int = -1,
    key: bytes | None = None,
    *,
    max_bytes: int = 64 * 1024,
    max_future_skew_ms: int | None = None,
    key_required: bool = False,
) -> Event | ErrorRecord | None:
    """Returns one Kafka message's event as the scorer judges it (`parse_event`, then, with
    `max_future_skew_ms`, `future_skew_reason` against `append_ms`, then `key_mismatch_reason`
    with `key_required`): the event it applies, the error it dead-letters, or None for a guest.
    The archiver judges with the same function, so the log holds exactly what the scorer
    applies. Never raises."""
    result = parse_event(value, max_bytes=max_bytes)
    if type(result) is not Event:
        return result
    reason = None if max_future_skew_ms is None else future_skew_reason(result, append_ms, max_future_skew_ms)
    if reason is None:
        reason = key_mismatch_reason(result, key, key_required=key_required)
    return result if reason is None else ErrorRecord(value, reason)


def parse_batch(
    messages: Sequence[tuple[Any, ...]],
    *,
    max_bytes: int = 64 * 1024,
    max_future_skew_ms: int | None = None,
    key_required: bool = False,
) -> ParsedBatch:
    """Parses messages that start with (value, topic, partition, offset[, append_ms[, key]]) into
    events, errors and counts with `parse_message`; `sources` says which message each event came
    from. Never raises."""
    batch = ParsedBatch()
    events, sources, errors = batch.events, batch.sources, batch.errors
    for index, message in enumerate(messages):
        append_ms = message[4] if len(message) > 4 else -1
        key = message[5] if len(message) > 5 else None
        result = parse_message(
            message[0], append_ms, key,
            max_bytes=max_bytes, max_future_skew_ms=max_future_skew_ms, key_required=key_required,
        )  # fmt: skip
        if result is None:
            batch.guests += 1
        elif type(result) is Event:
            if result.page not in KNOWN_PAGES:
                batch.unknown_pages += 1
            events.append(result)
            sources.append(index)
        else:
            assert isinstance(result, ErrorRecord)
            result.topic, result.partition, result.offset = message[1], message[2], message[3]
            errors.append(result)
    return batch
