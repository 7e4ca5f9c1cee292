"""What metering adds to the event loop's work per batch: ServedVersion._finish of a metered
and an unmetered server, called in turn over identical batches in one process.

bench/metering.py reads the whole cost of metering (loop, ledger writer, and whatever they do
to each other) side by side under load, to about a point. This reads only the loop's own
metering work, to a fraction of a microsecond: both servers are built in one process from
the same model, BATCHES batches of each size are made for each (single-sample JSON requests,
decoded as the server decodes them), and the two servers' `_finish` calls alternate, each
timed alone with the cyclic GC paused. The result per size is the median call, on and off,
and their difference.

`--against REV` measures the same in a process running git revision REV's `frugalserve/`,
in turn with this tree's (WORKERS processes each), and sets the two differences side by
side: what a change to the loop's metering saves, measured the same way.

One command: `.venv/bin/python bench/metering_loop.py` (or `--against REV`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import uvloop
import workloads
from machine import git_revision, source_at
from report import update_benchmarks_md
from rich.console import Console
from rich.table import Table

# a worker imports these from the revision on its PYTHONPATH (--against), the parent from the
# tree
from frugalserve.app import ServerSettings, build_dataplane
from frugalserve.progress import new_progress
from frugalserve.protocols.v2_codec import decode_request
from frugalserve.serving.batcher import Batch, Pending

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
SIZES = (1, 8, 33, 64)  # requests per batch (33: the batch bench/metering.py's servers cut)
BATCHES = 200  # per size, server and repetition
REPEATS = 10
WORKERS = 3  # processes per source with --against, taken in turn


def _measure(scratch: Path) -> dict[int, dict[str, float]]:
    """In this process (whichever frugalserve it imports): median µs of one _finish call per
    batch size, metered ("on") and not ("off")."""
    digits = workloads.digits(OUT / "models")
    workload, body = digits.name, digits.body()

    def repository(key: str) -> Path:
        version = scratch / key / workload / "1"
        version.mkdir(parents=True)
        shutil.copy(digits.onnx_path, version / "model.onnx")
        (version.parent / "config.yaml").write_text(
            f"batching: {{max_batch_size: {max(SIZES)}, max_queue_delay_ms: 2}}\n"
            "device: {type: aws-c7i.large, share: 0.5}\n")
        return scratch / key

    async def run() -> dict[int, dict[str, float]]:
        loop = asyncio.get_running_loop()
        planes = {
            "on": build_dataplane(ServerSettings(repository("on"), poll_interval_s=None,
                                                 ledger_url=f"sqlite:///{scratch}/ledger.db")),
            "off": build_dataplane(ServerSettings(repository("off"), metering=False,
                                                  poll_interval_s=None)),
        }
        for plane in planes.values():
            await plane.start()
        served = {key: plane._resolve(workload, None) for key, plane in planes.items()}
        reference = served["on"]
        outputs = reference.loaded.runtime.predict(reference.example_inputs(max(SIZES)))

        def batch(size: int) -> Batch:
            items = []
            for _ in range(size):
                request, _ = decode_request(body, None, workload, None, "anonymous")
                items.append(Pending(request.inputs, 1, time.perf_counter(), 0.0, None,
                                     loop.create_future(), request))
            return Batch(items, size, time.perf_counter(), time.time(), 4e-4, 4e-4,
                         {k: v[:size] for k, v in outputs.items()})

        results = {}
        for size in SIZES:
            calls: dict[str, list[int]] = {"on": [], "off": []}
            for _ in range(REPEATS):
                made = {key: [batch(size) for _ in range(BATCHES)] for key in calls}
                gc.collect()
                gc.disable()
                try:
                    for i in range(BATCHES):
                        for key in ("on", "off") if i % 2 else ("off", "on"):
                            finish, b = served[key]._finish, made[key][i]
                            t0 = time.perf_counter_ns()
                            finish("reference", b)
                            calls[key].append(time.perf_counter_ns() - t0)
                finally:
                    gc.enable()
                planes["on"].ledger.log.take()  # the writer's work: not the loop's
            results[size] = {key: statistics.median(ns) / 1000 for key, ns in calls.items()}
        for plane in planes.values():
            await plane.stop()
        return results

    return uvloop.run(run())


def _worker(source: Path | None) -> dict[int, dict[str, float]]:
    """_measure in a fresh process importing frugalserve from `source` (None: this tree)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    done = subprocess.run([sys.executable, __file__, "--worker"], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"worker failed:\n{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def _metering(runs: list[dict[int, dict[str, float]]], size: int) -> float:
    """Median over worker processes of on - off, µs per batch."""
    return statistics.median(r[size]["on"] - r[size]["off"] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV",
                        help="also measure git revision REV, in turn with this tree")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="frugalserve-meterloop-") as scratch:
            print(json.dumps(_measure(Path(scratch))))
        return 0
    console = Console()
    workloads.digits(OUT / "models")  # trained once here, not in each worker
    scratch = Path(tempfile.mkdtemp(prefix="frugalserve-meterloop-"))
    sources: dict[str, Path | None] = {"tree": None}
    if args.against:
        sources[args.against] = source_at(ROOT, args.against, scratch / "against")
    runs: dict[str, list] = {label: [] for label in sources}
    workers = WORKERS if args.against else 1
    with new_progress(console) as progress:
        task = progress.add_task("metered and unmetered _finish, in turn",
                                 total=workers * len(sources))
        for _ in range(workers):
            for label, source in sources.items():
                runs[label].append(_worker(source))
                progress.advance(task)
    table = Table(title="metering's work on the event loop, per batch (median _finish call)")
    for column in _header(args.against):
        table.add_column(column, justify="right")
    rows = [_row(size, runs, args.against) for size in SIZES]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    chart = OUT / ("metering_loop_against.png" if args.against else "metering_loop.png")
    _chart(runs, chart)
    _publish(rows, args.against, chart)
    return 0


