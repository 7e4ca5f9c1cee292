"""Every variant of one repository model's version, made, profiled and stored beside it.

Layout (the repository contract; every variant folder is laid out like a version folder):

    <repo>/<model>/<version>/model.onnx            the reference variant, named "reference"
    <repo>/<model>/<version>/profile.json          the reference's profile
    <repo>/<model>/<version>/variants/<variant>/   another variant: its artifact (model.onnx),
                                                   profile.json, and a copy of the version
                                                   folder's other files (a text model's
                                                   tokenizer.json), so it loads with the same
                                                   runtime and options

Variants made from the reference's ONNX file: int8-dynamic, int8-static (QDQ), fp16, sparse-50
(unstructured, 50% zeros), pruned-25 (structured, 25% of hidden units) and student (distilled).
A maker that does not apply (quantizing a graph with no MatMul/Gemm/Conv, calibrating or
distilling over text inputs, pruning a CNN's hidden units) is skipped with the reason, and so is
a variant whose inputs or outputs come out different from the reference's. Candidates are other
models of the repository with the same signature; their latest version is copied in whole as a
variant named after the model.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich import box
from rich.progress import Progress
from rich.table import Table

from ..progress import new_progress
from ..repository.config import ModelConfig
from ..repository.plan import REFERENCE, VARIANTS_DIR, variant_dir
from ..repository.repository import (
    CONFIG_FILE,
    RepositoryError,
    signature_mismatch,
    version_folders,
)
from ..runtimes import ModelLoadError
from ..runtimes.onnx import OnnxRuntime
from ..tensors import TensorSpec
from . import distill, prune, quantize
from .profile import (
    BATCH_SIZES,
    PROFILE_FILE,
    Predictions,
    Profile,
    open_runtime,
    predict_folder,
    profile_folder,
)

log = logging.getLogger("frugalserve.optimize")

QUANTIZABLE = {"MatMul", "Gemm", "Conv"}
_FLOAT = onnx.TensorProto.FLOAT


@dataclass
class VariantSet:
    model: str
    version: str
    version_dir: Path
    config: ModelConfig
    profiles: list[Profile] = field(default_factory=list)  # the reference first
    predictions: dict[str, Predictions] = field(default_factory=dict)  # on validation rows
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why

    def folder(self, variant: str) -> Path:
        return variant_dir(self.version_dir, variant)

    def profile(self, variant: str) -> Profile:
        return next(p for p in self.profiles if p.variant == variant)


def version_dir(repository: Path, model: str, version: str | None = None) -> Path:
    """The version folder to optimize: the one named, else the latest (highest number)."""
    folder = Path(repository) / model
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder")
    if version is not None:
        if not (folder / version).is_dir():
            raise ValueError(f"{folder}: no version {version}")
        return folder / version
    try:
        return version_folders(folder)[-1]
    except RepositoryError as exc:
        raise ValueError(str(exc)) from None


# -- signatures ---------------------------------------------------------------------------------

def signature(folder: Path, runtime: str | None = None,
              options: dict[str, Any] | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    engine = open_runtime(folder, runtime, options)
    try:
        return engine.signature()
    finally:
        engine.close()


# -- makers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Facts:
    """What decides which makers apply to the reference's ONNX graph."""

    onnx: bool
    ops: frozenset[str] = frozenset()
    float_input: str | None = None  # None: FP32; else the input's element type name
    label: bool = False


def _facts(source: Path) -> _Facts:
    if not source.exists():
        return _Facts(onnx=False)
    model = onnx.load(str(source))
    inits = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in inits)
    elem = first.type.tensor_type.elem_type
    return _Facts(True, frozenset(n.op_type for n in model.graph.node),
                  None if elem == _FLOAT else onnx.TensorProto.DataType.Name(elem),
                  any(o.name == "label" for o in model.graph.output))


def _why_not(needs: Sequence[str], facts: _Facts) -> str | None:
    if not facts.onnx:
        return "the reference has no ONNX artifact (model.onnx) to transform"
    if "linear" in needs and not facts.ops & QUANTIZABLE:
        return "no MatMul, Gemm or Conv in the graph to quantize"
    if "float" in needs and facts.float_input is not None:
        return f"needs FP32 inputs (calibration rows); the model takes {facts.float_input}"
    if "label" in needs and not facts.label:
        return "needs a `label` output for the student to learn from"
    return None


