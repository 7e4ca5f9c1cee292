"""Where the ledger writer's CPU goes: one flush of a SQLite ledger, split by phase.

Batches of one-row requests from one tenant are recorded in a LedgerWriter's batch log, as
the server records them; each flush is then run phase by phase, timed with the writer
thread's CPU clock: the batch log's records laid out as numpy columns, the usage rollups, the
batch rows and their rollups, each batch's usage_log row (its JSON columns), and the SQL
transaction (inserts, rollup upserts, commit). The cases (CASES): batches of 40 requests,
83 a flush (0.5 s at 6,640 req/s, about a metered server's rate in bench/metering.py) and
332 (a 2 s flush); and 2 s flushes of the small batches of a lightly loaded server, 8
requests (8 connections, 13,600 req/s) and 1 (one connection, 2,500 req/s), where the
writer's work per batch is paid by fewer requests. The median of FLUSHES flushes, per batch.

One command: `.venv/bin/python bench/ledger_flush.py`.
"""

from __future__ import annotations

import gc
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

CASES = ((40, 83), (40, 332), (8, 3400), (1, 5000))  # (requests per batch, batches per flush)
FLUSHES = 60
PHASES = ("numpy columns from the batch log", "usage rollups", "batch rows and rollups",
          "usage rows (JSON columns)", "SQL: inserts, upserts, commit")
OUT = Path(__file__).resolve().parent / "out"
CHART = OUT / "ledger_flush.png"


def _fill(writer: ledger.LedgerWriter, requests: int, batches: int) -> None:
    now, wall = time.perf_counter(), time.time()
    arrivals = [now - 0.002 - i * 1e-5 for i in range(requests)]
    key = writer.log.key("digits", "1", "reference", "aws-c7i.large", "on_demand", 0.5)
    for _ in range(batches):
        writer.log.record(key, writer.reserve_ids(), writer.reserve_ids(requests + 1), wall,
                          requests, requests, 0.4, 3086 * requests, dispatched=now - 0.001,
                          done=now, done_at=wall, arrivals=arrivals, costs=[3086] * requests,
                          tenant="anonymous")


def _one_flush(writer: ledger.LedgerWriter, requests: int, batches: int) -> list[float]:
    """Seconds of this thread's CPU per phase, for one flush (LedgerWriter.flush's steps)."""
    _fill(writer, requests, batches)
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


Case = tuple[int, int]  # (requests per batch, batches per flush)


def main() -> int:
    console = Console()
    results: dict[Case, list[float]] = {}  # µs per batch, per phase
    with new_progress(console) as progress:
        for requests, batches in CASES:
            engine = ledger.open_engine(ledger.sqlite_url(
                Path(tempfile.mkdtemp(prefix="frugalserve-flush-")) / "ledger.db"))
            writer = ledger.LedgerWriter(engine)
            # as the server does once loaded: long-lived objects out of the cyclic GC, whose
            # full passes over them would otherwise be billed to the flushes of many batches
            gc.collect()
            gc.freeze()
            task = progress.add_task(f"flushes of {batches} batches of {requests}",
                                     total=FLUSHES)
            runs = []
            for _ in range(FLUSHES):
                runs.append(_one_flush(writer, requests, batches))
                progress.advance(task)
            writer.close()
            results[requests, batches] = [statistics.median(r[i] for r in runs) / batches * 1e6
                                          for i in range(len(PHASES))]
    table = Table(title="ledger writer CPU per batch (SQLite)")
    table.add_column("phase")
    for case in CASES:
        table.add_column(f"{_name(case)}, µs/batch", justify="right")
    for i, phase in enumerate((*PHASES, "total", "total per request")):
        table.add_row(phase, *(f"{_value(results[c], i, c):.2f}" for c in CASES))
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    _chart(results)
    _publish(results)
    return 0


def _name(case: Case) -> str:
    requests, batches = case
    return f"{batches} batches of {requests} a flush"


def _value(per_phase: list[float], i: int, case: Case) -> float:
    """Phase i's µs per batch; then the total per batch, and per request."""
    if i < len(PHASES):
        return per_phase[i]
    return sum(per_phase) / (case[0] if i > len(PHASES) else 1)


def _chart(results: dict[Case, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    left = [0.0] * len(CASES)
    for i, phase in enumerate(PHASES):
        widths = [results[c][i] for c in CASES]
        ax.barh([_name(c) for c in CASES], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("writer CPU, µs per batch")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(CHART, dpi=120)
    plt.close(fig)


def _publish(results: dict[Case, list[float]]) -> None:
    today = date.today().isoformat()
    rows = [f"| {phase} | " + " | ".join(f"{_value(results[c], i, c):.2f}" for c in CASES)
            + " |" for i, phase in enumerate((*PHASES, "total", "total per request"))]
    section = "\n".join([
        f"## Ledger writer CPU per flush phase, {today}",
        "",
        f"- Command: `.venv/bin/python bench/ledger_flush.py` (frugalserve "
        f"{git_revision(ROOT)}; SQLite in WAL; one-row requests from one tenant; median of "
        f"{FLUSHES} flushes; the writer thread's CPU clock).",
        f"- Chart: `bench/out/{CHART.name}`",
        "",
        "| phase | " + " | ".join(f"{_name(c)}, µs/batch" for c in CASES) + " |",
        "|---|" + "---:|" * len(CASES),
        *rows,
        "",
        "The last row is the total over the batch's requests. This is the writer alone, "
        "without the server beside it: in the side-by-side metering bench the writer's thread "
        "costs more per request than this.",
    ])
    update_benchmarks_md(ROOT / "BENCHMARKS.md", today, section, name="ledger-flush")


if __name__ == "__main__":
    sys.exit(main())
