"""The reference CNN: trained a few steps on a few hundred images, exported to ONNX, checked
against torch and loaded the way the server loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.progress import Progress

from frugalserve.runtimes.onnx import OnnxRuntime
from frugalserve.workloads import fashion_cnn
from frugalserve.workloads.fashion_mnist import FashionMNIST, Split
from frugalserve.workloads.onnx_export import DEFAULT_CONFIG

needs_torch = pytest.mark.skipif(
    not fashion_cnn.torch_available(),
    reason="torch is not installed (not part of the test extras yet; the bench installs "
           "torch==2.13.0)")

QUIET = Progress(disable=True)


def _tiny_data(seed: int = 0) -> FashionMNIST:
    """300 training images whose class is the brightness of one 7x7 block: learnable in a few
    steps, and no dependency on the installed data set."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        y = rng.integers(0, 10, n)
        x = rng.random((n, 28, 28), dtype=np.float32) * 0.2
        for i, label in enumerate(y):
            row, col = divmod(int(label), 4)
            x[i, 7 * row:7 * row + 7, 7 * col:7 * col + 7] += 0.8
        return Split(x.reshape(n, 784), y.astype(np.int64))

    return FashionMNIST(split(300), split(100), split(100))


@pytest.fixture(scope="module")
def trained() -> fashion_cnn.TrainedCNN:
    return fashion_cnn.train_cnn(_tiny_data(), QUIET, epochs=3, batch_size=32, threads=1,
                                 max_steps=20)


@needs_torch
def test_training_runs_the_asked_steps_and_learns(trained: fashion_cnn.TrainedCNN) -> None:
    assert trained.steps == 20
    assert not trained.net.training
    assert trained.validation_accuracy > 0.3  # chance is 0.1


@needs_torch
def test_export_matches_torch_and_has_the_v2_signature(trained: fashion_cnn.TrainedCNN,
                                                      tmp_path: Path) -> None:
    data = _tiny_data(seed=1)
    path = fashion_cnn.export_cnn(trained.net, tmp_path, "cnn", check_rows=data.test.x[:50])
    assert path == tmp_path / "cnn" / "1" / "model.onnx"
    assert yaml.safe_load((tmp_path / "cnn" / "config.yaml").read_text()) == DEFAULT_CONFIG

    runtime = OnnxRuntime(path, {})
    try:
        inputs, outputs = runtime.signature()
        assert [(s.name, s.datatype, s.shape) for s in inputs] == [("X", "FP32", (-1, 784))]
        assert {(s.name, s.datatype, s.shape) for s in outputs} == {
            ("label", "INT64", (-1,)), ("probabilities", "FP32", (-1, 10))}
        # any batch size: 1, 7 and 64 rows
        for n in (1, 7, 64):
            x = np.ascontiguousarray(np.resize(data.test.x, (n, 784)))
            got = runtime.predict({"X": x})
            assert got["probabilities"].shape == (n, 10) and got["label"].shape == (n,)
            assert np.allclose(got["probabilities"].sum(axis=1), 1.0, atol=1e-5)
            # the same numbers as torch (check_export raises otherwise)
            assert fashion_cnn.check_export(trained.net, path.read_bytes(), x) < 1e-4
    finally:
        runtime.close()


@needs_torch
def test_check_export_catches_a_different_model(trained: fashion_cnn.TrainedCNN) -> None:
    other = fashion_cnn.build_model(seed=1).eval()
    x = _tiny_data().test.x[:16]
    with pytest.raises(fashion_cnn.ExportMismatch):
        fashion_cnn.check_export(trained.net, fashion_cnn.to_onnx(other), x)


def test_macs_match_the_layers() -> None:
    assert fashion_cnn.macs_per_image() == 11_992_448
    assert "12 M MACs" in fashion_cnn.describe()


@needs_torch
@pytest.mark.parametrize(("channels", "hidden"), [(fashion_cnn.CHANNELS, fashion_cnn.HIDDEN),
                                                  ((8, 16), 32)])
def test_macs_are_what_the_network_computes(channels, hidden) -> None:
    """Counted from the layers of the built network, one image through it."""
    import torch

    net = fashion_cnn.build_model(channels=channels, hidden=hidden).eval()
    counted = []

    def count(layer, _inputs, output) -> None:
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            counted.append(output.numel() * layer.in_channels * kh * kw)
        elif isinstance(layer, torch.nn.Linear):
            counted.append(layer.in_features * layer.out_features)

    for layer in net:
        layer.register_forward_hook(count)
    with torch.inference_mode():
        net(torch.zeros(1, 1, 28, 28))
    assert len(counted) == 4
    assert sum(counted) == fashion_cnn.macs_per_image(channels, hidden)


def test_frugalserve_imports_without_torch() -> None:
    probe = ("import sys; import frugalserve.cli, frugalserve.workloads.fashion_cnn; "
             "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
