"""Serving benchmark: frugalserve against a naive FastAPI server, MLServer, the bare-ASGI HTTP
ceiling and raw onnxruntime, measured side by side in one run on the same models and load.

    .venv/bin/python bench/serving.py [--duration 10] [--quick] [--skip-mlserver]

Each server runs alone, pinned to core 0; wrk runs pinned to core 1 and sends single-sample V2
JSON requests over 1, 8 and 64 connections (for the compute-bound model, frugalserve also gets
the same request in V2's binary tensor extension, as Triton's client sends it). Writes
bench/out/serving.{json,png}, logs under bench/out/logs/, and (except --quick) a dated section
in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

import engine
import loadgen
import machine
import numpy as np
import onnxruntime
import orjson
import report
import servers
import workloads
from deps import ensure_fastapi, ensure_mlserver, ensure_torch, ensure_wrk
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

ROOT = servers.BENCH.parent
OUT = servers.BENCH / "out"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
CONNECTIONS = (1, 8, 64)
COMPUTE_BOUND_CONNECTIONS = (64,)
BUSY_THRESHOLD = 0.15  # others using more of an idle core than this: wait before starting
OTHERS_LIMIT = 0.05  # others using more of core 0 than this during a run: note it
START_ESTIMATE_S = 2.5  # progress-bar estimate of a server's start-up


@dataclass(frozen=True)
class Options:
    duration_s: int  # wrk takes whole seconds
    warmup_s: int
    engine_s: float  # per batch size
    quiet_wait_s: float  # longest wait for the cores to be idle before each server
    skip_mlserver: bool
    quick: bool


@dataclass(frozen=True)
class Scenario:
    workload: workloads.Workload
    servers: tuple[servers.Server, ...]
    connections: tuple[int, ...]

    def server_s(self, options: Options) -> float:
        """Planned seconds for one server, for the progress bar."""
        return (START_ESTIMATE_S + options.warmup_s
                + len(self.connections) * (options.duration_s + 0.5))

    def planned_s(self, options: Options) -> float:
        return len(self.servers) * self.server_s(options) + engine_planned_s(options)


def engine_planned_s(options: Options) -> float:
    return len(engine.BATCH_SIZES) * options.engine_s + 1.0


def parse_options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per wrk run (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="short runs, no MLServer, no BENCHMARKS.md: a smoke test")
    parser.add_argument("--skip-mlserver", action="store_true", help="leave MLServer out")
    args = parser.parse_args(argv)
    if args.quick:
        return Options(min(args.duration, 1), 1, 0.2, 1.0, True, True)
    if args.duration < 1:
        parser.error("--duration must be at least 1 (second)")
    return Options(args.duration, 3, 1.0, 20.0, args.skip_mlserver, False)


def plan(small: workloads.Workload, large: workloads.Workload,
         options: Options) -> list[Scenario]:
    peers = () if options.skip_mlserver else (servers.MLSERVER,)
    return [
        Scenario(small, (servers.FRUGAL, servers.FRUGAL_OFF, servers.NAIVE, *peers,
                         servers.BARE), CONNECTIONS),
        Scenario(large, (servers.FRUGAL, servers.FRUGAL_BINARY, servers.NAIVE, *peers,
                         servers.BARE),
                 COMPUTE_BOUND_CONNECTIONS),
    ]


class Bench:
    """Runs the scenarios under one Rich progress bar and collects the results."""

    def __init__(self, options: Options, results: report.Results, progress: Progress,
                 scratch: Path):
        self.options, self.results, self.progress = options, results, progress
        self.scratch = scratch
        self.task: TaskID = progress.add_task("starting", total=None)

    def run(self, scenarios: list[Scenario]) -> None:
        total = sum(s.planned_s(self.options) for s in scenarios)
        self.progress.update(self.task, total=total)
        for scenario in scenarios:
            self._engine(scenario)
            wl = scenario.workload
            script = loadgen.write_script(wl.body(), self.scratch / f"{wl.name}.lua")
            binary = None
            if any(server.binary for server in scenario.servers):
                binary = loadgen.write_binary_script(*wl.binary_body(),
                                                     self.scratch / f"{wl.name}-binary.lua")
            for server in scenario.servers:
                self._server(scenario, server, binary if server.binary and binary else script)
        self.progress.update(self.task, description="done", completed=total)

    def _step(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def _advance(self, seconds: float) -> None:
        self.progress.advance(self.task, seconds)

    def _engine(self, scenario: Scenario) -> None:
        wl = scenario.workload
        self._step(f"{wl.name} · onnxruntime in-process, batch 1..{max(engine.BATCH_SIZES)}")
        self.results.engines[wl.name] = engine.measure(wl.onnx_path, self.options.engine_s,
                                                       servers.SERVER_CORE)
        self._advance(engine_planned_s(self.options))

    def _wait_quiet(self, what: str) -> None:
        """Give other processes' bursts a chance to pass; `others` in each run says if not."""
        self._step(f"{what}: waiting for idle cores")
        busy = machine.wait_quiet((servers.SERVER_CORE, loadgen.WRK_CORE), BUSY_THRESHOLD,
                                  self.options.quiet_wait_s)
        if max(busy.values()) > BUSY_THRESHOLD:
            self.progress.console.log(
                f"[yellow]{what}: starting although other processes use the cores "
                f"({', '.join(f'core {c} {100 * b:.0f}%' for c, b in busy.items())})")

    def _server(self, scenario: Scenario, server: servers.Server, script: Path) -> None:
        wl, options = scenario.workload, self.options
        runs = [report.Run(wl.name, server.key, server.label, c) for c in scenario.connections]
        self.results.runs += runs
        what = f"{wl.name} · {server.label}"
        done_at = self.progress.tasks[self.task].completed + scenario.server_s(options)
        self._wait_quiet(what)
        name = f"{wl.name}-{server.key}"
        try:
            with servers.Running(server, wl, self.scratch / name,
                                 OUT / "logs" / f"{name}.log") as running:
                self._step(f"{what}: starting")
                running.wait_ready()
                _check_answer(running, wl)
                self._step(f"{what}: warming up")
                self._warm_up(running, script, what)
                self._advance(START_ESTIMATE_S + options.warmup_s)
                for run in runs:
                    self._step(f"{what}: {run.connections} conns")
                    self._measure(running, script, run)
                    self._advance(options.duration_s + 0.5)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            message = f"{what}: {type(exc).__name__}: {exc}"
            for run in runs:
                run.error = run.error or message
            self.results.notes.append(message.splitlines()[0] + " (log: bench/out/logs/"
                                      f"{name}.log)")
            self.progress.console.log(f"[red]{message}")
        self.progress.update(self.task, completed=done_at)

    def _warm_up(self, running: servers.Running, script: Path, what: str) -> None:
        result = loadgen.run(running.infer_url, script, max(CONNECTIONS),
                             self.options.warmup_s)
        if result.non_2xx or result.socket_errors:
            self.progress.console.log(f"[yellow]{what}: warm-up had {result.non_2xx} non-2xx "
                                      f"and {result.socket_errors} socket errors")

    def _measure(self, running: servers.Running, script: Path, run: report.Run) -> None:
        before = Snapshot.take(running)
        run.result = loadgen.run(running.infer_url, script, run.connections,
                                 self.options.duration_s)
        Snapshot.take(running).fill(before, run)
        if run.others_share > OTHERS_LIMIT:
            self._note(f"{run.label}, {run.workload}, {run.connections} conns: other processes "
                       f"used {100 * run.others_share:.0f}% of core 0 during the run")
        if run.failed:
            detail = run.result.socket_error_detail or "no socket errors"
            note = (f"{run.label}, {run.workload}, {run.connections} conns: "
                    f"{run.result.non_2xx} non-2xx responses; {detail}")
            self._note(note)

    def _note(self, note: str) -> None:
        self.results.notes.append(note)
        self.progress.console.log(f"[yellow]{note}")


