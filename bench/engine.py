"""The ceiling: raw onnxruntime in-process, one intra-op thread, pinned to core 0.

Run as a script it measures one model and prints {batch size: samples/s} as JSON; `measure`
runs that script in a pinned child so the parent's own threads never share its core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUNDS = 3  # best of: a round is seconds / ROUNDS of back-to-back runs


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _samples_per_s(session: ort.InferenceSession, batch: np.ndarray, seconds: float) -> float:
    feeds = {session.get_inputs()[0].name: batch}
    for _ in range(5):
        session.run(None, feeds)
    best = 0.0
    for _ in range(ROUNDS):
        runs, start = 0, time.perf_counter()
        deadline = start + seconds / ROUNDS
        while (now := time.perf_counter()) < deadline:
            session.run(None, feeds)
            runs += 1
        best = max(best, runs * len(batch) / (now - start))
    return best


def _profile(path: Path, seconds: float) -> dict[int, float]:
    session = _session(path)
    features = session.get_inputs()[0].shape[1]
    rows = np.random.default_rng(0).random((max(BATCH_SIZES), features), dtype=np.float32)
    return {n: _samples_per_s(session, rows[:n], seconds) for n in BATCH_SIZES}


def measure(path: Path, seconds: float, core: int = 0) -> dict[int, float]:
    """Samples/s per batch size, measured in a child pinned to `core`."""
    argv = ["taskset", "-c", str(core), sys.executable, __file__, str(path), "--seconds",
            str(seconds)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in orjson.loads(out).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--seconds", type=float, default=1.0, help="per batch size")
    args = parser.parse_args()
    result = _profile(args.model, args.seconds)
    sys.stdout.write(orjson.dumps({str(k): v for k, v in result.items()}).decode())


if __name__ == "__main__":
    main()
