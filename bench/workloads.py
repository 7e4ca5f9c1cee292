"""The two benchmark models, trained here and exported to ONNX, and one request body for each.

(a) `digits`: a small MLP on sklearn's load_digits, 64 inputs: HTTP and queueing dominate.
(b) `fashion`: a (1024, 1024) MLP on Fashion-MNIST, 784 inputs: compute dominates.
Models are cached under bench/out/models/ and retrained only when missing.
"""

from __future__ import annotations

import gzip
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"


@dataclass(frozen=True)
class Workload:
    name: str  # the model's name in URLs
    description: str
    onnx_path: Path
    sample: np.ndarray  # one float32 row
    max_batch_size: int

    def body(self) -> bytes:
        """A V2 JSON request for one sample, as a typical client would send it."""
        row = self.sample.astype(np.float64).round(5).tolist()
        tensor = {"name": "X", "shape": [1, len(row)], "datatype": "FP32", "data": row}
        return orjson.dumps({"inputs": [tensor]})


def _export(model: MLPClassifier, x: np.ndarray, path: Path) -> None:
    onnx_model = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())


def _train(x: np.ndarray, y: np.ndarray, **mlp: object) -> MLPClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(random_state=0, **mlp).fit(x, y)  # type: ignore[arg-type]


def _digits_data() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16).astype(np.float32), data.target


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format): big-endian int32 dims after a 4-byte magic, then uint8."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def ensure_fashion_dataset() -> None:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", FASHION_PACKAGE], check=True)


def _fashion_data(rows: int = 12000) -> tuple[np.ndarray, np.ndarray]:
    ensure_fashion_dataset()
    images = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:rows]
    labels = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:rows]
    return (images.reshape(len(images), -1) / 255).astype(np.float32), labels


def _build(name: str, description: str, models_dir: Path, max_batch_size: int,
           data: Callable[[], tuple[np.ndarray, np.ndarray]], **mlp: object) -> Workload:
    x, y = data()
    path = models_dir / name / "model.onnx"
    if not path.exists():
        _export(_train(x, y, **mlp), x, path)
    return Workload(name, description, path, x[0], max_batch_size)


def digits(models_dir: Path) -> Workload:
    return _build("digits", "MLP(64) on load_digits, 64 inputs", models_dir, 64, _digits_data,
                  hidden_layer_sizes=(64,), max_iter=300)


def fashion(models_dir: Path) -> Workload:
    return _build("fashion", "MLP(1024, 1024) on Fashion-MNIST, 784 inputs", models_dir, 64,
                  _fashion_data, hidden_layer_sizes=(1024, 1024), max_iter=3, batch_size=256)
