"""Fixtures: small real models (scikit-learn digits, exported to ONNX) and live servers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import support
from ledger_support import ledger_url_fixture, pg_url_fixture  # noqa: F401 - fixtures
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier

DIGITS_CONFIG = {
    "batching": {"max_batch_size": 64, "max_queue_delay_ms": 5, "max_queue_size": 4096},
    "device": {"type": "aws-c7i.large", "share": 0.5, "pricing": "on_demand"},
    "parameters": {"threads": 1},
}


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Artifacts:
    X: np.ndarray  # digits features scaled to [0, 1], float32, (1797, 64)
    y: np.ndarray
    lr: LogisticRegression
    mlp: MLPClassifier
    named: LogisticRegression  # string class labels: its label output is BYTES
    reg: LinearRegression  # a regressor: one FP64 output, no probabilities
    lr_onnx: bytes
    mlp_onnx: bytes
    _sessions: dict = field(default_factory=dict)

    def session(self, which: str) -> ort.InferenceSession:
        if which not in self._sessions:
            blob = {"lr": self.lr_onnx, "mlp": self.mlp_onnx}[which]
            self._sessions[which] = ort.InferenceSession(blob,
                                                         providers=["CPUExecutionProvider"])
        return self._sessions[which]

    def onnx_predict(self, which: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """The model's direct onnxruntime output: the reference every response is held to."""
        sess = self.session(which)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, {"X": x}), strict=True))

    @cached_property
    def typed_onnx(self) -> bytes:
        """Two inputs, a FP32 [-1, 3] and b INT64 [-1, 1]; three outputs of three datatypes:
        sum = a + b (FP32), half = a as FP16, positive = a > 0 (BOOL)."""
        f, i64 = TensorProto.FLOAT, TensorProto.INT64
        nodes = [
            helper.make_node("Cast", ["b"], ["bf"], to=f),
            helper.make_node("Add", ["a", "bf"], ["sum"]),
            helper.make_node("Cast", ["a"], ["half"], to=TensorProto.FLOAT16),
            helper.make_node("Constant", [], ["zero"],
                             value=helper.make_tensor("z", f, [], [0.0])),
            helper.make_node("Greater", ["a", "zero"], ["positive"]),
        ]
        graph = helper.make_graph(
            nodes, "typed",
            [helper.make_tensor_value_info("a", f, ["N", 3]),
             helper.make_tensor_value_info("b", i64, ["N", 1])],
            [helper.make_tensor_value_info("sum", f, ["N", 3]),
             helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["N", 3]),
             helper.make_tensor_value_info("positive", TensorProto.BOOL, ["N", 3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()

    @staticmethod
    def typed_expected(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return {"sum": a + b.astype(np.float32), "half": a.astype(np.float16),
                "positive": a > 0}

    @cached_property
    def gated(self) -> support.GatedClassifier:
        return support.GatedClassifier(self.lr)

    def distinct_rows(self, n: int, start: int = 0) -> np.ndarray:
        """n distinct inputs: digits rows with a per-row offset so no two are equal."""
        idx = (np.arange(n) + start) % len(self.X)
        rows = self.X[idx].copy()
        rows[:, 1] += (np.arange(n, dtype=np.float32) + start) * np.float32(1e-3)
        return rows


def _onnx(model, X: np.ndarray) -> bytes:
    return to_onnx(model, X[:1], options={id(model): {"zipmap": False}}).SerializeToString()


@pytest.fixture(scope="session")
def artifacts() -> Artifacts:
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(max_iter=100).fit(X[:600], y[:600])
        mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0).fit(X, y)
        names = np.array(DIGIT_NAMES)[y]
        named = LogisticRegression(max_iter=50).fit(X[:600], names[:600])
    reg = LinearRegression().fit(X[:600], y[:600].astype(np.float64))
    return Artifacts(X, y, lr, mlp, named, reg, _onnx(lr, X), _onnx(mlp, X))


def build_shared_repository(repo: Path, a: Artifacts) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    # two versions: 1 = logistic regression, 2 = MLP (the default: latest)
    support.write_model(repo, "digits", {"1": a.lr_onnx, "2": a.mlp_onnx}, DIGITS_CONFIG)
    # NaN allowed by the config
    support.write_model(repo, "digits_nan", {"1": a.lr_onnx}, {
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64], "allow_nan": True}],
    })
    # a joblib scikit-learn model with no config.yaml at all (everything from the artifact)
    support.write_model(repo, "skdigits", {"1": a.lr})
    # two inputs (FP32, INT64); FP32, FP16 and BOOL outputs
    support.write_model(repo, "typed", {"1": a.typed_onnx},
                        {"batching": {"max_batch_size": 64, "max_queue_delay_ms": 5}})
    # BYTES and FP64 outputs
    support.write_model(repo, "sknamed", {"1": a.named})
    support.write_model(repo, "skreg", {"1": a.reg})
    # a model whose predict can be held by the test (see support.GatedClassifier)
    support.write_model(repo, "gated", {"1": a.gated}, {
        "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2, "max_queue_size": 256},
    })
    support.write_model(repo, "gated_tiny", {"1": a.gated}, {
        "batching": {"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 1},
    })
    # for load/unload through the repository API
    support.write_model(repo, "spare", {"1": a.lr_onnx}, DIGITS_CONFIG)
    return repo


SHARED_MAX_BODY = 256 * 1024


@pytest.fixture(scope="session")
def shared_repo(tmp_path_factory, artifacts) -> Path:
    return build_shared_repository(tmp_path_factory.mktemp("shared") / "models", artifacts)


@pytest.fixture(scope="session", params=support.TRANSPORTS)
def server(request, shared_repo, tmp_path_factory):
    """One server per transport for the protocol, bad-input, batching, metrics and client
    tests: frugalserve's native HTTP server, and the ASGI app under uvicorn."""
    ledger = tmp_path_factory.mktemp(f"ledger-{request.param}") / "ledger.db"
    settings = support.settings(shared_repo, ledger_url=f"sqlite:///{ledger}",
                                max_body_bytes=SHARED_MAX_BODY)
    with support.LiveServer(settings, transport=request.param) as live:
        yield live


@pytest.fixture
def http(server):
    with server.client() as client:
        yield client
