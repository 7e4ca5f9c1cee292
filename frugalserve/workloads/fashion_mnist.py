"""Fashion-MNIST: the image workload, and two reference classifiers trained on it.

The data comes from the Debian package `dataset-fashion-mnist` (Zalando's IDX files), so the
demo needs no network. Splits are fixed: the 60k training images are shuffled with a seed into
55k train and 5k validation; the 10k test images are the test split.
"""

from __future__ import annotations

import copy
import gzip
import time
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
from rich.progress import Progress
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from .data import DatasetMissing, accuracy
from .onnx_export import export_classifier, predict_labels
from .tracking import cost_usd, tracked

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
PIXELS = 28 * 28
VALIDATION = 5_000
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, 784) float32 in [0, 1]
    y: np.ndarray  # (n,) int64 class ids

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FashionMNIST:
    train: Split
    validation: Split
    test: Split


def load(root: Path = DEFAULT_ROOT, seed: int = 0, validation: int = VALIDATION) -> FashionMNIST:
    """The three splits; the same seed always gives the same train/validation split."""
    x_all, y_all = _read_pair(Path(root), "train")
    x_test, y_test = _read_pair(Path(root), "t10k")
    order = np.random.default_rng(seed).permutation(len(y_all))
    val, train = order[:validation], order[validation:]
    return FashionMNIST(Split(x_all[train], y_all[train]), Split(x_all[val], y_all[val]),
                        Split(x_test, y_test))


def _read_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", _IMAGE_MAGIC, 16)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", _LABEL_MAGIC, 8)
    x = np.empty((len(labels), PIXELS), dtype=np.float32)
    np.multiply(images.reshape(len(labels), PIXELS), np.float32(1 / 255), out=x)  # no f64 copy
    return x, labels.astype(np.int64)


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    if not path.exists():
        raise DatasetMissing(f"{path} not found: Fashion-MNIST is not installed; install it with "
                             "`apt-get install dataset-fashion-mnist` (or pass its folder)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {found})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


# -- reference models ------------------------------------------------------------------------

def train_logreg(data: FashionMNIST, progress: Progress, max_iter: int = 100) -> LogisticRegression:
    """Multinomial logistic regression (lbfgs). lbfgs reports no per-iteration progress and
    restarting it in slices loses its curvature estimate, so the bar pulses until the fit ends
    (Rich refreshes from its own thread)."""
    model = LogisticRegression(max_iter=max_iter)
    task = progress.add_task(f"train fmnist-logreg (lbfgs, {max_iter} iterations)", total=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the time budget
        model.fit(data.train.x, data.train.y)
    progress.update(task, total=1, completed=1)
    return model


def train_mlp(data: FashionMNIST, progress: Progress, epochs: int = 15, patience: int = 3,
              seed: int = 0, holdout: int = 5_000) -> MLPClassifier:
    """One hidden layer of 128, one epoch per partial_fit, early stopping on the accuracy of
    the last `holdout` training rows (not fitted): keeps the best epoch, stops after `patience`
    epochs without a gain. Not on the validation split: the optimizer calibrates cascades
    there, and a model chosen for its validation score looks better there than it is."""
    model = MLPClassifier(hidden_layer_sizes=(128,), random_state=seed)
    classes = np.arange(len(CLASSES))
    rng = np.random.default_rng(seed)
    cut = len(data.train) - min(holdout, len(data.train) // 10)
    fit_x, fit_y = data.train.x[:cut], data.train.y[:cut]
    stop_x, stop_y = data.train.x[cut:], data.train.y[cut:]
    task = progress.add_task("train fmnist-mlp (128 hidden, adam)", total=epochs)
    best, best_acc, best_epoch, stale = model, -1.0, 0, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(fit_y))
        model.partial_fit(fit_x[order], fit_y[order], classes=classes)
        acc = float((model.predict(stop_x) == stop_y).mean())
        progress.update(task, advance=1,
                        description=f"train fmnist-mlp (epoch {epoch}, held-out acc {acc:.3f})")
        if acc > best_acc:
            best, best_acc, best_epoch, stale = copy.deepcopy(model), acc, epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    progress.update(task, completed=epochs, description=f"train fmnist-mlp (kept epoch "
                    f"{best_epoch} of {epoch}, held-out acc {best_acc:.3f})")
    return best


# -- the repository the demo serves ----------------------------------------------------------

@dataclass(frozen=True)
class ReferenceModel:
    name: str
    path: Path  # the exported model.onnx
    train_s: float
    test_accuracy: float  # of the exported ONNX file, on the 10k test images
    validation_accuracy: float  # of the exported ONNX file, on the validation split
    training_run_id: int | None = None  # in the ledger, when one was given
    training_cost_usd: Decimal | None = None


def build_repository(repository: Path, data: FashionMNIST, progress: Progress,
                     ledger_url: str | None = None) -> list[ReferenceModel]:
    """Train both reference models, export them to ONNX, measure the exports on the validation
    and test sets. With `ledger_url`, each training is recorded there as a run of the model's
    version 1, with its cost."""
    trainers = (("fmnist-logreg", train_logreg), ("fmnist-mlp", train_mlp))
    built = []
    for name, train in trainers:
        params = {"kind": name.removeprefix("fmnist-"), "train_rows": len(data.train),
                  "threads": 1}
        # One BLAS thread: on a small, shared machine the threaded kernels spin against each
        # other; for these shapes they measured 3x slower than a single thread.
        with tracked(name, ledger_url, params) as run, threadpool_limits(1):
            t0 = time.perf_counter()
            model = train(data, progress)
            train_s = time.perf_counter() - t0
        path = export_classifier(model, data.train.x, repository, name)
        val_accuracy = accuracy(predict_labels(path, data.validation.x), data.validation)
        test_accuracy = accuracy(predict_labels(path, data.test.x), data.test)
        built.append(ReferenceModel(name, path, train_s, test_accuracy, val_accuracy, run.id,
                                    cost_usd(run)))
    return built