def _makers(source: Path, x_calibration: np.ndarray, x_unlabelled: np.ndarray, *, model: str,
            version: str, ledger_url: str | None, student_hidden: tuple[int, ...],
            student_max_iter: int, prune_fraction: float,
            sparsity: float) -> dict[str, tuple[tuple[str, ...], Callable[[Path], object]]]:
    """variant name -> (what it needs of the reference, how it makes its model.onnx)."""
    pct = int(round(prune_fraction * 100))
    return {
        "int8-dynamic": (("linear",), lambda p: quantize.quantize_int8_dynamic(source, p)),
        "int8-static": (("linear", "float"),
                        lambda p: quantize.quantize_int8_static(source, p, x_calibration)),
        "fp16": (("linear",), lambda p: quantize.convert_fp16(source, p)),
        f"sparse-{int(round(sparsity * 100))}": ((), lambda p: prune.magnitude_prune(
            source, p, sparsity)),
        f"pruned-{pct}": (("float",), lambda p: prune.structured_prune(
            source, p, prune_fraction, calibration=x_calibration)),
        "student": (("float", "label"), lambda p: distill.distill(
            source, x_unlabelled, p, hidden=student_hidden, model=model,
            version=f"{version}-student", ledger_url=ledger_url, max_iter=student_max_iter)),
    }


def variant_runtime(config: ModelConfig, variant: str) -> str | None:
    """The runtime a variant loads with, as the server loads it: the model's configured one
    for the reference, the one its own files call for otherwise (a TF-IDF ONNX file can be a
    cheap stage in front of a tokenizer + encoder model)."""
    return config.runtime if variant == REFERENCE else None


