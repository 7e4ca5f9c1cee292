"""How results are shown: Rich tables and matplotlib charts for load runs and the demo."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from .economics.meter import format_usd
from .loadgen import LoadSummary

if TYPE_CHECKING:
    from .demo import DemoResult, Phase, Savings


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
    if result.savings is not None:
        show_savings(result.savings, console)
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


def show_savings(s: Savings, console: Console) -> None:
    """The naive deployment against the optimizer's plan, the levers, the student's payback."""
    table = Table(title=f"{s.model}: naive deployment vs the optimizer's plan (test set, "
                        f"{s.plan.requests:,} requests through HTTP, metered)",
                  box=box.SIMPLE_HEAD)
    for column in ("deployment", "accuracy", "$ / 1M", "p50", "p99", "answered by"):
        table.add_column(column, justify="left" if column in ("deployment", "answered by")
                         else "right")
    for name, r in (("naive: reference, batch 1", s.naive), (f"plan: {s.chosen}", s.plan)):
        table.add_row(name, f"{r.accuracy:.4f}", format_usd(Decimal(r.usd_per_million)),
                      f"{r.p50_ms:.1f} ms", f"{r.p99_ms:.1f} ms", r.answered_by())
    console.print(table)
    console.print(f"saving: {s.factor:.1f}x cheaper per prediction as metered "
                  f"(the profiles predicted {s.estimated_factor:.1f}x), accuracy "
                  f"{100 * (s.plan.accuracy - s.naive.accuracy):+.2f} points")
    levers = Table(title="saving by lever (estimated from the profiles)", box=box.SIMPLE_HEAD)
    for column in ("lever", "$ / 1M saved", "share", "how"):
        levers.add_column(column, justify="right" if column in ("$ / 1M saved", "share")
                          else "left")
    for lever in s.levers:
        levers.add_row(lever.name, format_usd(Decimal(lever.usd_per_1m)), f"{lever.share:.1%}",
                       lever.detail)
    console.print(levers)
    if s.student_training_usd is not None:
        line = f"distilled student: trained for {format_usd(Decimal(s.student_training_usd))}"
        if s.student_break_even is None:
            line += "; it saves nothing per prediction here, so it never pays for itself"
        elif s.student_in_plan:
            line += (f"; it saves {format_usd(Decimal(s.student_saving_per_1m_usd))} per 1M "
                     f"predictions against the reference, so it pays for itself after "
                     f"{s.student_break_even:,.0f} predictions")
        else:  # a break-even of a variant nothing serves would read as a saving made
            line += (f"; the chosen plan does not serve it, so its training is not paid back "
                     f"(served instead of the reference, it would break even after "
                     f"{s.student_break_even:,.0f} predictions)")
        console.print(line)


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


# -- the spend report (economics.report) ------------------------------------------------------

def _usd_text(value: str | None, digits: int = 3) -> str:
    return "-" if value is None else format_usd(Decimal(value), digits)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def show_spend_report(report, console: Console) -> None:
    """Rich tables for an economics.report.Report: the breakdown asked for, per-version
    economics, savings, training break-even and budgets."""
    t = report.totals
    since = report.to_dict()["since"][:16]
    until = report.to_dict()["until"][:16]
    head = Table(title=f"spend {since} to {until} (UTC)", box=box.SIMPLE_HEAD)
    head.add_column("quantity")
    head.add_column("value", justify="right")
    for name, value in (
        ("predictions ok / requests", f"{t['ok']:,} / {t['requests']:,}"),
        ("inference (busy)", _usd_text(t["inference_usd"])),
        ("inference (provisioned: busy + idle)", _usd_text(t["provisioned_usd"])),
        ("training (runs started in the window)", _usd_text(t["training_usd"])),
        ("training share / inference share",
         f"{_pct(t['training_share'])} / {_pct(t['inference_share'])}"),
        ("per 1k predictions, marginal", _usd_text(t["per_1k_marginal_usd"])),
        ("per 1k predictions, amortized", _usd_text(t["per_1k_amortized_usd"])),
        ("utilization", _pct(t["utilization"])),
        ("saved by batching (vs batch 1)", _usd_text(report.savings["total_usd"])),
    ):
        head.add_row(name, value)
    console.print(head)

    keys = {"model": ["model"], "version": ["model", "version"],
            "variant": ["model", "version", "variant"], "tenant": ["tenant"],
            "day": ["day"]}[report.by]
    main = Table(title=f"spend by {report.by}", box=box.SIMPLE_HEAD)
    columns = [*keys, "requests", "ok", "errors", "cost", "$/1k marginal"]
    if report.by in ("model", "version", "variant"):
        columns += ["$/1k amortized", "util.", "batching saved"]
    for c in columns:
        main.add_column(c, justify="left" if c in keys else "right")
    for r in report.rows:
        cells = [str(r[k]) for k in keys] + [
            f"{r['requests']:,}", f"{r['ok']:,}", f"{r['errors']:,}", _usd_text(r["cost_usd"]),
            _usd_text(r["per_1k_marginal_usd"])]
        if report.by in ("model", "version", "variant"):
            cells += [_usd_text(r["per_1k_amortized_usd"]), _pct(r["utilization"]),
                      _usd_text(r["batching_saving_usd"])]
        main.add_row(*cells)
    console.print(main)

    if report.training:
        runs = Table(title="training runs: break-even", box=box.SIMPLE_HEAD)
        for c in ("run", "model", "started", "cost", "saving/prediction", "predictions needed",
                  "break-even"):
            runs.add_column(c, justify="right" if c in ("cost", "predictions needed") else
                            "left")
        for r in report.training:
            each = r["saving_per_prediction_pusd"]
            runs.add_row(str(r["id"]), f"{r['model']} v{r['version']}", r["started_at"][:16],
                         _usd_text(r["cost_usd"]),
                         "-" if each is None else f"{each / 1e6:.4g} µ$",
                         "-" if r["predictions_needed"] is None else
                         f"{r['predictions_needed']:,}",
                         (r["break_even_at"] or "")[:10] or r["break_even"])
        console.print(runs)
    if report.budgets:
        budgets = Table(title="budgets", box=box.SIMPLE_HEAD)
        for c in ("budget", "period", "amount", "spent", "burn/day", "runway"):
            budgets.add_column(c, justify="left" if c in ("budget", "period") else "right")
        for b in report.budgets:
            if "error" in b:
                budgets.add_row(str(b.get("id")), b["error"], "", "", "", "")
                continue
            scope = b["scope"] + (f" {b['scope_value']}" if b["scope_value"] else "")
            runway = b["runway_days"]
            budgets.add_row(scope, b["period"], _usd_text(b["amount_usd"]),
                            _usd_text(b["spent_usd"]), _usd_text(b["burn_usd_per_day"]),
                            "-" if runway is None else f"{runway:,.1f} d")
        console.print(budgets)
    console.print(f"savings method: {report.savings['method']}", style="dim")


def write_spend_chart(report, path: Path) -> Path:
    """Spend over time (inference stacked by model, training on top) and the training vs
    inference share of the window."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import UTC, datetime

    import matplotlib.pyplot as plt

    series = report.series
    when = [datetime.fromtimestamp(s["ts"], UTC) for s in series]
    models = sorted({m for s in series for m in s["by_model"]})
    width = report.bucket_s / 86400 * 0.8
    fig, (over, share) = plt.subplots(1, 2, figsize=(13, 5),
                                      gridspec_kw={"width_ratios": [3, 1]})
    bottom = [0.0] * len(series)
    for model in models:
        values = [s["by_model"].get(model, 0) / 1e12 for s in series]
        over.bar(when, values, width, bottom=bottom, label=f"inference: {model}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    training = [s["training_pusd"] / 1e12 for s in series]
    if any(training):
        over.bar(when, training, width, bottom=bottom, label="training", color="tab:red")
    over.set_ylabel("USD per " + ("day" if report.bucket_s == 86400 else "hour"))
    over.set_title("Spend over time")
    if models or any(training):
        over.legend(fontsize=8)
    fig.autofmt_xdate()
    inf = report.totals["inference_pusd"] / 1e12
    tr = report.totals["training_pusd"] / 1e12
    if inf + tr > 0:
        share.pie([inf, tr], labels=["inference", "training"], autopct="%1.1f%%",
                  colors=["tab:blue", "tab:red"])
    share.set_title("Training vs inference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
