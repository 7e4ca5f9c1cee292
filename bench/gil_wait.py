"""What a worker's predict call costs beside other Python work: wall time and the worker
thread's own CPU time, for a small ONNX model at batch 32.

Three placements, each in a process of its own:
- alone: the predict thread alone, on one core (the baseline);
- one core: beside a busy Python thread on the same core, as a server's worker beside its
  event loop (frugalserve serve pinned to one core);
- two cores: beside a busy Python thread that runs on the other core, as a server on a thread
  of its load generator's process (how replays ran before server_process.ServerProcess).

The meter bills a single-threaded engine its thread CPU time (economics/meter.py); this shows
how far wall time, and with two cores even that CPU time, drift from the call alone.

One command: `.venv/bin/python bench/gil_wait.py`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import report
from rich.console import Console

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
CALLS = 2000
ROWS = 32
PLACEMENTS = {"alone": ({0}, False), "one core": ({0}, True), "two cores": ({0, 1}, True)}


def _model(folder: Path) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from frugalserve.workloads.onnx_export import export_classifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    return export_classifier(LogisticRegression(max_iter=300).fit(x, y), x, folder, "digits")


def measure(model: Path, busy: bool) -> dict[str, float]:
    """In this process: CALLS predict calls, beside a busy Python thread when `busy`."""
    from frugalserve.runtimes.onnx import OnnxRuntime

    runtime = OnnxRuntime(model, {})
    feeds = {"X": np.random.default_rng(0).random((ROWS, 64), dtype=np.float32)}
    runtime.predict(feeds)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin)
    if busy:
        spinner.start()
    walls, cpus = [], []
    for _ in range(CALLS):
        t0, c0 = time.perf_counter(), time.thread_time()
        runtime.predict(feeds)
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - t0)
    stop.set()
    if busy:
        spinner.join()
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3,
            "wall_over_cpu": sum(walls) / sum(cpus)}


def _chart(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, key, label in ((-0.2, "wall_ms", "wall"), (0.2, "cpu_ms", "thread CPU")):
        ax.bar(xs + offset, [results[n][key] for n in names], 0.4, label=label)
    ax.set_xticks(xs, names)
    ax.set_yscale("log")
    ax.set_ylabel(f"median ms per predict (batch {ROWS})")
    ax.set_title("a predict call beside other Python work")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":  # a child: one placement
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3] == "busy")))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two cores")
        return 2
    console = Console()
    results = {}
    with tempfile.TemporaryDirectory() as tmp, console.status("measuring") as status:
        model = _model(Path(tmp))
        for name, (cores, busy) in PLACEMENTS.items():
            status.update(f"measuring: {name}")
            child = subprocess.Popen([sys.executable, __file__, "--measure", str(model),
                                      "busy" if busy else "idle"], stdout=subprocess.PIPE)
            os.sched_setaffinity(child.pid, cores)
            out, _ = child.communicate()
            if child.returncode:
                raise RuntimeError(f"{name}: the measuring process failed")
            results[name] = json.loads(out)
    base = results["alone"]["cpu_ms"]
    header = ["placement", "median wall ms", "median thread CPU ms", "sum wall / sum CPU",
              "CPU vs alone"]
    rows = [[name, f"{r['wall_ms']:.4f}", f"{r['cpu_ms']:.4f}", f"{r['wall_over_cpu']:.2f}x",
             f"{r['cpu_ms'] / base:.2f}x"] for name, r in results.items()]
    console.print(report.rich_table("a predict call beside other Python work", header, rows))
    OUT.mkdir(parents=True, exist_ok=True)
    _chart(results, OUT / "gil_wait.png")
    today = date.today().isoformat()
    section = "\n".join([
        f"## A predict call beside other Python work, {today}", "",
        f"- Command: `.venv/bin/python bench/gil_wait.py` (logistic regression on load_digits "
        f"as ONNX, one intra-op thread, {CALLS:,} calls at batch {ROWS}; baseline: the same "
        "calls alone on one core). Chart: `bench/out/gil_wait.png`", "",
        report.markdown_table(header, rows), "",
        "- one core: a server's worker beside its event loop. Wall time there holds waits for "
        "the GIL and the core; the meter bills the thread CPU time instead.",
        "- two cores: a server on a thread of its load generator's process. The waiting "
        "thread burns CPU itself, so the server runs in a process of its own "
        "(frugalserve/server_process.py) for every replay, the demo and the benchmarks.",
    ])
    report.update_benchmarks_md(BENCHMARKS, today, section, name="gil-wait-bench")
    console.print("chart: bench/out/gil_wait.png; BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
