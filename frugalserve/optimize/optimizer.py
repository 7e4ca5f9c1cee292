"""`frugalserve optimize`: variants -> profiles -> calibrated cascades -> the cheapest plan.

One model of a repository, with validation and test splits passed in as arrays (this room does
not read data sets; the CLI does): build and profile its variants in the repository
(`variants.build_variants`), search single variants, cascades and batch settings on the
validation split (`plan_search.search`), run each tier's stages on the test split with the
chosen thresholds to show whether the validation estimate holds, and write
`<repo>/<model>/plan.yaml` and a chart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import Progress

from ..economics.ratecard import RateCard
from ..progress import new_progress
from ..repository.config import ModelConfig
from ..repository.plan import PLAN_FILE, REFERENCE
from ..repository.repository import CONFIG_FILE
from . import cascade
from .plan_report import write_chart
from .plan_search import (
    DELAYS_MS,
    PlanOption,
    Price,
    SearchResult,
    Targets,
    VariantStats,
    plan_document,
    search,
)
from .profile import BATCH_SIZES, CONFIDENCE_OUTPUT, Predictions, predict_folder
from .variants import VariantSet, build_variants, variant_runtime, version_dir

CHART_FILE = "plan.png"
STUDENT_MAX_ITER = 60  # epochs of the student's fit: converged on 20k rows, a few seconds


@dataclass(frozen=True)
class Dataset:
    """The splits optimize needs, as model inputs: pixels (float32 [n, 784]) or texts (object
    [n, 1]); labels are int64."""

    name: str
    x_train: np.ndarray  # unlabelled inputs: static-int8 calibration, the student's lessons
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Settings:
    targets: Targets
    candidates: tuple[str, ...] = ()
    version: str | None = None
    ledger_url: str | None = None
    rate_card: Path | None = None
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    delays_ms: tuple[float, ...] = DELAYS_MS
    rate_rps: float | None = None
    calls: int = 200
    budget_s: float = 2.0
    reuse: bool = False
    calibration_rows: int = 1024
    unlabelled_rows: int = 20_000
    student_max_iter: int = STUDENT_MAX_ITER
    chart: Path | None = None  # default: <repo>/<model>/plan.png


@dataclass
class OptimizeResult:
    variants: VariantSet
    search: SearchResult
    tests: dict[str, tuple[float, tuple[float, ...]]] = field(default_factory=dict)
    plan_path: Path | None = None
    chart_path: Path | None = None
    document: dict[str, Any] | None = None


def price_of(config: ModelConfig, rate_card: RateCard) -> Price:
    """The model's device share priced as the server's meter prices it."""
    device = config.device
    usd = rate_card.device(device.type).usd_per_hour(device.pricing)
    return Price(usd, device.share, device.type, device.pricing)


def test_results(variants: VariantSet, options: dict[str, PlanOption], x_test: np.ndarray,
                 y_test: np.ndarray) -> dict[str, tuple[float, tuple[float, ...]]]:
    """Each option run on the test split: every stage predicts every row once, and the
    thresholds route them as the server would. (accuracy, reach) per option name."""
    config = variants.config
    cache: dict[str, Predictions] = {}
    out = {}
    for name, option in options.items():
        for stage in option.stages:
            if stage not in cache:
                cache[stage] = predict_folder(variants.folder(stage), x_test,
                                              variant_runtime(config, stage), config.parameters)
        preds = [cache[s] for s in option.stages]
        out[name] = cascade.evaluate([p.correct(y_test) for p in preds],
                                     [p.confidence for p in preds], option.thresholds)
    return out


def _extra(variants: VariantSet, data: Dataset) -> dict[str, Any]:
    extra: dict[str, Any] = {"data": data.name, "validation_rows": int(len(data.y_val)),
                             "test_rows": int(len(data.y_test))}
    if variants.skipped:
        extra["skipped_variants"] = dict(variants.skipped)
    student = next((p for p in variants.profiles if p.variant == "student"), None)
    if student is not None and "training_cost_usd" in student.notes:
        extra["student_training"] = {"cost_usd": student.notes["training_cost_usd"],
                                     "run_id": student.notes.get("training_run_id")}
    return extra


def optimize_model(repository: Path, model: str, data: Dataset, settings: Settings,
                   progress: Progress | None = None) -> OptimizeResult:
    """Build, profile, search, test, write plan.yaml and the chart (see the module's note).
    plan.yaml is written only when some plan meets both targets."""
    if 1 not in settings.batch_sizes:
        raise ValueError(f"the batch sizes {list(settings.batch_sizes)} must include 1: the "
                         "reference at batch 1 is what every saving is measured against")
    repository = Path(repository)
    # the model folder, its config and its price first: a wrong name, device or rate card
    # fails now, not after every variant has been made and profiled
    version_dir(repository, model, settings.version)
    config = ModelConfig.load(repository / model / CONFIG_FILE, model)
    price = price_of(config, RateCard.load(settings.rate_card))
    own = progress is None
    progress = progress or new_progress()
    if own:
        progress.start()
    try:
        variants = build_variants(
            repository, model, version=settings.version,
            x_calibration=data.x_train[:settings.calibration_rows], x_val=data.x_val,
            y_val=data.y_val, x_unlabelled=data.x_train[:settings.unlabelled_rows],
            candidates=settings.candidates, ledger_url=settings.ledger_url,
            student_max_iter=settings.student_max_iter, batch_sizes=settings.batch_sizes,
            calls=settings.calls, budget_s=settings.budget_s, reuse=settings.reuse,
            progress=progress)
        task = progress.add_task("searching plans", total=2)
        stats = [VariantStats.from_profile(p, variants.predictions[p.variant], data.y_val)
                 for p in variants.profiles]
        result = search(stats, price, settings.targets, reference=REFERENCE,
                        batch_sizes=settings.batch_sizes, delays_ms=settings.delays_ms,
                        rate_rps=settings.rate_rps)
        progress.update(task, advance=1, description="running the tiers on the test split")
        out = OptimizeResult(variants, result)
        out.tests = test_results(variants, {"naive": result.counterfactual, **result.tiers},
                                 data.x_test, data.y_test)
        progress.update(task, advance=1, description="plans searched and tested")
    finally:
        if own:
            progress.stop()
    out.chart_path = write_chart(result, settings.chart or repository / model / CHART_FILE,
                                 f"{model} v{variants.version} on {data.name}: serving plans")
    if result.chosen is not None:
        out.document = _document(out, data)
        out.plan_path = repository / model / PLAN_FILE
        out.plan_path.write_text(yaml.safe_dump(out.document, sort_keys=False,
                                                allow_unicode=True), encoding="utf-8")
    return out


def _document(out: OptimizeResult, data: Dataset) -> dict[str, Any]:
    doc = plan_document(out.search, out.variants.version, confidence_output=CONFIDENCE_OUTPUT,
                        tests={k: v for k, v in out.tests.items() if k != "naive"},
                        extra=_extra(out.variants, data))
    naive = out.tests.get("naive")
    if naive is not None:
        doc["estimate"]["counterfactual"]["test_accuracy"] = round(naive[0], 6)
    return doc

