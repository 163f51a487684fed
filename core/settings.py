"""All configuration in one place: environment variables with the `CHURN_` prefix (or `.env`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from core.errors import ConfigError

# Settings whose value may carry a password (`scheme://user:password@host`): printed masked.
URL_SETTINGS = frozenset({"kafka_bootstrap", "redis_url", "mlflow_tracking_uri"})
# Settings that are secrets as a whole: never echoed, not even in a validation error.
SECRET_SETTINGS = frozenset({"api_keys", "kafka_sasl_password"})
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def mask_url(url: str) -> str:
    """Returns `url` with the password of a `user:password@` part replaced by `***`
    (for logs and messages; connect with the unmasked value)."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


class Settings(BaseSettings):
    """Every setting of every process. Built once per process by `load_settings()` and passed in."""

    model_config = SettingsConfigDict(
        env_prefix="CHURN_", env_file=".env", extra="forbid", frozen=True, validate_default=True
    )

    # Where local services keep their data, pid files and logs (git-ignored).
    state_dir: Path = Path(".state")

    # Kafka
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_bootstrap: str = ""  # empty: 127.0.0.1:<kafka_port>
    events_topic: str = "events"
    dlq_topic: str = "events.dlq"
    topic_partitions: int = Field(default=6, ge=1, le=1024)
    scorer_group: str = "churn-scorer"
    archiver_group: str = "churn-archiver"
    max_event_bytes: int = Field(default=64 * 1024, ge=256)
    # Actions: the topic of tier-change events (key = user id; as many partitions as the events
    # topic, a change goes to the partition of the event that caused it). Empty: `risk.changes`
    # for the events topic `events`, else `<events_topic>.changes` (changes carry offsets of it).
    changes_topic: str = ""
    # Canary: this share of users (a stable hash slice, `models.runtime.in_canary`) is served by
    # the registry's `challenger` in the scorer and the API alike; 0 = champion only.
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)

    # Redis and Feast
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_url: str = ""  # empty: redis://127.0.0.1:<redis_port>/0
    redis_cluster: bool = False
    redis_prefix: str = "churn:"  # key prefix of scorer state and risk rows
    feast_repo: Path | None = None  # empty: <state_dir>/feast
    feast_project: str = "churn"
    # User states, feature rows and risk rows expire after this many seconds without a write
    # (bounded memory: users who left stop costing). Unset: the longest feature window plus the
    # allowed lateness, after which no event can change the user's row any more; 0: never expire.
    redis_key_ttl_seconds: int | None = Field(default=None, ge=0)

    # Prometheus
    prometheus_port: int = Field(default=9090, ge=1, le=65535)

    # MLflow
    mlflow_tracking_uri: str = ""  # empty: sqlite:///<state_dir>/mlflow.db
    model_name: str = "churn-lightgbm"
    # Promotion gates for a new model (see training.registry): absolute floors on the test
    # period, and how much ROC-AUC it may lose to the champion on the same test set.
    gate_min_roc_auc: float = Field(default=0.70, ge=0.0, le=1.0)
    gate_min_pr_auc: float = Field(default=0.05, ge=0.0, le=1.0)
    gate_auc_tolerance: float = Field(default=0.005, ge=0.0, le=1.0)
    # How much worse (relative) than a constant forecast of the training churn rate the backtest
    # mean Brier score may be: calibrated probabilities far off the base rate are refused.
    gate_brier_tolerance: float = Field(default=0.10, ge=0.0)
    # Training (training/pipeline.py): hours between observation points (each user-day weighs 1
    # whatever the grid), the hyper-parameter search's time budget and trial cap, the
    # rolling-origin backtests (days per test period, at most this many, the latest) and the
    # bootstrap replicates of their intervals and of the paired champion/challenger gate.
    train_grid_hours: int = Field(default=24, ge=1, le=24)
    train_search_seconds: float = Field(default=30.0, ge=0)
    train_search_trials: int = Field(default=6, ge=1, le=100)
    train_backtest_days: int = Field(default=3, ge=1, le=60)
    train_backtest_folds: int = Field(default=4, ge=1, le=50)
    train_bootstrap_samples: int = Field(default=200, ge=20, le=10_000)

    # Processes
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(default=1, ge=1, le=64)
    api_keys: list[SecretStr] = Field(default_factory=list)
    # Larger request bodies are refused with 413 before they are read. The largest valid batch
    # fits: 1,000 ids of 64 characters, each escaped as JSON encoders do by default (Python's
    # `json.dumps`: a character outside the BMP is a surrogate pair, 12 bytes), ~772 KB.
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # A body not received this long after its first read is refused with 408 (it holds a slot).
    api_body_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    open_health_and_metrics: bool = True  # health and /metrics answer without an API key
    scorer_metrics_port: int = Field(default=9108, ge=0, le=65535)
    archiver_metrics_port: int = Field(default=9109, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # bind address of the scorer's metrics server (0.0.0.0 in compose)

    # Model and features
    horizon_days: int = Field(default=14, ge=1, le=365)
    allowed_lateness_seconds: int = Field(default=3600, ge=0)
    clock: Literal["event", "wall"] = "event"
    # Bounds a batch (each batch is what is already fetched, so only a scorer catching up reaches
    # it): a user's row, score and state are written once per batch, so bigger batches share that
    # among more of their events (stream bench, 10k users: 43.3k ev/s at 20,000, 58.9k at 50,000),
    # at the price of up to ~1 s per batch and as many events replayed after a crash.
    max_batch_events: int = Field(default=50_000, ge=1, le=100_000)
    # How long an idle scorer waits for events to make a batch (a busy one never waits).
    max_batch_wait_ms: int = Field(default=100, ge=1, le=10_000)
    model_poll_seconds: float = Field(default=10.0, gt=0)

    # Drift monitoring (monitoring/drift.py, stream/snapshot.py): at each UTC midnight of event
    # time the scorer snapshots every user active in the last `lookback_days` and compares the
    # snapshot with the champion's reference, overall and per segment (a segment with fewer than
    # `drift_min_segment_rows` rows on either side is shown but not judged: with no drift, PSI on
    # ten bins times the rows is about chi-square with 9 degrees of freedom, so 500 rows keep a
    # false "warn" (PSI 0.1) below 1e-5 per feature, 200 rows would not). The snapshots go to
    # the prediction log (default <state>/data/predictions); realized performance is computed
    # when labels are known, and `churn retrain --if-degraded` retrains once the realized ROC-AUC
    # of the latest `degraded_days` labelled snapshots is below `gate_min_roc_auc`.
    lookback_days: int = Field(default=28, ge=1, le=365)
    drift_min_segment_rows: int = Field(default=500, ge=1)
    prediction_log_dir: Path | None = None
    degraded_days: int = Field(default=2, ge=1, le=60)
    drift_psi_warn: float = Field(default=0.1, gt=0)
    drift_psi_alert: float = Field(default=0.25, gt=0)
    # `churn retrain --if-drift` retrains once a PSI has been at alert level this long (as the alert rules).
    drift_sustained_minutes: float = Field(default=30.0, ge=0)

    # Hostile input and credentials (issue 18).
    # An event dated more than this after its Kafka append time (the broker's clock: the events
    # topic uses LogAppendTime) is dead-lettered: one bad device clock must not move event time.
    # Below the allowed lateness, so an accepted early event never makes a user's real ones late.
    max_future_skew_seconds: int = Field(default=300, ge=0, le=86_400)
    # An event whose message has no key is dead-lettered: on a topic of several partitions it
    # lands on any of them, so on a scorer that does not own the user. `false` accepts keyless
    # events, safe only on a topic of one partition. The scorer and the archiver read the same
    # setting, so the archived log holds what the scorer applied.
    require_event_key: bool = True
    # `churn serve` refuses to start without API keys unless this is set: open is a decision.
    api_open: bool = False
    # Kafka client security, passed to every client by `core.kafka.kafka_config`.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_ca_location: Path | None = None  # CA bundle for SSL / SASL_SSL (empty: system CAs)
    # Port of the local broker's SASL/SCRAM listener (`churn infra up`; 0: the Kafka port + 2).
    kafka_sasl_port: int = Field(default=0, ge=0, le=65535)

    # API capacity (issue 20). A worker with this many requests in flight answers any other at once
    # with 503 and Retry-After (serving/admission.py), so an accepted request waits behind at most
    # this many others' service time; during a standing overload (over 5% of a second's requests
    # refused) the limit is half of this. 0 (the default): derived in each worker from its measured
    # service time per request, as many as fit in a quarter of the latency budget below (at least 4, the fixed
    # default before, at most 64). A score request costs 0.4-1.2 ms of CPU on machines of this kind,
    # so one fixed number either queues past the budget on the slow ones or refuses bursts that the
    # fast ones serve within it. Fix it only with slower dependencies (more requests waiting on
    # Redis per worker than on the CPU).
    api_max_in_flight: int = Field(default=0, ge=0, le=1000)
    # The latency budget `churn bench api` searches capacity against (the highest open-loop rate
    # whose p99 stays under it), and a quarter of which a derived in-flight limit (above) fills.
    api_latency_budget_ms: float = Field(default=10.0, gt=0)

    # Promotion and rollback (issue 22; `churn promote`, `churn rollback`, training/promotion.py).
    # `churn promote` moves the challenger to champion only if, on the labelled users of the
    # prediction log that both versions scored (shadow or canary period), the one-sided 95% lower
    # bound of a paired bootstrap over users of ROC-AUC(challenger) - ROC-AUC(champion) is at
    # least -promote_auc_margin; with fewer than promote_min_users such users or
    # promote_min_churners churners among them it refuses (too little evidence).
    promote_auc_margin: float = Field(default=0.01, ge=0.0, le=1.0)
    promote_min_users: int = Field(default=200, ge=2)
    promote_min_churners: int = Field(default=20, ge=1)
    promote_bootstrap_samples: int = Field(default=500, ge=20, le=10_000)
    # Who the audit log names for a promotion or rollback (empty: the OS user), and where the log
    # is (JSON Lines; empty: <state>/model_audit.jsonl; `GET /models/history` reads it).
    actor: str = ""
    model_audit_log: Path | None = None

    @field_validator("events_topic", "dlq_topic", "scorer_group", "archiver_group", "model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            msg = "must not be blank"
            raise ValueError(msg)
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        # Redis Cluster hashes the first `{...}` of a key: a brace in the prefix would replace the
        # per-user slot-group tag, putting every user in one slot (one master) or splitting a
        # user's keys from their group's applied offsets.
        if "{" in value or "}" in value:
            msg = "must not contain { or }: the keys' own hash tags spread users over the cluster's slots"
            raise ValueError(msg)
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_blank_key(cls, value: list[SecretStr]) -> list[SecretStr]:
        # A blank key used to be dropped, so `[""]` (an unset template variable, say) passed the
        # "keys configured" check and left the API open without CHURN_API_OPEN.
        blank = [i for i, key in enumerate(value) if not key.get_secret_value().strip()]
        if blank:
            msg = f"key(s) at position {blank} are blank: an empty key would leave the API open"
            raise ValueError(msg)
        # A header carries visible ASCII only: servers strip surrounding spaces and Starlette reads
        # header bytes as latin-1, so a key with other characters could never match a request.
        unusable = [i for i, key in enumerate(value) if not _VISIBLE_ASCII.fullmatch(key.get_secret_value())]
        if unusable:
            msg = f"key(s) at position {unusable} have characters other than visible ASCII: no request could send them"
            raise ValueError(msg)
        return value

    @field_validator("max_future_skew_seconds")
    @classmethod
    def _skew_within_lateness(cls, value: int, info: ValidationInfo) -> int:
        # An event accepted up to the skew ahead of the broker moves its user's latest time that
        # far: beyond the lateness, the user's next real events would be dropped as late.
        lateness = info.data.get("allowed_lateness_seconds")
        if lateness is not None and value > lateness:
            msg = f"must be at most CHURN_ALLOWED_LATENESS_SECONDS ({lateness})"
            raise ValueError(msg)
        return value

    @field_validator("drift_psi_alert")
    @classmethod
    def _alert_above_warn(cls, value: float, info: ValidationInfo) -> float:
        warn = info.data.get("drift_psi_warn")
        if warn is not None and value <= warn:
            msg = f"must be above CHURN_DRIFT_PSI_WARN ({warn})"
            raise ValueError(msg)
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What repr() and str() show: API keys as `SecretStr` stars, URL passwords as `***`."""
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name in URL_SETTINGS and isinstance(value, str) else value

    @property
    def bootstrap_servers(self) -> str:
        """Returns the Kafka bootstrap address, derived from the port unless set explicitly."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def tier_changes_topic(self) -> str:
        """Returns the tier-change topic: `changes_topic`, else derived from the events topic."""
        if self.changes_topic:
            return self.changes_topic
        return "risk.changes" if self.events_topic == "events" else f"{self.events_topic}.changes"

    @property
    def kafka_sasl_listener_port(self) -> int:
        """Returns the port of the local broker's SASL/SCRAM listener."""
        return self.kafka_sasl_port or self.kafka_port + 2

    @property
    def redis_address(self) -> str:
        """Returns the Redis URL, derived from the port unless set explicitly."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def tracking_uri(self) -> str:
        """Returns the MLflow tracking URI; a SQLite file in the state folder by default."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.state_dir.resolve() / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        """Returns the MLflow artifact folder used with the default SQLite tracking store."""
        return self.state_dir.resolve() / "mlartifacts"

    @property
    def feast_repo_dir(self) -> Path:
        """Returns the folder of the generated Feast repo (feature_store.yaml and registry)."""
        return (self.feast_repo or self.state_dir / "feast").resolve()

    @property
    def data_dir(self) -> Path:
        """Returns the folder for simulated logs, the archived event log and batch outputs."""
        return self.state_dir.resolve() / "data"

    @property
    def predictions_dir(self) -> Path:
        """Returns the prediction log folder (the daily snapshots, Parquet by date)."""
        return (self.prediction_log_dir or self.data_dir / "predictions").resolve()

    @property
    def audit_log_path(self) -> Path:
        """Returns the model audit log file (JSON Lines): `model_audit_log`, or <state>/model_audit.jsonl."""
        return (self.model_audit_log or self.state_dir / "model_audit.jsonl").resolve()


def load_settings(**overrides: object) -> Settings:
    """Returns validated settings from the environment, `.env` and `overrides`.

    Raises:
        ConfigError: a value is invalid; the message names the `CHURN_` variable.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"CHURN_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}{_echo(err)}" for err in exc.errors()
        )
        msg = f"invalid settings: {problems}"
        if any(err["loc"] and err["loc"][0] in SECRET_SETTINGS | URL_SETTINGS for err in exc.errors()):
            raise ConfigError(msg) from None  # pydantic's own message, printed as the cause, shows the value
        raise ConfigError(msg) from exc
    except SettingsError as exc:  # a list setting that is not JSON; its text is not repeated (it may be a key)
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"CHURN_{field.group(1).upper()}" if field else "a setting"
        msg = f"invalid settings: {name} must be JSON (e.g. CHURN_API_KEYS='[\"key1\"]')"
        raise ConfigError(msg) from exc


def _echo(err: Any) -> str:
    """Returns " (got <input>)" for a validation error, with secrets left out and URL passwords masked."""
    name = str(err["loc"][0]) if err["loc"] else ""
    value = err.get("input")
    if "input" not in err or isinstance(value, dict) or name in SECRET_SETTINGS:
        return ""
    if name in URL_SETTINGS and isinstance(value, str):
        value = mask_url(value)
    return f" (got {value!r})"
