"""Answering "how likely is this user to churn, and why": online features + clock -> model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, cast

import numpy as np
from starlette.concurrency import run_in_threadpool

from core.errors import ServiceUnavailableError
from core.timeutil import ms_to_iso
from features import spec
from features.store import FeatureRow, FeatureStore
from models.runtime import LoadedModel, Model, feature_matrix, prediction_id, shadow_of, split_canary
from monitoring.metrics import Metrics
from serving.schemas import (
    AtRiskPage,
    AtRiskUser,
    CancelledAnswer,
    ModelRef,
    Reason,
    RiskAnswer,
    ShadowScore,
    StoredRisk,
    Tier,
)
from stream.at_risk import AtRiskIndex, Order
from stream.risk_store import RiskRow, RiskStore

DESCRIPTIONS = spec.describe()
TOP_REASONS = 5
_COLUMN = {name: i for i, name in enumerate(spec.MODEL_FEATURES)}


# Reads the feature rows and the stored risk rows of the same ids in one Redis round trip, or
# returns None where that cannot be done (then they are read one after the other).
ReadTogether = Callable[[Sequence[str]], tuple[list[FeatureRow | None], list[RiskRow | None]] | None]
# Reads the same on an asyncio client, with the clock of the answer (the stream watermark in
# event mode, read in the same round trip; the wall clock otherwise).
ReadAsync = Callable[[Sequence[str]], Awaitable[tuple[list[FeatureRow | None], list[RiskRow | None], int | None]]]


class RiskService:
    """Reads features and stored risk, applies the clock, scores with the current champion.

    `now_ms` is the injected clock: the stream's event-time watermark in replay/demo mode, the
    wall clock live (see `build_clock`). `read_together`, when given, reads both kinds of rows
    in one round trip, and `read_async` does so on an asyncio client for `answer_async`
    (`serving.deps.build_deps` gives both when both kinds live on one Redis server).
    """

    def __init__(
        self,
        features: FeatureStore,
        risks: RiskStore,
        current_model: Callable[[], LoadedModel | None],
        now_ms: Callable[[], int | None],
        metrics: Metrics,
        read_together: ReadTogether | None = None,
        read_async: ReadAsync | None = None,
        challenger: Callable[[], LoadedModel | None] = lambda: None,
        canary_percent: float = 0.0,
    ) -> None:
        self.features = features
        self.risks = risks
        self.current_model = current_model
        self.now_ms = now_ms
        self.metrics = metrics
        # A distinct challenger serves the canary slice of users (`models.runtime.in_canary`) and
        # scores every other answer in shadow (the champion scores the canary's in shadow).
        self.challenger = challenger
        self.canary_percent = canary_percent
        self.read_together = read_together
        self.read_async = read_async

    def answer(self, user_ids: Sequence[str], *, explain: bool) -> tuple[list[RiskAnswer | CancelledAnswer], list[str]]:
        """Returns the answers for the known users (in the order asked; a cancelled user as a
        `CancelledAnswer`, without scoring) and the ids that are unknown. Blocking: Redis is read
        with the synchronous clients (see `answer_async` for the event loop).

        Raises:
            ServiceUnavailableError: no model is loaded (and a user needs scoring), or a store is down.
        """
        loaded = self.current_model()  # one model for the whole request, even if a swap lands meanwhile
        challenger = self.challenger()
        started = time.perf_counter()
        both = self.read_together(user_ids) if self.read_together is not None and user_ids else None
        rows = both[0] if both is not None else self.features.read_rows(user_ids)
        self.metrics.store_read_seconds.observe(time.perf_counter() - started)
        stored = both[1] if both is not None else None
        return self._answers(user_ids, rows, stored, loaded, challenger, explain, self.now_ms)

    async def answer_async(
        self, user_ids: Sequence[str], *, explain: bool
    ) -> tuple[list[RiskAnswer | CancelledAnswer], list[str]]:
        """Returns what `answer` returns without blocking the event loop: Redis is read with
        `read_async` (one round trip on an asyncio client, which also gives the clock) when
        given, else `answer` runs in a worker thread. Scoring runs on the caller's thread: a few
        rows cost a fraction of a millisecond, less than the thread hop it saves.

        Raises:
            ServiceUnavailableError: no model is loaded (and a user needs scoring), or a store is down.
        """
        if self.read_async is None or not user_ids:
            return await run_in_threadpool(partial(self.answer, user_ids, explain=explain))
        loaded = self.current_model()
        challenger = self.challenger()
        started = time.perf_counter()
        rows, stored, now_ms = await self.read_async(user_ids)
        self.metrics.store_read_seconds.observe(time.perf_counter() - started)
        return self._answers(user_ids, rows, stored, loaded, challenger, explain, lambda: now_ms)

    def _answers(
        self,
        user_ids: Sequence[str],
        rows: list[FeatureRow | None],
        stored: list[RiskRow | None] | None,
        loaded: LoadedModel | None,
        challenger: LoadedModel | None,
        explain: bool,
        clock: Callable[[], int | None],
    ) -> tuple[list[RiskAnswer | CancelledAnswer], list[str]]:
        """Returns `answer`'s result from the feature `rows` read for `user_ids` and their stored
        risk rows (`stored`, one per id; None: read here for the ids found): cancelled users as
        such, the others scored by the champion or the canary's challenger as of `clock()`.

        Raises:
            ServiceUnavailableError: no model is loaded and a user needs scoring, or Redis is down.
        """
        found = [row for row in rows if row is not None]
        unknown = [u for u, row in zip(user_ids, rows, strict=True) if row is None]
        if not found:
            return [], unknown
        if stored is None:
            found_stored = self.risks.read([row.user_id for row in found])
        else:
            found_stored = [risk for row, risk in zip(rows, stored, strict=True) if row is not None]
        answers: dict[str, RiskAnswer | CancelledAnswer] = {
            row.user_id: CancelledAnswer(
                user_id=row.user_id,
                status="cancelled",
                cancelled_at=ms_to_iso(risk.cancelled_ms),
                features_updated_at=ms_to_iso(row.last_event_ms),
            )
            for row, risk in zip(found, found_stored, strict=True)
            if risk is not None and risk.cancelled_ms is not None
        }
        pairs = [(row, risk) for row, risk in zip(found, found_stored, strict=True) if row.user_id not in answers]
        if pairs:
            if loaded is None:
                msg = "no champion model is loaded yet (train and promote one: `churn train`)"
                raise ServiceUnavailableError(msg)
            ids = [row.user_id for row, _ in pairs]
            clock_ms = clock()
            for model, kept in split_canary(ids, loaded, challenger, self.canary_percent):
                part, part_stored = [pairs[i][0] for i in kept], [pairs[i][1] for i in kept]
                shadow = shadow_of(model, loaded, challenger)
                for answer in self._score(part, part_stored, model, explain, clock_ms, shadow):
                    answers[answer.user_id] = answer
        return [answers[row.user_id] for row in found], unknown

    def _score(
        self,
        known: list[FeatureRow],
        stored: list[RiskRow | None],
        loaded: LoadedModel,
        explain: bool,
        clock: int | None,
        shadow: LoadedModel | None = None,
    ) -> list[RiskAnswer]:
        # In event mode the watermark may trail a user's newest event by a batch: never go negative.
        now = [max(clock or row.last_event_ms, row.last_event_ms) for row in known]
        matrix = feature_matrix(known, now)
        model = loaded.model
        probabilities = model.predict(matrix)
        contributions = model.contributions(matrix) if explain else [None] * len(known)
        answers = [
            self._answer(row, float(p), loaded, model, now_ms, contrib, matrix[i], stored[i])
            for i, (row, p, now_ms, contrib) in enumerate(zip(known, probabilities, now, contributions, strict=True))
        ]
        if shadow is not None:  # one more predict on the same matrix: the answers' served fields stay as they are
            others = shadow.model.predict(matrix)
            tiers = [shadow.model.tier(float(p)) for p in others]
            ref = ModelRef(name=shadow.name, version=shadow.version)
            for answer, p, tier, row, now_ms in zip(answers, others, tiers, known, now, strict=True):
                answer.shadow = ShadowScore(
                    model=ref, churn_probability=float(p), risk_tier=cast(Tier, tier),
                    prediction_id=prediction_id(shadow.version, row.user_id, row.last_event_ms, now_ms),
                )  # fmt: skip
            self.metrics.track_shadow("api", probabilities, others, [a.risk_tier for a in answers], tiers)
        return answers

    def _answer(
        self,
        row: FeatureRow,
        probability: float,
        loaded: LoadedModel,
        model: Model,
        now_ms: int,
        contributions: dict[str, float] | None,
        values: np.ndarray,
        stored: RiskRow | None,
    ) -> RiskAnswer:
        reasons = None
        if contributions is not None:
            index = _COLUMN
            top = sorted(contributions.items(), key=lambda kv: abs(kv[1]), reverse=True)[:TOP_REASONS]
            reasons = [
                Reason(
                    feature=name,
                    description=DESCRIPTIONS.get(name, name),
                    value=None if np.isnan(values[index[name]]) else float(values[index[name]]),
                    impact=round(impact, 6),
                )
                for name, impact in top
            ]
        return RiskAnswer(
            user_id=row.user_id,
            churn_probability=probability,
            risk_tier=cast(Tier, model.tier(probability)),
            horizon_days=model.horizon_days,
            model=ModelRef(name=loaded.name, version=loaded.version),
            as_of=ms_to_iso(now_ms),
            features_updated_at=ms_to_iso(row.last_event_ms),
            reasons=reasons,
            prediction_id=prediction_id(loaded.version, row.user_id, row.last_event_ms, now_ms),
            stored_risk=None
            if stored is None or stored.churn_probability is None
            else StoredRisk(
                churn_probability=stored.churn_probability,
                risk_tier=stored.risk_tier,  # type: ignore[arg-type]
                model_version=stored.model_version,
                event_time=ms_to_iso(stored.event_time_ms),
                scored_at=ms_to_iso(stored.scored_at_ms),
                prediction_id=stored.prediction_id or None,
            ),
        )


def at_risk_page(index: AtRiskIndex, risks: RiskStore, tier: Tier, order: Order, offset: int, limit: int) -> AtRiskPage:
    """Returns one page of the at-risk list of `tier`: the index's members joined with their
    stored risk rows. Members whose row expired or left the tier since (the index is updated
    after the rows) are left out of the page and pruned from the index (unless re-added since);
    `next_offset` and `total` count the members pruned out of the ranks, so paging on skips
    nobody.

    Raises:
        ServiceUnavailableError: Redis is down.
    """
    total, ranked = index.page(tier, order, offset, limit)
    rows = risks.read([member for member, _ in ranked])
    users, stale = [], {}
    for (member, score), row in zip(ranked, rows, strict=True):
        if row is None or row.risk_tier != tier or row.churn_probability is None:
            stale[member] = score
            continue
        users.append(
            AtRiskUser(
                user_id=row.user_id,
                churn_probability=row.churn_probability,
                risk_tier=tier,
                model_version=row.model_version,
                event_time=ms_to_iso(row.event_time_ms),
                scored_at=ms_to_iso(row.scored_at_ms),
                prediction_id=row.prediction_id,
            )
        )
    # Every member ranked after a pruned one moved up a rank: the next page starts that much earlier.
    pruned = index.prune(tier, order, stale)
    total -= pruned
    following = offset + len(ranked) - pruned
    return AtRiskPage(
        tier=tier, order=order, offset=offset, limit=limit, total=total,
        next_offset=following if following < total else None, users=users,
    )  # fmt: skip


def build_clock(mode: str, risks: RiskStore, cache_s: float = 0.5) -> Callable[[], int | None]:
    """Returns the API's clock: wall time ("wall") or the stream watermark ("event"), which is
    re-read from Redis at most every `cache_s` seconds; None before the stream has run."""
    if mode == "wall":
        return lambda: time.time_ns() // 1_000_000
    cached: list[Any] = [None, 0.0]

    def watermark() -> int | None:
        if time.monotonic() - cached[1] > cache_s:
            # On an outage keep the last known watermark; the feature read reports the outage.
            with contextlib.suppress(ServiceUnavailableError):
                cached[0] = risks.watermark()
            cached[1] = time.monotonic()
        return cached[0]

    return watermark
