"""The model audit log: one JSON line per registry step (a promotion accepted, refused or forced,
a rollback, a `churn train` gate decision), appended to a local file and read newest first.

Each entry holds at least `at` (UTC ISO 8601), `action`, `outcome`, `actor`, `reason`,
`from_version` and `to_version`; `figures` holds the evidence (e.g. the paired comparison).
A line is written with one `write` on a file opened for appending, so concurrent writers do not
interleave lines; a line cut short by a crash is skipped (and logged) when reading.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def who(configured: str) -> str:
    """Returns the actor to record: `configured` (CHURN_ACTOR or --actor) when set, else the OS user."""
    if configured.strip():
        return configured.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (e.g. a bare container)
        return f"uid:{os.getuid()}"


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Appends `entry` (with `at` set to now unless given) as one JSON line to `path`; returns
    the entry as written.

    Raises:
        OSError: the file cannot be written.
    """
    written = _finite({"at": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry})
    line = (json.dumps(written, default=str, allow_nan=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a line cut short by a crash: end it, so this entry stays whole
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _finite(value: Any) -> Any:
    """Returns `value` with NaN and infinities as None, in nested dicts and lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read(path: Path, limit: int, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Returns (entries newest first, skipping `offset` and keeping at most `limit`; the number of
    entries in the log). A missing file is an empty log; unreadable lines are skipped."""
    if not path.exists():
        return [], 0
    entries = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (cut short by a crash?); skipped", path, number)
            continue
        except RecursionError:  # valid JSON, nested deeper than the parser goes: no entry anyway
            log.warning("%s line %d is nested too deeply to read; skipped", path, number)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    entries.reverse()
    return entries[offset : offset + limit], len(entries)
