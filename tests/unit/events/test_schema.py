"""The event contract: real Sparkify rows are accepted, broken ones rejected with a precise reason,
and no input whatsoever makes the parser raise."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.schema import (
    KNOWN_PAGES,
    MAX_SONG_SECONDS,
    MAX_TS_MS,
    MIN_TS_MS,
    USER_ID_PATTERN,
    ErrorRecord,
    Event,
    parse_batch,
    parse_event,
    parse_message,
)
from tests.support import FIXTURES


def _rows(name: str) -> list[bytes]:
    return (FIXTURES / name).read_bytes().splitlines()


@pytest.fixture(scope="module")
def valid_row() -> dict[str, Any]:
    return json.loads(_rows("sparkify_mini_first10.jsonl")[0])


def _encode(row: dict[str, Any]) -> bytes:
    return json.dumps(row).encode()


# --- real rows are accepted ---------------------------------------------------------------


def test_first10_verbatim_rows_are_all_events() -> None:
    results = [parse_event(line) for line in _rows("sparkify_mini_first10.jsonl")]
    assert all(type(r) is Event for r in results), [r for r in results if type(r) is not Event]


def test_first100_pandas_rows_give_events_and_guests_and_no_errors(sparkify_lines: list[bytes]) -> None:
    results = [parse_event(line) for line in sparkify_lines]
    errors = [r for r in results if isinstance(r, ErrorRecord)]
    guests = [r for r in results if r is None]
    assert errors == []
    assert len(guests) == 6  # rows with "userId": "" (logged out)
    assert len([r for r in results if type(r) is Event]) == 94


def test_float_registration_and_null_song_fields_are_accepted(sparkify_lines: list[bytes]) -> None:
    events = [e for e in map(parse_event, sparkify_lines) if type(e) is Event]
    assert all(isinstance(e.registration, float) for e in events)  # pandas wrote 1538173362000.0
    non_songs = [e for e in events if e.page != "NextSong"]
    assert non_songs
    assert all(e.song is None and e.artist is None and e.length is None for e in non_songs)


def test_guest_with_null_user_fields_is_a_guest_not_an_error(valid_row: dict[str, Any]) -> None:
    guest = {**valid_row, "userId": "", "auth": "Logged Out", "registration": None, "firstName": None}
    assert parse_event(_encode(guest)) is None


def test_fields_are_mapped_from_camel_case(valid_row: dict[str, Any]) -> None:
    event = parse_event(_encode(valid_row))
    assert type(event) is Event
    assert (event.user_id, event.session_id, event.item_in_session) == ("30", 29, 50)
    assert (event.ts, event.level, event.user_agent) == (1538352117000, "paid", valid_row["userAgent"])


def test_to_json_round_trips(sparkify_lines: list[bytes]) -> None:
    for event in map(parse_event, sparkify_lines):
        if type(event) is Event:
            assert parse_event(event.to_json()) == event


# --- broken rows are rejected with a precise reason ---------------------------------------

BROKEN: list[tuple[str, dict[str, Any], str]] = [
    ("missing field", {"sessionId": ...}, "missing required field `sessionId`"),
    ("ts as string", {"ts": "1538352117000"}, "Expected `int`, got `str` - at `$.ts`"),
    ("ts as float", {"ts": 1538352117000.0}, "Expected `int`, got `float` - at `$.ts`"),
    ("bool instead of int", {"sessionId": True}, "Expected `int`, got `bool` - at `$.sessionId`"),
    ("userId as int", {"userId": 30}, "Expected `str`, got `int` - at `$.userId`"),
    # The API could never look such a user up (one id rule for both: `USER_ID_PATTERN`).
    ("userId with a control character", {"userId": "u\n1"}, "userId 'u\\n1' has a control character - at `$.userId`"),
    ("ts in year 9999", {"ts": 253_402_300_799_000}, f"Expected `int` <= {MAX_TS_MS} - at `$.ts`"),
    ("ts before 2000", {"ts": 1}, f"Expected `int` >= {MIN_TS_MS} - at `$.ts`"),
    ("negative length", {"length": -1.5}, "Expected `float` >= 0.0 - at `$.length`"),
    ("negative sessionId", {"sessionId": -1}, "Expected `int` >= 0 - at `$.sessionId`"),
    # Valid JSON, but no int64 holds it: it would fail every write of the user's state.
    ("sessionId beyond int64", {"sessionId": 10**30}, "Expected `int` <= 9223372036854775807 - at `$.sessionId`"),
    ("unknown level", {"level": "gold"}, "Invalid enum value 'gold' - at `$.level`"),
    ("empty page", {"page": ""}, "Expected `str` of length >= 1 - at `$.page`"),
    ("status out of range", {"status": 99}, "Expected `int` >= 100 - at `$.status`"),
    ("oversize string", {"song": "x" * 3000}, "Expected `str` of length <= 2048 - at `$.song`"),
    ("object where str expected", {"artist": {"a": 1}}, "Expected `str | null`, got `object` - at `$.artist`"),
]


@pytest.mark.parametrize(("change", "reason"), [(c, r) for _, c, r in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_invalid_fields_are_rejected_with_where_and_what(
    valid_row: dict[str, Any], change: dict[str, Any], reason: str
) -> None:
    row = {k: v for k, v in {**valid_row, **change}.items() if v is not ...}
    raw = _encode(row)
    result = parse_event(raw)
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith("invalid event: ")
    assert reason in result.reason
    assert result.raw == raw  # the original bytes, ready for the DLQ


def _swap(row: dict[str, Any], old: bytes, new: bytes) -> bytes:
    raw = _encode(row)
    assert old in raw
    return raw.replace(old, new, 1)


def test_nan_is_malformed_json(valid_row: dict[str, Any]) -> None:
    result = parse_event(_swap(valid_row, b"277.89016", b"NaN"))
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith("malformed JSON: ")


def test_infinity_is_out_of_range(valid_row: dict[str, Any]) -> None:
    result = parse_event(_swap(valid_row, b"277.89016", b"1e999"))
    assert isinstance(result, ErrorRecord)
    assert "at `$.length`" in result.reason


def test_invalid_utf8_is_an_error_not_an_exception(valid_row: dict[str, Any]) -> None:
    raw = _swap(valid_row, b"Rockpools", b"Rock\xffpools")
    result = parse_event(raw)
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith("malformed JSON: invalid UTF-8")
    assert result.raw == raw


def test_lone_surrogate_escape_is_malformed(valid_row: dict[str, Any]) -> None:
    result = parse_event(_swap(valid_row, b"Rockpools", b"Rock\\ud800pools"))
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith("malformed JSON: ")


def test_oversize_message_is_rejected_before_decoding(valid_row: dict[str, Any]) -> None:
    raw = _encode({**valid_row, "padding": "x" * 70_000})
    result = parse_event(raw, max_bytes=64 * 1024)
    assert isinstance(result, ErrorRecord)
    assert result.reason == f"message of {len(raw)} bytes exceeds the limit of {64 * 1024}"
    assert len(result.raw) == 64 * 1024  # truncated so the DLQ message stays under Kafka's limit


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000],
    ids=["deep array", "deep object"],
)
def test_deep_nesting_is_rejected(raw: bytes) -> None:
    # msgspec validates while it parses, so the first problem met is the reason given.
    result = parse_event(raw)
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith(("malformed JSON: ", "expected a JSON object: ", "invalid event: "))


def test_deep_nesting_inside_an_unknown_field_is_rejected(valid_row: dict[str, Any]) -> None:
    raw = _encode(valid_row)[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    result = parse_event(raw)
    assert isinstance(result, ErrorRecord)
    assert result.reason == "malformed JSON: nested too deeply"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[1, 2]", "expected a JSON object: Expected `object`, got `array`"),
        (b'"hello"', "expected a JSON object: Expected `object`, got `str`"),
        (b"42", "expected a JSON object: Expected `object`, got `int`"),
        (b"null", "expected a JSON object: Expected `object`, got `null`"),
        (b"", "malformed JSON: "),
        (b"   ", "malformed JSON: "),
        (b'{"ts": 1538352117000', "malformed JSON: "),
        (b'{"ts": 1538352117000, "userId": "30"', "malformed JSON: "),
        (b"\xef\xbb\xbf{}", "malformed JSON: "),  # a UTF-8 byte order mark is not JSON
    ],
)
def test_non_objects_and_broken_json_are_rejected(raw: bytes, reason: str) -> None:
    result = parse_event(raw)
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith(reason)


def test_trailing_characters_after_a_valid_event_are_malformed(valid_row: dict[str, Any]) -> None:
    result = parse_event(_encode(valid_row) + b" x")
    assert isinstance(result, ErrorRecord)
    assert result.reason.startswith("malformed JSON: ")
    assert "trailing characters" in result.reason


# --- batches --------------------------------------------------------------------------------


def test_batch_keeps_positions_and_counts(sparkify_lines: list[bytes], valid_row: dict[str, Any]) -> None:
    unknown_page = _encode({**valid_row, "page": "Brand New Page"})
    messages = [(raw, "events", 3, offset) for offset, raw in enumerate([*sparkify_lines, b"oops", unknown_page])]
    batch = parse_batch(messages)
    assert (len(batch.events), batch.guests, batch.unknown_pages) == (95, 6, 1)
    assert len(batch.sources) == len(batch.events)
    assert messages[batch.sources[0]][2:] == (3, 0)
    assert all(parse_event(messages[j][0]) == event for event, j in zip(batch.events, batch.sources, strict=True))
    (error,) = batch.errors
    assert (error.raw, error.topic, error.partition, error.offset) == (b"oops", "events", 3, 100)


# --- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _assert_outcome(result: object) -> None:
    assert result is None or isinstance(result, ErrorRecord | Event)
    if isinstance(result, ErrorRecord):
        assert result.reason
    if isinstance(result, Event):
        assert result.user_id
        assert MIN_TS_MS <= result.ts <= MAX_TS_MS


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    _assert_outcome(parse_event(raw))


@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
@settings(max_examples=300)
def test_arbitrary_json_objects_never_raise(obj: dict[str, Any]) -> None:
    _assert_outcome(parse_event(json.dumps(obj).encode()))  # allow_nan: NaN/Infinity literals too


@given(data=st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_field_of_a_real_row_replaced_by_any_json_never_raises(
    valid_row: dict[str, Any], data: st.DataObject
) -> None:
    row = dict(valid_row)
    for field in data.draw(st.lists(st.sampled_from(sorted(row)), min_size=1, max_size=4)):
        row[field] = data.draw(json_values)
    raw = json.dumps(row).encode()
    result = parse_event(raw)
    _assert_outcome(result)
    if isinstance(result, ErrorRecord):
        assert result.raw == raw


valid_events: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    ts=st.integers(MIN_TS_MS, MAX_TS_MS),
    userId=st.from_regex(USER_ID_PATTERN, fullmatch=True),
    sessionId=st.integers(0, 2**62),
    itemInSession=st.integers(0, 2**31),
    page=st.sampled_from(sorted(KNOWN_PAGES)),
    auth=st.sampled_from(["Logged In", "Cancelled"]),
    level=st.sampled_from(["free", "paid"]),
    registration=st.none() | st.integers(0, MAX_TS_MS) | st.floats(0, MAX_TS_MS),
    length=st.none() | st.floats(0, MAX_SONG_SECONDS),
    song=st.none() | st.text(max_size=50),
    status=st.none() | st.integers(100, 599),
)


@given(valid_events)
@settings(max_examples=300)
def test_every_valid_event_is_accepted_unchanged(row: dict[str, Any]) -> None:
    event = parse_event(json.dumps(row).encode())
    assert type(event) is Event
    assert (event.ts, event.user_id, event.page) == (row["ts"], row["userId"], row["page"])
    if row["length"] is not None:
        assert event.length is not None
        assert math.isclose(event.length, row["length"])


def test_a_message_both_dated_ahead_and_keyed_by_another_user_is_refused_for_its_time(
    valid_row: dict[str, Any],
) -> None:
    """The checks run in their documented order (format, then the clock, then the key), so the
    DLQ reason of a message with both faults names the clock."""
    event = parse_event(_encode(valid_row))
    assert isinstance(event, Event)
    appended = event.ts - 365 * 86_400_000
    both = parse_message(event.to_json(), appended, b"someone-else", max_future_skew_ms=300_000)
    assert isinstance(both, ErrorRecord)
    assert "ahead of its Kafka append time" in both.reason
    keyed = parse_message(event.to_json(), event.ts, b"someone-else", max_future_skew_ms=300_000)
    assert isinstance(keyed, ErrorRecord)
    assert "is not the event's userId" in keyed.reason
