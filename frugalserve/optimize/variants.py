"""Every variant of one ONNX classifier, made and profiled side by side.

Writes `<out>/<variant>.onnx` and `<out>/<variant>.json` (its profile) for: fp32 (the reference,
copied), int8-dynamic, int8-static (QDQ), fp16, sparse-50 (unstructured, 50% zeros), pruned-25
(structured, 25% of hidden units) and student (distilled), plus `profiles.json` with all of them.
A maker that does not apply to the model (structured pruning of a CNN) is skipped and named.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.progress import Progress
from rich.table import Table

from ..progress import new_progress
from . import distill, prune, quantize
from .profile import BATCH_SIZES, Profile, profile_model

log = logging.getLogger("frugalserve.optimize")


@dataclass
class VariantSet:
    profiles: list[Profile] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why


def build_variants(source: Path, out: Path, *, x_calibration: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, x_unlabelled: np.ndarray, model: str, version: str,
                   ledger_url: str | None = None, student_hidden: tuple[int, ...] = (32,),
                   prune_fraction: float = 0.25, sparsity: float = 0.5,
                   batch_sizes: tuple[int, ...] = BATCH_SIZES, calls: int = 200,
                   progress: Progress | None = None) -> VariantSet:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pct = int(round(prune_fraction * 100))
    makers: dict[str, Callable[[Path], object]] = {
        "fp32": lambda p: shutil.copyfile(source, p),
        "int8-dynamic": lambda p: quantize.quantize_int8_dynamic(source, p),
        "int8-static": lambda p: quantize.quantize_int8_static(source, p, x_calibration),
        "fp16": lambda p: quantize.convert_fp16(source, p),
        f"sparse-{int(round(sparsity * 100))}": lambda p: prune.magnitude_prune(source, p,
                                                                                sparsity),
        f"pruned-{pct}": lambda p: prune.structured_prune(source, p, prune_fraction,
                                                          calibration=x_calibration),
        "student": lambda p: distill.distill(source, x_unlabelled, p, hidden=student_hidden,
                                             model=model, version=f"{version}-student",
                                             ledger_url=ledger_url),
    }
    result = VariantSet()
    own = progress is None
    progress = progress or new_progress()
    if own:
        progress.start()
    try:
        task = progress.add_task("variants", total=len(makers))
        for name, make in makers.items():
            path = out / f"{name}.onnx"
            progress.update(task, description=f"making {name}")
            try:
                made = make(path)
            except ValueError as exc:
                result.skipped[name] = str(exc)
                log.info("variant %s skipped: %s", name, exc)
                progress.advance(task)
                continue
            notes = ({"training_cost_usd": str(made.cost_usd), "training_run_id": made.run_id}
                     if isinstance(made, distill.Student) else {})
            prof = profile_model(path, x_val, y_val, variant=name, batch_sizes=batch_sizes,
                                 calls=calls, progress=progress, notes=notes)
            prof.save(out / f"{name}.json")
            result.profiles.append(prof)
            progress.advance(task)
    finally:
        if own:
            progress.stop()
    (out / "profiles.json").write_text(json.dumps(
        {"profiles": [p.to_dict() for p in result.profiles], "skipped": result.skipped},
        indent=2))
    return result


def profiles_table(profiles: list[Profile]) -> Table:
    """One row per variant: accuracy, size, memory, parameters, p50/p99 and throughput per batch."""
    table = Table(title="variants (1 thread)", box=box.SIMPLE_HEAD)
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
