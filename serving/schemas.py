"""Request and response bodies of the risk API (they are the OpenAPI document's schemas)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from events.schema import USER_ID_PATTERN

USER_ID_DESCRIPTION = "1-64 characters, no control character (the stream's rule: `events.schema`)"
UserId = Annotated[str, Field(pattern=USER_ID_PATTERN, description=USER_ID_DESCRIPTION)]

Tier = Literal["low", "medium", "high"]


class Reason(BaseModel):
    """One feature's part in the score: its value and signed impact on the log-odds."""

    feature: str
    description: str
    value: float | None
    impact: float


class ModelRef(BaseModel):
    name: str
    version: str


class StoredRisk(BaseModel):
    """The scorer's latest stored answer (as of the user's latest event)."""

    churn_probability: float
    risk_tier: Tier
    model_version: str
    event_time: str
    scored_at: str
    prediction_id: str | None = Field(default=None, description="The stream score's id (null: written before ids)")


class ShadowScore(BaseModel):
    """What the shadow model (the other of champion and challenger) answers for the same row:
    never served, for comparing the two before a promotion."""

    model: ModelRef
    churn_probability: float = Field(ge=0, le=1)
    risk_tier: Tier
    prediction_id: str


class RiskAnswer(BaseModel):
    user_id: str
    status: Literal["scored"] = Field(default="scored", description="A scored user (see `CancelledAnswer`)")
    churn_probability: float = Field(ge=0, le=1)
    risk_tier: Tier
    horizon_days: int
    model: ModelRef
    as_of: str = Field(description="The clock used: the stream watermark (event mode) or wall time (ISO 8601, UTC)")
    features_updated_at: str = Field(description="Event time of the user's latest event in the online store")
    reasons: list[Reason] | None = Field(default=None, description="Top 5 features by |impact|; null if explain=false")
    stored_risk: StoredRisk | None = Field(default=None, description="What the stream scorer last wrote")
    prediction_id: str = Field(
        description="Id of this answer: a digest of the model version, the user, the features' event time and"
        " `as_of` (the same inputs give the same id), also in tier-change events and the prediction log"
    )
    shadow: ShadowScore | None = Field(
        default=None,
        description="The shadow model's score of the same row (null without a distinct challenger); the fields"
        " above are always the serving model's",
    )


class CancelledAnswer(BaseModel):
    """A user who has cancelled (their `Cancellation Confirmation` was seen): no longer scored,
    so no probability, tier or reasons."""

    user_id: str
    status: Literal["cancelled"]
    cancelled_at: str = Field(description="Event time of the user's cancellation (ISO 8601, UTC)")
    features_updated_at: str = Field(description="Event time of the user's latest event in the online store")


# What the risk routes answer per user, told apart by `status`.
UserAnswer = Annotated[RiskAnswer | CancelledAnswer, Field(discriminator="status")]


class BatchRequest(BaseModel):
    user_ids: list[UserId] = Field(min_length=1, max_length=1000)
    # Strict: JSON has booleans, so 0 or "yes" is a client bug to report, not to guess at.
    explain: bool = Field(default=False, strict=True)


class BatchAnswer(BaseModel):
    results: list[UserAnswer]
    unknown_user_ids: list[str]


class AtRiskUser(BaseModel):
    """One user of the at-risk list: the stream scorer's stored score."""

    user_id: str
    churn_probability: float
    risk_tier: Tier
    model_version: str
    event_time: str = Field(description="Event time of the user's latest event (the score is as of it)")
    scored_at: str
    prediction_id: str


class AtRiskPage(BaseModel):
    """One page of a tier's users, highest probability or newest score first."""

    tier: Tier
    order: Literal["probability", "newest"]
    offset: int
    limit: int
    total: int = Field(description="Users in the tier (the list is live: pages taken apart may overlap)")
    next_offset: int | None = Field(description="Offset of the next page; null on the last")
    users: list[AtRiskUser]


class ModelInfo(BaseModel):
    name: str
    version: str
    horizon_days: int
    metrics: dict[str, float | None]
    trained_window: dict[str, str | None]
    spec_version: str
    promoted_at: str | None = None
    calibration: str | None = Field(default=None, description="`platt`, `isotonic` or `none` (null: not recorded)")
    tier_cuts: dict[str, float] | None = Field(
        default=None, description="The lowest probability of each tier above `low` (`medium`, `high`)"
    )


class HistoryEntry(BaseModel):
    """One registry step of the audit log (`models.audit`)."""

    # Steps may carry more (e.g. the rule, a withdrawn challenger); a hand-edited version number
    # (`"to_version": 3`) reads as the string it stands for.
    model_config = {"extra": "allow", "coerce_numbers_to_str": True}

    # Defaults everywhere: a line written by an older (or hand-edited) log still reads.
    at: str = Field(default="", description="When (UTC, ISO 8601)")
    action: str = Field(default="", description="`promote` or `rollback`")
    outcome: str = Field(
        default="",
        description="`accepted`, `refused`, `held` (gates passed, trained with --no-promote),"
        " `forced` (rule overridden) or `done`",
    )
    trigger: str = Field(default="", description="`command` (churn promote / rollback) or `train` (the gates)")
    actor: str = ""
    reason: str = ""
    from_version: str | None = Field(default=None, description="The champion before the step")
    to_version: str | None = Field(default=None, description="The version the step promoted, refused or restored")
    figures: dict[str, Any] = Field(default_factory=dict, description="The evidence, e.g. the paired ROC-AUCs")


class ModelHistory(BaseModel):
    """A page of the audit log, newest step first."""

    offset: int
    limit: int
    total: int = Field(description="Steps in the log")
    next_offset: int | None = Field(description="Offset of the next page; null on the last")
    entries: list[HistoryEntry]


class Problem(BaseModel):
    """Every error answer: what went wrong, in one sentence."""

    detail: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
