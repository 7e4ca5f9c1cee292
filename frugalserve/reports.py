"""How results are shown: Rich tables and matplotlib charts for load runs and the demo."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from .loadgen import LoadSummary

if TYPE_CHECKING:
    from .demo import DemoResult, Phase


def format_usd(amount: Decimal | None, digits: int = 3) -> str:
    """Fixed notation with `digits` significant digits: $0.000000123, never 1.23e-07."""
    if amount is None:
        return "-"
    if amount == 0:
        return "$0"
    places = max(2, digits - 1 - math.floor(math.log10(abs(float(amount)))))
    return f"${amount:.{places}f}"


def format_errors(errors: dict[int, int]) -> str:
    names = {0: "no response"}
    return ", ".join(f"{n:,} × {names.get(s, s)}" for s, n in sorted(errors.items())) or "-"


def load_table(summary: LoadSummary, title: str = "load", url: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("url", url)] if url else []
    rows += [
        ("mode", summary.mode),
        ("requests", f"{summary.requests:,}"),
        ("ok", f"{summary.ok:,}"),
        ("errors", format_errors(summary.errors)),
        ("achieved req/s", f"{summary.rps:,.1f}"),
    ]
    if summary.offered_rps is not None:
        rows.append(("offered req/s", f"{summary.offered_rps:,.1f}"))
    rows += [(f"{p} latency", f"{v:.2f} ms") for p, v in (
        ("p50", summary.p50_ms), ("p90", summary.p90_ms), ("p99", summary.p99_ms),
        ("max", summary.max_ms))]
    if summary.accuracy is not None:
        rows.append(("accuracy", f"{summary.accuracy:.4f}"))
    if summary.last_error:
        rows.append(("last error", summary.last_error))
    for name, value in rows:
        table.add_row(name, value)
    return table


def show_demo(result: DemoResult, console: Console) -> None:
    for model in result.models:
        phases = [p for p in result.phases if p.model == model.name]
        console.print(_model_table(model.name, model.test_accuracy, model.train_s, phases))
    console.print(_DEMO_LEGEND, style="dim")
    chart = write_demo_chart(result.phases, result.workdir / "demo.png")
    console.print(f"chart: {chart}   ledger: {result.workdir / 'ledger.db'}   "
                  f"repository: {result.workdir / 'repository'}")
    console.print(f"demo finished in {result.elapsed_s:.0f} s")


def _model_table(name: str, test_accuracy: float, train_s: float, phases: list[Phase]) -> Table:
    table = Table(title=f"{name}: test accuracy {test_accuracy:.4f} (offline, ONNX), "
                        f"trained in {train_s:.0f} s",
                  box=box.SIMPLE_HEAD)
    for column in ("load", "requests", "req/s", "p50", "p99", "accuracy", "$/1k busy",
                   "$/1k provisioned", "util.", "batch"):
        table.add_column(column, justify="left" if column == "load" else "right")
    for p in phases:
        acc = p.load.accuracy
        table.add_row(
            p.load.mode, f"{p.load.requests:,}", f"{p.load.rps:,.0f}",
            f"{p.load.p50_ms:.1f} ms", f"{p.load.p99_ms:.1f} ms",
            "-" if acc is None else f"{acc:.4f}",
            format_usd(p.ledger.cost_per_1k_usd()),
            format_usd(p.provisioned_per_1k_usd()),
            f"{p.ledger.utilization(p.wall_s):.1%}",
            f"{p.ledger.mean_batch_size:.1f}",
        )
        if p.load.errors:
            table.add_row("", f"errors: {format_errors(p.load.errors)}", style="red")
    return table


_DEMO_LEGEND = (
    "latency: client side, successful requests; accuracy: served labels vs true labels\n"
    "$/1k busy: the ledger's cost (engine time x device price x share) per 1,000 successes\n"
    "$/1k provisioned: the replica's whole share of the device over the run (busy + idle)\n"
    "util.: engine busy time / wall time; batch: mean rows per batch (ledger)"
)


def write_demo_chart(phases: list[Phase], path: Path) -> Path:
    """Latency percentiles and cost per 1k predictions of every load run, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe off the main thread
    import matplotlib.pyplot as plt

    labels = [f"{p.model}\n{p.load.mode}" for p in phases]
    x = range(len(phases))
    fig, (lat, cost) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.27
    for k, (name, attr) in enumerate((("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))):
        lat.bar([i + (k - 1) * width for i in x], [getattr(p.load, attr) for p in phases],
                width, label=name)
    lat.set_ylabel("latency (ms, client side)")
    lat.set_title("Latency percentiles")
    lat.legend()
    per_1k = [float(p.ledger.cost_per_1k_usd() or 0) * 1e6 for p in phases]
    bars = cost.bar(list(x), per_1k, color="tab:green")
    cost.bar_label(bars, labels=[format_usd(p.ledger.cost_per_1k_usd()) for p in phases],
                   fontsize=8)
    cost.set_ylabel("micro-USD per 1,000 predictions")
    cost.set_title("Cost per 1k predictions (ledger)")
    for ax in (lat, cost):
        ax.set_xticks(list(x), labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
