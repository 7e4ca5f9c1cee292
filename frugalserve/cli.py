"""The frugalserve command line: each command is a thin call into the rooms."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from .economics.ratecard import RateCard
    from .economics.training import TrainingEstimate, TrainingRun, TrainingTotals

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
    flush_interval: float = typer.Option(2.0, help="Seconds between ledger writes: a crash "
                                         "loses at most this much usage (a clean shutdown "
                                         "writes everything)."),
    ledger_process: bool = typer.Option(True, "--ledger-process/--ledger-thread", help="Write "
                                        "the ledger from a child process (off the server's "
                                        "GIL: metering leaves tail latency alone) or from a "
                                        "thread of the server."),
    log_level: str = typer.Option("info", help="Log level."),
    allow_anonymous: bool = typer.Option(None, "--allow-anonymous/--require-key", help="Accept "
                                         "requests without an API key (default: only while "
                                         "the ledger holds no active key)."),
    trust_tenant_header: bool = typer.Option(False, help="Let anonymous requests name their "
                                             "tenant with an X-Tenant header."),
    budgets: Path = typer.Option(None, help="budgets.yaml, in force besides `frugalserve "
                                 "budgets set`."),
    alert_webhook: str = typer.Option(None, help="URL that budget alerts are POSTed to (JSON)."),
) -> None:
    """Serve a model repository over the Open Inference Protocol (V2)."""
    from .app import ServerSettings, run_server

    if not isinstance(logging.getLevelName(log_level.upper()), int):
        raise typer.BadParameter("debug, info, warning, error or critical",
                                 param_hint="--log-level")
    if not math.isfinite(max_body_mb):  # int() of it would be a traceback; the rest is checked
        raise typer.BadParameter(f"a number of MiB, not {max_body_mb}", param_hint="--max-body-mb")
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to a user
    settings = ServerSettings(repository, ledger, rate_card, metering, poll_interval or None,
                              int(max_body_mb * 1024 * 1024), allow_anonymous=allow_anonymous,
                              trust_tenant_header=trust_tenant_header, budgets_file=budgets,
                              alert_webhook=alert_webhook, flush_interval_s=flush_interval,
                              ledger_process=ledger_process)
    from sqlalchemy.exc import SQLAlchemyError

    from .economics.ratecard import RateCardError
    from .repository import RepositoryError

    try:
        run_server(settings, host, port)
    except (SQLAlchemyError, ImportError) as exc:  # e.g. mysql:// without its driver
        typer.echo(f"frugalserve serve: cannot start: "
                   f"{_ledger_problem(settings.resolved_ledger_url(), exc)}", err=True)
        raise typer.Exit(1) from exc
    except (RepositoryError, RateCardError, OSError, ValueError) as exc:
        # a wrong path, price file or a port in use: say which, without a traceback
        typer.echo(f"frugalserve serve: cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


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
                                concurrency=16 if concurrency is None else concurrency,
                                rate=rate, connections=connections,
                                duration_s=duration, requests=requests, headers=headers,
                                timeout_s=timeout, label=model)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = loadgen.run(spec).summary()
    Console().print(reports.load_table(summary, model, spec.url))
    if summary.ok == 0:  # a load that got no answer is a failed run, whatever it printed
        typer.echo(f"frugalserve bench: no request succeeded ({summary.last_error})", err=True)
        raise typer.Exit(1)


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

    from .demo import DemoConfig, NoPlan, run_demo
    from .reports import show_demo
    from .workloads.fashion_mnist import DatasetMissing

    try:
        config = DemoConfig(workdir, duration, concurrency)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _make_dir(workdir, "--workdir")
    console = Console()
    if not console.is_terminal:  # piped to a file: keep the tables' columns unwrapped
        console.width = max(console.width, 120)
    try:
        result = run_demo(config, console)
    except (DatasetMissing, NoPlan) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    show_demo(result, console)


# -- optimizer ----------------------------------------------------------------------------------

OPT_LEDGER_HELP = ("Ledger database URL for the distilled student's training run (default: "
                   "$FRUGALSERVE_LEDGER, else ./frugalserve-ledger.db).")


def _optimize_data(name: str):
    """The splits of the seed workload `--data` names; a missing data package is one clear line
    and exit 1."""
    from .replay import DATA_SETS, labelled_data
    from .workloads.data import DatasetMissing

    if name not in DATA_SETS:
        raise typer.BadParameter(f"one of {', '.join(DATA_SETS)}, not {name!r}",
                                 param_hint="--data")
    try:
        return labelled_data(name)
    except DatasetMissing as exc:
        typer.echo(f"frugalserve: {exc}", err=True)
        raise typer.Exit(1) from exc


def _check_student_ledger(url: str | None) -> None:
    """A ledger the student's training run cannot be recorded in fails now, not as a skipped
    student after the other variants were made and profiled."""
    import os

    from .economics.training import LEDGER_ENV

    if url or os.environ.get(LEDGER_ENV):
        _open_ledger(url).dispose()


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{option}: {text!r} is not a comma-separated list") from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter(f"{option}: give one or more non-negative numbers")
    return values


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


@app.command()
def optimize(
    model: str = typer.Argument(..., help="The model to optimize (a folder of the repository); "
                                "its latest version is the reference."),
    repository: Path = typer.Option(..., "--repository", "-r", help="Model repository folder."),
    data: str = typer.Option(..., help="Validation and test data: fashion-mnist or sentiment."),
    max_accuracy_drop: float = typer.Option(0.5, help="Percentage points of validation "
                                            "accuracy the plan may lose against the reference."),
    p99_ms: float = typer.Option(50.0, "--p99-ms", help="p99 latency target (queue wait + "
                                 "compute, every stage an item passes), ms."),
    margin_z: float = typer.Option(1.0, help="Safety margin: standard errors of the paired "
                                   "accuracy drop (vs the reference, on validation) added "
                                   "before comparing it with --max-accuracy-drop (0: none)."),
    candidates: str = typer.Option(None, help="Other repository models with the same inputs "
                                   "and outputs to try as variants, comma-separated."),
    ledger: str = typer.Option(None, help=OPT_LEDGER_HELP),
    rate_card: Path = typer.Option(None, help="YAML with device prices that override the "
                                   "shipped rate card."),
    rate: float = typer.Option(None, help="Expected load, items/s: sizes each stage's batches "
                               "and queue waits (default: busy, full batches)."),
    batch_sizes: str = typer.Option("1,8,32,64", help="Batch sizes to profile and try as "
                                    "max_batch_size."),
    delays: str = typer.Option("1,2,5,10", help="max_queue_delay_ms values to try."),
    calls: int = typer.Option(200, min=1, help="Timed calls per batch size when profiling."),
    reuse_variants: bool = typer.Option(False, help="Keep variant folders that already have a "
                                        "profile.json instead of remaking them."),
    unlabelled_rows: int = typer.Option(20_000, min=1, help="Training rows (labels unread) the "
                                        "student is distilled on."),
    chart: Path = typer.Option(None, help="PNG chart path (default <repo>/<model>/plan.png)."),
) -> None:
    """Find the cheapest serving plan that meets the accuracy and p99 targets.

    Make and profile variants, calibrate cascades, search plans and batch settings, print the
    Pareto frontier and the levers, and write the cheapest plan meeting the targets as
    <repo>/<model>/plan.yaml."""
    from rich.console import Console

    from .economics.ratecard import RateCardError
    from .optimize import plan_report
    from .optimize.optimizer import Settings, optimize_model
    from .optimize.plan_search import Targets
    from .optimize.variants import profiles_table
    from .progress import new_progress
    from .repository import ConfigError

    try:
        targets = Targets(max_accuracy_drop / 100, p99_ms, margin_z)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if rate is not None and not 0 < rate < math.inf:  # NaN too
        raise typer.BadParameter("--rate must be a finite number > 0 items/s")
    settings = Settings(targets, _names(candidates), ledger_url=ledger, rate_card=rate_card,
                        batch_sizes=_numbers(batch_sizes, int, "--batch-sizes"),
                        delays_ms=_numbers(delays, float, "--delays"), rate_rps=rate,
                        calls=calls, reuse=reuse_variants, unlabelled_rows=unlabelled_rows,
                        chart=chart)
    dataset = _optimize_data(data)
    _check_student_ledger(ledger)
    console = Console()
    if not console.is_terminal:  # piped to a file: keep the tables' columns unwrapped
        console.width = max(console.width, 200)
    try:
        with new_progress(console) as progress:
            out = optimize_model(repository, model, dataset, settings, progress)
    except (ValueError, ConfigError, RateCardError) as exc:
        console.print(f"[red]frugalserve optimize: {exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(profiles_table(out.variants.profiles))
    for name, why in out.variants.skipped.items():
        console.print(f"skipped {name}: {why}")
    console.print(plan_report.frontier_table(out.search))
    if out.search.chosen is None:
        console.print(f"[red]no plan keeps accuracy within {max_accuracy_drop:g} pp of the "
                      f"reference with p99 <= {p99_ms:g} ms; no plan.yaml written "
                      f"(chart: {out.chart_path})[/red]")
        raise typer.Exit(1)
    console.print(plan_report.tiers_table(out.search, out.tests))
    console.print(plan_report.levers_table(out.search))
    console.print(f"chart: {out.chart_path}\nplan: {out.plan_path}")


@app.command()
def variants(
    model: str = typer.Argument(..., help="The model whose latest version gets variants."),
    repository: Path = typer.Option(..., "--repository", "-r", help="Model repository folder."),
    data: str = typer.Option(..., help="Validation data: fashion-mnist or sentiment."),
    candidates: str = typer.Option(None, help="Other repository models with the same inputs "
                                   "and outputs to copy in as variants, comma-separated."),
    ledger: str = typer.Option(None, help=OPT_LEDGER_HELP),
    calls: int = typer.Option(200, min=1, help="Timed calls per batch size."),
    unlabelled_rows: int = typer.Option(20_000, min=1, help="Training rows (labels unread) the "
                                        "student is distilled on."),
) -> None:
    """Make and profile a model's variants, without planning.

    Make int8, fp16, pruned and distilled variants into <version>/variants/ and profile each
    (and the reference) on the validation split."""
    from rich.console import Console

    from .optimize.optimizer import STUDENT_MAX_ITER
    from .optimize.variants import build_variants, profiles_table
    from .progress import new_progress
    from .repository import ConfigError

    dataset = _optimize_data(data)
    _check_student_ledger(ledger)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    try:
        with new_progress(console) as progress:
            result = build_variants(
                repository, model, x_calibration=dataset.x_train[:1024], x_val=dataset.x_val,
                y_val=dataset.y_val, x_unlabelled=dataset.x_train[:unlabelled_rows],
                candidates=_names(candidates), ledger_url=ledger, calls=calls,
                student_max_iter=STUDENT_MAX_ITER, progress=progress)
    except (ValueError, ConfigError) as exc:
        console.print(f"[red]frugalserve variants: {exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(profiles_table(result.profiles))
    for name, why in result.skipped.items():
        console.print(f"skipped {name}: {why}")


# -- training runs ------------------------------------------------------------------------------

training_app = typer.Typer(help="Training runs in the ledger: add one done elsewhere, estimate a "
                           "large one from 6ND, list them.", no_args_is_help=True)
app.add_typer(training_app, name="training")

LEDGER_HELP = ("Ledger database URL (default: $FRUGALSERVE_LEDGER, else ./frugalserve-ledger.db), "
               "e.g. postgresql+psycopg://user@host/db")
RATE_CARD_HELP = "YAML with device prices that override the shipped rate card."
PRICING_HELP = "Pricing basis: on_demand, spot or on_prem."


def _open_ledger(url: str | None):
    """The ledger engine; a URL that names no database it can open is a bad --ledger."""
    from sqlalchemy.exc import SQLAlchemyError

    from .economics.training import default_ledger_url, open_ledger

    try:
        return open_ledger(url)
    except (SQLAlchemyError, ValueError, ImportError) as exc:  # e.g. mysql:// without a driver
        raise _bad_ledger(url or default_ledger_url(), exc) from None


def _bad_ledger(url: str, exc: Exception) -> typer.BadParameter:
    return typer.BadParameter(_ledger_problem(url, exc))


def _ledger_problem(url: str, exc: Exception) -> str:
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    if "://" not in url:  # a file path, e.g. the demo's ledger.db
        reason += f"; a SQLite file is given as sqlite:///{url}"
    return f"--ledger {_shown_url(url)}: cannot open it: {reason}"


def _shown_url(url: str) -> str:
    """A ledger URL as it may be printed: its password masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL at all: nothing in it to hide
        return url


