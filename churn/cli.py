"""The `churn` console entry point: one Typer app, one subcommand per job.

Each command builds its settings and clients here (the process's wiring point) and hands
them to library code. This is the top layer: nothing imports it. Each command imports the
packages it runs inside its function (marked `# heavy`): together they load LightGBM,
scikit-learn, polars, Feast and MLflow, several seconds that `churn --help` or `churn infra
status` should not wait for. The layer test reads these imports too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from core.errors import ChurnError, InvalidInputError, NotFoundError
from core.redis import redis_client, redis_errors
from core.settings import Settings, load_settings, mask_url
from core.timeutil import parse_utc, to_ms
from features.online import state_layout
from features.state_store import remove_old_layouts
from infra import cluster as infra_cluster
from infra import local as infra

app = typer.Typer(
    help="Real-time churn scorer: Kafka -> features (Feast/Redis) -> LightGBM -> API.", no_args_is_help=True
)
infra_app = typer.Typer(
    help="Local real services on 127.0.0.1: Kafka (KRaft), Redis, Prometheus.", no_args_is_help=True
)
app.add_typer(infra_app, name="infra")
bench_app = typer.Typer(help="Benchmarks on the configured services; each prints JSON figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
actions_app = typer.Typer(help="Act on tier changes: consume the risk.changes topic.", no_args_is_help=True)
app.add_typer(actions_app, name="actions")


def _settings() -> Settings:
    return load_settings()


def _print_figures(measure: Callable[[], dict[str, Any]]) -> None:
    """Runs a benchmark and prints its figures as JSON; a ChurnError becomes a one-line error."""

    try:
        figures = measure()
    except ChurnError as exc:
        _fail(exc)
    typer.echo(json.dumps(figures, indent=2))


def _fail(exc: ChurnError) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


_CLUSTER = typer.Option(
    False, "--cluster", help="the local clusters instead: 3 Kafka brokers (RF 3), Redis Cluster (3 masters, 3 replicas)"
)


@infra_app.command("up")
def infra_up(cluster: bool = _CLUSTER) -> None:
    """Install what is missing, start Kafka, Redis and Prometheus (or the clusters), wait until each answers."""

    settings = _settings()
    try:
        states = infra_cluster.up(settings) if cluster else infra.up(settings)
    except ChurnError as exc:
        _fail(exc)
    for state in states:
        typer.echo(f"{state.name:<11} {state.address:<16} ready     {state.detail}")
    if cluster:
        typer.echo("clients of the clusters need:")
        for name, value in infra_cluster.client_env(settings).items():
            typer.echo(f"  export {name}={value}")


@infra_app.command("down")
def infra_down() -> None:
    """Stop the services started from this state folder (the single nodes and the clusters)."""

    settings = _settings()
    infra.down(settings)
    infra_cluster.down(settings)
    typer.echo("stopped")


@infra_app.command("status")
def infra_status(cluster: bool = _CLUSTER) -> None:
    """Report each service (or cluster node): process running, and whether it answers a real request."""

    settings = _settings()
    states = infra_cluster.status(settings) if cluster else infra.status(settings)
    for state in states:
        word = "ready" if state.ready else ("starting" if state.running else "down")
        typer.echo(f"{state.name:<11} {state.address:<16} {word:<9} {state.detail}")
    if not all(state.ready for state in states):
        raise typer.Exit(1)


@app.command("alerts")
def alerts(
    window: float = typer.Option(600.0, min=0.0, help="Also list alerts active at any time in this many seconds."),
    url: str = typer.Option("", help="Prometheus base URL (default: the local one, CHURN_PROMETHEUS_PORT)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if a target is not up or an alert was active."),
) -> None:
    """Prometheus's view as JSON: scrape targets, alerts active now and alerts seen in the window."""
    from monitoring import prometheus_status as status  # heavy: see the module docstring

    base = url or f"http://127.0.0.1:{_settings().prometheus_port}"
    try:
        targets, active = status.targets(base), status.active_alerts(base)
        seen = status.alerts_seen(base, window) if window > 0 else []
    except ChurnError as exc:
        _fail(exc)
    report = {
        "prometheus": base,
        "targets": [asdict(t) for t in targets],
        "alerts_active": [asdict(a) for a in active],
        f"alerts_seen_in_last_{window:g}s": [asdict(a) for a in seen],
    }
    typer.echo(json.dumps(report, indent=2))
    if check and (not targets or any(t.health != "up" for t in targets) or active or seen):
        raise typer.Exit(1)


