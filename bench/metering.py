"""What metering costs: frugalserve with metering on and off, loaded side by side.

Both servers are pinned to core 0 and loaded at the same time, each by its own wrk (64
connections, both on core 1), for ROUNDS rounds of SECONDS. Each round's cost is 1 - (CPU
seconds per request, off) / (CPU seconds per request, on), each server's CPU from /proc: a
saturated server's throughput is the inverse of its CPU per request, so this is the
throughput cost, taken where both servers see the same machine at the same moment. Runs one
after another do not: a server's CPU per request moves by more than the effect between
consecutive rounds (36 to 66 µs in the run BENCHMARKS.md records), while the cost of each
round moves far less.

The two places are not alike: the server started first, whose load also starts first in each
round, can pay a point more by itself (two unmetered servers read +1.03 % at 40be2fa). So the
servers swap places halfway: ROUNDS / 2 rounds with the on server first, then both are
restarted in the other order for ROUNDS / 2 more. The result is the mean of the two halves'
medians, in which a place's own cost cancels; half their difference is that cost.

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
import contextlib
import statistics
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
from machine import git_revision, source_at
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


def one_round(running: dict[str, servers.Running], first: str, script: Path,
              flush_s: float) -> dict[str, float]:
    """Both servers loaded at once, `first`'s load started first; the CPU per request of each.
    flush_s: the longer of their ledger flush intervals."""
    on, off = running["on"], running["off"]
    results: dict[str, loadgen.WrkResult] = {}
    counted = {"on": on.counters(), "off": off.counters()}
    before = {"on": on.cpu_seconds(), "off": off.cpu_seconds()}
    loop_before = {"on": on.cpu_seconds(True), "off": off.cpu_seconds(True)}

    def load(key: str) -> None:
        results[key] = loadgen.run(running[key].infer_url, script, CONNECTIONS, SECONDS)

    threads = [threading.Thread(target=load, args=(key,)) for key in _places(first)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the writers' last flush of the round, in its CPU: a write the round held back (the
    # ledger's child process idles while its core is busy) goes once the core is free, and
    # the round's last records with the flush after it
    time.sleep(2 * flush_s + 0.2)
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
    row["first"] = first
    for key, running in (("on", on), ("off", off)):  # after the CPU readings: not in them
        now = running.counters()
        row[f"{key}_batch"] = ((now["requests"] - counted[key]["requests"])
                               / max(1.0, now["batches"] - counted[key]["batches"]))
    return row


def half(compared: Comparison, first: str, workload: workloads.Workload, scratch: Path,
         script: Path, advance) -> list[dict]:
    """ROUNDS / 2 rounds with `first` ("on" or "off") in the first place: its server started
    first and, in every round, its load started first. A place can cost a point by itself
    (the control read +1.03 % at 40be2fa, all in the event loop), so each server takes each
    place for half the rounds, and the result is the mean of the two halves' medians."""
    spec = {"on": compared.subject, "off": compared.baseline}
    with contextlib.ExitStack() as stack:
        running = {key: stack.enter_context(servers.Running(
            spec[key], workload, scratch / key, OUT / "logs" / f"{key}-{first}-first.log"))
            for key in _places(first)}
        for key in _places(first):
            running[key].wait_ready()
            loadgen.run(running[key].infer_url, script, CONNECTIONS, 3)  # warm-up
            advance()
        rounds = []
        for _ in range(ROUNDS // 2):
            rounds.append(one_round(running, first, script, compared.flush_s))
            advance()
    return rounds


def _interval(text: str) -> float:
    """A flush interval the server accepts (0 read as no option at all, measuring plain
    metering under --flush-against's name)."""
    seconds = float(text)
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"a number of seconds in (0, 86400], not {text}")
    return seconds


def _places(first: str) -> tuple[str, str]:
    return (first, "off" if first == "on" else "on")


def _halves(rounds: list[dict], value=lambda r: r["cost"]) -> dict[str, float]:
    """The median of `value` over the rounds with each server first."""
    return {first: statistics.median(value(r) for r in rounds if r["first"] == first)
            for first in ("on", "off")}


def _balanced(rounds: list[dict], value=lambda r: r["cost"]) -> float:
    """The mean of the two halves' medians: a place's own cost cancels out."""
    return statistics.mean(_halves(rounds, value).values())


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
    flush_s: float = FLUSH_INTERVAL_S  # the longer of the two servers' ledger flush intervals


