"""The demo's parts: the Fashion-MNIST loader, ONNX export, serving under load, ledger totals."""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import pytest
from rich.progress import Progress
from sklearn.linear_model import LogisticRegression
from sqlalchemy import insert

from frugalserve import loadgen, v2_client
from frugalserve.app import ServerSettings, ServerThread
from frugalserve.economics.ledger import (
    LedgerWriter,
    UsageChunk,
    batches,
    open_engine,
    sqlite_url,
)
from frugalserve.economics.meter import format_usd
from frugalserve.economics.summary import model_usage
from frugalserve.workloads import fashion_mnist
from frugalserve.workloads.onnx_export import INPUT_NAME, export_classifier, predict_labels

QUIET = Progress(disable=True)


def _write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n = len(labels)
    head = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    head = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
    (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + labels.tobytes()))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """IDX files like Zalando's, 40 training and 10 test images; image i is filled with i."""
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = np.repeat(np.arange(n, dtype=np.uint8), 784).reshape(n, 28, 28)
        _write_idx(tmp_path, prefix, images, (np.arange(n) % 10).astype(np.uint8))
    return tmp_path


def test_loader_splits_scales_and_is_reproducible(tiny_dataset: Path) -> None:
    data = fashion_mnist.load(tiny_dataset, seed=3, validation=8)
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 8, 10)
    for split in (data.train, data.validation, data.test):
        assert split.x.dtype == np.float32 and split.x.shape[1] == 784
        assert split.y.dtype == np.int64
        assert 0.0 <= split.x.min() and split.x.max() <= 1.0
    # the image filled with value v has label v % 10, whichever split it landed in
    assert np.array_equal(np.rint(data.train.x[:, 0] * 255).astype(int) % 10, data.train.y)
    train_ids = set(np.rint(data.train.x[:, 0] * 255).astype(int))
    val_ids = set(np.rint(data.validation.x[:, 0] * 255).astype(int))
    assert not train_ids & val_ids and len(train_ids | val_ids) == 40
    again = fashion_mnist.load(tiny_dataset, seed=3, validation=8)
    assert np.array_equal(again.validation.x, data.validation.x)


