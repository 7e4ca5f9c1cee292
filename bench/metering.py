"""What metering costs: frugalserve with metering on and off, measured in alternation.

The serving benchmark compares one run of each, and on this machine run-to-run noise is as
large as the effect; here both servers run side by side (only one is loaded at a time, both
pinned to core 0) and 64-connection wrk runs alternate on/off ROUNDS times; the cost is
1 - median(on) / median(off). One command: `.venv/bin/python bench/metering.py`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import loadgen
import report
import servers
import workloads
from rich.console import Console
from rich.table import Table

from frugalserve.progress import new_progress

ROUNDS = 5
SECONDS = 8
CONNECTIONS = 64
OUT = Path(__file__).resolve().parent / "out"
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def main() -> int:
    console = Console()
    workload = workloads.digits(OUT / "models")
    scratch = Path(tempfile.mkdtemp(prefix="frugalserve-metering-"))
    script = loadgen.write_script(workload.body(), scratch / "digits.lua")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    with servers.Running(servers.FRUGAL, workload, scratch / "on", OUT / "logs" / "on.log") as on, \
            servers.Running(servers.FRUGAL_OFF, workload, scratch / "off",
                            OUT / "logs" / "off.log") as off, \
            new_progress(console) as progress:
        task = progress.add_task("metering on/off, alternating", total=2 * ROUNDS + 2)
        for running in (on, off):
            running.wait_ready()
            loadgen.run(running.infer_url, script, CONNECTIONS, 3)  # warm-up
            progress.advance(task)
        for _ in range(ROUNDS):
            for key, running in (("on", on), ("off", off)):
                time.sleep(1)  # let the other server's ledger writer settle
                result = loadgen.run(running.infer_url, script, CONNECTIONS, SECONDS)
                if result.non_2xx or result.socket_errors:
                    raise RuntimeError(f"metering {key}: failed requests in the run")
                rates[key].append(result.rps)
                progress.advance(task)
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    cost = 1 - on_rate / off_rate
    table = Table(title=f"metering cost, digits, {CONNECTIONS} conns, {ROUNDS} alternating runs")
    for column in ("metering", "runs (req/s)", "median"):
        table.add_column(column)
    for key in ("on", "off"):
        table.add_row(key, ", ".join(f"{r:,.0f}" for r in rates[key]),
                      f"{statistics.median(rates[key]):,.0f}")
    console.print(table)
    console.print(f"metering cost: {100 * cost:.2f} % (target <= 3 %)")
    _publish(rates, cost)
    return 0


def _publish(rates: dict[str, list[float]], cost: float) -> None:
    runs = {k: ", ".join(f"{r:,.0f}" for r in v) for k, v in rates.items()}
    today = date.today().isoformat()
    section = "\n".join([
        f"## Metering cost, alternating runs, {today}",
        "",
        "- Command: `.venv/bin/python bench/metering.py` (both servers up, pinned to core 0, one "
        f"loaded at a time; wrk -t1 -c{CONNECTIONS} -d{SECONDS}s on core 1, alternating on/off "
        f"{ROUNDS} times; digits MLP, single-sample JSON)",
        "",
        "| metering | runs (req/s) | median |",
        "|---|---|---:|",
        f"| on | {runs['on']} | {statistics.median(rates['on']):,.0f} |",
        f"| off | {runs['off']} | {statistics.median(rates['off']):,.0f} |",
        "",
        f"Metering cost: **{100 * cost:.2f} %** of throughput (target <= 3 %).",
    ])
    report.update_benchmarks_md(BENCHMARKS, today, section, name="metering-bench")


if __name__ == "__main__":
    sys.exit(main())