@app.command("consume")
def consume(
    idle_exit: float = typer.Option(
        0.0, help="Exit after this many seconds without messages while partitions are assigned (0: run until stopped)."
    ),
) -> None:
    """Run the scoring consumer (group churn-scorer): events -> features -> scores -> Redis."""
    from monitoring.server import registered, start_metrics_server  # heavy: see the module docstring
    from stream.consumer import build_scorer  # heavy: see the module docstring

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = _settings()
    try:
        scorer = build_scorer(settings)
    except ChurnError as exc:
        _fail(exc)
    start_metrics_server(scorer.metrics, settings.scorer_metrics_port, settings.metrics_host)
    scorer.install_signal_handlers()
    with registered(settings, "scorer", settings.scorer_metrics_port, settings.metrics_host):
        scorer.run(max_idle_s=idle_exit or None)


def _stop_like_ctrl_c_on_sigterm() -> None:
    """Makes SIGTERM (docker stop, kill) end the command as Ctrl-C does: flush, summary, exit."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command("produce")
def produce(
    replay: str = typer.Option(..., "--replay", help="JSON Lines file of events (.gz or plain) to publish."),
    rate: float = typer.Option(0.0, min=0.0, help="At most this many events per second (0: no limit)."),
    speedup: float = typer.Option(0.0, min=0.0, help="Replay event time this many times faster (0: ignore ts)."),
) -> None:
    """Publish events to the events topic keyed by userId; malformed lines are reported, not sent."""
    from stream.pacing import Pacing  # heavy: see the module docstring
    from stream.producer import ProduceReport, replay_file  # heavy: see the module docstring

    on_tty = sys.stderr.isatty()
    _stop_like_ctrl_c_on_sigterm()

    def show_progress(report: ProduceReport) -> None:
        line = (
            f"{report.lines:>12,} lines  {report.sent:>12,} sent  {report.events_per_second:>9,.0f}/s  "
            f"malformed {report.malformed:,}  failed {report.failed:,}"
        )
        # On a terminal one line redraws in place; in a log each update is its own line.
        sys.stderr.write(f"\r{line}" if on_tty else f"{line}\n")
        sys.stderr.flush()

    try:
        report = replay_file(
            _settings(),
            Path(replay),
            pacing=Pacing(rate=rate or None, speedup=speedup or None),
            progress=show_progress,
        )
    except ChurnError as exc:
        _fail(exc)
    if on_tty:
        sys.stderr.write("\n")
    typer.echo(
        f"sent {report.sent:,} (guests without key {report.guests:,}), skipped {report.skipped:,} blank, "
        f"failed {report.failed:,}, malformed {report.malformed:,} in {report.elapsed_seconds:.1f}s "
        f"({report.events_per_second:,.0f} events/s)"
    )
    for reason, count in report.failure_reasons.most_common():
        typer.echo(f"  failed: {count:,} x {reason}")
    shown = 20
    for line_no, reason in report.malformed_lines[:shown]:
        typer.echo(f"  malformed line {line_no}: {reason}")
    if report.malformed > shown:
        typer.echo(f"  ... and {report.malformed - shown:,} more malformed lines")
    if report.interrupted:
        raise typer.Exit(130)
    if report.failed:
        raise typer.Exit(1)


@bench_app.command("produce")
def bench_produce(
    events: int = typer.Option(1_000_000, min=1, help="How many pre-generated events to publish."),
) -> None:
    """Events/s published to the configured broker from one process (fresh topic, deleted after)."""
    from bench import produce as produce_bench  # heavy: see the module docstring

    _print_figures(lambda: produce_bench.bench_produce(_settings(), events=events))


@app.command("archive")
def archive(
    out: Path | None = typer.Option(None, help="Event log folder (default: <state>/data/events)."),
    idle_exit: float = typer.Option(
        0.0, help="Exit after this many seconds without messages while partitions are assigned (0: run until stopped)."
    ),
) -> None:
    """Run the archiver (group churn-archiver): events -> Parquet log partitioned by event date;
    metrics on CHURN_ARCHIVER_METRICS_PORT."""
    from monitoring.metrics import Metrics  # heavy: see the module docstring
    from monitoring.server import registered, start_metrics_server  # heavy: see the module docstring
    from stream.archiver import Archiver  # heavy: see the module docstring

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = _settings()
    metrics = Metrics()
    archiver = Archiver(settings, out or settings.data_dir / "events", metrics=metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: archiver.stopping.set())
    start_metrics_server(metrics, settings.archiver_metrics_port, settings.metrics_host)
    with registered(settings, "archiver", settings.archiver_metrics_port, settings.metrics_host):
        archiver.run(max_idle_s=idle_exit or None)


@app.command("simulate")
def simulate(
    users: int = typer.Option(1000, min=1, help="Listeners in the population."),
    days: int = typer.Option(60, min=1, help="Days of events."),
    start: str = typer.Option("2026-01-01", help="First day, ISO date or datetime (UTC unless an offset is given)."),
    seed: int = typer.Option(0, help="Random seed; the same options give identical output."),
    churn_level: float = typer.Option(1.0, min=0.0, help="Multiplies every user's churn hazard."),
    drift_at: str | None = typer.Option(None, help="ISO datetime after which behaviour drifts (sim/simulator.py)."),
    drift_strength: float = typer.Option(1.0, min=0.0, help="How strongly behaviour drifts after --drift-at."),
    out: str | None = typer.Option(None, help="Events as JSON Lines, gzip if the name ends with .gz."),
    truth: str | None = typer.Option(None, help="Ground-truth Parquet (default: <out stem>.truth.parquet)."),
    oracle: bool = typer.Option(False, "--oracle", help="Also report the oracle ROC-AUC on a daily grid (H: horizon)."),
) -> None:
    """Simulate listeners: events in ts order plus the hidden ground truth; prints a JSON summary."""
    from sim import simulator  # heavy: see the module docstring
    from sim.ground_truth import save_truth  # heavy: see the module docstring
    from sim.oracle import oracle_report  # heavy: see the module docstring

    settings = _settings()
    events_path = Path(out) if out else settings.data_dir / "simulated.jsonl.gz"
    truth_path = Path(truth) if truth else simulator.truth_path_for(events_path)
    try:
        config = simulator.SimConfig(
            users=users, days=days, start=parse_utc(start, "--start"), seed=seed, churn_level=churn_level,
            drift_at=parse_utc(drift_at, "--drift-at") if drift_at else None, drift_strength=drift_strength,
        )  # fmt: skip
        began = time.perf_counter()
        sim = simulator.simulate(config)
        generated = time.perf_counter() - began
    except ChurnError as exc:
        _fail(exc)
    sim.write_events(events_path)
    save_truth(sim.truth, truth_path)
    churned = sim.truth.churn_ms >= 0
    summary: dict[str, object] = {
        "events": sim.events.height,
        "guest_events": int((sim.events["userId"] == "").sum()),
        "users": users,
        "days": days,
        "churned_users": int(churned.sum()),
        "churn_rate": round(float(churned.mean()), 4),
        "generate_seconds": round(generated, 2),
        "events_per_second": round(sim.events.height / generated),
        "total_seconds": round(time.perf_counter() - began, 2),
        "out": str(events_path),
        "truth": str(truth_path),
    }
    if oracle:
        summary["oracle"] = oracle_report(sim.truth, horizon_days=settings.horizon_days)
    typer.echo(json.dumps(summary, indent=2))


@app.command("feast-apply")
def feast_apply() -> None:
    """Write feature_store.yaml and register the Feast objects generated from the feature spec."""
    from features.feast_repo import apply_repo  # heavy: see the module docstring

    settings = _settings()
    try:
        store = apply_repo(settings)
    except ChurnError as exc:
        _fail(exc)
    views = store.list_feature_views()
    typer.echo(f"project   {store.project}  (repo {settings.feast_repo_dir})")
    for view in views:
        typer.echo(f"view      {view.name}: {len(view.features)} features, online={view.online}")


_EVENT_LOG_HELP = "Event log: a date-partitioned Parquet folder, a .parquet or a .jsonl[.gz] file."
_PromoteOption = Annotated[
    bool,
    typer.Option(
        "--promote/--no-promote",
        help="--no-promote: the new version stays `challenger` even if the gates pass (a staged rollout:"
        " shadow, canary, then `churn promote`).",
    ),
]


@app.command("train")
def train(
    events: Annotated[Path, typer.Option(help=_EVENT_LOG_HELP)],
    horizon_days: Annotated[int | None, typer.Option(min=1, help="Horizon H in days (default: settings).")] = None,
    grid_hours: Annotated[
        int | None,
        typer.Option(min=1, max=24, help="Hours between observation times from UTC midnight (default: settings)."),
    ] = None,
    truth: Annotated[Path | None, typer.Option(help="Simulator ground truth: also report the oracle ROC-AUC.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    promote: _PromoteOption = True,
) -> None:
    """Check the log, select and backtest LightGBM on time splits, fit it on every labelled point,
    log to MLflow, register and gate."""
    from sim.oracle import oracle_for  # heavy: see the module docstring
    from training.pipeline import TrainOptions  # heavy: see the module docstring

    oracle = oracle_for(truth) if truth else None
    options = TrainOptions(horizon_days=horizon_days, grid_hours=grid_hours, oracle=oracle, promote=promote)
    _train_and_report(_settings(), events, options, as_json=as_json)


def _train_and_report(settings: Settings, events: Path, options: Any, *, as_json: bool) -> None:
    """Runs the training pipeline with progress on stderr; prints the summary (table or JSON)."""
    from training import pipeline, report  # heavy: see the module docstring

    try:
        summary = pipeline.train(settings, events, options=options, progress=lambda line: typer.echo(line, err=True))
    except ChurnError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary.to_dict(), default=str) if as_json else report.format_summary(summary))


@app.command("retrain")
def retrain(
    events: Annotated[Path, typer.Option(help=_EVENT_LOG_HELP)],
    if_drift: Annotated[
        bool, typer.Option("--if-drift", help="Only if a feature or the score drifted (scorer's state in Redis).")
    ] = False,
    if_degraded: Annotated[
        bool,
        typer.Option(
            "--if-degraded",
            help="Only if the realized ROC-AUC of the latest CHURN_DEGRADED_DAYS labelled snapshots is below"
            " CHURN_GATE_MIN_ROC_AUC. With --if-drift: either condition.",
        ),
    ] = False,
    sustained_minutes: Annotated[
        float | None, typer.Option(min=0, help="Minutes at alert level first (default: CHURN_DRIFT_SUSTAINED_MINUTES).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the training summary as one JSON object.")] = False,
    promote: _PromoteOption = True,
) -> None:
    """Retrain (as `churn train`), always, or only after sustained drift and/or degraded realized performance."""
    from models.registry import champion_version  # heavy: see the module docstring
    from monitoring.drift_state import read_drift, retrain_decision  # heavy: see the module docstring
    from monitoring.performance_state import degraded_decision, read_performance  # heavy: see the module docstring
    from training.pipeline import TrainOptions  # heavy: see the module docstring

    settings = _settings()
    if if_drift or if_degraded:
        minutes = settings.drift_sustained_minutes if sustained_minutes is None else sustained_minutes
        decisions = []
        try:
            champion = champion_version(settings)  # the states' figures count only when they are its
            with redis_errors("reading the drift and performance states"):
                client = redis_client(settings)
                if if_drift:
                    drift = read_drift(client, settings.redis_prefix)
                    decisions.append(retrain_decision(drift, minutes, time.time(), champion))
                if if_degraded:
                    state = read_performance(client, settings.redis_prefix)
                    decisions.append(
                        degraded_decision(state, settings.gate_min_roc_auc, settings.degraded_days, champion)
                    )
        except ChurnError as exc:
            _fail(exc)
        go = any(decision for decision, _ in decisions)
        typer.echo(f"{'retraining' if go else 'not retraining'}: {'; '.join(why for _, why in decisions)}")
        if not go:
            return
    _train_and_report(settings, events, TrainOptions(promote=promote), as_json=as_json)


@actions_app.command("tail")
def actions_tail(
    group: Annotated[
        str, typer.Option(help="Consumer group (a new group starts at the topic's start).")
    ] = "churn-actions",
    webhook: Annotated[str, typer.Option(help="POST each change as JSON to this URL instead of printing it.")] = "",
    max_attempts: Annotated[int, typer.Option(min=1, help="Webhook attempts per change before the DLQ.")] = 5,
    idle_exit: Annotated[float, typer.Option(help="Exit after this many seconds without changes (0: never).")] = 0.0,
) -> None:
    """Print the tier changes (one JSON line each), or deliver them to a webhook with retries and a DLQ."""
    from stream.actions import TailReport, WebhookSink, tail  # heavy: see the module docstring
    from stream.changes import ENCODER, ensure_changes_topic  # heavy: see the module docstring

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stopping = threading.Event()
    _stop_on_signals(stopping)
    settings = _settings()

    def show(change: Any) -> None:
        typer.echo(ENCODER.encode(change).decode())

    report = TailReport()
    try:
        sink = WebhookSink(webhook, max_attempts=max_attempts, stopping=stopping) if webhook else show
        ensure_changes_topic(settings)
        tail(settings, sink, group=group, stopping=stopping, idle_exit_s=idle_exit or None, report=report)
    except KeyboardInterrupt:  # the second signal: at once, and not as a success
        typer.echo(
            f"interrupted after {report.counts()}: the batch in hand is delivered again from its start after a restart",
            err=True,
        )
        raise typer.Exit(130) from None
    except ChurnError as exc:
        _fail(exc)
    summary = report.counts()
    if report.stopped_mid_batch:
        summary += "; stopped within a batch: it is delivered again from its start after a restart"
    typer.echo(summary, err=True)


def _stop_on_signals(stopping: threading.Event) -> None:
    """Makes SIGTERM (docker stop, kill) and Ctrl-C set `stopping`: the command ends what it
    holds (a webhook attempt in flight, at most its timeout) and prints its summary. A second
    signal ends it at once, as Ctrl-C does by default (KeyboardInterrupt)."""

    def stop(*_: object) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


_ACTOR_HELP = "Who the audit log names (default: CHURN_ACTOR, else the OS user)."


@app.command("promote")
def promote(
    force: Annotated[bool, typer.Option("--force", help="Promote even if the rule refuses (needs --reason).")] = False,
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log (required with --force).")] = "",
    actor: Annotated[str, typer.Option(help=_ACTOR_HELP)] = "",
) -> None:
    """Move the `challenger` to `champion` if its realized performance on the users both versions
    scored (prediction log, shadow/canary period) is not worse than the champion's. Exit 0 promoted,
    1 refused (aliases untouched), 2 error. Every attempt goes to the audit log."""
    from training.promotion import promote as run_promote  # heavy: see the module docstring

    if force and not reason.strip():
        typer.secho("error: --force needs --reason (the audit log records why the rule was overridden)", err=True)
        raise typer.Exit(2)
    try:
        step = run_promote(_settings(), force=force, reason=reason, actor=actor)
    except ChurnError as exc:
        _fail(exc)
    entry = step.entry
    was = f"v{entry['from_version']}" if entry["from_version"] else "none"
    typer.echo(f"{entry['outcome']}: challenger v{entry['to_version']} (champion was {was})")
    typer.echo(f"rule: {entry['rule']}")
    if not step.accepted:
        typer.echo("aliases unchanged")
        raise typer.Exit(1)
    typer.echo(f"champion is now v{entry['to_version']}; scorer and API swap within CHURN_MODEL_POLL_SECONDS")


@app.command("rollback")
def rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log.")] = "",
    actor: Annotated[str, typer.Option(help=_ACTOR_HELP)] = "",
) -> None:
    """Move `champion` back to the version the current champion replaced (scorer and API swap
    without a restart); a challenger alias on the rolled-back version is removed. Exit 0 done, 2 error."""
    from training.promotion import rollback as run_rollback  # heavy: see the module docstring

    try:
        step = run_rollback(_settings(), reason=reason, actor=actor)
    except ChurnError as exc:
        _fail(exc)
    entry = step.entry
    withdrawn = " (its challenger alias removed)" if entry["challenger_withdrawn"] else ""
    typer.echo(f"rolled back: champion v{entry['from_version']}{withdrawn} -> v{entry['to_version']}")
    typer.echo("scorer and API swap within CHURN_MODEL_POLL_SECONDS")


@app.command("score")
def score(
    events: Annotated[Path, typer.Option(help=_EVENT_LOG_HELP)],
    as_of: Annotated[str, typer.Option(help="ISO time to score at (UTC unless an offset is given).")],
    out: Annotated[Path, typer.Option(help="Output file, .csv or .parquet.")],
    active_days: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Only users with an event in the N days up to --as-of: the daily snapshot's population"
            " (training's observation points; N = CHURN_LOOKBACK_DAYS there).",
        ),
    ] = None,
    top: Annotated[
        int, typer.Option(min=0, help="Also print the N users most at risk (highest probability first).")
    ] = 0,
) -> None:
    """Score every known user (or every user active in the last --active-days) as of a time with the champion."""
    from events.log import load_events_with_positions  # heavy: see the module docstring
    from features.offline import as_streamed  # heavy: see the module docstring
    from models.registry import load_champion  # heavy: see the module docstring
    from training.scoring import score_users, write_scores  # heavy: see the module docstring

    settings = _settings()
    try:
        moment = parse_utc(as_of, "--as-of")
        champion = load_champion(settings)
        if champion is None:
            where = mask_url(settings.tracking_uri)
            msg = f"no champion version of {settings.model_name} at {where}; run `churn train` first"
            raise NotFoundError(msg)
        model, version = champion
        # The events the scorer applies (late ones left out), so that the rows are the stream's.
        applied = as_streamed(load_events_with_positions(events), settings.allowed_lateness_seconds * 1000)
        scores = score_users(model, applied, to_ms(moment), version, active_days=active_days)
        write_scores(scores, out)
    except ChurnError as exc:
        _fail(exc)
    tiers = scores["risk_tier"].value_counts().sort("risk_tier")
    counts = ", ".join(f"{row['risk_tier']} {row['count']}" for row in tiers.iter_rows(named=True))
    typer.echo(f"scored {scores.height} users with {settings.model_name} v{version} -> {out} ({counts})")
    if top:  # the scores are sorted by probability descending, then user id
        for row in scores.head(top).iter_rows(named=True):
            typer.echo(f"{row['user_id']}\t{row['churn_probability']:.4f}\t{row['risk_tier']}")


@bench_app.command("train")
def bench_train(
    users: Annotated[int, typer.Option(min=10, help="Simulated listeners.")] = 10_000,
    days: Annotated[int, typer.Option(min=1, help="Simulated days.")] = 60,
    compare: Annotated[
        bool, typer.Option("--compare", help="Before/after ROC-AUC of the registered model on the days after the log.")
    ] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Simulation seeds 0.. for --compare.")] = 3,
    future_days: Annotated[
        int, typer.Option(min=1, help="Days after the log whose points --compare scores (labels from the simulation).")
    ] = 3,
    booster_seeds: Annotated[
        int,
        typer.Option(
            min=1, help="With --compare: refit both models with this many LightGBM seeds (the spread of one draw)."
        ),
    ] = 1,
) -> None:
    """Seconds of each training step (checks, build, search, final fit) on a simulated
    date-partitioned log; with --compare, main's procedure against this one on the same seeds."""
    from bench import train as train_bench  # heavy: see the module docstring

    if compare:
        seeds_run = tuple(range(seeds))
        say = lambda line: typer.echo(line, err=True)  # noqa: E731
        _print_figures(
            lambda: train_bench.compare_train(
                _settings(), users, days, seeds_run, future_days=future_days, progress=say, booster_seeds=booster_seeds
            )
        )
    else:
        _print_figures(lambda: train_bench.bench_train(_settings(), users, days))


