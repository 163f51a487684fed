"""The `churn` console entry point: one Typer app, one subcommand per job.

Each command builds its settings and clients here (the process's wiring point) and hands
them to library code; heavy modules are imported inside the command so `churn --help` is fast.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from churn.errors import ChurnError
from churn.settings import Settings, load_settings

app = typer.Typer(help="Real-time churn scorer: Kafka -> features (Feast/Redis) -> LightGBM -> API.", no_args_is_help=True)
infra_app = typer.Typer(help="Local real services on 127.0.0.1: Kafka (KRaft), Redis, Prometheus.", no_args_is_help=True)
app.add_typer(infra_app, name="infra")


def _settings() -> Settings:
    return load_settings()


def _fail(exc: ChurnError) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@infra_app.command("up")
def infra_up() -> None:
    """Install what is missing, start Kafka, Redis and Prometheus, wait until each answers."""
    from churn import infra

    try:
        states = infra.up(_settings())
    except ChurnError as exc:
        _fail(exc)
    for state in states:
        typer.echo(f"{state.name:<11} {state.address:<16} ready     {state.detail}")


@infra_app.command("down")
def infra_down() -> None:
    """Stop the services started from this state folder."""
    from churn import infra

    infra.down(_settings())
    typer.echo("stopped")


@infra_app.command("status")
def infra_status() -> None:
    """Report each service: process running, and whether it answers a real request."""
    from churn import infra

    states = infra.status(_settings())
    for state in states:
        word = "ready" if state.ready else ("starting" if state.running else "down")
        typer.echo(f"{state.name:<11} {state.address:<16} {word:<9} {state.detail}")
    if not all(state.ready for state in states):
        raise typer.Exit(1)


def main() -> None:
    """Runs the CLI; a ChurnError becomes a one-line message and exit code 2, not a traceback."""
    try:
        app()
    except ChurnError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
