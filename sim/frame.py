"""Turns simulated event rows (integer codes) into wire-format columns, the keys of `events.schema.Event`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from sim.catalog import LAST_NAMES, LOCATIONS, USER_AGENTS, Catalogue
from sim.pages import METHOD_IS_PUT, PAGE_NAMES, STATUS
from sim.population import FIRST_NAMES, Population


def _take(values: Sequence[str | None], codes: np.ndarray, missing: str | None = None) -> pl.Series:
    """Returns values[codes] as a categorical column (cheap for long repeated strings); -1 -> `missing`."""
    table = pl.Series([*values, missing], dtype=pl.String).cast(pl.Categorical)
    return table.gather(np.where(codes < 0, len(values), codes))


def event_frame(
    ts: np.ndarray,
    user: np.ndarray,
    session_id: np.ndarray,
    item: np.ndarray,
    page: np.ndarray,
    guest: np.ndarray,
    paid: np.ndarray,
    song: np.ndarray,
    pop: Population,
    catalogue: Catalogue,
) -> pl.DataFrame:
    """Returns one row per event with the wire keys in `Event` field order; guests have userId "" and
    null registration and identity fields, non-song events null song/artist/length."""
    who = np.where(guest, -1, user)
    is_song = song >= 0
    return (
        pl.DataFrame(
            {
                "ts": ts,
                "userId": _take(list(pop.user_ids), who, ""),
                "sessionId": session_id,
                "itemInSession": item,
                "page": _take(PAGE_NAMES, page),
                "auth": _take(("Logged In", "Logged Out"), guest.astype(np.int64)),
                "level": _take(("free", "paid"), paid.astype(np.int64)),
                "registration": pl.Series(pop.registration_ms[user]),
                "length": pl.Series(np.round(catalogue.length[song], 5)),
                "status": STATUS[page],
                "song": _take(catalogue.songs, song),
                "artist": _take(catalogue.artists, song),
                "method": _take(("GET", "PUT"), METHOD_IS_PUT[page].astype(np.int64)),
                "location": _take([name for name, _, _ in LOCATIONS], np.where(guest, -1, pop.location[user])),
                "userAgent": _take([agent for agent, _ in USER_AGENTS], np.where(guest, -1, pop.agent[user])),
                "gender": _take(("M", "F"), np.where(guest, -1, pop.female[user].astype(np.int64))),
                "firstName": _take(FIRST_NAMES, np.where(guest, -1, pop.first_name[user])),
                "lastName": _take(LAST_NAMES, np.where(guest, -1, pop.last_name[user])),
                "_guest": guest,
                "_song": is_song,
            }
        )
        .with_columns(
            pl.when(pl.col("_guest")).then(None).otherwise(pl.col("registration")).alias("registration"),
            pl.when(pl.col("_song")).then(pl.col("length")).otherwise(None).alias("length"),
        )
        .drop("_guest", "_song")
    )