@app.command("serve")
def serve(
    workers: int = typer.Option(0, help="uvicorn worker processes (0: CHURN_API_WORKERS)."),
) -> None:
    """Run the risk API (FastAPI under uvicorn) on CHURN_API_HOST:CHURN_API_PORT."""
    import uvicorn

    from monitoring import multiprocess  # heavy: see the module docstring
    from monitoring.server import registered  # heavy

    settings = _settings()
    processes = workers or settings.api_workers
    # One `/metrics` for all workers (monitoring.multiprocess), set up before uvicorn starts them.
    shared = (
        multiprocess.workers_folder(settings.state_dir / "api-metrics", settings.api_port)
        if processes > 1
        else contextlib.nullcontext()
    )
    # uvicorn ends `run` on SIGTERM/SIGINT (graceful shutdown), then raises the signal again under
    # the handler it found. SIGTERM's default ended the process there, before the `with` blocks
    # removed the Prometheus target file (left as a down target); this one leaves through them.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with shared, registered(settings, "api", settings.api_port, settings.api_host):
        uvicorn.run(
            "serving.main:app_from_env",
            factory=True,
            host=settings.api_host,
            port=settings.api_port,
            workers=processes,
            log_level="warning",
            access_log=False,
        )


def _exit_cleanly(*_: object) -> None:
    """A SIGTERM handler: ends the process through its cleanup (`finally`, `with`), exit 0.

    Raises:
        SystemExit: always.
    """
    raise SystemExit(0)


@app.command("demo")
def demo(
    users: int = typer.Option(2000, min=10, help="Simulated listeners."),
    days: int = typer.Option(
        60, min=1, help="Days of history before live scoring (at least what the first training needs: 44 by default)."
    ),
    rate: int = typer.Option(200, min=1, help="Live events per second."),
    duration: float = typer.Option(0.0, help="Seconds of live scoring before stopping (0: until Ctrl-C)."),
    drift: bool = typer.Option(
        False, "--drift", help="Inject drift into the live part (fewer songs per session, more adverts and errors)."
    ),
) -> None:
    """Run the whole system end to end on the local services (`make demo`; `--drift` to watch the drift alert fire)."""
    from churn.demo import run_demo  # heavy: see the module docstring

    _stop_like_ctrl_c_on_sigterm()  # so `kill` also stops the scorer, API and producer it started
    try:
        run_demo(_settings(), users=users, days=days, rate=rate, duration=duration or None, say=typer.echo, drift=drift)
    except ChurnError as exc:
        _fail(exc)


@bench_app.command("stream")
def bench_stream(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes: a smoke test of every phase (~2 min).")] = False,
    events: Annotated[int, typer.Option(min=1000, help="Events in the catch-up topic.")] = 1_000_000,
    users: Annotated[int, typer.Option(min=10, help="Distinct users in the events.")] = 10_000,
    naive_events: Annotated[int, typer.Option(min=1, help="Timed events of the naive baseline.")] = 25_000,
    peer_events: Annotated[int, typer.Option(min=1, help="Messages through the Quix Streams peer.")] = 300_000,
    load_seconds: Annotated[float, typer.Option(min=1.0, help="Seconds of paced events per load.")] = 20.0,
) -> None:
    """One run, JSON on stdout (progress on stderr): catch-up with 1-3 scorer processes, CPU per
    event by stage, the consume+decode bound, a Quix Streams peer, the fair naive baseline, the
    live loop's capacity and per-event freshness at 25/50/75% of it, memory per user."""
    from bench import stream as stream_bench  # heavy: see the module docstring

    sizes = (
        stream_bench.QUICK
        if quick
        else stream_bench.Sizes(
            events=events,
            users=users,
            naive_events=naive_events,
            peer_events=min(peer_events, events),
            capacity_events=min(stream_bench.Sizes.capacity_events, events),
            load_seconds=load_seconds,
        )
    )
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    _print_figures(lambda: stream_bench.bench_stream(_settings(), sizes, say=say))


