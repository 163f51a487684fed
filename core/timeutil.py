"""Time helpers shared by every package: millisecond units, ISO 8601 text, parsing of options.

Event time is epoch milliseconds (the eventsim `ts`); every instant shown to a user is UTC ISO
8601 with millisecond precision and a `Z`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from core.errors import InvalidInputError

SECOND_MS = 1_000
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


_TWO_DIGITS = [f"{i:02d}" for i in range(60)]
_THREE_DIGITS = [f"{i:03d}" for i in range(1000)]


@lru_cache(maxsize=4096)
def _day_text(day: int) -> str:
    """Returns the UTC date of epoch day `day` as `YYYY-MM-DD`."""
    return datetime.fromtimestamp(day * 86_400, tz=UTC).date().isoformat()


def ms_to_iso(ms: int) -> str:
    """Returns epoch milliseconds as ISO 8601 UTC text, e.g. `2026-01-01T00:00:00.000Z`
    (fractions of a millisecond are dropped, as `isoformat(timespec="milliseconds")` does)."""
    # Arithmetic, a cached date and digit tables instead of a datetime per call: the at-risk page
    # formats two instants per user, and `datetime.isoformat` was a third of the route's CPU.
    day, in_day = divmod(int(ms // 1), DAY_MS)
    seconds, milli = divmod(in_day, SECOND_MS)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    two = _TWO_DIGITS
    return f"{_day_text(day)}T{two[hour]}:{two[minute]}:{two[second]}.{_THREE_DIGITS[milli]}Z"


def parse_utc(text: str, what: str = "the value") -> datetime:
    """Returns the ISO date or datetime `text` as an aware datetime (UTC unless it carries an
    offset; a trailing `Z` means UTC).

    Raises:
        InvalidInputError: `text` is not an ISO date or datetime (the message names `what`).
    """
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{what}: expected an ISO date or datetime such as 2026-01-01 or 2026-02-01T12:00:00Z, got {text!r}"
        raise InvalidInputError(msg) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """Returns an aware datetime as epoch milliseconds."""
    return int(moment.timestamp() * 1000)
