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


@app.command()
def bench(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8000"),
    model: str = typer.Option(..., "--model", "-m", help="Model to call."),
    version: str = typer.Option(None, help="Model version (default: the server's choice)."),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Closed loop: connections "
                                    "sending back to back (default 16)."),
    rate: float = typer.Option(None, "--rate", "-r", help="Open loop: Poisson arrivals per "
                               "second (instead of --concurrency)."),
    connections: int = typer.Option(64, help="Open loop: connection pool size."),
    duration: float = typer.Option(10.0, "--duration", "-d", help="Seconds to run."),
    requests: int = typer.Option(None, "--requests", "-n", help="Stop after this many requests "
                                 "(whichever comes first with --duration)."),
    input_file: Path = typer.Option(None, help="JSON file: a V2 request, or a list of them sent "
                                    "in turn (default: zeros shaped as the model's inputs)."),
    header: list[str] = typer.Option(None, "--header", "-H", help="Extra header 'Name: value' "
                                     "(repeatable)."),
    timeout: float = typer.Option(30.0, help="Seconds before a request counts as lost."),
) -> None:
    """Load a V2 endpoint, closed or open loop, and print latency and throughput."""
    from rich.console import Console

    from . import loadgen, reports, v2_client

    if concurrency is not None and rate is not None:
        raise typer.BadParameter("give --concurrency or --rate, not both")
    try:
        bodies = (v2_client.bodies_from_file(input_file) if input_file else
                  [v2_client.zeros_body(v2_client.fetch_metadata(url, model))])
        headers = dict(_split_header(h) for h in header or [])
        spec = loadgen.LoadSpec(v2_client.infer_url(url, model, version), bodies,
                                concurrency=concurrency or 16, rate=rate, connections=connections,
                                duration_s=duration, requests=requests, headers=headers,
                                timeout_s=timeout, label=model)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = loadgen.run(spec)
    Console().print(reports.load_table(result.summary(), model, spec.url))


def _split_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise typer.BadParameter(f"header {text!r} is not 'Name: value'")
    return name.strip(), value.strip()


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Folder for the repository, ledger and "
                                 "chart."),
    duration: float = typer.Option(10.0, "--duration", "-d", help="Seconds of closed-loop load "
                                   "per model (the open-loop run takes half)."),
    concurrency: int = typer.Option(32, help="Closed-loop connections."),
) -> None:
    """Train two Fashion-MNIST models, serve them, load them and show what predictions cost."""
    from rich.console import Console

    from .demo import DemoConfig, run_demo
    from .reports import show_demo
    from .workloads.fashion_mnist import DatasetMissing

    console = Console()
    if not console.is_terminal:  # piped to a file: keep the tables' columns unwrapped
        console.width = max(console.width, 120)
    try:
        result = run_demo(DemoConfig(workdir, duration, concurrency), console)
    except DatasetMissing as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    show_demo(result, console)


if __name__ == "__main__":
    app()