@bench_app.command("features")
def bench_features(
    online_events: int = typer.Option(1_000_000, help="Events through the online engine."),
    offline_points: int = typer.Option(1_000_000, help="(user, as_of) points for the offline engine."),
    offline_events: int = typer.Option(10_000_000, help="Events in the offline log."),
    feast_rows: int = typer.Option(20_000, help="Rows written to the real Redis through Feast."),
) -> None:
    """Online engine events/s, Feast write path vs store.push, offline engine seconds (JSON)."""
    from bench.engines import bench_offline, bench_online  # heavy: see the module docstring
    from bench.feast_write import bench_feast_write  # heavy: see the module docstring

    settings = _settings()
    _print_figures(
        lambda: {
            **bench_online(online_events),
            **bench_feast_write(settings, rows=feast_rows),
            **bench_offline(offline_points, offline_events),
        }
    )


@bench_app.command("api")
def bench_api(
    users: Annotated[int, typer.Option(min=1, help="Feature rows loaded into the online store.")] = 100_000,
    workers: Annotated[int, typer.Option(min=1, help="Workers of `churn serve` and of `feast serve`.")] = 1,
    budget_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Latency budget of the capacity search: 99% answered 2xx within it (0: CHURN_API_LATENCY_BUDGET_MS).",
        ),
    ] = 0.0,
    seconds: Annotated[float, typer.Option(min=0.5, help="Measured seconds of the runs at 50% and 100%.")] = 10.0,
    step_seconds: Annotated[float, typer.Option(min=0.5, help="Measured seconds of each search step.")] = 3.0,
    connections: Annotated[int, typer.Option(min=1, help="Keep-alive connections of the load generator.")] = 64,
    mode: Annotated[
        list[str] | None, typer.Option(help="Modes to measure (score, reasons, batch_100; default all).")
    ] = None,
    anchor: Annotated[bool, typer.Option(help="Also measure `feast serve` on the same users and Redis.")] = True,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run: 2,000 users, 1 s steps, coarse search.")] = False,
) -> None:
    """Capacity (highest rate with 99% answered 2xx within the budget) per mode, latencies and CPU per request at 50%
    and 100% of it, beside `feast serve` (JSON on stdout, progress on stderr)."""
    from bench import api as api_bench  # heavy: see the module docstring

    settings = _settings()
    budget = budget_ms or settings.api_latency_budget_ms
    if quick:
        plan = dataclasses.replace(api_bench.QUICK, budget_ms=budget)
        users = min(users, 2000)
    else:
        plan = api_bench.LoadPlan(
            budget_ms=budget, step_seconds=step_seconds, measure_seconds=seconds, connections=connections
        )
    unknown = sorted(set(mode or ()) - set(api_bench.MODES))
    if unknown:
        msg = f"unknown mode(s) {unknown}: choose from {sorted(api_bench.MODES)}"
        raise typer.BadParameter(msg)
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    modes = tuple(mode) if mode else tuple(api_bench.MODES)
    _print_figures(lambda: api_bench.bench_api(settings, users, workers, plan, modes, anchor, say))


