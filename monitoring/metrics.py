"""Every Prometheus metric of the system, defined once (names in base units, no user ids in labels).

Metrics live in a `Metrics` object built per process (nothing registers at import time), on
its own `CollectorRegistry`, so tests and several components in one process never collide.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from models.runtime import LoadedModel
from monitoring import multiprocess

# Sub-millisecond to seconds: request, batch and store latencies.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Event-to-score freshness: milliseconds to a minute, fine below 2 s where the p99 goal (1 s) is
# judged: a quantile interpolated within a bucket is off by at most the bucket's width.
FRESHNESS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip
SCORE_BUCKETS = tuple(round(x * 0.05, 2) for x in range(1, 20))


def _gauge(name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry) -> Gauge:
    """Returns a gauge that, with several API workers (`monitoring.multiprocess`), is exported
    per live worker (label `pid`): a worker that stopped leaves no value behind."""
    return Gauge(name, documentation, labelnames, registry=registry, multiprocess_mode="liveall")


class Metrics:
    """The metric objects of one process; `registry` is what `/metrics` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if multiprocess.active_dir() is None:
            # Values are in memory (`monitoring.multiprocess`), where clearing and removing series
            # works; prometheus-client warns that it does not because Feast sets its folder
            # variable in every process, and the warning came at every daily snapshot.
            warnings.filterwarnings(
                "ignore", message="(Clearing|Removal of) labels has not been implemented", category=UserWarning
            )
        self.registry = registry or CollectorRegistry()
        self._model_labels: dict[str, tuple[str, str, str]] = {}  # component -> its churn_model_info labels
        r = self.registry
        # Stream scorer
        self.events_total = Counter(
            "churn_events_consumed_total",
            "Events consumed by outcome: ok, invalid (dead-lettered), guest (skipped), late (ignored), duplicate",
            ["outcome"],
            registry=r,
        )
        self.unknown_pages_total = Counter(
            "churn_unknown_pages_total", "Valid events whose page is not a known page", registry=r
        )
        self.dlq_total = Counter("churn_dlq_messages_total", "Messages written to the dead-letter topic", registry=r)
        self.commit_failures_total = Counter(
            "churn_scorer_commit_failures_total",
            "Offset commits Kafka refused (harmless: the applied offsets in the states skip replays)",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "churn_batch_duration_seconds", "Time to process one micro-batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_events = Histogram(
            "churn_batch_events", "Messages per micro-batch", buckets=(1, 10, 100, 500, 1000, 5000, 20000), registry=r
        )
        self.freshness_seconds = BulkHistogram(
            "churn_event_to_score_seconds",
            "Per applied event: wall time its batch's risk rows were written minus the event's Kafka append time",
            FRESHNESS_BUCKETS,
            r,
        )
        self.consumer_lag = _gauge(
            "churn_consumer_lag_messages", "Messages behind the partition end", ["topic", "partition"], registry=r
        )
        self.users_scored_total = Counter("churn_users_scored_total", "Risk rows written", registry=r)
        self.score = BulkHistogram("churn_score", "Churn probabilities written", SCORE_BUCKETS, r)
        self.tier_total = Counter("churn_risk_tier_total", "Risk rows written by tier", ["tier"], registry=r)
        self.scorer_ready = _gauge(
            "churn_scorer_ready", "1 while the scorer can write to its stores, 0 during an outage", registry=r
        )
        self.state_bytes = _gauge(
            "churn_state_bytes_per_user", "Mean serialised feature-state size per user in the last batch", registry=r
        )
        # Redis faults (issue #18): every failed attempt is classified by `core.redis.classify`.
        self.store_failures = _gauge(
            "churn_scorer_store_failures",
            "Consecutive failed attempts of the current batch (0 once a batch is written)",
            registry=r,
        )
        self.redis_refusing = _gauge(
            "churn_scorer_redis_refusing",
            "1 while Redis refuses the scorer's commands with this error code (OOM, READONLY, MISCONF, AUTH...)",
            ["reason"],
            registry=r,
        )
        self.redis_rollbacks_total = Counter(
            "churn_scorer_redis_rollbacks_total",
            "Partitions found behind in Redis (it restarted from older data) and replayed from Kafka",
            registry=r,
        )
        # Scorer CPU by stage (issue #19): thread CPU of the loop, per batch (`StageCpu`)
        self.stage_cpu_seconds = Counter(
            "churn_scorer_stage_cpu_seconds_total",
            "CPU seconds of the scorer's loop thread by stage (see monitoring.metrics.SCORER_STAGES)",
            ["stage"],
            registry=r,
        )
        # Feature store
        self.store_write_seconds = Histogram(
            "churn_feature_store_write_seconds", "Feature rows write latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.store_read_seconds = Histogram(
            "churn_feature_store_read_seconds", "Feature rows read latency", buckets=LATENCY_BUCKETS, registry=r
        )
        # API
        self.request_seconds = Histogram(
            "churn_api_request_duration_seconds",
            "API request latency by route template and status code",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # API admission control (issue #20, serving/admission.py)
        self.api_shed_total = Counter(
            "churn_api_shed_requests_total",
            "Requests answered 503 with Retry-After because the worker had its in-flight limit in flight",
            registry=r,
        )
        self.api_in_flight = _gauge(
            "churn_api_requests_in_flight",
            "Requests in flight in this API worker (health and metrics aside)",
            registry=r,
        )
        self.api_in_flight_limit = _gauge(
            "churn_api_in_flight_limit",
            "The worker's in-flight limit: derived from its service time per request and the latency budget, or"
            " CHURN_API_MAX_IN_FLIGHT; half of it during a standing overload",
            registry=r,
        )
        # Model
        self.model_info = _gauge(
            "churn_model_info", "The loaded model (value 1)", ["component", "name", "version"], registry=r
        )
        self.model_loaded = _gauge("churn_model_loaded", "1 if a champion model is loaded", ["component"], registry=r)
        self.model_refused_total = Counter(
            "churn_model_refused_total",
            "Champion versions refused because their features or spec version differ from the running spec",
            ["component"],
            registry=r,
        )
        # Drift
        self.feature_psi = _gauge("churn_feature_psi", "PSI of a feature vs its reference", ["feature"], registry=r)
        self.feature_ks = _gauge("churn_feature_ks_statistic", "Two-sample KS statistic", ["feature"], registry=r)
        self.feature_ks_pvalue = _gauge("churn_feature_ks_pvalue", "Two-sample KS p-value", ["feature"], registry=r)
        self.score_psi = _gauge("churn_score_psi", "PSI of the score vs its reference", registry=r)
        self.drift_window_rows = _gauge(
            "churn_drift_window_rows", "Users in the latest daily drift snapshot", registry=r
        )
        self.drift_psi_threshold = _gauge(
            "churn_drift_psi_threshold",
            "PSI at which a drift status reaches a level (warn, alert): CHURN_DRIFT_PSI_WARN and _ALERT",
            ["level"],
            registry=r,
        )
        # Daily snapshot: per-segment drift, realized and expected performance (stream/snapshot.py)
        self.snapshot_as_of = _gauge(
            "churn_snapshot_as_of_seconds", "Event time (UTC midnight) of the latest daily snapshot", registry=r
        )
        self.segment_feature_psi_max = _gauge(
            "churn_segment_feature_psi_max",
            "Highest feature PSI within a segment (level_free/paid, tenure band) of the snapshot",
            ["segment"],
            registry=r,
        )
        self.segment_score_psi = _gauge(
            "churn_segment_score_psi", "Score PSI within a segment of the snapshot", ["segment"], registry=r
        )
        self.realized = _gauge(
            "churn_realized_performance",
            "Realized figure (roc_auc, pr_auc, high_precision, high_recall, brier, observed_rate, predicted_rate)"
            " of the latest labelled snapshot",
            ["metric"],
            registry=r,
        )
        self.realized_as_of = _gauge(
            "churn_realized_as_of_seconds", "Event time of the latest snapshot with realized figures", registry=r
        )
        self.expected = _gauge(
            "churn_expected_performance",
            "Figure the calibrated probabilities of the latest snapshot imply (roc_auc, high_precision,"
            " high_recall, predicted_rate)",
            ["metric"],
            registry=r,
        )
        self.performance_floor = _gauge(
            "churn_performance_floor", "The promotion floor of a metric (roc_auc)", ["metric"], registry=r
        )
        # Shadow scoring (issue #22): a distinct `challenger` scored beside the serving model
        self.shadow_rows_total = Counter(
            "churn_shadow_scored_total",
            "Users scored by the shadow model beside the serving one (component: scorer or api)",
            ["component"],
            registry=r,
        )
        self.shadow_same_tier_total = Counter(
            "churn_shadow_same_tier_total",
            "Users the shadow model put in the same tier as the serving one (component: scorer or api)",
            ["component"],
            registry=r,
        )
        self.shadow_abs_delta_total = Counter(
            "churn_shadow_abs_delta_total",
            "Sum of |served probability - shadow probability| over the users scored by both"
            " (divided by churn_shadow_scored_total: the mean |delta p|)",
            ["component"],
            registry=r,
        )
        self.shadow_agreement = _gauge(
            "churn_shadow_agreement",
            "Agreement of the served and shadow scores over the latest daily snapshot (metric: same_tier,"
            " spearman, mean_abs_delta)",
            ["metric"],
            registry=r,
        )
        self.shadow_snapshot_rows = _gauge(
            "churn_shadow_snapshot_rows", "Users scored by both models in the latest daily snapshot", registry=r
        )
        self.model_score_psi = _gauge(
            "churn_model_score_psi",
            "Score PSI of each model of the latest snapshot against its own reference (role: served = the"
            " champion, shadow = the challenger)",
            ["role", "version"],
            registry=r,
        )
        self.model_feature_psi_max = _gauge(
            "churn_model_feature_psi_max",
            "Highest feature PSI of the latest snapshot against each model's own reference",
            ["role", "version"],
            registry=r,
        )
        self.model_expected = _gauge(
            "churn_model_expected_performance",
            "Figure each model's probabilities over every user of the latest snapshot imply",
            ["role", "version", "metric"],
            registry=r,
        )
        self.model_realized = _gauge(
            "churn_model_realized_performance",
            "Realized figure of each model over every user of the latest labelled snapshot",
            ["role", "version", "metric"],
            registry=r,
        )
        # Archiver
        self.archiver_lag = _gauge(
            "churn_archiver_lag_messages",
            "Archiver messages behind the partition end",
            ["topic", "partition"],
            registry=r,
        )
        self.archiver_files_total = Counter("churn_archiver_files_total", "Parquet files written", registry=r)
        self.archiver_bytes_total = Counter("churn_archiver_bytes_total", "Parquet bytes written", registry=r)
        self.archiver_events_total = Counter("churn_archiver_events_total", "Events archived", registry=r)
        self.archiver_last_commit = _gauge(
            "churn_archiver_last_commit_timestamp_seconds", "Wall time of the archiver's last offset commit", registry=r
        )
        self.archiver_commit_failures_total = Counter(
            "churn_archiver_commit_failures_total",
            "Archiver offset commits Kafka refused (the next batch's commit covers them)",
            registry=r,
        )

    def exposition(self) -> bytes:
        """Returns the text exposition `/metrics` answers: this registry, or every worker's
        values in multiprocess mode (`monitoring.multiprocess`)."""
        return multiprocess.exposition(self.registry)

    def set_model(self, component: str, name: str, version: str | None) -> None:
        """Records which model `component` (scorer or api) now serves; version None = no model.
        The series of the model it served before is removed (set to 0 in multiprocess mode,
        which cannot remove a series: dashboards read `churn_model_info > 0`)."""
        previous = self._model_labels.pop(component, None)
        if previous is not None:
            if multiprocess.active_dir() is None:
                self.model_info.remove(*previous)
            else:
                self.model_info.labels(*previous).set(0)
        if version is not None:
            self._model_labels[component] = (component, name, version)
            self.model_info.labels(component, name, version).set(1)
        self.model_loaded.labels(component).set(0 if version is None else 1)

    def model_swapped(self, component: str) -> Callable[[LoadedModel], None]:
        """Returns the callback a `models.holder.ModelHolder` calls with each model it loads:
        it records the model's name and version for `component`."""
        return lambda loaded: self.set_model(component, loaded.name, loaded.version)

    def model_refused(self, component: str) -> Callable[[str, str], None]:
        """Returns the callback a `models.holder.ModelHolder` calls with each champion version
        it refuses (version, reason): it counts them for `component`."""
        return lambda _version, _reason: self.model_refused_total.labels(component).inc()

    def track_shadow(
        self,
        component: str,
        served: np.ndarray,
        shadow: np.ndarray,
        served_tiers: Sequence[str],
        shadow_tiers: Sequence[str],
    ) -> None:
        """Counts users scored by both models for `component` (scorer or api): how many, how many
        in the same tier, and the sum of |delta p| (rates of these give the live agreement)."""
        self.shadow_rows_total.labels(component).inc(len(served))
        self.shadow_same_tier_total.labels(component).inc(
            sum(a == b for a, b in zip(served_tiers, shadow_tiers, strict=True))
        )
        self.shadow_abs_delta_total.labels(component).inc(float(np.sum(np.abs(np.asarray(served) - shadow))))

    def set_model_figures(self, gauge: Gauge, role: str, version: str | None, figures: dict[str, float]) -> None:
        """Sets a per-model gauge (`model_*`, labels role, version and, with `figures` keyed by
        metric, metric; the key "" for a gauge without a metric label) for the model of `role`,
        first removing that role's series of other versions (a promoted or withdrawn model must
        not linger). `version` None only removes the role's series. Non-finite values are skipped."""
        for family in gauge.collect():
            for sample in family.samples:
                labels = sample.labels
                if labels.get("role") == role and labels.get("version") != version:
                    gauge.remove(*(labels[name] for name in ("role", "version", "metric") if name in labels))
        if version is None:
            return
        for metric, value in figures.items():
            if np.isfinite(value):
                gauge.labels(role, version, *([metric] if metric else [])).set(value)


# The scorer loop's stages, in loop order; each one's thread CPU is counted in
# `churn_scorer_stage_cpu_seconds_total{stage}`. Together they cover the loop thread's whole time.
SCORER_STAGES: Final = (
    "consume",  # librdkafka consume() and the Message tuples (the fetch itself runs on librdkafka's threads)
    "offset_check",  # reading the applied offsets Redis holds (has it gone back in time?)
    "parse",  # JSON decode and validation (events.schema.parse_batch)
    "state_load",  # user states not cached: Redis read and msgpack decode
    "engine",  # online engine: apply each event, build each touched user's row and state blob
    "feast_write",  # feature rows to Redis through the Feast write path
    "score",  # feature matrix, LightGBM predict, risk rows built, score/freshness metrics
    "shadow",  # the shadow model's predict on the same matrix and the agreement counters (nothing written)
    "risk_write",  # risk rows and the watermark to Redis
    "state_write",  # user states and applied offsets to Redis (one Lua script)
    "changes",  # tier-change events: reading the changes topic's unsaved tail, publishing, acks
    "snapshot",  # daily snapshot activity (and the snapshot itself at a UTC midnight)
    "commit",  # dead letters, batch metrics, Kafka offset commit
    "gc",  # the batch's survivors collected and frozen (core.gc_policy.freeze_survivors)
    "housekeeping",  # model poll, lag report, idle checks between batches
)


class StageCpu:
    """Thread CPU time of the scorer loop by stage: `mark(stage)` charges the time since the
    previous mark to `stage` (one `thread_time_ns` read, a syscall of well under a microsecond);
    `flush()` adds the sums to the counter once per batch, so a batch costs about a dozen clock
    reads and a dozen counter increments, whatever its size."""

    def __init__(self, counter: Counter) -> None:
        self._children = {stage: counter.labels(stage) for stage in SCORER_STAGES}
        self._ns = dict.fromkeys(SCORER_STAGES, 0)
        self._last = time.thread_time_ns()

    def start(self) -> None:
        """Starts the clock on the calling thread, which must take every later mark: a thread's
        CPU clock is its own, so a loop run on another thread than the one that built this
        would charge a negative time (and the counter refuses it)."""
        self._last = time.thread_time_ns()

    def mark(self, stage: str) -> None:
        """Charges the loop thread's CPU since the previous mark (or `start`) to `stage`."""
        now = time.thread_time_ns()
        self._ns[stage] += now - self._last
        self._last = now

    def flush(self) -> None:
        """Adds the charged time to `churn_scorer_stage_cpu_seconds_total` and starts over."""
        for stage, ns in self._ns.items():
            if ns:
                self._children[stage].inc(ns * 1e-9)
                self._ns[stage] = 0


class BulkHistogram(Collector):
    """A Prometheus histogram fed a whole batch of values at once.

    The scorer observes two values per scored user; `Histogram.observe` per value cost about a
    tenth of a batch's time. Here a batch is bucketed by one numpy call. Exposed exactly like a
    `Histogram` of the same name (`_bucket{le=...}`, `_sum`, `_count`).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = np.array([*buckets, float("inf")])
        self._labels = [floatToGoString(b) for b in self._bounds]
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # the metrics server thread reads while the loop writes
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Counts each value in the first bucket whose upper bound is >= it (Prometheus' `le`)."""
        if len(values) == 0:
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        total = float(np.sum(values))
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Yields the histogram family: cumulative buckets, sum and count."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        yield HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )
