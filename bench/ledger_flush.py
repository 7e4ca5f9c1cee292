"""Where the ledger writer's CPU goes: one flush of a SQLite ledger, split by phase.

Batches of 40 one-row requests from one tenant are recorded in a LedgerWriter's batch log, as
the server records them; each flush is then run phase by phase, timed with the writer
thread's CPU clock: the batch log's records laid out as numpy columns, the usage rollups, the
batch rows and their rollups, each batch's usage_log row (its JSON columns), and the SQL
transaction (inserts, rollup upserts, commit). Flushes of 83
batches (0.5 s at 6,640 req/s, about a metered server's rate in bench/metering.py) and of 332
(a 2 s flush). The median of FLUSHES flushes, per batch.

One command: `.venv/bin/python bench/ledger_flush.py`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from machine import git_revision
from report import update_benchmarks_md
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from frugalserve.economics import ledger  # noqa: E402
from frugalserve.progress import new_progress  # noqa: E402

REQUESTS = 40  # per batch
SIZES = (83, 332)  # batches per flush
FLUSHES = 60
PHASES = ("numpy columns from the batch log", "usage rollups", "batch rows and rollups",
          "usage rows (JSON columns)", "SQL: inserts, upserts, commit")
OUT = Path(__file__).resolve().parent / "out"
CHART = OUT / "ledger_flush.png"


def _fill(writer: ledger.LedgerWriter, batches: int) -> None:
    now, wall = time.perf_counter(), time.time()
    arrivals = [now - 0.002 - i * 1e-5 for i in range(REQUESTS)]
    key = writer.log.key("digits", "1", "reference", "aws-c7i.large", "on_demand", 0.5)
    for _ in range(batches):
        writer.log.record(key, writer.reserve_ids(), writer.reserve_ids(REQUESTS + 1), wall,
                          REQUESTS, REQUESTS, 0.4, 123_440, dispatched=now - 0.001, done=now,
                          done_at=wall, arrivals=arrivals, costs=[3086] * REQUESTS,
                          tenant="anonymous")


def _one_flush(writer: ledger.LedgerWriter, batches: int) -> list[float]:
    """Seconds of this thread's CPU per phase, for one flush (LedgerWriter.flush's steps)."""
    _fill(writer, batches)
    clock = time.thread_time
    tt = clock()
    pages = writer.log.take()
    t0 = clock()
    minutes = ledger.rollup_usage([], pages, writer.log)
    hours = ledger.rollup_hours(minutes)
    t1 = clock()
    batch_rows = [row for page in pages for row in ledger.page_batch_rows(page, writer.log)]
    by_batch = ledger.rollup_batches(batch_rows, writer.replica_id)
    t2 = clock()
    rows = [row for page in pages for row in ledger.page_usage_rows(page, writer.log)]
    t3 = clock()
    ledger._write(writer.engine, ((ledger.batches, batch_rows), (ledger.usage_log, rows)),
                  ((ledger.usage_rollup, minutes), (ledger.usage_rollup_hourly, hours),
                   *by_batch))
    t4 = clock()
    return [t0 - tt, t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def main() -> int:
    console = Console()
    results: dict[int, list[float]] = {}  # batches per flush -> µs per batch, per phase
    with new_progress(console) as progress:
        for size in SIZES:
            engine = ledger.open_engine(ledger.sqlite_url(
                Path(tempfile.mkdtemp(prefix="frugalserve-flush-")) / "ledger.db"))
            writer = ledger.LedgerWriter(engine)
            task = progress.add_task(f"flushes of {size} batches", total=FLUSHES)
            runs = []
            for _ in range(FLUSHES):
                runs.append(_one_flush(writer, size))
                progress.advance(task)
            writer.close()
            results[size] = [statistics.median(r[i] for r in runs) / size * 1e6
                             for i in range(len(PHASES))]
    table = Table(title=f"ledger writer CPU per batch of {REQUESTS} requests (SQLite)")
    table.add_column("phase")
    for size in SIZES:
        table.add_column(f"{size} batches/flush, µs/batch", justify="right")
    for i, phase in enumerate((*PHASES, "total")):
        table.add_row(phase, *(f"{_value(results[s], i):.2f}" for s in SIZES))
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    _chart(results)
    _publish(results)
    return 0


def _value(per_phase: list[float], i: int) -> float:
    return sum(per_phase) if i == len(PHASES) else per_phase[i]


def _chart(results: dict[int, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = [0.0] * len(SIZES)
    for i, phase in enumerate(PHASES):
        widths = [results[s][i] for s in SIZES]
        ax.barh([f"{s} batches/flush" for s in SIZES], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel(f"writer CPU, µs per batch of {REQUESTS} requests")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(CHART, dpi=120)
    plt.close(fig)


def _publish(results: dict[int, list[float]]) -> None:
    today = date.today().isoformat()
    rows = [f"| {phase} | " + " | ".join(f"{_value(results[s], i):.2f}" for s in SIZES) + " |"
            for i, phase in enumerate((*PHASES, "total"))]
    per_request = {s: sum(results[s]) / REQUESTS for s in SIZES}
    section = "\n".join([
        f"## Ledger writer CPU per flush phase, {today}",
        "",
        f"- Command: `.venv/bin/python bench/ledger_flush.py` (frugalserve "
        f"{git_revision(ROOT)}; SQLite in WAL; batches of {REQUESTS} one-row requests from one "
        f"tenant; median of {FLUSHES} flushes; the writer thread's CPU clock).",
        f"- Chart: `bench/out/{CHART.name}`",
        "",
        "| phase | " + " | ".join(f"{s} batches/flush, µs/batch" for s in SIZES) + " |",
        "|---|" + "---:|" * len(SIZES),
        *rows,
        "",
        "Per request: " + ", ".join(f"{per_request[s]:.2f} µs at {s} batches a flush"
                                    for s in SIZES)
        + ". This is the writer alone, without the server beside it: in the side-by-side "
        "metering bench the writer's thread costs more per request than this.",
    ])
    update_benchmarks_md(ROOT / "BENCHMARKS.md", today, section, name="ledger-flush")


if __name__ == "__main__":
    sys.exit(main())