@bench_app.command("at-risk")
def bench_at_risk(
    users: Annotated[int, typer.Option(min=1, help="Scored users written to Redis.")] = 1_000_000,
    requests: Annotated[int, typer.Option(min=1, help="Measured requests per order.")] = 2000,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Users per page.")] = 100,
) -> None:
    """GET /users/at-risk p50/p99 through a real `churn serve` on the real Redis with N scored
    users, beside the server's /health/live floor and the stores alone (JSON)."""
    from bench.at_risk import bench_at_risk as run  # heavy: see the module docstring

    settings = _settings()
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    _print_figures(lambda: run(settings, users, requests, limit, say))


@app.command("predictions")
def predictions(
    user: Annotated[str | None, typer.Option(help="Only this user's score history.")] = None,
    date: Annotated[str | None, typer.Option(help="Only this snapshot date (YYYY-MM-DD).")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Prediction log (default: CHURN_PREDICTION_LOG_DIR).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write to a .csv or .parquet file instead of printing.")] = None,
    role: Annotated[
        str, typer.Option(help="served (the answers served), shadow (the other model's scores) or all.")
    ] = "served",
) -> None:
    """Read the prediction log: the daily snapshots (user, as-of, probability, tier, model version,
    role, churned once labelled)."""
    import polars as pl  # heavy: see the module docstring

    from monitoring.prediction_log import read_log  # heavy: see the module docstring
    from training.scoring import write_scores  # heavy: see the module docstring

    if role not in ("served", "shadow", "all"):
        msg = f"--role must be served, shadow or all, got {role!r}"
        _fail(InvalidInputError(msg))
    settings = _settings()
    try:
        log = read_log(
            log_dir or settings.predictions_dir, user_id=user, date=date, role=None if role == "all" else role
        )
        if out is not None:
            write_scores(log, out)
    except ChurnError as exc:
        _fail(exc)
    if out is not None:
        typer.echo(f"{log.height} predictions -> {out}")
        return
    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=160):
        typer.echo(str(log.with_columns(pl.from_epoch("as_of", time_unit="ms").alias("as_of"))))


