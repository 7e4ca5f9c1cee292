"""What the meter bills as compute: the worker's wall time around `predict`, against the worker
thread's own CPU time over the same call.

The meter prices a batch by the wall time its predict call took. With one intra-op thread the
engine computes on the worker thread, so wall - thread CPU is time spent not computing: mostly
waiting for the GIL while the event loop (or another stage's worker) holds it. This measures
that gap under a 64-connection load on one model alone and on the Fashion-MNIST cascade plan.

One command (after `bench/optimizer.py --workloads fashion` built the repository):
`.venv/bin/python bench/compute_time.py`.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import report

from frugalserve import loadgen
from frugalserve.app import ServerSettings, ServerThread
from frugalserve.economics.ledger import sqlite_url
from frugalserve.replay import request_bodies
from frugalserve.serving import batcher
from frugalserve.v2_client import infer_url
from frugalserve.workloads import fashion_mnist

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE / "out" / "optimizer" / "fashion" / "repository"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
REQUESTS = 10_000
CONNECTIONS = 64

samples: dict[str, list[tuple[float, float]]] = defaultdict(list)  # batcher -> (wall, cpu)


def _timed_worker(self: batcher.Batcher) -> None:
    """Batcher._worker with the thread's CPU time taken beside the wall time it bills."""
    while (batch := self._work.get()) is not None:
        items = batch.items
        feeds = items[0].inputs if len(items) == 1 else {
            n: np.concatenate([it.inputs[n] for it in items]) for n in items[0].inputs}
        batch.started_at = time.time()
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            batch.outputs = self.predict(feeds)
        except Exception as exc:  # noqa: BLE001 - as the real worker does
            batch.error = exc
        batch.compute_s = time.perf_counter() - t0
        samples[self.name].append((batch.compute_s, time.thread_time() - c0))
        self._loop.call_soon_threadsafe(self._complete, batch)


def measure(repository: Path, model: str, bodies: list[bytes]) -> dict[str, tuple]:
    samples.clear()
    ledger = sqlite_url(repository.parent / "compute-time.db")
    with ServerThread(ServerSettings(repository, ledger, poll_interval_s=None)) as server:
        loadgen.run(loadgen.LoadSpec(infer_url(server.url, model), bodies,
                                     concurrency=CONNECTIONS, duration_s=None,
                                     requests=REQUESTS, label=model))
    out = {}
    for name, pairs in samples.items():
        walls, cpus = zip(*pairs, strict=True)
        out[name] = (len(pairs), statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3,
                     sum(walls) / sum(cpus))
    return out


def main() -> int:
    if not (REPOSITORY / "fmnist-cnn" / "plan.yaml").exists():
        print(f"{REPOSITORY}: run `bench/optimizer.py --workloads fashion` first")
        return 1
    batcher.Batcher._worker = _timed_worker
    bodies = request_bodies("X", fashion_mnist.load().test.x)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        alone = Path(tmp) / "alone" / "repository"
        shutil.copytree(REPOSITORY / "fmnist-logreg", alone / "fmnist-logreg",
                        ignore=shutil.ignore_patterns("variants", "plan.yaml", "*.png"))
        for setting, repo, model in (("fmnist-logreg alone", alone, "fmnist-logreg"),
                                     ("cascade plan", REPOSITORY, "fmnist-cnn")):
            for name, (n, wall, cpu, ratio) in sorted(measure(repo, model, bodies).items()):
                rows.append([setting, name, f"{n:,}", f"{wall:.3f}", f"{cpu:.3f}",
                             f"{ratio:.2f}x"])
    header = ["setting", "batcher", "batches", "median wall ms", "median thread CPU ms",
              "sum wall / sum CPU"]
    from rich.console import Console

    Console().print(report.rich_table("billed compute vs the worker's CPU", header, rows))
    section = "\n".join([
        f"## Billed compute time vs thread CPU, {date.today().isoformat()}", "",
        "- Command: `.venv/bin/python bench/compute_time.py` (Fashion-MNIST test images, "
        f"{REQUESTS:,} single-row requests, {CONNECTIONS} connections; baseline: the worker "
        "thread's CPU time over the same predict calls)", "",
        report.markdown_table(header, rows), "",
        "Wall time beyond the thread's CPU is waiting (mostly for the GIL); the meter bills it.",
    ])
    report.update_benchmarks_md(BENCHMARKS, date.today().isoformat(), section,
                                name="compute-time-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