@training_app.command("add")
def training_add(
    model: str = typer.Option(..., "--model", "-m", help="Model name."),
    version: str = typer.Option(..., "--version", "-v", help="Model version it produced."),
    device: str = typer.Option(..., help="Rate-card device, e.g. nvidia-a100-80gb."),
    hours: float = typer.Option(..., help="Wall-clock hours the run took."),
    gpus: int = typer.Option(1, "--gpus", "--devices", help="How many of the device it held."),
    pricing: str = typer.Option("on_demand", help=PRICING_HELP),
    share: float = typer.Option(1.0, help="Share of each device it held, in (0, 1]."),
    started: datetime = typer.Option(None, help="When it started (default: it ended now)."),
    notes: str = typer.Option(None, help="Free text kept with the run."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
    rate_card: Path = typer.Option(None, help=RATE_CARD_HELP),
) -> None:
    """Record a training run done elsewhere: its cost is device-hours x the rate card's $/h."""
    from rich.console import Console

    from .economics import training

    try:
        run = training.imported_run(
            _rate_card(rate_card), model=model, version=version, device=device, hours=hours,
            devices=gpus, pricing=pricing, share=share, notes=notes,
            started_at=None if started is None else _epoch(started))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_id = training.record_run(_open_ledger(ledger), run)
    Console().print(f"training run {run_id} recorded: {model} v{version}, {gpus} x {device}, "
                    f"{run.device_hours:,.1f} device-hours, {pricing}, "
                    f"{_usd(run.cost_usd)}")


@training_app.command("estimate")
def training_estimate(
    device: str = typer.Option(..., help="Rate-card device, e.g. nvidia-a100-80gb."),
    params: float = typer.Option(None, "--params", "-N", help="Parameters N, e.g. 70e9."),
    tokens: float = typer.Option(None, "--tokens", "-D", help="Training tokens D, e.g. 2e12."),
    mfu: float = typer.Option(None, help="Model FLOPs utilization (default: the 0.435 that "
                              "Llama 2 70B's published GPU-hours imply)."),
    gpu_hours: float = typer.Option(None, help="Device-hours, when known (instead of --mfu)."),
    gpus: int = typer.Option(1, "--gpus", "--devices", help="Devices in parallel: sets the "
                             "wall-clock time, not the cost."),
    pricing: str = typer.Option("on_demand", help=PRICING_HELP),
    record: bool = typer.Option(False, help="Record the estimate as a training run."),
    model: str = typer.Option(None, "--model", "-m", help="With --record: the model."),
    version: str = typer.Option(None, "--version", "-v", help="With --record: its version."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
    rate_card: Path = typer.Option(None, help=RATE_CARD_HELP),
) -> None:
    """Estimate a large training run: FLOPs = 6ND, device-hours = FLOPs / (peak x MFU)."""
    from rich.console import Console

    from .economics import training

    if record and not (model and version):
        raise typer.BadParameter("--record needs --model and --version")
    try:
        estimate = training.estimate_training(
            _rate_card(rate_card), device, params=params, tokens=tokens, mfu=mfu,
            gpu_hours=gpu_hours, devices=gpus, pricing=pricing)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = Console()
    console.print(_estimate_table(estimate))
    if record:
        run_id = training.record_run(_open_ledger(ledger),
                                     estimate.as_run(model, version))
        console.print(f"recorded as training run {run_id} of {model} v{version}")


@training_app.command("list")
def training_list(
    model: str = typer.Option(None, "--model", "-m", help="Only this model."),
    version: str = typer.Option(None, "--version", "-v", help="Only this version."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
) -> None:
    """Show the training runs in the ledger, with their total."""
    from rich.console import Console

    from .economics import training

    runs = training.training_runs_for(_open_ledger(ledger), model, version)
    console = Console()
    if not console.is_terminal:  # piped to a file: keep the columns unwrapped
        console.width = max(console.width, 140)
    console.print(_runs_table(runs, training.training_totals(runs)))


def _rate_card(path: Path | None) -> RateCard:
    from .economics.ratecard import RateCard

    return RateCard.load(path)


def _epoch(when: datetime) -> float:
    # a time without a zone is taken as UTC, as the ledger's epoch seconds are
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _usd(amount: Decimal) -> str:
    from .economics.meter import format_usd

    return f"${amount:,.2f}" if amount >= 1000 else format_usd(amount, 4)


def _qty(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _estimate_table(e: TrainingEstimate) -> Table:
    from rich.table import Table

    table = Table(title=f"training estimate: {e.device}, {e.pricing}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    mfu = "-" if e.mfu is None else f"{e.mfu:.3f}" + (" (Llama 2 70B)" if e.mfu_is_default else "")
    rows = [
        ("parameters N", "-" if e.params is None else f"{e.params:.3g}"),
        ("tokens D", "-" if e.tokens is None else f"{e.tokens:.3g}"),
        ("FLOPs (6ND)", "-" if e.flops is None else f"{e.flops:.3e}"),
        ("peak FLOP/s per device", "-" if e.peak_flops is None else f"{e.peak_flops:.3e}"),
        ("MFU", mfu),
        ("device-hours", f"{e.device_hours:,.0f}"),
        (f"wall-clock on {e.devices:,}", f"{e.wall_hours:,.1f} h ({e.wall_hours / 24:,.1f} d)"),
        ("$ per device-hour", _usd(e.usd_per_hour)),
        ("cost", _usd(e.cost_usd)),
        ("energy (devices, estimate)", f"{e.energy_kwh:,.0f} kWh"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _runs_table(runs: list[TrainingRun], totals: TrainingTotals) -> Table:
    from rich.table import Table

    table = Table(title="training runs")
    for name in ("id", "started (UTC)", "model", "source", "device", "pricing", "device-h",
                 "CPU s", "peak RSS", "kWh", "cost"):
        numeric = name in ("id", "device-h", "CPU s", "peak RSS", "kWh", "cost")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=name == "device")
    for r in runs:
        table.add_row(
            str(r.id), datetime.fromtimestamp(r.started_at, UTC).strftime("%Y-%m-%d %H:%M"),
            f"{r.model} v{r.version}", r.source if r.status == "ok" else f"{r.source}, {r.status}",
            r.device if r.devices == 1 else f"{r.devices} x {r.device}", r.pricing,
            _qty(r.device_hours), "-" if r.cpu_s is None else f"{r.cpu_s:,.2f}",
            "-" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 2**20:,.0f} MiB",
            _qty(r.energy_kwh), _usd(r.cost_usd))
    table.add_section()
    table.add_row("", "", f"{totals.runs} runs", f"{totals.failed} failed" if totals.failed
                  else "", "", "", _qty(totals.device_hours), "", "",
                  _qty(totals.energy_kwh), _usd(totals.cost_usd()))
    return table


# -- workloads ----------------------------------------------------------------------------------

workloads_app = typer.Typer(help="The seed workloads: real data sets and their reference models.",
                            no_args_is_help=True)
app.add_typer(workloads_app, name="workloads")


@workloads_app.command("build")
def workloads_build(
    repository: Path = typer.Option(..., help="Model repository folder to train into."),
    ledger: str = typer.Option(None, help="Ledger database URL for the training runs (default: "
                               "$FRUGALSERVE_LEDGER, else the SQLite file `frugalserve serve` "
                               "keeps beside the repository)."),
    only: str = typer.Option(None, help="Comma-separated workloads (default: all): "
                             "fashion-mnist, fashion-cnn, sentiment, movielens."),
    cnn_epochs: int = typer.Option(1, min=1, help="Epochs of the Fashion-MNIST CNN."),
    workdir: Path = typer.Option(Path("runs/sentiment"), help="Cache of the sentiment "
                                 "encoders' embeddings."),
) -> None:
    """Train the workloads' reference models into a repository.

    Record each training run with its cost in the ledger, and show the models' validation and
    test metrics."""
    import os

    from rich.console import Console

    from .app import ServerSettings
    from .economics.training import LEDGER_ENV
    from .progress import new_progress
    from .workloads import catalog, fashion_mnist, movielens, sentiment

    try:
        chosen = catalog.parse_only(only)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--only") from exc
    _make_dir(repository, "--repository")
    url = ledger or os.environ.get(LEDGER_ENV) or ServerSettings(repository).resolved_ledger_url()
    _open_ledger(url).dispose()  # a wrong URL fails now, not after the training
    console = Console()
    if not console.is_terminal:  # piped to a file: keep the table's columns unwrapped
        console.width = max(console.width, 120)
    missing = (fashion_mnist.DatasetMissing, sentiment.DatasetMissing,
               movielens.DatasetMissing, ImportError, OSError)
    try:
        with new_progress(console) as progress:
            rows = catalog.build_workloads(repository, chosen, progress, url, cnn_epochs,
                                           workdir)
    except missing as exc:
        console.print(f"[red]frugalserve workloads build: {exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(catalog.built_table(rows, repository))
    console.print(f"training runs recorded in {_shown_url(url)}")


# -- spend report and ledger maintenance --------------------------------------------------------

@app.command()
def report(
    ledger: str = typer.Option(None, help=LEDGER_HELP),
    since: str = typer.Option("30d", help="Window start: 30d, 12h, 15m, an ISO date or epoch "
                              "seconds."),
    until: str = typer.Option(None, help="Window end (default: now), same forms as --since."),
    by: str = typer.Option("model", help="Breakdown: model, version, variant, tenant or day."),
    format: str = typer.Option("table", "--format", "-f", help="table, json, csv or focus "
                               "(FinOps FOCUS-style CSV)."),
    chart: Path = typer.Option(None, help="Also write a PNG chart of spend over time here."),
    output: Path = typer.Option(None, "--output", "-o", help="Write json/csv/focus here "
                                "instead of standard output."),
) -> None:
    """What inference and training cost: spend, cost per prediction, savings, budgets.

    Spend by model, version, variant, tenant and day; training vs inference; cost per 1k
    predictions (marginal and amortized); utilization; savings; break-even; budgets."""
    import sys

    from rich.console import Console

    from .economics import report as spend

    if format not in ("table", "json", "csv", "focus"):
        raise typer.BadParameter("--format: table, json, csv or focus")
    try:
        start = spend.parse_since(since)
        end = None if until is None else spend.parse_since(until)
        result = spend.build_report(_open_ledger(ledger), start, end, by)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if format == "table":
        from .reports import show_spend_report

        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 140)
        show_spend_report(result, console)
    else:
        data = {"json": lambda: result.to_json().decode() + "\n", "csv": result.to_csv,
                "focus": result.to_focus_csv}[format]()
        if output:
            _write(output, "--output", output.write_text, data)
        else:
            sys.stdout.write(data)
    if chart:
        from .reports import write_spend_chart

        _write(chart, "--chart", write_spend_chart, result, chart)
        Console(stderr=True).print(f"chart: {chart}")


def _make_dir(path: Path, option: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot create it: {exc.strerror or exc}",
                                 param_hint=option) from None


def _write(path: Path, option: str, write, *args) -> None:
    """`write(*args)`, which writes `path`; a path that cannot be written is a bad `option`."""
    try:
        write(*args)
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot write it: {exc.strerror or exc}",
                                 param_hint=option) from None


ledger_app = typer.Typer(help="Ledger maintenance: schema migrations, retention, spill files.",
                         no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("upgrade")
def ledger_upgrade(ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """Bring the ledger schema to the latest migration (Alembic `upgrade head`)."""
    from rich.console import Console
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from .economics import migrations
    from .economics.training import default_ledger_url

    url = ledger or default_ledger_url()
    try:  # not open_ledger: that would migrate first, and "was" would always be head
        before = migrations.upgrade(create_engine(url))
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise _bad_ledger(url, exc) from None
    Console().print(f"ledger at revision {migrations.head()} (was {before or 'unversioned'})")


@ledger_app.command("prune")
def ledger_prune(
    ledger: str = typer.Option(None, help=LEDGER_HELP),
    days: float = typer.Option(30.0, help="Keep raw usage and batch rows this many days; the "
                               "per-minute rollups are kept."),
) -> None:
    """Delete raw usage and batch rows older than the retention."""
    from rich.console import Console

    from .economics.ledger import prune

    try:
        deleted = prune(_open_ledger(ledger), days)
    except ValueError as exc:  # a retention that is not a positive number of days
        raise typer.BadParameter(str(exc), param_hint="--days") from exc
    Console().print(", ".join(f"{n:,} {t} rows deleted" for t, n in deleted.items()))


@ledger_app.command("load-spill")
def ledger_load_spill(
    files: list[Path] = typer.Argument(..., help="ledger-spill-*.jsonl files, written beside "
                                       "the ledger when it was unreachable at shutdown."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
) -> None:
    """Write spilled usage and batch records into the ledger, with their rollups; each file
    is renamed *.loaded after. A file whose records are there already is refused."""
    from rich.console import Console

    from .economics.ledger import load_spill

    engine = _open_ledger(ledger)
    console = Console()
    for path in files:
        if not path.is_file():
            raise typer.BadParameter(f"{path}: no such file", param_hint="FILES")
        try:
            counts = load_spill(engine, path)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="FILES") from None
        except OSError as exc:
            raise typer.BadParameter(f"{path}: cannot read it: {exc.strerror or exc}",
                                     param_hint="FILES") from None
        except engine.dialect.loaded_dbapi.Error as exc:  # the database failed the write
            raise _bad_ledger(str(engine.url), exc) from None
        loaded = path.with_name(path.name + ".loaded")
        path.rename(loaded)
        console.print(f"{path}: {counts['batches']:,} batches, {counts['usage_log']:,} usage "
                      f"chunks written; renamed {loaded.name}")


# -- API keys and budgets -----------------------------------------------------------------------

keys_app = typer.Typer(help="API keys: each bills a tenant; admin keys may use admin routes.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="Tenant the key's usage is billed to."),
    tier: str = typer.Option("standard", help="Tier: free, economy, standard or premium (a "
                             "plan tier of the same name serves its requests)."),
    admin: bool = typer.Option(False, help="May use the admin routes (repository, reports)."),
    name: str = typer.Option(None, help="A note to tell keys apart."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
) -> None:
    """Create a key. It is shown once: only its hash is stored."""
    from rich.console import Console

    from .economics import keys

    try:
        info, secret = keys.create_key(_open_ledger(ledger), tenant, tier, admin, name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = Console(stderr=True)
    console.print(f"key {info.key_id} for tenant '{info.tenant}' ({info.tier}"
                  f"{', admin' if info.admin else ''}); store it now, it is not shown again:")
    print(secret)


@keys_app.command("list")
def keys_list(ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """List keys (never the keys themselves)."""
    from rich.console import Console
    from rich.table import Table

    from .economics import keys

    table = Table(title="API keys")
    for col in ("key id", "tenant", "tier", "admin", "created (UTC)", "status", "name"):
        table.add_column(col)
    for k in keys.list_keys(_open_ledger(ledger)):
        status = "active" if k.revoked_at is None else "revoked " + _utc(k.revoked_at)
        table.add_row(k.key_id, k.tenant, k.tier, "yes" if k.admin else "", _utc(k.created_at),
                      status, k.name or "")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key id shown by `keys list`."),
                ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """Revoke a key; running servers refuse it within their refresh interval (2 s)."""
    from .economics import keys

    if not keys.revoke_key(_open_ledger(ledger), key_id):
        raise typer.BadParameter(f"no active key {key_id!r}")
    typer.echo(f"key {key_id} revoked")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


budgets_app = typer.Typer(help="Budgets: spend limits per period with alert, downgrade and "
                          "reject thresholds.", no_args_is_help=True)
app.add_typer(budgets_app, name="budgets")


@budgets_app.command("set")
def budgets_set(
    amount: str = typer.Option(..., "--amount", help="Dollars per period, e.g. 250 or 0.5."),
    scope: str = typer.Option("global", help="global, tenant or model."),
    target: str = typer.Option("", help="The tenant or model name (not for global)."),
    period: str = typer.Option("month", help="day, week, month (UTC) or total."),
    threshold: list[str] = typer.Option(None, "--threshold", "-t", help="PERCENT:ACTION, "
                                        "repeatable; actions alert, downgrade, reject "
                                        "(default: 80:alert 100:reject)."),
    fallback_model: str = typer.Option(None, help="Model that downgrade serves instead."),
    ledger: str = typer.Option(None, help=LEDGER_HELP),
) -> None:
    """Create or replace the budget of (scope, target, period)."""
    from .economics import budgets

    try:
        thresholds = (tuple(budgets.Threshold.parse(t) for t in threshold) if threshold
                      else budgets.DEFAULT_THRESHOLDS)
        budget = budgets.Budget(scope, target, period, budgets.usd_to_pico(amount), thresholds,
                                fallback_model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    budget_id = budgets.set_budget(_open_ledger(ledger), budget)
    typer.echo(f"budget {budget_id}: {budget.label} ${budget.amount_usd.normalize():f} per "
               f"{period}; " + ", ".join(f"{t.percent:g}% {t.action}" for t in thresholds))


@budgets_app.command("list")
def budgets_list(ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """Budgets with their spend so far this period (from the ledger)."""
    import time

    from rich.console import Console
    from rich.table import Table

    from .economics import budgets
    from .economics.meter import exact_usd as usd

    engine = _open_ledger(ledger)
    console = Console()
    if not console.is_terminal:  # piped to a file: keep the columns unwrapped
        console.width = max(console.width, 140)
    table = Table(title="budgets")
    for col in ("id", "scope", "period", "amount", "spent", "used", "thresholds", "fallback",
                "resets (UTC)"):
        table.add_column(col, justify="right" if col in ("id", "amount", "spent", "used")
                         else "left")
    now = time.time()
    for b in budgets.list_budgets(engine):
        start, end = budgets.period_bounds(b.period, now)
        spent = budgets.spent_since(engine, b, start)
        used = f"{100 * spent / b.amount_pusd:.1f}%" if b.amount_pusd else "-"
        table.add_row(str(b.id), b.label, b.period, usd(b.amount_pusd), usd(spent), used,
                      " ".join(f"{t.percent:g}:{t.action}" for t in b.thresholds),
                      b.fallback_model or "", "never" if end is None else _utc(end))
    console.print(table)


@budgets_app.command("delete")
def budgets_delete(budget_id: int = typer.Argument(..., help="The id shown by `budgets list`."),
                   ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """Delete a budget; running servers drop it within their refresh interval."""
    from .economics import budgets

    if not budgets.delete_budget(_open_ledger(ledger), budget_id):
        raise typer.BadParameter(f"no budget {budget_id}")
    typer.echo(f"budget {budget_id} deleted")


@budgets_app.command("alerts")
def budgets_alerts(limit: int = typer.Option(50, help="How many, newest first."),
                   ledger: str = typer.Option(None, help=LEDGER_HELP)) -> None:
    """Budget alerts recorded in the ledger."""
    from rich.console import Console
    from rich.table import Table

    from .economics.alerts import list_alerts

    try:
        alerts = list_alerts(_open_ledger(ledger), limit)
    except ValueError as exc:  # a limit below 1
        raise typer.BadParameter(str(exc), param_hint="--limit") from exc
    table = Table(title="budget alerts")
    for col in ("time (UTC)", "action", "message"):
        table.add_column(col)
    for a in alerts:
        table.add_row(_utc(a["ts"]), a["action"], a["message"])
    Console().print(table)


if __name__ == "__main__":
    app()