def _copy_companions(version: Path, dst: Path, artifact: str | None) -> None:
    """The version folder's files other than its artifact, profile and variants (a tokenizer,
    a vocabulary), so the variant loads with the same runtime."""
    for item in version.iterdir():
        if item.name in (artifact, PROFILE_FILE, VARIANTS_DIR) or (dst / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


# -- building -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """How to measure one variant once its folder is in place."""

    set: VariantSet
    x_val: np.ndarray
    y_val: np.ndarray
    kwargs: dict[str, Any]
    reuse: bool

    def measure(self, name: str, notes: dict[str, Any], progress: Progress) -> None:
        folder = self.set.folder(name)
        config = self.set.config
        runtime = variant_runtime(config, name)
        saved = folder / PROFILE_FILE
        if self.reuse and saved.exists():
            prof = Profile.load(saved)
            preds = predict_folder(folder, self.x_val, runtime, config.parameters)
        else:
            prof, preds = profile_folder(folder, self.x_val, self.y_val, variant=name,
                                         runtime=runtime, options=config.parameters,
                                         progress=progress, notes=notes, **self.kwargs)
        self.set.profiles.append(prof)
        self.set.predictions[name] = preds


def build_variants(repository: Path, model: str, *, x_calibration: np.ndarray,
                   x_val: np.ndarray, y_val: np.ndarray, x_unlabelled: np.ndarray,
                   version: str | None = None, candidates: Sequence[str] = (),
                   ledger_url: str | None = None, student_hidden: tuple[int, ...] = (32,),
                   student_max_iter: int = 200, prune_fraction: float = 0.25,
                   sparsity: float = 0.5, batch_sizes: tuple[int, ...] = BATCH_SIZES,
                   calls: int = 200, budget_s: float = 2.0, reuse: bool = False,
                   progress: Progress | None = None) -> VariantSet:
    """Make, copy in and profile every variant of `model`'s version (the latest by default)
    under `<version>/variants/`, and profile the reference itself (`<version>/profile.json`).
    With `reuse`, a variant folder that already has a profile.json is kept as it is (its
    validation predictions are recomputed)."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be whole numbers >= 1, got {list(batch_sizes)}")
    repository = Path(repository)
    vdir = version_dir(repository, model, version)
    config = ModelConfig.load(repository / model / CONFIG_FILE, model)
    result = VariantSet(model, vdir.name, vdir, config)
    job = _Job(result, x_val, y_val, {"batch_sizes": batch_sizes, "calls": calls,
                                      "budget_s": budget_s}, reuse)
    source = vdir / OnnxRuntime.filename
    makers = _makers(source, x_calibration, x_unlabelled, model=model, version=vdir.name,
                     ledger_url=ledger_url, student_hidden=student_hidden,
                     student_max_iter=student_max_iter, prune_fraction=prune_fraction,
                     sparsity=sparsity)
    clash = sorted(set(candidates) & (set(makers) | {REFERENCE}))
    if clash:
        raise ValueError(f"candidate name(s) {clash} clash with variant names")
    own = progress is None
    progress = progress or new_progress()
    if own:
        progress.start()
    try:
        task = progress.add_task("variants", total=1 + len(makers) + len(candidates))
        progress.update(task, description="profiling reference")
        try:
            job.measure(REFERENCE, {"source": f"{model} v{vdir.name}"}, progress)
        except ModelLoadError as exc:
            raise ValueError(f"{model} v{vdir.name} cannot be loaded: {exc}") from exc
        progress.advance(task)
        expected = signature(vdir, config.runtime, config.parameters)
        facts = _facts(source)
        for name, (needs, make) in makers.items():
            progress.update(task, description=f"making {name}")
            why = _why_not(needs, facts)
            if why is None:
                why = _make(result, name, make, expected, reuse, job, progress)
            if why is not None:
                result.skipped[name] = why
                log.info("variant %s skipped: %s", name, why)
            progress.advance(task)
        for name in candidates:
            progress.update(task, description=f"copying candidate {name}")
            why = _candidate(result, repository, name, expected, reuse, job, progress)
            if why is not None:
                result.skipped[name] = why
            progress.advance(task)
    finally:
        if own:
            progress.stop()
    return result


def _make(result: VariantSet, name: str, make: Callable[[Path], object],
          expected: tuple[list[TensorSpec], list[TensorSpec]], reuse: bool, job: _Job,
          progress: Progress) -> str | None:
    """Make one variant's folder and measure it; the reason it was skipped, or None."""
    folder = result.folder(name)
    config = result.config
    if not (reuse and (folder / PROFILE_FILE).exists()):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            made = make(folder / OnnxRuntime.filename)
            _copy_companions(result.version_dir, folder, OnnxRuntime.filename)
            mismatch = signature_mismatch(expected, signature(folder, None, config.parameters))
        except Exception as exc:  # noqa: BLE001 - a maker that fails (or makes a file that
            # will not load) skips its variant only
            shutil.rmtree(folder, ignore_errors=True)
            return str(exc) if isinstance(exc, ValueError) else f"failed: {exc!r}"
        if mismatch:
            shutil.rmtree(folder, ignore_errors=True)
            return f"its signature differs from the reference's: {mismatch}"
        notes: dict[str, Any] = {"source": f"{result.model} v{result.version}", "maker": name}
        if isinstance(made, distill.Student):
            notes |= {"training_cost_usd": str(made.cost_usd),
                      "training_run_id": made.run_id, "agreement": made.agreement}
    else:
        notes = {}
    job.measure(name, notes, progress)
    return None


def _candidate(result: VariantSet, repository: Path, name: str,
               expected: tuple[list[TensorSpec], list[TensorSpec]], reuse: bool, job: _Job,
               progress: Progress) -> str | None:
    """Copy another model's latest version in as a variant, if it has the same signature."""
    config = result.config
    folder = result.folder(name)
    if not (reuse and (folder / PROFILE_FILE).exists()):
        try:
            source = version_dir(repository, name)
            mismatch = signature_mismatch(expected, signature(source, None, config.parameters))
        except Exception as exc:  # noqa: BLE001 - a candidate that will not load is skipped
            return f"cannot load it: {exc}"
        if mismatch:
            return f"its signature differs from the reference's: {mismatch}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _copy_companions(source, folder, None)
        notes = {"source": f"{name} v{source.name}", "candidate": name}
    else:
        notes = {}
    job.measure(name, notes, progress)
    return None


def profiles_table(profiles: list[Profile]) -> Table:
    """One row per variant: accuracy, size, memory, parameters, p50/p99 and throughput per batch."""
    table = Table(title="variants (validation accuracy; latency of one call)",
                  box=box.SIMPLE_HEAD)
    for col in ("variant", "accuracy", "size KiB", "RSS MiB", "params"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    batches = sorted({b for p in profiles for b in p.latency})
    for b in batches:
        table.add_column(f"b{b} p50/p99 ms", justify="right")
        table.add_column(f"b{b} items/s", justify="right")
    for p in profiles:
        cells = [p.variant, f"{p.accuracy:.4f}", f"{p.size_bytes / 1024:.1f}",
                 f"{p.rss_bytes / 2**20:.1f}", f"{p.parameters:,}"]
        for b in batches:
            lat = p.latency.get(b)
            cells += ([f"{lat.p50_ms:.3f}/{lat.p99_ms:.3f}", f"{lat.throughput:,.0f}"]
                      if lat else ["", ""])
        table.add_row(*cells)
    return table
