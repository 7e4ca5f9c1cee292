"""A small convolutional network for Fashion-MNIST (PyTorch), exported to ONNX: the compute-bound
reference model.

The architecture is PyTorch's classic MNIST example: conv 1->32 3x3, ReLU, conv 32->64 3x3,
ReLU, max-pool 2, dropout, fc 9216->128, ReLU, dropout, fc 128->10; about 12 M multiply-adds
per image (the 128-hidden MLP needs 0.1 M). The two conv widths and the hidden size are
parameters, for a heavier or lighter variant. The exported model takes the same flat request as
the other Fashion-MNIST models, `X` FP32 [-1, 784], reshapes it to [-1, 1, 28, 28] inside, and
answers `label` INT64 [-1] (argmax) and `probabilities` FP32 [-1, 10] (softmax).

Torch is imported inside the functions only: the rest of frugalserve imports without it.
"""

from __future__ import annotations

import importlib.util
import io
import time
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from rich.progress import Progress

from .data import accuracy
from .fashion_mnist import PIXELS, FashionMNIST, Split
from .onnx_export import INPUT_NAME, OPSET, predict_labels, write_model
from .tracking import cost_usd, tracked

if TYPE_CHECKING:
    import torch

NAME = "fmnist-cnn"
SIDE = 28
CLASSES = 10
OUTPUT_NAMES = ("label", "probabilities")
CHANNELS = (32, 64)
HIDDEN = 128


def macs_per_image(channels: tuple[int, int] = CHANNELS, hidden: int = HIDDEN) -> int:
    """Multiply-adds of one image: conv1 at 26x26, conv2 at 24x24, fc1 from 12x12 after the
    pool, fc2."""
    c1, c2 = channels
    return (26 * 26 * c1 * 9 + 24 * 24 * c2 * c1 * 9 + 12 * 12 * c2 * hidden
            + hidden * CLASSES)


def describe(channels: tuple[int, int] = CHANNELS, hidden: int = HIDDEN) -> str:
    return (f"CNN (conv {channels[0]}, conv {channels[1]}, pool, fc {hidden}) on Fashion-MNIST, "
            f"784 inputs, {macs_per_image(channels, hidden) / 1e6:.0f} M MACs/image")


