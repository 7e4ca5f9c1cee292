"""What metering costs: frugalserve with metering on and off, loaded side by side.

Both servers are pinned to core 0 and loaded at the same time, each by its own wrk (64
connections, both on core 1), for ROUNDS rounds of SECONDS. Each round's cost is 1 - (CPU
seconds per request, off) / (CPU seconds per request, on), each server's CPU from /proc: a
saturated server's throughput is the inverse of its CPU per request, so this is the
throughput cost, taken where both servers see the same machine at the same moment. Runs one
after another do not: a server's CPU per request moves by more than the effect between
consecutive rounds (36 to 66 µs in the run BENCHMARKS.md records), while the cost of each
round moves far less. The result is the median round.

`--control` runs the same rounds with both servers unmetered: what the method reads when
there is no difference to find (its own error), published beside the result.

`--against REV` loads the metered server at HEAD ("on") beside the metered server at git
revision REV ("off", its `frugalserve/` from `git archive`): what a change to the hot path
costs or saves, read the same way (negative: HEAD is cheaper).

`--flush-against S` loads the metered server at the default ledger flush interval ("on")
beside one whose writer flushes every S seconds ("off"): what the interval costs.

One command: `.venv/bin/python bench/metering.py` (then `--control`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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

ROUNDS = 30
SECONDS = 3
CONNECTIONS = 64
TARGET = 0.03
OUT = Path(__file__).resolve().parent / "out"
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def one_round(on: servers.Running, off: servers.Running, script: Path) -> dict[str, float]:
    """Both servers loaded at once; the CPU per request of each."""
    results: dict[str, loadgen.WrkResult] = {}
    counted = {"on": on.counters(), "off": off.counters()}
    before = {"on": on.cpu_seconds(), "off": off.cpu_seconds()}
    loop_before = {"on": on.cpu_seconds(True), "off": off.cpu_seconds(True)}

    def load(key: str, running: servers.Running) -> None:
        results[key] = loadgen.run(running.infer_url, script, CONNECTIONS, SECONDS)

    threads = [threading.Thread(target=load, args=item) for item in (("on", on), ("off", off))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(FLUSH_INTERVAL_S + 0.2)  # the writer's last flush of the round: in its CPU
    for key, result in results.items():
        if result.non_2xx or result.socket_errors:
            raise RuntimeError(f"metering {key}: failed requests in the run")
    served = {key: results[key].rps * SECONDS for key in ("on", "off")}
    row = {f"{key}_rps": results[key].rps for key in ("on", "off")}
    for key, running in (("on", on), ("off", off)):
        row[f"{key}_us"] = (running.cpu_seconds() - before[key]) / served[key] * 1e6
        row[f"{key}_loop_us"] = \
            (running.cpu_seconds(True) - loop_before[key]) / served[key] * 1e6
    row["cost"] = 1 - row["off_us"] / row["on_us"]
    for key, running in (("on", on), ("off", off)):  # after the CPU readings: not in them
        now = running.counters()
        row[f"{key}_batch"] = ((now["requests"] - counted[key]["requests"])
                               / max(1.0, now["batches"] - counted[key]["batches"]))
    return row


@dataclass(frozen=True)
class Comparison:
    """Which two servers a run loads side by side, and how its result reads."""

    name: str  # the BENCHMARKS.md section's key, and the chart's file name
    option: str  # the command-line option that asks for it ("": none)
    subject: servers.Server  # "on"
    baseline: servers.Server  # "off"
    pair: str  # the two servers, in words
    title: str  # of the section
    result: str  # the result's name, before its figure
    cheaper: str = ""  # what a negative result means


def comparison(control: bool, against: str | None, flush_against: float | None,
               scratch: Path) -> Comparison:
    if flush_against:
        default = f"{FLUSH_INTERVAL_S:g} s"
        return Comparison("metering-flush", f" --flush-against {flush_against:g}",
                          servers.FRUGAL, servers.frugalserve_flushing(flush_against),
                          f"both metered: ledger flushes every {default} on, every "
                          f"{flush_against:g} s off", f"flush interval {default} against "
                          f"{flush_against:g} s", f"Flushing every {default} against every "
                          f"{flush_against:g} s", f"flushing every {default} is cheaper")
    if against:
        source = scratch / "against"
        source.mkdir()
        git = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "archive", against,
                              "frugalserve"], capture_output=True)
        if git.returncode:
            raise SystemExit(f"--against {against}: {git.stderr.decode().strip()}")
        archive = git.stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        return Comparison("metering-against", f" --against {against}",
                          servers.FRUGAL, servers.frugalserve_at(source, against),
                          f"both metered: HEAD on, {against} off",
                          f"HEAD against {against}", f"HEAD against {against}",
                          "HEAD is cheaper")
    if control:
        return Comparison("metering-control", " --control", servers.FRUGAL_OFF,
                          servers.FRUGAL_OFF, "two unmetered servers in the on and off places",
                          "control (both unmetered)", "Control")
    return Comparison("metering", "", servers.FRUGAL, servers.FRUGAL_OFF, "metering on and off",
                      "", "Metering cost")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # one comparison a run: both flags would silently measure only one of them
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--control", action="store_true",
                       help="both servers unmetered: the method's own error")
    which.add_argument("--against", metavar="REV",
                       help="the metered server at HEAD beside the one at git revision REV")
    which.add_argument("--flush-against", metavar="S", type=float,
                       help="the metered server at the default ledger flush interval beside "
                            "one flushing every S seconds")
    args = parser.parse_args()
    console = Console()
    workload = workloads.digits(OUT / "models")
    scratch = Path(tempfile.mkdtemp(prefix="frugalserve-metering-"))
    script = loadgen.write_script(workload.body(), scratch / "digits.lua")
    compared = comparison(args.control, args.against, args.flush_against, scratch)
    rounds: list[dict[str, float]] = []
    with servers.Running(compared.subject, workload, scratch / "on",
                         OUT / "logs" / "on.log") as on, \
            servers.Running(compared.baseline, workload, scratch / "off",
                            OUT / "logs" / "off.log") as off, \
            new_progress(console) as progress:
        task = progress.add_task(f"{compared.pair}, side by side", total=ROUNDS + 2)
        for running in (on, off):
            running.wait_ready()
            loadgen.run(running.infer_url, script, CONNECTIONS, 3)  # warm-up
            progress.advance(task)
        for _ in range(ROUNDS):
            rounds.append(one_round(on, off, script))
            progress.advance(task)
    cost = statistics.median(r["cost"] for r in rounds)
    table = Table(title=f"metering cost, digits, {CONNECTIONS} conns each, {ROUNDS} rounds")
    for column in HEADER:
        table.add_column(column, justify="right")
    for i, r in enumerate(rounds, 1):
        table.add_row(*_cells(i, r))
    console.print(table)
    console.print(f"{compared.result}: {100 * cost:.2f} % (median round; the metering target "
                  f"is <= 3 %); {_where(rounds)}")
    OUT.mkdir(parents=True, exist_ok=True)
    chart = OUT / f"{compared.name}.png"
    _chart(rounds, cost, chart, compared)
    _publish(rounds, cost, compared, chart)
    return 0


# loop: the main thread (the event loop); the rest of a server's CPU is its other threads
# (engine workers, and with metering on the ledger writer)
# batch: requests per batch (one row each), from the server's /metrics; a server whose
# batches are smaller pays the per-batch work over fewer requests
HEADER = ("round", "on req/s", "off req/s", "on CPU µs/req", "off CPU µs/req", "on loop µs/req",
          "off loop µs/req", "on batch", "off batch", "cost")


def _cells(i: int | str, r: dict[str, float]) -> list[str]:
    return [str(i), f"{r['on_rps']:,.0f}", f"{r['off_rps']:,.0f}", f"{r['on_us']:.1f}",
            f"{r['off_us']:.1f}", f"{r['on_loop_us']:.1f}", f"{r['off_loop_us']:.1f}",
            f"{r['on_batch']:.1f}", f"{r['off_batch']:.1f}", f"{100 * r['cost']:.1f} %"]


def _where(rounds: list[dict[str, float]]) -> str:
    """The on server's extra CPU per request on its event loop and on its other threads."""
    loop = statistics.median(r["on_loop_us"] - r["off_loop_us"] for r in rounds)
    rest = statistics.median((r["on_us"] - r["on_loop_us"]) - (r["off_us"] - r["off_loop_us"])
                             for r in rounds)
    return f"event loop {loop:+.2f} µs/req, other threads {rest:+.2f} µs/req"


