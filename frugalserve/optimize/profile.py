"""A variant's profile: what it gets right, how fast it answers, what it takes.

Any variant folder (a version folder, or `<version>/variants/<name>/`) is loaded through the
runtime its artifact calls for (`frugalserve.runtimes.runtime_for`), the way the server loads a
version: ONNX classifiers over pixels and text models over `text` BYTES [-1, 1] (rows given as
object arrays) are measured alike. Measured here, on this machine, with the options the server
would pass (the model's config.yaml `parameters`, one intra-op thread unless they say otherwise:
the server's default per instance).

Latency is of single `predict` calls at each batch size (p50 and p99 over at least `calls` calls
and `min_s` seconds, after a warm-up); throughput is items per second at that batch size, from
the mean call time; cost estimates use the trimmed mean (the calls at or below the p99).
Accuracy is top-1 from the `label` output (else the argmax of the first 2-d output); confidence,
which cascades route on, is the row's maximum of `probabilities`. Size is the artifact's bytes
on disk; memory is the growth of this process's resident set (from /proc/self/statm) from before
the model was loaded to after its first call, a rough figure (the allocator may reuse freed
pages) that is clamped at zero.
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
from ..runtimes import Runtime, runtime_for
from ..runtimes.onnx import OnnxRuntime
from . import graph

BATCH_SIZES = (1, 8, 32, 64)
CONFIDENCE_OUTPUT = "probabilities"
PROFILE_FILE = "profile.json"
_STATM = Path("/proc/self/statm")
_CHUNK = 256  # rows per call when predicting a whole split


@dataclass(frozen=True)
class BatchLatency:
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second, on the profile's `threads`
    calls: int
    # the mean of the calls at or below the p99: what cost estimates use, because on a shared
    # machine a call that was preempted measures the neighbour, not the model
    trimmed_mean_ms: float | None = None


@dataclass(frozen=True)
class Profile:
    variant: str
    path: str
    accuracy: float  # top-1 on the validation rows given
    validation_rows: int
    size_bytes: int
    rss_bytes: int
    parameters: int  # floating-point weights (int8 weights are not counted)
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



@dataclass(frozen=True)
class Predictions:
    """One variant's answers on a split: top-1 labels and, when it has the confidence output,
    each row's confidence (the maximum over the row: what a cascade stage routes on)."""

    labels: np.ndarray
    confidence: np.ndarray | None

    def correct(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(self.labels).reshape(-1) == np.asarray(y).reshape(-1)


def open_runtime(folder: Path, runtime: str | None = None,
                 options: dict[str, Any] | None = None) -> Runtime:
    """The variant in `folder` loaded as the server loads a version: the runtime named (the
    model's config.yaml `runtime`), else the one whose artifact is in the folder."""
    kind = runtime_for(Path(folder), runtime)
    return kind(Path(folder) / kind.filename, {"threads": 1, **(options or {})})


def input_rows(runtime: Runtime, x: np.ndarray) -> tuple[str, np.ndarray]:
    """The model's one input name, and `x` in the dtype it takes (pixels become float32; text
    rows stay object arrays)."""
    inputs = runtime.signature()[0]
    if len(inputs) != 1:
        raise ValueError(f"{runtime.path}: profiling needs a model with one input, it has "
                         f"{[i.name for i in inputs]}")
    spec, x = inputs[0], np.asarray(x)
    text = x.dtype.kind in "OSU"
    if (spec.datatype == "BYTES") != text or x.ndim != len(spec.shape) or any(
            d not in (-1, n) for d, n in zip(spec.shape[1:], x.shape[1:], strict=True)):
        rows = "text" if text else str(x.dtype)
        raise ValueError(f"{runtime.path}: the model takes {spec.name} {spec.datatype} "
                         f"{list(spec.shape)}; the data's rows are {rows} {list(x.shape[1:])}: "
                         "not data for this model")
    if spec.datatype == "FP32" and x.dtype != np.float32:
        x = x.astype(np.float32)
    return spec.name, np.ascontiguousarray(x)


def _labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "label" in outputs:
        return np.asarray(outputs["label"]).reshape(-1)
    scores = next(v for v in outputs.values() if v.ndim == 2)
    return scores.argmax(axis=1)


def predict_rows(runtime: Runtime, x: np.ndarray,
                 confidence_output: str = CONFIDENCE_OUTPUT) -> Predictions:
    """Labels and confidences of every row of `x`, `_CHUNK` rows per call."""
    name, rows = input_rows(runtime, x)
    labels, confidence = [], []
    for i in range(0, len(rows), _CHUNK):
        out = runtime.predict({name: rows[i:i + _CHUNK]})
        labels.append(_labels(out))
        if confidence_output in out:
            confidence.append(np.asarray(out[confidence_output]).max(axis=1))
    # in the output's own dtype: the server routes on these very numbers (a float64 cast to
    # float32 could land on the other side of a threshold)
    conf = np.concatenate(confidence) if confidence else None
    return Predictions(np.concatenate(labels), conf)


def predict_folder(folder: Path, x: np.ndarray, runtime: str | None = None,
                   options: dict[str, Any] | None = None,
                   confidence_output: str = CONFIDENCE_OUTPUT) -> Predictions:
    engine = open_runtime(folder, runtime, options)
    try:
        return predict_rows(engine, x, confidence_output)
    finally:
        engine.close()


def measure_latency(runtime: Runtime, name: str, x: np.ndarray, batch: int,
                    calls: int = 200, warmup: int = 10, budget_s: float = 2.0,
                    min_s: float = 0.25) -> BatchLatency:
    """Time single calls of `batch` rows: at least `calls` of them over at least `min_s`
    seconds (a fast model gets thousands, so one stall moves the mean little), stopping once
    `budget_s` has passed and 10 calls are in."""
    reps = -(-batch // len(x))
    rows = np.ascontiguousarray(np.tile(x, (reps,) + (1,) * (x.ndim - 1))[:batch]
                                if reps > 1 else x[:batch])
    feed = {name: rows}
    for _ in range(warmup):
        runtime.predict(feed)
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runtime.predict(feed)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if (len(times) >= calls and t1 - start >= min_s) or (
                t1 - start > budget_s and len(times) >= 10):
            break
    ms = np.asarray(times) * 1e3
    mean, p99 = float(ms.mean()), float(np.percentile(ms, 99))
    return BatchLatency(batch, float(np.percentile(ms, 50)), p99, mean, batch / (mean / 1e3),
                        len(ms), float(ms[ms <= p99].mean()))


def _parameters(path: Path) -> int:
    return graph.parameter_count(path) if path.suffix == ".onnx" else 0


def profile_runtime(runtime: Runtime, x: np.ndarray, y: np.ndarray, *, variant: str,
                    rss_before: int, batch_sizes: tuple[int, ...] = BATCH_SIZES,
                    calls: int = 200, budget_s: float = 2.0, min_s: float = 0.25,
                    progress: Progress | None = None,
                    notes: dict[str, Any] | None = None,
                    confidence_output: str = CONFIDENCE_OUTPUT) -> tuple[Profile, Predictions]:
    """Profile a loaded runtime on validation rows `x` with labels `y` (see the module's note)."""
    own = progress is None
    progress = progress or new_progress()
    if own:
        progress.start()
    try:
        task = progress.add_task(f"profiling {variant}", total=2 + len(batch_sizes))
        name, rows = input_rows(runtime, x)
        runtime.predict({name: rows[:1]})
        rss = max(0, _rss_bytes() - rss_before)
        progress.advance(task)
        predictions = predict_rows(runtime, rows, confidence_output)
        accuracy = float(np.mean(predictions.correct(y))) if len(y) else 0.0
        progress.advance(task)
        latency = {}
        for batch in batch_sizes:
            latency[batch] = measure_latency(runtime, name, rows, batch, calls=calls,
                                             budget_s=budget_s, min_s=min_s)
            progress.advance(task)
    finally:
        if own:
            progress.stop()
    path = Path(runtime.path)
    threads = int(runtime.options.get("threads", 1))
    profile = Profile(variant=variant, path=str(path), accuracy=accuracy, validation_rows=len(y),
                      size_bytes=path.stat().st_size, rss_bytes=rss,
                      parameters=_parameters(path), latency=latency, threads=threads,
                      device=cpu_name(), measured_at=time.time(),
                      notes={"runtime": runtime.name, **(notes or {})})
    return profile, predictions


def profile_folder(folder: Path, x: np.ndarray, y: np.ndarray, *, variant: str,
                   runtime: str | None = None, options: dict[str, Any] | None = None,
                   **kwargs: Any) -> tuple[Profile, Predictions]:
    """Profile the variant in `folder` (a version folder or a variant folder) and save the profile
    as `<folder>/profile.json`; keyword arguments as `profile_runtime`."""
    rss0 = _rss_bytes()
    engine = open_runtime(folder, runtime, options)
    try:
        profile, predictions = profile_runtime(engine, x, y, variant=variant, rss_before=rss0,
                                               **kwargs)
    finally:
        engine.close()
    profile.save(Path(folder) / PROFILE_FILE)
    return profile, predictions


def profile_model(path: Path, x: np.ndarray, y: np.ndarray, *, variant: str | None = None,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, calls: int = 200,
                  budget_s: float = 2.0, progress: Progress | None = None,
                  notes: dict[str, Any] | None = None) -> Profile:
    """Profile one ONNX file at `path`, wherever it lies, on onnxruntime with one thread."""
    path = Path(path)
    rss0 = _rss_bytes()
    engine = OnnxRuntime(path, {"threads": 1})
    try:
        profile, _ = profile_runtime(engine, x, y, variant=variant or path.stem, rss_before=rss0,
                                     batch_sizes=batch_sizes, calls=calls, budget_s=budget_s,
                                     progress=progress, notes=notes)
    finally:
        engine.close()
    return profile