class ExportMismatch(RuntimeError):
    """The ONNX file does not compute what the torch model computes."""


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def build_model(seed: int = 0, channels: tuple[int, int] = CHANNELS,
                hidden: int = HIDDEN) -> torch.nn.Module:
    """The untrained network: logits from [n, 1, 28, 28] images."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3), nn.ReLU(),
        nn.Conv2d(c1, c2, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(12 * 12 * c2, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, CLASSES),
    )


def _serving_module(net: torch.nn.Module) -> torch.nn.Module:
    """`net` behind the serving signature: flat rows in; label and probabilities out."""
    import torch

    class Serving(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net(x.reshape(-1, 1, SIDE, SIDE))
            return torch.argmax(logits, dim=1), torch.softmax(logits, dim=1)

    return Serving(net).eval()


@dataclass(frozen=True)
class TrainedCNN:
    net: Any  # torch.nn.Module in eval mode: logits from [n, 1, 28, 28]
    epochs: int
    steps: int
    train_s: float
    validation_accuracy: float


def _logits(net: torch.nn.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    import torch

    with torch.inference_mode():
        parts = [net(torch.from_numpy(x[i:i + batch]).reshape(-1, 1, SIDE, SIDE)).numpy()
                 for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.empty((0, CLASSES), np.float32)


def train_cnn(data: FashionMNIST, progress: Progress, epochs: int = 1, batch_size: int = 128,
              lr: float = 1e-3, threads: int = 2, seed: int = 0, max_steps: int | None = None,
              channels: tuple[int, int] = CHANNELS, hidden: int = HIDDEN,
              name: str = NAME) -> TrainedCNN:
    """Adam on cross-entropy, `epochs` passes over the training split (or `max_steps` steps),
    one bar step per mini-batch; the returned net is in eval mode."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        net = build_model(seed, channels, hidden)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        loss_fn = torch.nn.CrossEntropyLoss()
        x = torch.from_numpy(np.ascontiguousarray(data.train.x)).reshape(-1, 1, SIDE, SIDE)
        y = torch.from_numpy(data.train.y)
        per_epoch = -(-len(data.train) // batch_size)
        total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
        task = progress.add_task(f"train {name} ({epochs} epoch(s), batch {batch_size})",
                                 total=total)
        generator = torch.Generator().manual_seed(seed)
        steps, loss_avg = 0, None
        net.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                if steps >= total:
                    break
                index = order[start:start + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(net(x[index]), y[index])
                loss.backward()
                optimizer.step()
                steps += 1
                value = loss.item()
                loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
                if steps % 10 == 0 or steps == total:
                    progress.update(task, completed=steps, description=(
                        f"train {name} (epoch {epoch}/{epochs}, loss {loss_avg:.3f})"))
        net.eval()
        val_acc = accuracy(_logits(net, data.validation.x).argmax(1), data.validation)
        train_s = time.perf_counter() - t0
        progress.update(task, completed=total, description=(
            f"train {name} ({steps} steps, {train_s:.0f} s, val acc {val_acc:.3f})"))
        return TrainedCNN(net, epochs, steps, train_s, val_acc)
    finally:
        torch.set_num_threads(previous_threads)


def to_onnx(net: torch.nn.Module) -> bytes:
    """The ONNX bytes of the serving signature, batch axis dynamic, opset 17 (TorchScript
    exporter; torch's newer exporter would need onnxscript)."""
    import torch

    module = _serving_module(net)
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says so
        torch.onnx.export(module, (torch.zeros(2, PIXELS),), buffer, dynamo=False,
                          opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)
    return buffer.getvalue()


def check_export(net: torch.nn.Module, onnx_bytes: bytes, x: np.ndarray,
                 atol: float = 1e-4) -> float:
    """Run `x` through torch and through onnxruntime; raise ExportMismatch unless the
    probabilities agree within `atol` and the labels are equal. Returns the largest difference."""
    import torch

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    with torch.inference_mode():
        want_label, want_prob = (t.numpy() for t in _serving_module(net)(torch.from_numpy(x)))
    if probabilities.shape != want_prob.shape or not np.allclose(probabilities, want_prob,
                                                                 atol=atol):
        raise ExportMismatch(f"ONNX probabilities differ from torch's (shape "
                             f"{probabilities.shape} vs {want_prob.shape})")
    # a near-tie may flip argmax by float noise: compare labels where torch's choice is clear
    top2 = np.sort(want_prob, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 10 * atol
    if label.dtype != np.int64 or not np.array_equal(label[clear], want_label[clear]):
        raise ExportMismatch("ONNX labels differ from torch's")
    return float(np.abs(probabilities - want_prob).max())


def export_cnn(net: torch.nn.Module, repository: Path, name: str = NAME, version: int = 1,
               config: dict[str, Any] | None = None, check_rows: np.ndarray | None = None) -> Path:
    """Export `net`, check the export against torch on `check_rows` (random images when
    None), and write it into the model repository; returns the .onnx path."""
    onnx_bytes = to_onnx(net)
    if check_rows is None:
        check_rows = np.random.default_rng(0).random((64, PIXELS), dtype=np.float32)
    check_export(net, onnx_bytes, np.ascontiguousarray(check_rows, dtype=np.float32))
    return write_model(onnx_bytes, repository, name, version, config)


@dataclass(frozen=True)
class BuiltCNN:
    path: Path  # the exported model.onnx
    train_s: float
    steps: int
    validation_accuracy: float  # torch's, after training
    test_accuracy: float  # of the exported ONNX file, on the test split
    training_run_id: int | None = None  # in the ledger, when one was given
    training_cost_usd: Decimal | None = None


def build(repository: Path, data: FashionMNIST, progress: Progress, epochs: int = 1,
          name: str = NAME, config: dict[str, Any] | None = None,
          ledger_url: str | None = None, **train: Any) -> BuiltCNN:
    """Train (`train`: more train_cnn arguments), export into `repository` (checked against
    torch on validation images), and measure the export's accuracy on the test split. With
    `ledger_url`, the training is recorded there as a run of `name` version 1, with its cost."""
    params = {"kind": "cnn", "epochs": epochs, "train_rows": len(data.train),
              **{k: list(v) if isinstance(v, tuple) else v for k, v in train.items()}}
    with tracked(name, ledger_url, params) as run:
        trained = train_cnn(data, progress, epochs=epochs, name=name, **train)
        run.params.update(steps=trained.steps, validation_accuracy=trained.validation_accuracy)
    path = export_cnn(trained.net, repository, name, config=config,
                      check_rows=data.validation.x[:256])
    test = predict_labels(path, data.test.x)
    return BuiltCNN(path, trained.train_s, trained.steps, trained.validation_accuracy,
                    accuracy(test, data.test), run.id, cost_usd(run))


def subset(data: FashionMNIST, train: int, validation: int, test: int) -> FashionMNIST:
    """The first rows of each split: for quick runs and tests."""
    def cut(split: Split, n: int) -> Split:
        return Split(split.x[:n], split.y[:n])

    return FashionMNIST(cut(data.train, train), cut(data.validation, validation),
                        cut(data.test, test))