def _chart(rounds: list[dict[str, float]], cost: float, path: Path,
           compared: Comparison) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(1, len(rounds) + 1), [100 * r["cost"] for r in rounds], color="#4878a8")
    ax.axhline(100 * cost, color="black", linewidth=1, label=f"median {100 * cost:.2f} %")
    if compared.name == "metering":
        ax.axhline(100 * TARGET, color="#c44e52", linestyle="--", label="target 3 %")
    ax.set_xlabel("round (both servers loaded at once)")
    ax.set_ylabel("1 - off/on CPU per request, %")
    ax.set_title(compared.pair, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _publish(rounds: list[dict[str, float]], cost: float, compared: Comparison,
             chart: Path) -> None:
    today = date.today().isoformat()
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    lines = [f"| {' | '.join(_cells(i, r))} |" for i, r in enumerate(rounds, 1)]
    spread = (f"rounds from {100 * min(r['cost'] for r in rounds):.1f} to "
              f"{100 * max(r['cost'] for r in rounds):.1f} %")
    if compared.name == "metering":
        verdict = "PASS" if cost <= TARGET else "FAIL"
        result = (f"Metering cost: **{100 * cost:.2f} %** (median round; target <= 3 %): "
                  f"**{verdict}**.")
    elif compared.name == "metering-control":
        result = (f"Control: **{100 * cost:.2f} %** (median round) where the true difference "
                  f"is 0; {spread}.")
    else:
        result = (f"{compared.result}: **{100 * cost:+.2f} %** (median round) of the on "
                  f"server's CPU per request (negative: {compared.cheaper}); {spread}.")
    result += f" Where (on - off, median round): {_where(rounds)}."
    section = "\n".join([
        f"## Metering cost, side by side{', ' + compared.title if compared.title else ''}, "
        f"{today}",
        "",
        f"- Command: `.venv/bin/python bench/metering.py{compared.option}` "
        f"({compared.pair}, both servers "
        f"pinned to core 0 and loaded at once, each by `wrk -t1 -c{CONNECTIONS} -d{SECONDS}s` "
        f"on core 1; {ROUNDS} rounds; digits MLP, single-sample JSON; frugalserve "
        f"{git_revision(BENCHMARKS.parent)}). Why side by side: see the module docstring.",
        "- Cost of a round: 1 - (off CPU µs/req) / (on CPU µs/req), each server's CPU time "
        "(all its threads, the ledger writer's included) over the requests it served. Loop: "
        "the main thread's (the event loop's) share of it; the rest is the other threads "
        "(engine worker; ledger writer).",
        f"- Chart: `bench/out/{chart.name}`",
        "",
        f"| {' | '.join(HEADER)} |",
        "|" + "---:|" * len(HEADER),
        *lines,
        f"| median | {' | '.join(_cells('', median)[1:])} |",
        "",
        result,
    ])
    report.update_benchmarks_md(BENCHMARKS, today, section, name=(
        "metering-bench" if compared.name == "metering" else compared.name))


if __name__ == "__main__":
    sys.exit(main())