def comparison(control: bool, against: str | None, flush_against: float | None,
               scratch: Path) -> Comparison:
    if flush_against is not None:
        default = f"{FLUSH_INTERVAL_S:g} s"
        return Comparison("metering-flush", f" --flush-against {flush_against:g}",
                          servers.FRUGAL, servers.frugalserve_flushing(flush_against),
                          f"both metered: ledger flushes every {default} on, every "
                          f"{flush_against:g} s off", f"flush interval {default} against "
                          f"{flush_against:g} s", f"Flushing every {default} against every "
                          f"{flush_against:g} s", f"flushing every {default} is cheaper",
                          max(FLUSH_INTERVAL_S, flush_against))
    if against:
        source = source_at(BENCHMARKS.parent, against, scratch / "against")
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
    which.add_argument("--flush-against", metavar="S", type=_interval,
                       help="the metered server at the default ledger flush interval beside "
                            "one flushing every S seconds")
    args = parser.parse_args()
    console = Console()
    workload = workloads.digits(OUT / "models")
    scratch = Path(tempfile.mkdtemp(prefix="frugalserve-metering-"))
    script = loadgen.write_script(workload.body(), scratch / "digits.lua")
    compared = comparison(args.control, args.against, args.flush_against, scratch)
    rounds: list[dict] = []
    with new_progress(console) as progress:
        task = progress.add_task(f"{compared.pair}, side by side", total=ROUNDS + 4)
        for first in ("on", "off"):
            rounds += half(compared, first, workload, scratch / f"{first}-first", script,
                           lambda: progress.advance(task))
    cost = _balanced(rounds)
    table = Table(title=f"metering cost, digits, {CONNECTIONS} conns each, {ROUNDS} rounds")
    for column in HEADER:
        table.add_column(column, justify="right")
    for i, r in enumerate(rounds, 1):
        table.add_row(*_cells(i, r))
    console.print(table)
    console.print(f"{compared.result}: {100 * cost:.2f} % ({_reading(rounds)}; the metering "
                  f"target is <= 3 %); {_where(rounds)}")
    OUT.mkdir(parents=True, exist_ok=True)
    chart = OUT / f"{compared.name}.png"
    _chart(rounds, cost, chart, compared)
    _publish(rounds, cost, compared, chart)
    return 0


# loop: the main thread (the event loop); the rest of a server's CPU is its other threads
# (engine workers, and with metering on the ledger writer's) and its ledger writer process
# batch: requests per batch (one row each), from the server's /metrics; a server whose
# batches are smaller pays the per-batch work over fewer requests
# first: the server in the first place (started first, its load started first each round)
HEADER = ("round", "first", "on req/s", "off req/s", "on CPU µs/req", "off CPU µs/req",
          "on loop µs/req", "off loop µs/req", "on batch", "off batch", "cost")


def _cells(i: int | str, r: dict) -> list[str]:
    return [str(i), r["first"], f"{r['on_rps']:,.0f}", f"{r['off_rps']:,.0f}", f"{r['on_us']:.1f}",
            f"{r['off_us']:.1f}", f"{r['on_loop_us']:.1f}", f"{r['off_loop_us']:.1f}",
            f"{r['on_batch']:.1f}", f"{r['off_batch']:.1f}", f"{100 * r['cost']:.1f} %"]


def _reading(rounds: list[dict]) -> str:
    """How the result was read: each half's median and the place's own cost between them."""
    halves = _halves(rounds)
    return (f"mean of the halves' medians: {100 * halves['on']:.2f} % with on first, "
            f"{100 * halves['off']:.2f} % with off first; the first place's own cost "
            f"{50 * (halves['on'] - halves['off']):+.2f} %")


def _where(rounds: list[dict]) -> str:
    """The on server's extra CPU per request on its event loop and on its other threads."""
    loop = _balanced(rounds, lambda r: r["on_loop_us"] - r["off_loop_us"])
    rest = _balanced(rounds, lambda r: (r["on_us"] - r["on_loop_us"])
                     - (r["off_us"] - r["off_loop_us"]))
    return f"event loop {loop:+.2f} µs/req, other threads {rest:+.2f} µs/req"


def _chart(rounds: list[dict[str, float]], cost: float, path: Path,
           compared: Comparison) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for first, color in (("on", "#4878a8"), ("off", "#dd8452")):
        places = [(i, 100 * r["cost"]) for i, r in enumerate(rounds, 1) if r["first"] == first]
        ax.bar(*zip(*places, strict=True), color=color, label=f"{first} first")
    ax.axhline(100 * cost, color="black", linewidth=1,
               label=f"result {100 * cost:.2f} % (mean of the halves' medians)")
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
    median = {"first": "", **{k: statistics.median(r[k] for r in rounds)
                              for k in rounds[0] if k != "first"}}
    lines = [f"| {' | '.join(_cells(i, r))} |" for i, r in enumerate(rounds, 1)]
    spread = (f"rounds from {100 * min(r['cost'] for r in rounds):.1f} to "
              f"{100 * max(r['cost'] for r in rounds):.1f} %")
    if compared.name == "metering":
        verdict = "PASS" if cost <= TARGET else "FAIL"
        result = f"Metering cost: **{100 * cost:.2f} %** (target <= 3 %): **{verdict}**."
    elif compared.name == "metering-control":
        result = f"Control: **{100 * cost:.2f} %** where the true difference is 0."
    else:
        result = (f"{compared.result}: **{100 * cost:+.2f} %** of the on server's CPU per "
                  f"request (negative: {compared.cheaper}).")
    result += (f" Read as the {_reading(rounds)}; {spread}. Where (on - off, read the same "
               f"way): {_where(rounds)}.")
    section = "\n".join([
        f"## Metering cost, side by side{', ' + compared.title if compared.title else ''}, "
        f"{today}",
        "",
        f"- Command: `.venv/bin/python bench/metering.py{compared.option}` "
        f"({compared.pair}, both servers "
        f"pinned to core 0 and loaded at once, each by `wrk -t1 -c{CONNECTIONS} -d{SECONDS}s` "
        f"on core 1; {ROUNDS} rounds, half with each server in the first place; digits MLP, "
        f"single-sample JSON; frugalserve "
        f"{git_revision(BENCHMARKS.parent)}). Why side by side: see the module docstring.",
        "- Cost of a round: 1 - (off CPU µs/req) / (on CPU µs/req), each server's CPU time "
        "(all its threads and its ledger writer process) over the requests it served. Loop: "
        "the main thread's (the event loop's) share of it; the rest is the other threads "
        "(engine worker; ledger writer) and the ledger writer process.",
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
