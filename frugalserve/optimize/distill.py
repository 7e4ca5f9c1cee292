"""Distillation: a smaller student learns to answer like a teacher, from unlabelled inputs.

The teacher (any ONNX classifier with `label` and `probabilities` outputs) labels the inputs;
the student, a scikit-learn MLP with fewer hidden units, is fitted to the teacher's top-1
answers (hard-label distillation: no ground-truth label is read) and exported to ONNX with the
same input name and outputs, so it is a drop-in variant. Its training is measured and recorded
in the ledger with `track_training`, so its cost can be set against the inference it saves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from ..economics.training import track_training
from ..runtimes.onnx import OnnxRuntime
from . import graph
from .profile import predict_rows


@dataclass(frozen=True)
class Student:
    path: Path
    hidden: tuple[int, ...]
    agreement: float  # share of the distillation inputs on which student and teacher agree
    run_id: int | None  # the training run's id in the ledger
    cost_usd: Decimal
    wall_s: float


def teacher_answers(teacher: Path, x: np.ndarray) -> np.ndarray:
    """The teacher's top-1 labels for `x`, as the profiler reads them (`label`, else argmax)."""
    runtime = OnnxRuntime(Path(teacher), {"threads": 2})
    try:
        return predict_rows(runtime, x).labels
    finally:
        runtime.close()


def distill(teacher: Path, x: np.ndarray, dst: Path, *, hidden: tuple[int, ...] = (32,),
            model: str, version: str, ledger_url: str | None = None,
            device: str = "aws-c7i.large", share: float = 1.0, max_iter: int = 200,
            seed: int = 0, threads: int = 1) -> Student:
    """Fit a student MLP with `hidden` units to the teacher's answers on the unlabelled `x`, record
    the fit as a training run of (`model`, `version`) on `device`, export it to `dst`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    teacher_model = graph.load(Path(teacher))
    name = graph.input_name(teacher_model)
    # the student speaks the teacher's ONNX opset, so whatever served the teacher serves it
    opset = max(o.version for o in teacher_model.opset_import if o.domain in ("", "ai.onnx"))
    targets = teacher_answers(teacher, x)
    student = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=seed)
    params = {"kind": "distillation", "teacher": str(teacher), "hidden": list(hidden),
              "inputs": len(x), "threads": threads}
    with track_training(model, version, device, ledger_url=ledger_url, share=share,
                        params=params, notes="student distilled from teacher labels") as run:
        with warnings.catch_warnings(), threadpool_limits(threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            student.fit(x, targets)
        agreement = float(np.mean(student.predict(x) == targets))
        run.params["agreement"] = agreement
        run.params["n_params"] = int(sum(c.size for c in student.coefs_)
                                     + sum(b.size for b in student.intercepts_))
    # L2 decay leaves some weights subnormal (< 1.2e-38), which x86 computes ~100x slower
    for coefs in student.coefs_:
        coefs[np.abs(coefs) < np.finfo(np.float32).tiny] = 0
    onnx_model = to_onnx(student, initial_types=[(name, FloatTensorType([None, x.shape[1]]))],
                         options={id(student): {"zipmap": False}}, target_opset=opset)
    graph.save(onnx_model, Path(dst))
    assert run.record is not None
    return Student(Path(dst), hidden, agreement, run.id, run.record.cost_usd, run.record.wall_s)
