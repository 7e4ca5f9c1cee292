"""The frugalserve command line: each command is a thin call into the rooms."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(help="Serve ML models at the lowest cost that meets your targets.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """frugalserve: an inference server and cost ledger."""


@app.command()
def serve(
    repository: Path = typer.Argument(..., help="Model repository folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    ledger: str = typer.Option(None, help="Ledger database URL (default: SQLite beside the "
                               "repository), e.g. postgresql+psycopg://user@host/db"),
    rate_card: Path = typer.Option(None, help="YAML with device prices that override the shipped "
                                   "rate card."),
    metering: bool = typer.Option(True, help="Meter costs and write usage records."),
    poll_interval: float = typer.Option(2.0, help="Seconds between repository polls for "
                                        "changed models (0: off)."),
    max_body_mb: float = typer.Option(64.0, help="Largest request body accepted, in MiB."),
    log_level: str = typer.Option("info", help="Log level."),
) -> None:
    """Serve a model repository over the Open Inference Protocol (V2)."""
    from .app import ServerSettings, run_server

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(repository, ledger, rate_card, metering, poll_interval or None,
                              int(max_body_mb * 1024 * 1024))
    run_server(settings, host, port)


if __name__ == "__main__":
    app()