def _header(against: str | None) -> list[str]:
    if against:
        return ["requests per batch", "tree on − off µs/batch", f"{against} on − off µs/batch",
                "tree µs/request", f"{against} µs/request", "saved µs/request"]
    return ["requests per batch", "on µs/batch", "off µs/batch", "on − off µs/batch",
            "on − off µs/request"]


def _row(size: int, runs: dict[str, list], against: str | None) -> list[str]:
    tree = _metering(runs["tree"], size)
    if against:
        other = _metering(runs[against], size)
        return [str(size), f"{tree:.2f}", f"{other:.2f}", f"{tree / size:.3f}",
                f"{other / size:.3f}", f"{(other - tree) / size:+.3f}"]
    only = runs["tree"][0][size]
    return [str(size), f"{only['on']:.2f}", f"{only['off']:.2f}", f"{tree:.2f}",
            f"{tree / size:.3f}"]


def _chart(runs: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(runs)
    for i, (label, results) in enumerate(runs.items()):
        ax.bar([s + (i - (len(runs) - 1) / 2) * width for s in range(len(SIZES))],
               [_metering(results, size) / size for size in SIZES], width, label=label)
    ax.set_xticks(range(len(SIZES)), [str(s) for s in SIZES])
    ax.set_xlabel("requests per batch")
    ax.set_ylabel("metering on the loop, µs/request")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _publish(rows: list[list[str]], against: str | None, chart: Path) -> None:
    today = date.today().isoformat()
    option = f" --against {against}" if against else ""
    header = _header(against)
    section = "\n".join([
        f"## Metering on the event loop, per batch{', tree against ' + against if against else ''}"
        f", {today}",
        "",
        f"- Command: `.venv/bin/python bench/metering_loop.py{option}` (frugalserve "
        f"{git_revision(ROOT)}; digits MLP, single-sample JSON requests; a metered and an "
        f"unmetered server's `ServedVersion._finish` called in turn, {REPEATS} x {BATCHES} "
        f"batches of each size, cyclic GC paused; median call"
        + (f"; {WORKERS} processes per source, in turn, median of their differences)"
           if against else ")") + ".",
        f"- Chart: `bench/out/{chart.name}`",
        "",
        f"| {' | '.join(header)} |",
        "|" + "---:|" * len(header),
        *(f"| {' | '.join(row)} |" for row in rows),
    ])
    update_benchmarks_md(ROOT / "BENCHMARKS.md", today, section,
                         name="metering-loop-against" if against else "metering-loop")


if __name__ == "__main__":
    sys.exit(main())
