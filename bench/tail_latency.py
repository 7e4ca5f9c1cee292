"""What metering does to tail latency: p50 and p99 with the ledger written from a child process
(the default), from a thread of the server (`serve --ledger-thread`), and with metering off.

A flush turns the batches of the last 2 s into rows and writes them. From a thread of the
server, that work holds the GIL in bursts which the event loop waits behind, several times a
request; a lightly loaded server, whose batches hold one request each, has the most of it per
request. A child process at idle priority (economics/ledger_process.py) gives the core back
the moment a server thread wakes. The three servers run at once on core 0, each loaded alone
in turn by wrk on core 1, at 1, 8 and 64 connections, REPS times in a rotating order, with a
pause of two flush intervals after each load (a server's last flush of its load falls in the
pause, not in the next server's load); the table has each server's medians.

One command: `.venv/bin/python bench/tail_latency.py` (`--seconds`, `--reps`).
"""

from __future__ import annotations

import argparse
import contextlib
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
from machine import git_revision
from rich.console import Console
from rich.table import Table

from frugalserve.economics.ledger import FLUSH_INTERVAL_S
from frugalserve.progress import new_progress

CONNECTIONS = (1, 8, 64)
SERVERS = (servers.FRUGAL, servers.FRUGAL_LEDGER_THREAD, servers.FRUGAL_OFF)
OUT = Path(__file__).resolve().parent / "out"
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
CHART = OUT / "tail_latency.png"
SHORT = {servers.FRUGAL.label: "metered,\nledger process",
         servers.FRUGAL_LEDGER_THREAD.label: "metered,\nledger thread",
         servers.FRUGAL_OFF.label: "metering off"}
HEADER = ("server", "conns", "req/s", "p50 ms", "p99 ms", "p99 / unmetered p99", "p99 range")


def measure(seconds: int, reps: int, console: Console) -> dict[tuple[str, int], list]:
    """wrk results by (server name, connections), REPS each."""
    workload = workloads.digits(OUT / "models")
    scratch = Path(tempfile.mkdtemp(prefix="frugalserve-tail-"))
    script = loadgen.write_script(workload.body(), scratch / "digits.lua")
    results: dict[tuple[str, int], list] = {}
    with contextlib.ExitStack() as stack, new_progress(console) as progress:
        task = progress.add_task("three servers, each loaded alone in turn",
                                 total=len(SERVERS) * (1 + reps * len(CONNECTIONS)))
        running = []
        for server in SERVERS:
            run = stack.enter_context(servers.Running(server, workload, scratch / server.key,
                                                      OUT / "logs" / f"tail-{server.key}.log"))
            run.wait_ready()
            loadgen.run(run.infer_url, script, 64, 3)  # warm-up
            running.append(run)
            progress.advance(task)
        for rep in range(reps):
            for conns in CONNECTIONS:
                for i in range(len(running)):  # rotate: each server takes each place
                    run = running[(i + rep) % len(running)]
                    result = loadgen.run(run.infer_url, script, conns, seconds)
                    if result.non_2xx or result.socket_errors:
                        raise RuntimeError(f"{run.server.label}: failed requests")
                    results.setdefault((run.server.key, conns), []).append(result)
                    time.sleep(2 * FLUSH_INTERVAL_S + 0.2)
                    progress.advance(task)
    return results


def rows(results: dict[tuple[str, int], list]) -> list[dict]:
    out = []
    for conns in CONNECTIONS:
        base = statistics.median(r.p99_ms for r in results[(servers.FRUGAL_OFF.key, conns)])
        for server in SERVERS:
            runs = results[(server.key, conns)]
            p99 = statistics.median(r.p99_ms for r in runs)
            out.append({"server": server.label, "conns": conns,
                        "rps": statistics.median(r.rps for r in runs),
                        "p50": statistics.median(r.p50_ms for r in runs), "p99": p99,
                        "ratio": p99 / base, "low": min(r.p99_ms for r in runs),
                        "high": max(r.p99_ms for r in runs)})
    return out


def _cells(r: dict) -> list[str]:
    return [r["server"], str(r["conns"]), f"{r['rps']:,.0f}", f"{r['p50']:.3f}",
            f"{r['p99']:.3f}", f"{r['ratio']:.2f}x", f"{r['low']:.2f}-{r['high']:.2f}"]


def chart(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CONNECTIONS), figsize=(8, 3.2))
    for ax, conns in zip(axes, CONNECTIONS, strict=True):
        mine = [r for r in table if r["conns"] == conns]
        names = [SHORT[r["server"]] for r in mine]
        ax.bar(names, [r["p99"] for r in mine], color=["#4878a8", "#dd8452", "#55a868"],
               label="p99 (median of runs)")
        ax.errorbar(names, [r["p99"] for r in mine], fmt="none", ecolor="black",
                    yerr=[[r["p99"] - r["low"] for r in mine],
                          [r["high"] - r["p99"] for r in mine]], capsize=3)
        ax.scatter(names, [r["p50"] for r in mine], color="black", marker="_", s=200,
                   label="p50", zorder=3)
        ax.set_title(f"{conns} connection{'s' if conns > 1 else ''}", fontsize=9)
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish(table: list[dict], seconds: int, reps: int) -> None:
    today = date.today().isoformat()
    section = "\n".join([
        f"## Tail latency with metering: ledger process, ledger thread, no metering, {today}",
        "",
        f"- Command: `.venv/bin/python bench/tail_latency.py --seconds {seconds} --reps {reps}` "
        f"(three servers running at once on core 0, each loaded alone in turn by "
        f"`wrk -t1 -cN -d{seconds}s --latency` on core 1, {reps} runs per server and "
        f"connection count in a rotating order, a {2 * FLUSH_INTERVAL_S + 0.2:g} s pause "
        f"after each; digits MLP, single-sample JSON; frugalserve "
        f"{git_revision(BENCHMARKS.parent)}). Medians of the runs; the p99 range is the "
        "lowest and highest run.",
        f"- Chart: `bench/out/{CHART.name}`",
        "",
        f"| {' | '.join(HEADER)} |",
        "|---|" + "---:|" * (len(HEADER) - 1),
        *(f"| {' | '.join(_cells(r))} |" for r in table),
    ])
    report.update_benchmarks_md(BENCHMARKS, today, section, name="tail-latency")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--reps", type=int, default=3, help="runs per server and conns")
    args = parser.parse_args()
    console = Console()
    table = rows(measure(args.seconds, args.reps, console))
    shown = Table(title="tail latency, digits")
    for column in HEADER:
        shown.add_column(column, justify="right")
    for r in table:
        shown.add_row(*_cells(r))
    console.print(shown)
    OUT.mkdir(parents=True, exist_ok=True)
    chart(table, CHART)
    publish(table, args.seconds, args.reps)
    console.print(f"wrote {CHART.relative_to(BENCHMARKS.parent)} and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
