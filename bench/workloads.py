"""The two benchmark models, trained here and exported to ONNX, and one request body for each.

(a) `digits`: a small MLP on sklearn's load_digits, 64 inputs: HTTP and queueing dominate.
(b) `fashion-cnn`: frugalserve's reference CNN on Fashion-MNIST (PyTorch, conv 32, conv 64,
    pool, fc 128: ~12 M multiply-adds per image), 784 inputs: compute dominates.
Models are cached under bench/out/models/ and retrained only when missing.
"""

from __future__ import annotations

import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from frugalserve.progress import new_progress
from frugalserve.workloads import fashion_cnn, fashion_mnist

FASHION_PACKAGE = "dataset-fashion-mnist"
CNN_NAME = "fashion-cnn"
CNN_EPOCHS = 1
# conv 64/128: 45 M MACs an image, so the engine, not HTTP, is the cost. conv 32/64 (12 M MACs)
# is cheaper than parsing its 784-float JSON request: no HTTP server reached 0.8x of the engine.
CNN_CHANNELS = (64, 128)
CNN_TRAIN_IMAGES = 20_000  # one epoch on a subset keeps the one-off training to a few minutes
MAX_BATCH_SIZE = 64


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

    def binary_body(self) -> tuple[bytes, int]:
        """The same request with the tensor in V2's binary extension (what Triton's Python
        client sends by default): a JSON header, then the raw float32 bytes. Like `body()` it
        names no `outputs`, so both ask for every output, answered in JSON. Returns the body
        and the header's length (the Inference-Header-Content-Length header)."""
        raw = np.ascontiguousarray(self.sample, dtype="<f4").tobytes()
        tensor = {"name": "X", "shape": [1, self.sample.size], "datatype": "FP32",
                  "parameters": {"binary_data_size": len(raw)}}
        header = orjson.dumps({"inputs": [tensor]})
        return header + raw, len(header)


def digits(models_dir: Path) -> Workload:
    data = load_digits()
    x, y = (data.data / 16).astype(np.float32), data.target
    path = models_dir / "digits" / "model.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
            model.fit(x, y)
        onnx_model = to_onnx(model, x[:1], options={id(model): {"zipmap": False}},
                             target_opset=17)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(onnx_model.SerializeToString())
    return Workload("digits", "MLP(64) on load_digits, 64 inputs", path, x[0], MAX_BATCH_SIZE)


def ensure_fashion_dataset() -> None:
    if not (fashion_mnist.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").exists():
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", FASHION_PACKAGE], check=True)


def fashion_cnn_workload(models_dir: Path, console: Console) -> Workload:
    """The CNN, trained once (a Rich bar per step) and cached in `models_dir` as a model
    repository entry (`fashion-cnn/1/model.onnx`, config.yaml, train.json)."""
    ensure_fashion_dataset()
    data = fashion_mnist.load()
    path = models_dir / CNN_NAME / "1" / "model.onnx"
    facts_path = models_dir / CNN_NAME / "train.json"
    cached = orjson.loads(facts_path.read_bytes()) if facts_path.exists() else {}
    if not path.exists() or cached.get("channels") != list(CNN_CHANNELS):
        train = fashion_cnn.subset(data, CNN_TRAIN_IMAGES, len(data.validation.y),
                                   len(data.test.y))
        with new_progress(console) as progress:
            built = fashion_cnn.build(models_dir, train, progress, epochs=CNN_EPOCHS,
                                      name=CNN_NAME, channels=CNN_CHANNELS)
        facts = {"epochs": CNN_EPOCHS, "channels": list(CNN_CHANNELS),
                 "train_images": CNN_TRAIN_IMAGES, "steps": built.steps,
                 "train_s": round(built.train_s, 1),
                 "validation_accuracy": built.validation_accuracy,
                 "test_accuracy": built.test_accuracy}
        facts_path.write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2))
        console.log(f"{CNN_NAME}: trained {built.steps} steps in {built.train_s:.0f} s, "
                    f"validation accuracy {built.validation_accuracy:.3f}, test accuracy "
                    f"{built.test_accuracy:.3f} (ONNX)")
    facts = orjson.loads(facts_path.read_bytes())
    description = (f"{fashion_cnn.describe(CNN_CHANNELS)}, test accuracy "
                   f"{facts['test_accuracy']:.3f} ({facts['epochs']} epoch on "
                   f"{facts['train_images']:,} images, {facts['train_s']:.0f} s of training)")
    return Workload(CNN_NAME, description, path, data.test.x[0], MAX_BATCH_SIZE)