@dataclass(frozen=True)
class Snapshot:
    """What a server and its core had used at one moment; two of them describe a run."""

    time: float
    cpu_s: float
    core_ticks: dict[int, tuple[int, int]]
    counters: dict[str, float] | None

    @classmethod
    def take(cls, running: servers.Running) -> Snapshot:
        return cls(time.monotonic(), running.cpu_seconds(),
                   machine.core_ticks((servers.SERVER_CORE,)), running.counters())

    def fill(self, before: Snapshot, run: report.Run) -> None:
        wall = self.time - before.time
        run.cpu_share = (self.cpu_s - before.cpu_s) / wall
        busy = machine.busy_between(before.core_ticks, self.core_ticks)[servers.SERVER_CORE]
        run.others_share = max(0.0, busy - run.cpu_share)
        if self.counters is not None and before.counters is not None:
            delta = {name: self.counters[name] - before.counters[name] for name in self.counters}
            run.mean_batch = delta["requests"] / delta["batches"] if delta["batches"] else None
            run.engine_share = delta["busy_seconds"] / wall


def _check_answer(running: servers.Running, wl: workloads.Workload) -> None:
    status, body = servers.post(running.infer_url, wl.body())
    if status != 200 or b'"outputs"' not in body:
        raise RuntimeError(f"{running.server.label} answered {status}: {body[:300]!r}")
    if running.server.binary:
        _check_binary_answer(running, wl, body)


