"""The workloads as served models, and their training runs in the ledger.

MovieLens-100K's recommenders as ONNX graphs: the exact top-10 and the IVF variant answer
what the numpy path answers, for every user and through the server; a user id the model does
not know gets an in-band "no recommendation" row without failing the batch. Every workload's
training is one run in the ledger with a cost; `frugalserve workloads build` does it all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import support
import yaml
from rich.progress import Progress
from test_fashion_cnn import _tiny_data
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics.training import open_ledger, training_runs_for
from frugalserve.runtimes.onnx import OnnxRuntime
from frugalserve.workloads import catalog, fashion_cnn, fashion_mnist, movielens
from frugalserve.workloads import movielens_onnx as mo

QUIET = Progress(disable=True)
IVF_PLAN = {"version": "1", "default_tier": "economy",
            "tiers": {"economy": {"stages": [{"variant": movielens.IVF_VARIANT}]}}}


@pytest.fixture(scope="module")
def ratings() -> movielens.MovieLens:
    try:
        return movielens.load()
    except movielens.DatasetMissing as exc:
        pytest.skip(str(exc))


class Recsys:
    """A small refit (16 factors, 4 iterations: under a second) exported into a repository."""

    def __init__(self, data: movielens.MovieLens, root: Path):
        self.data = data
        self.seen = data.train.matrix(data.n_users, data.n_items)
        self.seen[data.validation.users, data.validation.items] = 1.0
        self.factors = movielens.train_als(self.seen, QUIET, factors=16, iterations=4)
        self.index = movielens.build_ivf(self.factors.items, n_lists=16)
        self.nprobe = 4
        self.repo = root / "models"
        self.exported = movielens.export(self.factors, self.index, self.seen, data, self.repo,
                                         self.nprobe)
        self.exact = movielens.top_k_exact(self.factors, self.seen)
        self.approx, _ = self.index.search(self.factors.users, self.seen, nprobe=self.nprobe)

    def scores(self) -> np.ndarray:
        s = self.factors.users @ self.factors.items.T
        s[self.seen > 0] = -np.inf
        return s

    def ids(self, dense_top: np.ndarray) -> np.ndarray:
        """Dense item rows -> data set item ids (NO_ITEM kept)."""
        return np.where(dense_top == mo.NO_ITEM, mo.NO_ITEM, self.data.item_ids[dense_top])


@pytest.fixture(scope="module")
def recsys(ratings, tmp_path_factory) -> Recsys:
    return Recsys(ratings, tmp_path_factory.mktemp("recsys"))


# -- the graphs against numpy ----------------------------------------------------------------

def test_repository_layout_and_signature(recsys):
    model = recsys.repo / movielens.MODEL_NAME
    assert recsys.exported.path == model / "1" / "model.onnx"
    assert recsys.exported.ivf_path == model / "1" / "variants" / "ivf" / "model.onnx"
    assert yaml.safe_load((model / "config.yaml").read_text())["batching"]
    for path in (recsys.exported.path, recsys.exported.ivf_path):
        runtime = OnnxRuntime(path, {})
        try:
            inputs, outputs = runtime.signature()
        finally:
            runtime.close()
        assert [s.as_dict() for s in inputs] == [
            {"name": "user", "datatype": "INT64", "shape": [-1, 1]}]
        assert [s.as_dict() for s in outputs] == [
            {"name": "items", "datatype": "INT64", "shape": [-1, 10]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]


def test_onnx_top10_is_numpys_for_every_user_and_recall_agrees(recsys):
    data = recsys.data
    exact = movielens.served_top_k(recsys.exported.path, data)
    approx = movielens.served_top_k(recsys.exported.ivf_path, data)
    scores = recsys.scores()
    assert len(movielens.disagreements(exact, recsys.exact, scores)) == 0
    assert len(movielens.disagreements(approx, recsys.approx, scores)) == 0
    # ties are rare with float factors: nearly every row is identical, slot for slot
    assert (exact == recsys.exact).all(axis=1).mean() > 0.99
    assert (approx == recsys.approx).all(axis=1).mean() > 0.99
    assert not recsys.seen[np.arange(data.n_users)[:, None], exact].any()
    # a slot swapped by a float tie moves recall by 1/(943*5) at most per swap
    for got, want in ((exact, recsys.exact), (approx, recsys.approx)):
        assert movielens.recall_at_k(got, data.test, data.n_users) == pytest.approx(
            movielens.recall_at_k(want, data.test, data.n_users), abs=1e-3)
    assert recsys.exported.test_recall == movielens.recall_at_k(exact, data.test, data.n_users)
    assert recsys.exported.ivf_test_recall == movielens.recall_at_k(approx, data.test,
                                                                    data.n_users)


def test_the_export_check_fails_on_a_real_difference(recsys):
    scores = recsys.scores()
    wrong = recsys.exact.copy()
    wrong[5] = recsys.exact[5, ::-1]  # same items, another order: the slot scores differ
    assert list(movielens.disagreements(wrong, recsys.exact, scores)) == [5]
    wrong = recsys.exact.copy()
    wrong[7, 0] = mo.NO_ITEM
    assert list(movielens.disagreements(wrong, recsys.exact, scores)) == [7]


def test_ivf_slots_it_cannot_fill_are_no_item(ratings, tmp_path):
    """A user who has seen all but 3 items of the one list probed gets 3 items, then -1."""
    data = ratings
    seen = data.train.matrix(data.n_users, data.n_items)
    factors = movielens.train_als(seen, QUIET, factors=8, iterations=2)
    index = movielens.build_ivf(factors.items, n_lists=4)
    probe = movielens._top_k(factors.users[:1] @ index.centroids.T, 1)[0, 0]
    members = index.lists[probe]
    seen[0, members[3:]] = 1.0
    seen[0, members[:3]] = 0.0
    graph = mo.ivf_graph(factors.users, factors.items, index.centroids, index.lists, seen,
                         data.user_ids, data.item_ids, 10, nprobe=1)
    path = tmp_path / "ivf.onnx"
    path.write_bytes(graph.SerializeToString())
    items, scores = mo.recommend(path, data.user_ids[:1])
    want, _ = index.search(factors.users[:1], seen[:1], nprobe=1)
    assert sorted(mo.to_dense(items, data.item_ids)[0, :3]) == sorted(members[:3])
    assert (items[0, 3:] == mo.NO_ITEM).all() and (want[0, 3:] == mo.NO_ITEM).all()
    assert np.isfinite(scores[0, :3]).all() and (scores[0, 3:] == -np.inf).all()


def test_seen_bits_pack_and_unpack(recsys, tmp_path):
    packed = mo.pack_seen(recsys.seen)
    assert packed.shape == (943, 211) and packed.nbytes * 8 < recsys.seen.size + 8 * 943
    assert (np.unpackbits(packed, axis=1)[:, :1682] == recsys.seen).all()


# -- through the server ----------------------------------------------------------------------

def _infer(client, model: str, users: np.ndarray, binary: bool = False):
    rows = np.asarray(users, np.int64).reshape(-1, 1)
    if binary:
        body, headers = support.binary_body({"user": rows})
        r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    else:
        r = client.post(f"/v2/models/{model}/infer",
                        json=support.json_body({"user": rows}, datatype="INT64"))
    return r


@pytest.fixture(scope="module")
def served(recsys, tmp_path_factory):
    """movielens-mf as exported, and a copy whose plan serves the IVF variant."""
    repo = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(recsys.repo, repo)
    shutil.copytree(repo / movielens.MODEL_NAME, repo / "movielens-ivf")
    (repo / "movielens-ivf" / "plan.yaml").write_text(yaml.safe_dump(IVF_PLAN))
    with support.LiveServer(support.settings(repo, metering=False)) as server:
        yield server


@pytest.mark.parametrize("binary", [False, True])
def test_server_answers_numpys_top10(recsys, served, binary):
    dense_users = np.array([0, 1, 17, 250, 942])
    users = recsys.data.user_ids[dense_users]
    with served.client() as client:
        for model, want in (("movielens-mf", recsys.exact), ("movielens-ivf", recsys.approx)):
            r = _infer(client, model, users, binary)
            assert r.status_code == 200, r.text
            _, out = support.decode_response(r)
            np.testing.assert_array_equal(out["items"], recsys.ids(want[dense_users]))
            np.testing.assert_allclose(
                out["scores"], np.take_along_axis(recsys.scores()[dense_users],
                                                  want[dense_users], axis=1), rtol=1e-5)


def test_unknown_users_get_no_item_rows_and_the_rest_of_the_batch_is_answered(recsys, served):
    """The server cannot declare a valid range of values for an input (so no 400): the graph
    guards its own Gather. Without the guard an out-of-range id fails the whole batch (500 for
    every request in it) and a negative one reads another user's row."""
    ids = recsys.data.user_ids
    users = np.array([ids[3], 0, -1, ids.max() + 1, 2**62, ids[4]])
    with served.client() as client:
        for model in ("movielens-mf", "movielens-ivf"):
            r = _infer(client, model, users)
            assert r.status_code == 200, r.text
            _, out = support.decode_response(r)
            good = recsys.exact if model == "movielens-mf" else recsys.approx
            np.testing.assert_array_equal(out["items"][[0, 5]], recsys.ids(good[[3, 4]]))
            assert (out["items"][1:5] == mo.NO_ITEM).all()
            assert np.isnan(out["scores"][1:5]).all()  # -inf is null in JSON
            _, raw = support.decode_response(_infer(client, model, users, binary=True))
            assert (raw["scores"][1:5] == -np.inf).all()
        # the input's declared datatype is still enforced: a float user id is a 400
        r = client.post("/v2/models/movielens-mf/infer",
                        json=support.json_body({"user": np.ones((1, 1), np.float32)}))
        assert r.status_code == 400 and "INT64" in r.json()["error"]


