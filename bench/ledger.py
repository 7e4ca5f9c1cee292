"""Ledger benchmark: N usage records over 30 days, then the time of a 30-day report by tenant.

    .venv/bin/python bench/ledger.py [--requests 10000000] [--db sqlite,postgresql]
                                     [--raw-baseline] [--no-record]

Records are generated the way the server writes them: batches of 1-16 requests (6 model
versions, 10 tenants, spread evenly over the last 30 days) handed to a LedgerWriter with
log.record, flushed every 4,096 batches, so the raw rows (usage_log chunks, batches)
and the per-minute rollups are written by the real writer path in the same transactions.
The report (economics.report.build_report, --by tenant, 30 days) reads the rollups; it is timed
3 times and the median kept. --raw-baseline also times the same per-tenant totals read straight
from the per-request `usage` view (what a report without rollups would do).

SQLite: a file under a temporary folder. PostgreSQL: schema frugalserve_bench in
$FRUGALSERVE_BENCH_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test), dropped
and made again. Appends a dated section to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from machine import git_revision
from report import update_benchmarks_md
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from frugalserve.economics import report as spend  # noqa: E402
from frugalserve.economics.ledger import LedgerWriter, open_engine  # noqa: E402
from frugalserve.progress import new_progress  # noqa: E402

PG_URL = os.environ.get("FRUGALSERVE_BENCH_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SCHEMA = "frugalserve_bench"
MODELS = [("digits", "1"), ("digits", "2"), ("fashion", "1"), ("fashion", "2"),
          ("ranker", "1"), ("ranker", "3")]
TENANTS = [f"team-{i:02d}" for i in range(10)]
DAYS = 30
FLUSH_EVERY = 4096


def generate(url: str, n_requests: int, now: float,
             console: Console) -> tuple[float, int, int]:
    """Write n_requests through a LedgerWriter; (seconds, batches, pico-dollars written)."""
    writer = LedgerWriter(open_engine(url), flush_interval_s=3600)
    rng = random.Random(42)
    span = DAYS * 86400 - 120
    start = now - DAYS * 86400 + 60
    done = batches = pending = paid = 0
    t0 = time.perf_counter()
    with new_progress(console) as progress:
        task = progress.add_task(f"{writer.engine.dialect.name}: usage records", total=n_requests)
        while done < n_requests:
            size = min(rng.randint(1, 16), n_requests - done)
            ts = start + span * done / n_requests
            model, version = MODELS[batches % len(MODELS)]
            compute_ms = 0.2 + 0.05 * size
            batch_id = writer.reserve_ids()
            costs = [40_000 + 7 * k for k in range(size)]
            total = sum(costs)
            places = range(done, done + size)
            statuses = [200 if p % 97 else 500 for p in places]
            # each waited 0.3 ms and had its answer 1.2 ms after it came
            writer.log.record(
                writer.log.key(model, version, None, "aws-c7i.large", "on_demand", 0.5),
                batch_id, writer.reserve_ids(size + 1), ts, size, size, compute_ms, total,
                dispatched=1.0, done=1.0009, done_at=ts + 0.0009, arrivals=[0.9997] * size,
                costs=costs, tenant=tuple(TENANTS[p % 10] for p in places),
                statuses=None if 500 not in statuses else statuses,
                request_ids=tuple(f"req-{p}" for p in places))
            done += size
            paid += total
            batches += 1
            pending += 1
            if pending == FLUSH_EVERY:
                if not writer.flush():
                    raise RuntimeError("ledger write failed")
                pending = 0
                progress.update(task, completed=done)
        writer.close()
        progress.update(task, completed=done)
    return time.perf_counter() - t0, batches, paid


def time_report(url: str, now: float, repeat: int = 3) -> tuple[float, spend.Report]:
    engine = open_engine(url)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = spend.build_report(engine, now - DAYS * 86400, now, by="tenant")
        times.append(time.perf_counter() - t0)
    engine.dispose()
    return statistics.median(times), result


def time_raw(url: str, now: float) -> float:
    engine = create_engine(url)
    t0 = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(text("SELECT tenant, count(*), sum(cost_pusd) FROM usage WHERE ts >= :s "
                          "GROUP BY tenant"), {"s": now - DAYS * 86400}).all()
    engine.dispose()
    return time.perf_counter() - t0


def counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        out = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
               for t in ("usage_log", "batches", "usage_rollup", "batch_rollup")}
    engine.dispose()
    return out


def fresh_pg() -> str:
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    admin.dispose()
    return f"{PG_URL}?options=-csearch_path%3D{SCHEMA}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000_000)
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--raw-baseline", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    commit = git_revision(ROOT)  # at the start: the code that ran
    console = Console()
    now = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="frugalserve-ledger-bench-") as tmp:
        for db in args.db.split(","):
            url = f"sqlite:///{Path(tmp) / 'ledger.db'}" if db == "sqlite" else fresh_pg()
            gen_s, n_batches, paid = generate(url, args.requests, now, console)
            report_s, result = time_report(url, now)
            raw_s = time_raw(url, now) if args.raw_baseline else None
            c = counts(url)
            # the report read from the rollups must account for every request and pico-dollar
            check = sum(r["requests"] for r in result.rows), result.totals["inference_pusd"]
            assert check == (args.requests, paid), (check, (args.requests, paid))
            results.append({"db": db, "requests": args.requests, "batches": n_batches,
                            "gen_s": gen_s, "report_s": report_s, "raw_s": raw_s, **c})
            if db == "postgresql":
                admin = create_engine(PG_URL)
                with admin.begin() as conn:
                    conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
                admin.dispose()
    table = Table(title=f"ledger: {args.requests:,} usage records over {DAYS} days, "
                        "30-day report by tenant")
    for col in ("db", "write (records/s)", "usage_log rows", "usage_rollup rows",
                "report (median of 3)", "raw view query", "report speed-up"):
        table.add_column(col, justify="left" if col == "db" else "right")
    for r in results:
        table.add_row(r["db"], f"{r['gen_s']:.0f} s ({r['requests'] / r['gen_s']:,.0f}/s)",
                      f"{r['usage_log']:,}", f"{r['usage_rollup']:,}",
                      f"{r['report_s'] * 1000:,.0f} ms",
                      "-" if r["raw_s"] is None else f"{r['raw_s']:,.1f} s", _speedup(r))
    console.print(table)
    if not args.no_record:
        record(results, args, " ".join(["bench/ledger.py", *sys.argv[1:]]), commit)


def _speedup(r: dict) -> str:
    """The raw view query's time over the report's: what the rollups buy (same run)."""
    return "-" if r["raw_s"] is None else f"{r['raw_s'] / r['report_s']:,.1f}x"


def record(results: list[dict], args, command: str, commit: str) -> None:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"## Ledger benchmark ({args.requests:,} usage records), {day}", "",
        f"- Command: `.venv/bin/python {command}`",
        f"- Machine: nproc {os.cpu_count()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; frugalserve {commit}; "
        "PostgreSQL on 127.0.0.1 (same machine)",
        "- Records: written through `LedgerWriter.log.record` + `flush()` (the "
        "server's writer path: raw chunks and per-minute rollups in one transaction), batches "
        "of 1-16 requests, 6 model versions, 10 tenants, evenly over 30 days.",
        "- Report: `economics.report.build_report(since=now-30d, by='tenant')` (reads the "
        "rollups only), median of 3 runs; raw view: `SELECT tenant, count(*), sum(cost_pusd) "
        "FROM usage WHERE ts >= now-30d GROUP BY tenant` over the per-request JSON view.",
        "",
        "| db | records | batches | write time | records/s | usage_log rows | usage_rollup rows "
        "| report by tenant, 30 d | raw view query | report speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        raw = "-" if r["raw_s"] is None else f"{r['raw_s']:,.1f} s"
        lines.append(
            f"| {r['db']} | {r['requests']:,} | {r['batches']:,} | {r['gen_s']:.0f} s | "
            f"{r['requests'] / r['gen_s']:,.0f} | {r['usage_log']:,} | {r['usage_rollup']:,} | "
            f"{r['report_s'] * 1000:,.0f} ms | {raw} | {_speedup(r)} |")
    update_benchmarks_md(ROOT / "BENCHMARKS.md", day, "\n".join(lines),
                         name=f"ledger-bench {args.requests}")


if __name__ == "__main__":
    main()