@app.command("materialize")
def materialize(
    events: Path = typer.Option(..., help="Event log: Parquet folder (archiver output), .parquet or .jsonl[.gz]."),
    as_of: str = typer.Option("", help="ISO time of the backfill (default: the last event in the log)."),
) -> None:
    """Cold start: load the online store through Feast, and the scorer states, from an event log."""
    from features import backfill  # heavy: see the module docstring
    from stream.risk_store import RedisRiskStore, RiskRow  # heavy: see the module docstring
    from stream.snapshot import RedisActivity  # heavy: see the module docstring

    settings = _settings()

    def record_users(users: backfill.BackfilledUsers) -> None:
        # What the scorer keeps beside the states: cancelled users answered as cancelled, the
        # daily snapshot's population (who is active, who churned), and the stream's clock.
        client = redis_client(settings)
        now = time.time_ns() // 1_000_000
        risks = RedisRiskStore(client, settings.redis_prefix)
        risks.write([RiskRow.cancelled(user, cancelled, last, now) for user, cancelled, last in users.cancelled])
        RedisActivity(client, settings.redis_prefix).track(
            users.latest, {user: cancelled for user, cancelled, _ in users.cancelled}
        )
        risks.advance_watermark(users.as_of_ms)

    try:
        moment = parse_utc(as_of, "--as-of") if as_of else None
        summary = backfill.materialize(
            settings, events, moment, progress=lambda line: typer.echo(line, err=True), record_users=record_users
        )
    except ChurnError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary))


@app.command("cleanup")
def cleanup() -> None:
    """Deletes the scorer states and applied offsets of older state layouts (a changed spec or
    lateness leaves them behind, never read again); prints how many keys went."""
    settings = _settings()
    layout = state_layout(settings.allowed_lateness_seconds * 1000)
    try:
        removed = remove_old_layouts(redis_client(settings), settings.redis_prefix, layout)
    except ChurnError as exc:
        _fail(exc)
    typer.echo(json.dumps({"layout": layout, "removed_keys": removed}))


def main() -> None:
    """Runs the CLI; a ChurnError becomes a one-line message and exit code 2, not a traceback."""
    try:
        app()
    except ChurnError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