def _check_binary_answer(running: servers.Running, wl: workloads.Workload,
                         json_answer: bytes) -> None:
    """The binary request must get the JSON request's answer: same outputs, same label."""
    payload, header_length = wl.binary_body()
    status, body = servers.post(running.infer_url, payload, headers={
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length)})
    if status != 200:
        raise RuntimeError(f"{running.server.label} answered the binary request {status}: "
                           f"{body[:300]!r}")
    try:
        got = {o["name"]: o for o in orjson.loads(body)["outputs"]}
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{running.server.label}: the binary request's answer is not V2 "
                           f"JSON ({exc}): {body[:300]!r}") from None
    want = {o["name"]: o for o in orjson.loads(json_answer)["outputs"]}
    if got.keys() != want.keys() or got["label"]["data"] != want["label"]["data"] or any(
            not np.allclose(got[n]["data"], want[n]["data"], rtol=1e-4, atol=1e-6)
            for n in want):
        raise RuntimeError(f"{running.server.label}: the binary request's answer differs from "
                           f"the JSON request's: {body[:300]!r} vs {json_answer[:300]!r}")


def _command(argv: list[str]) -> str:
    return " ".join([os.path.relpath(sys.executable, ROOT), "bench/serving.py", *argv])


def _prepare(options: Options, console: Console) -> tuple[str, list[str]]:
    """Install what is missing; returns MLServer's version and notes."""
    with console.status("checking wrk, FastAPI and MLServer (installs what is missing)"):
        ensure_wrk()
        ensure_fastapi()
        if options.skip_mlserver:
            return "skipped", []
        version, note = ensure_mlserver()
    return version, [note] if note else []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _new_results(argv: list[str], options: Options, mlserver_version: str,
                 models: tuple[workloads.Workload, ...], notes: list[str]) -> report.Results:
    now = datetime.now()
    return report.Results(
        date=now.strftime("%Y-%m-%d"), command=_command(argv), machine=machine.describe(ROOT),
        settings={"duration_s": options.duration_s, "warmup_s": options.warmup_s,
                  "engine_s_per_batch": options.engine_s, "quick": options.quick,
                  "started": now.isoformat(timespec="seconds"),
                  "onnxruntime": onnxruntime.__version__, "mlserver": mlserver_version,
                  "models": {w.name: w.description for w in models}},
        notes=notes)


def run_bench(argv: list[str], console: Console) -> int:
    options = parse_options(argv)
    if len(os.sched_getaffinity(0)) < 2:
        console.print("[red]needs two cores: servers on core 0, wrk on core 1")
        return 2
    mlserver_version, notes = _prepare(options, console)
    if note := ensure_torch():
        notes.append(note)
    with console.status("training or loading the models (cached in bench/out/models)"):
        small = workloads.digits(OUT / "models")
    # outside the status spinner: training shows its own progress bar
    large = workloads.fashion_cnn_workload(OUT / "models", console)
    results = _new_results(argv, options, mlserver_version, (small, large), notes)
    os.sched_setaffinity(0, {loadgen.WRK_CORE})  # keep this process off the servers' core
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with (tempfile.TemporaryDirectory(prefix="frugalserve-bench-") as scratch,
          Progress(*columns, console=console, refresh_per_second=4) as progress):
        Bench(options, results, progress, Path(scratch)).run(plan(small, large, options))
    publish(results, small.name, large.name, options, console)
    return 0


def publish(results: report.Results, small: str, large: str, options: Options,
            console: Console) -> None:
    items = report.targets(results, small, large)
    if note := report.ceiling_note(results, large):
        results.notes.append(note)
    for workload in results.workloads():
        title = f"{workload}: {results.settings['models'][workload]}"
        console.print(report.rich_table(title, report.HEADER,
                                        report.table_rows(results, workload)))
    console.print(report.LEGEND, style="dim")
    console.print(report.rich_table("Targets", report.TARGET_HEADER, report.target_rows(items)))
    for note in results.notes:
        console.print(f"[yellow]note:[/] {note}")
    OUT.mkdir(parents=True, exist_ok=True)
    report.write_json(results, items, OUT / "serving.json")
    report.write_chart(results, small, large, OUT / "serving.png")
    written = ["bench/out/serving.json", "bench/out/serving.png"]
    if not options.quick:
        report.update_benchmarks_md(BENCHMARKS_MD, results.date,
                                    report.markdown_section(results, items))
        written.append("BENCHMARKS.md")
    console.print(f"wrote {', '.join(written)}"
                  + (" (a --quick run does not touch BENCHMARKS.md)" if options.quick else ""))


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the tables
        console = Console(width=max(console.width, 120))
    try:
        return run_bench(sys.argv[1:], console)
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 130
    finally:
        servers.stop_all()


if __name__ == "__main__":
    sys.exit(main())
