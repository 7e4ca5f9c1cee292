"""A variant's profile: what it gets right, how fast it answers, what it takes.

Measured here, on this machine, the way the server runs a model: one onnxruntime session with one
intra-op thread (the server's default per instance). Latency is of single `predict` calls at each
batch size (p50 and p99 over `calls` calls after a warm-up); throughput is items per second at
that batch size, from the mean call time. Size is the file's bytes on disk; memory is the growth
of this process's resident set (from /proc/self/statm) from before the model was loaded to after
its first call, a rough figure (the allocator may reuse freed pages) that is clamped at zero.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from ..progress import new_progress
from ..runtimes.onnx import OnnxRuntime
from . import graph

BATCH_SIZES = (1, 8, 32, 64)
_STATM = Path("/proc/self/statm")


@dataclass(frozen=True)
class BatchLatency:
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second, one thread
    calls: int


@dataclass(frozen=True)
class Profile:
    variant: str
    path: str
    accuracy: float  # top-1 on the validation rows given
    validation_rows: int
    size_bytes: int
    rss_bytes: int
    parameters: int  # floating-point weights (quantized weights are not floats: see nonzero)
    latency: dict[int, BatchLatency] = field(default_factory=dict)
    threads: int = 1
    device: str = ""
    measured_at: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def p99_ms(self, batch: int) -> float:
        return self.latency[batch].p99_ms

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["latency"] = {str(b): asdict(v) for b, v in self.latency.items()}
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Profile:
        latency = {int(b): BatchLatency(**v) for b, v in doc.get("latency", {}).items()}
        return cls(**{**doc, "latency": latency})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> Path:
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls.from_json(Path(path).read_text())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_bytes() -> int:
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "label" in outputs:
        return outputs["label"]
    scores = next(v for v in outputs.values() if v.ndim == 2)
    return scores.argmax(axis=1)


def measure_latency(runtime: OnnxRuntime, name: str, x: np.ndarray, batch: int,
                    calls: int = 200, warmup: int = 10, budget_s: float = 2.0) -> BatchLatency:
    """Time `calls` single calls of `batch` rows (fewer if `budget_s` runs out first)."""
    reps = -(-batch // len(x))
    rows = np.ascontiguousarray(np.tile(x, (reps, 1))[:batch] if reps > 1 else x[:batch])
    feed = {name: rows}
    for _ in range(warmup):
        runtime.predict(feed)
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(calls):
        t0 = time.perf_counter()
        runtime.predict(feed)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 > deadline and len(times) >= 10:
            break
    ms = np.asarray(times) * 1e3
    mean = float(ms.mean())
    return BatchLatency(batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                        mean, batch / (mean / 1e3), len(ms))


def profile_model(path: Path, x: np.ndarray, y: np.ndarray, *, variant: str | None = None,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, calls: int = 200,
                  budget_s: float = 2.0, progress: Progress | None = None,
                  notes: dict[str, Any] | None = None) -> Profile:
    """Profile the ONNX model at `path` on validation rows `x` with labels `y`."""
    path = Path(path)
    variant = variant or path.stem
    x = np.ascontiguousarray(x, dtype=np.float32)
    own = progress is None
    progress = progress or new_progress()
    if own:
        progress.start()
    try:
        task = progress.add_task(f"profiling {variant}", total=2 + len(batch_sizes))
        rss0 = _rss_bytes()
        runtime = OnnxRuntime(path, {"threads": 1})
        try:
            name = runtime.signature()[0][0].name
            runtime.predict({name: x[:1]})
            rss = max(0, _rss_bytes() - rss0)
            progress.advance(task)
            predicted = np.concatenate([_labels(runtime.predict({name: x[i:i + 256]}))
                                        for i in range(0, len(x), 256)])
            accuracy = float(np.mean(predicted == y)) if len(y) else 0.0
            progress.advance(task)
            latency = {}
            for batch in batch_sizes:
                latency[batch] = measure_latency(runtime, name, x, batch, calls=calls,
                                                 budget_s=budget_s)
                progress.advance(task)
        finally:
            runtime.close()
    finally:
        if own:
            progress.stop()
    return Profile(variant=variant, path=str(path), accuracy=accuracy, validation_rows=len(y),
                   size_bytes=path.stat().st_size, rss_bytes=rss,
                   parameters=graph.parameter_count(path), latency=latency, threads=1,
                   device=cpu_name(), measured_at=time.time(), notes=dict(notes or {}))