# -- training runs in the ledger -------------------------------------------------------------

def _runs(url: str, model: str):
    engine = open_ledger(url)
    try:
        return training_runs_for(engine, model, "1")
    finally:
        engine.dispose()


def _assert_one_priced_run(url: str, model: str, run_id: int | None, cost) -> None:
    runs = _runs(url, model)
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.id == run_id and run.cost_usd == cost
    assert run.cost_pusd > 0 and run.status == "ok" and run.source == "measured"
    assert run.wall_s > 0 and run.device == "aws-c7i.large"


def test_fashion_mnist_models_record_their_training(ledger_url, tmp_path):
    built = fashion_mnist.build_repository(tmp_path / "models", _tiny_data(), QUIET,
                                           ledger_url=ledger_url)
    assert [m.name for m in built] == ["fmnist-logreg", "fmnist-mlp"]
    for m in built:
        _assert_one_priced_run(ledger_url, m.name, m.training_run_id, m.training_cost_usd)
        assert 0 <= m.validation_accuracy <= 1


@pytest.mark.skipif(not fashion_cnn.torch_available(), reason="torch is not installed")
def test_the_cnn_records_its_training(ledger_url, tmp_path):
    built = fashion_cnn.build(tmp_path / "models", _tiny_data(), QUIET, ledger_url=ledger_url,
                              batch_size=32, threads=1, max_steps=5)
    _assert_one_priced_run(ledger_url, fashion_cnn.NAME, built.training_run_id,
                           built.training_cost_usd)
    assert _runs(ledger_url, fashion_cnn.NAME)[0].params["steps"] == 5


