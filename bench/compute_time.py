"""What the meter bills as compute against the worker's wall time around `predict`.

A batch's wall time holds, besides its computing, waits for the GIL and the core while the
event loop (or another stage's worker) runs. An engine that computes only on its worker thread
(onnxruntime with one intra-op thread) is billed that thread's CPU time instead; this measures
the gap under a 64-connection load on one model alone and on the Fashion-MNIST cascade plan:
how much the meter would overbill if it billed wall time.

One command (after `bench/optimizer.py --workloads fashion` built the repository):
`.venv/bin/python bench/compute_time.py`.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from datetime import date
from pathlib import Path

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

samples: dict[str, list[tuple[float, float]]] = defaultdict(list)  # batcher -> (wall, billed)
_complete = batcher.Batcher._complete


def _recording_complete(self: batcher.Batcher, batch: batcher.Batch) -> None:
    samples[self.name].append((batch.wall_s, batch.compute_s))
    _complete(self, batch)


def measure(repository: Path, model: str, bodies: list[bytes]) -> dict[str, tuple]:
    samples.clear()
    ledger = sqlite_url(repository.parent / "compute-time.db")
    with ServerThread(ServerSettings(repository, ledger, poll_interval_s=None)) as server:
        loadgen.run(loadgen.LoadSpec(infer_url(server.url, model), bodies,
                                     concurrency=CONNECTIONS, duration_s=None,
                                     requests=REQUESTS, label=model))
    out = {}
    for name, pairs in samples.items():
        walls, billed = zip(*pairs, strict=True)
        out[name] = (len(pairs), statistics.median(walls) * 1e3, statistics.median(billed) * 1e3,
                     sum(walls) / sum(billed))
    return out


def main() -> int:
    if not (REPOSITORY / "fmnist-cnn" / "plan.yaml").exists():
        print(f"{REPOSITORY}: run `bench/optimizer.py --workloads fashion` first")
        return 1
    batcher.Batcher._complete = _recording_complete
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
    header = ["setting", "batcher", "batches", "median wall ms", "median billed ms",
              "sum wall / sum billed"]
    from rich.console import Console

    Console().print(report.rich_table("billed compute vs the worker's wall time", header, rows))
    section = "\n".join([
        f"## Billed compute time vs wall time, {date.today().isoformat()}", "",
        "- Command: `.venv/bin/python bench/compute_time.py` (Fashion-MNIST test images, "
        f"{REQUESTS:,} single-row requests, {CONNECTIONS} connections; billed: the worker "
        "thread's CPU time, baseline: the wall time of the same predict calls)", "",
        report.markdown_table(header, rows), "",
        "Wall time beyond the thread's CPU is waiting (mostly for the GIL); the meter does not "
        "bill it.",
    ])
    report.update_benchmarks_md(BENCHMARKS, date.today().isoformat(), section,
                                name="compute-time-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
