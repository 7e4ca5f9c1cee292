"""Put a trained classifier into a model repository as ONNX, and check the export.

Layout written (Triton's): `<repo>/<name>/config.yaml` and `<repo>/<name>/<version>/model.onnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from skl2onnx import to_onnx

from ..runtimes.onnx import OnnxRuntime

OPSET = 17
INPUT_NAME = "X"  # skl2onnx names the input of a model converted from a NumPy sample "X"
DEFAULT_CONFIG: dict[str, Any] = {
    "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2},
    "device": {"type": "aws-c7i.large", "share": 0.5},
}


def export_classifier(model: Any, sample: np.ndarray, repository: Path, name: str,
                      version: int = 1, config: dict[str, Any] | None = None) -> Path:
    """Write the model as ONNX (outputs `label` and `probabilities`, no ZipMap so both are
    plain tensors) plus its config.yaml; return the .onnx path."""
    onnx_model = to_onnx(model, sample[:1], options={id(model): {"zipmap": False}},
                         target_opset=OPSET)
    return write_model(onnx_model.SerializeToString(), repository, name, version, config)


def write_model(onnx_bytes: bytes, repository: Path, name: str, version: int = 1,
                config: dict[str, Any] | None = None) -> Path:
    """Write an ONNX model and its config.yaml into the repository; return the .onnx path."""
    folder = Path(repository) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    path = folder / str(version) / OnnxRuntime.filename
    path.write_bytes(onnx_bytes)
    (folder / "config.yaml").write_text(yaml.safe_dump(config or DEFAULT_CONFIG, sort_keys=False))
    return path


def predict_labels(path: Path, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Labels from the exported file itself, through the runtime the server uses."""
    runtime = OnnxRuntime(path, {"threads": 2})
    try:
        name = runtime.signature()[0][0].name
        parts = [runtime.predict({name: x[i:i + batch]})["label"] for i in range(0, len(x), batch)]
    finally:
        runtime.close()
    return np.concatenate(parts)
