"""scikit-learn estimators saved with joblib (trusted repositories only: joblib is pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np

from ..tensors import TensorSpec
from .base import ModelLoadError, Runtime


class SklearnRuntime(Runtime):
    """One FP32 input `input` [-1, n_features]; outputs `label` and, for classifiers that
    have it, `probabilities` [-1, n_classes]."""

    name = "sklearn"
    filename = "model.joblib"

    def __init__(self, path: Path, options: dict[str, Any]):
        super().__init__(path, options)
        try:
            self.model = joblib.load(path)
        except Exception as exc:  # pickle raises anything for a corrupt file
            raise ModelLoadError(f"{path}: not a loadable joblib model: {exc}") from exc
        if not hasattr(self.model, "predict"):
            raise ModelLoadError(f"{path}: {type(self.model).__name__} has no predict()")
        self._proba = hasattr(self.model, "predict_proba")

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n_features = int(getattr(self.model, "n_features_in_", -1))
        inputs = [TensorSpec("input", "FP32", (-1, n_features))]
        label = np.asarray(getattr(self.model, "classes_", np.zeros(1, np.float64)))
        label_type = "INT64" if label.dtype.kind in "iub" else "FP64"
        if label.dtype.kind in "USO":
            label_type = "BYTES"
        outputs = [TensorSpec("label", label_type, (-1,))]
        if self._proba:
            outputs.append(TensorSpec("probabilities", "FP32", (-1, len(self.model.classes_))))
        return inputs, outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["input"]
        if self._proba:
            proba = self.model.predict_proba(x)
            label = self.model.classes_[proba.argmax(axis=1)]
            return {"label": _as_output(label), "probabilities": proba.astype(np.float32)}
        return {"label": _as_output(np.asarray(self.model.predict(x)))}


def _as_output(label: np.ndarray) -> np.ndarray:
    if label.dtype.kind in "iub":
        return label.astype(np.int64)
    if label.dtype.kind == "f":
        return label.astype(np.float64)
    return label.astype(object)