def test_movielens_records_one_run_for_its_fits_and_indexes(ratings, ledger_url, tmp_path):
    r = movielens.build(ratings, QUIET, factors=8, iterations=2, n_lists=8, nprobe=4,
                        repository=tmp_path / "models", ledger_url=ledger_url)
    _assert_one_priced_run(ledger_url, movielens.MODEL_NAME, r.training_run_id,
                           r.training_cost_usd)
    assert _runs(ledger_url, movielens.MODEL_NAME)[0].params["factors"] == 8
    assert r.exported is not None and r.exported.test_recall == r.test_recall


def test_without_a_ledger_nothing_is_recorded_anywhere(ratings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRUGALSERVE_LEDGER", raising=False)
    r = movielens.build(ratings, QUIET, factors=8, iterations=2, n_lists=8, nprobe=4)
    assert r.training_run_id is None and r.training_cost_usd is None and r.exported is None
    assert list(tmp_path.iterdir()) == []


# -- frugalserve workloads build -------------------------------------------------------------

def test_cli_builds_movielens_into_a_repository_with_its_run(ratings, ledger_url, tmp_path):
    repo = tmp_path / "models"
    result = CliRunner().invoke(app, ["workloads", "build", "--repository", str(repo),
                                      "--ledger", ledger_url, "--only", "movielens"])
    assert result.exit_code == 0, result.output
    assert (repo / "movielens-mf" / "1" / "variants" / "ivf" / "model.onnx").exists()
    assert not (repo / "fmnist-logreg").exists()
    run = _runs(ledger_url, "movielens-mf")[0]
    assert "movielens-mf/ivf" in result.output and "recall@10" in result.output
    assert f"${run.cost_usd:.6f}" in result.output


def test_cli_default_ledger_is_the_one_serve_uses(ratings, tmp_path, monkeypatch):
    monkeypatch.delenv("FRUGALSERVE_LEDGER", raising=False)
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "site" / "models"
    result = CliRunner().invoke(app, ["workloads", "build", "--repository", str(repo),
                                      "--only", "movielens"])
    assert result.exit_code == 0, result.output
    beside = support.settings(repo).resolved_ledger_url()
    assert beside.endswith("site/frugalserve-ledger.db")
    assert len(_runs(beside, "movielens-mf")) == 1


def test_cli_rejects_unknown_workloads(tmp_path):
    result = CliRunner().invoke(app, ["workloads", "build", "--repository", str(tmp_path),
                                      "--only", "movielens,imagenet"])
    assert result.exit_code == 2 and "imagenet" in result.output
    with pytest.raises(ValueError, match="choose from"):
        catalog.parse_only(",")
    assert catalog.parse_only("movielens, fashion-mnist") == ("fashion-mnist", "movielens")