def test_missing_dataset_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(fashion_mnist.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load(tmp_path)


@pytest.mark.skipif(not fashion_mnist.DEFAULT_ROOT.exists(), reason="dataset-fashion-mnist absent")
def test_the_real_dataset_has_the_documented_splits() -> None:
    data = fashion_mnist.load()
    assert (len(data.train), len(data.validation), len(data.test)) == (55_000, 5_000, 10_000)
    assert data.test.x.shape == (10_000, 784) and data.test.x.dtype == np.float32
    assert set(np.unique(data.train.y)) == set(range(10))


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory) -> tuple[Path, LogisticRegression, np.ndarray]:
    """A small logistic regression exported the way the demo exports its models."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    model = LogisticRegression(max_iter=200).fit(x, y)
    repo = tmp_path_factory.mktemp("repo")
    export_classifier(model, x, repo, "tiny")
    return repo, model, x


def test_export_matches_sklearn_and_writes_config(served_repo) -> None:
    repo, model, x = served_repo
    path = repo / "tiny" / "1" / "model.onnx"
    assert np.array_equal(predict_labels(path, x, batch=64), model.predict(x))
    assert "max_batch_size: 64" in (repo / "tiny" / "config.yaml").read_text()


def test_loadgen_against_the_server_agrees_with_the_ledger(served_repo, tmp_path: Path) -> None:
    repo, model, x = served_repo
    expected = model.predict(x).tolist()
    bodies = [v2_client.infer_body({INPUT_NAME: x[i:i + 1]}, ["label"]) for i in range(len(x))]
    ledger_url = sqlite_url(tmp_path / "ledger.db")

    def check(i: int, body: bytes) -> bool:
        return v2_client.output_data(body, "label")[0] == expected[i]

    with ServerThread(ServerSettings(repo, ledger_url, poll_interval_s=None)) as server:
        spec = loadgen.LoadSpec(v2_client.infer_url(server.url, "tiny"), bodies, concurrency=8,
                                requests=400, duration_s=None, check=check)
        result = loadgen.run(spec, QUIET)
    summary = result.summary()
    assert (summary.requests, summary.ok, summary.accuracy) == (400, 400, 1.0)
    engine = open_engine(ledger_url)
    totals = model_usage(engine, result.started_at, result.started_at + result.elapsed_s + 1)
    engine.dispose()
    tiny = totals["tiny"]
    assert (tiny.requests, tiny.ok, tiny.batch_rows) == (400, 400, 400)
    assert tiny.cost_pusd > 0 and tiny.device == "aws-c7i.large" and tiny.share == 0.5


def _usage(ts: float, model: str, status: int, cost: int, n: int) -> UsageChunk:
    """A one-request usage chunk, as the server hands it to the ledger writer."""
    request = (n, None, ts, "t", 1, 0.0, 1.0, cost, status)
    return UsageChunk(100 + n, ts, model, "1", None, None, 1, 1.0, (request,))


def _batch(ts: float, model: str, size: int, compute_ms: float, n: int) -> dict:
    return dict(id=n, ts=ts, model=model, version="1", device="aws-c7i.large",
                pricing="on_demand", share=0.5, size=size, requests=size, compute_ms=compute_ms,
                cost_pusd=0)


def test_summary_totals_per_model_over_a_window(tmp_path: Path) -> None:
    engine = open_engine(sqlite_url(tmp_path / "ledger.db"))
    rows = [_usage(100.0, "a", 200, 1_000, 1), _usage(101.0, "a", 200, 3_000, 2),
            _usage(102.0, "a", 503, 0, 3), _usage(102.5, "a", 499, 500, 4),
            _usage(101.0, "b", 200, 7, 5), _usage(500.0, "a", 200, 10**9, 6)]  # last: outside
    writer = LedgerWriter(engine)
    for chunk in rows:
        writer.add_usage(chunk)
    assert writer.flush()
    with engine.begin() as conn:
        conn.execute(insert(batches), [_batch(100.0, "a", 2, 30.0, 1),
                                       _batch(102.0, "a", 4, 10.0, 2),
                                       _batch(900.0, "a", 64, 1e6, 3)])  # outside
    totals = model_usage(engine, 100.0, 200.0)
    assert set(totals) == {"a", "b"}
    a = totals["a"]
    assert (a.requests, a.ok, a.errors, a.cost_pusd) == (4, 2, {503: 1, 499: 1}, 4_500)
    assert (a.batches, a.batch_rows, a.mean_batch_size) == (2, 6, 3.0)
    # 4,500 pico-dollars over 2 successes, times 1,000
    assert a.cost_per_1k_usd() == Decimal("0.00000225")
    assert a.utilization(wall_s=4.0) == pytest.approx(0.01)
    # the whole half device for 10 s at $0.36/h: $0.0005, over 2 successes, per 1,000
    assert a.provisioned_per_1k_usd(Decimal("0.36"), 10.0) == Decimal("0.25")
    b = model_usage(engine, 100.0, 200.0, model="b")
    assert set(b) == {"b"} and b["b"].cost_per_1k_usd() == Decimal("7E-9")  # 7 pico x 1,000
    assert model_usage(engine, 0.0, 1.0) == {}
    engine.dispose()


def test_usd_is_shown_in_fixed_notation_with_three_digits() -> None:
    assert format_usd(Decimal("0.0000123456")) == "$0.0000123"
    assert format_usd(Decimal("12.5")) == "$12.50"
    assert format_usd(Decimal(0)) == "$0" and format_usd(None) == "-"


def test_v2_bodies_round_trip(tmp_path: Path) -> None:
    body = v2_client.infer_body({"X": np.zeros((1, 3), np.float32)}, ["label"])
    doc = orjson.loads(body)
    assert doc["inputs"][0] == {"name": "X", "shape": [1, 3], "datatype": "FP32",
                                "data": [0.0, 0.0, 0.0]}
    assert doc["outputs"] == [{"name": "label"}]
    (tmp_path / "reqs.json").write_bytes(orjson.dumps([doc, doc]))
    assert len(v2_client.bodies_from_file(tmp_path / "reqs.json")) == 2
    meta = {"inputs": [{"name": "X", "datatype": "INT64", "shape": [-1, 2]}]}
    assert orjson.loads(v2_client.zeros_body(meta))["inputs"][0]["shape"] == [1, 2]


def test_the_mlp_never_looks_at_the_validation_split() -> None:
    """The optimizer calibrates cascade thresholds on the validation split, so the MLP must not
    be chosen there: its early stopping reads a held-out slice of train. Two different
    validation splits give the very same model."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    x = (rng.random((300, 784)) * 0.2 + (y[:, None] == np.arange(784) % 10) * 0.5)
    train = fashion_mnist.Split(x.astype(np.float32), y.astype(np.int64))
    models = []
    # true labels reward every further epoch; shifted labels punish it: stopping on the
    # validation split would keep the last epoch in one run and the first in the other
    for shift in (0, 1):
        validation = fashion_mnist.Split(train.x[:100], (train.y[:100] + shift) % 10)
        data = fashion_mnist.FashionMNIST(train, validation, validation)
        models.append(fashion_mnist.train_mlp(data, QUIET, epochs=4, patience=1))
    for a, b in zip(models[0].coefs_, models[1].coefs_, strict=True):
        np.testing.assert_array_equal(a, b)
