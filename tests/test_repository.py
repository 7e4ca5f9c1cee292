"""The model repository: bad configs and corrupt files fail alone with a clear error; loading
and unloading while serving (repository API, or polling) drops no in-flight request."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import support
from conftest import DIGITS_CONFIG

from frugalserve.repository import ModelRepository, RepositoryError

# -- broken models: (name, how to write it, file named in the error, words of the problem) ---


def _good_onnx(repo, name, a, config=DIGITS_CONFIG):
    support.write_model(repo, name, {"1": a.lr_onnx}, config)


def _raw(repo, name, version_files: dict[str, bytes], config: str | bytes | None):
    folder = Path(repo) / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_bytes(config if isinstance(config, bytes)
                                             else config.encode())
    for rel, data in version_files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)


def _fixed_batch(onnx_bytes: bytes) -> bytes:
    """The same model with its batch axis fixed to 1 (it cannot be batched)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model.SerializeToString()


BROKEN = {
    "bad_yaml": (lambda r, a: _raw(r, "bad_yaml", {"1/model.onnx": a.lr_onnx},
                                   "batching: {max_batch_size: [8\n"),
                 "bad_yaml/config.yaml", ["yaml"]),
    "not_utf8": (lambda r, a: _raw(r, "not_utf8", {"1/model.onnx": a.lr_onnx},
                                   b"batching: {max_batch_size: 8} # caf\xe9\n"),
                 "not_utf8/config.yaml", ["not UTF-8"]),
    "unknown_key": (lambda r, a: _raw(r, "unknown_key", {"1/model.onnx": a.lr_onnx},
                                      "batchin:\n  max_batch_size: 8\n"),
                    "unknown_key/config.yaml", ["batchin"]),
    "bad_value": (lambda r, a: _raw(r, "bad_value", {"1/model.onnx": a.lr_onnx},
                                    "batching:\n  max_batch_size: 0\n"),
                  "bad_value/config.yaml", ["max_batch_size"]),
    "not_a_number": (lambda r, a: _raw(r, "not_a_number", {"1/model.onnx": a.lr_onnx},
                                       "batching:\n  max_queue_size: lots\n"),
                     "not_a_number/config.yaml", ["max_queue_size", "lots"]),
    "wrong_dtype": (lambda r, a: _raw(r, "wrong_dtype", {"1/model.onnx": a.lr_onnx},
                                      "inputs:\n  - {name: X, datatype: FP64, shape: [-1, 64]}\n"),
                    "wrong_dtype/config.yaml", ["FP64", "FP32"]),
    "wrong_input": (lambda r, a: _raw(r, "wrong_input", {"1/model.onnx": a.lr_onnx},
                                      "inputs:\n  - {name: pixels, datatype: FP32, "
                                      "shape: [-1, 64]}\n"),
                    "wrong_input/config.yaml", ["pixels"]),
    "wrong_shape": (lambda r, a: _raw(r, "wrong_shape", {"1/model.onnx": a.lr_onnx},
                                      "inputs:\n  - {name: X, datatype: FP32, shape: [-1, 32]}\n"),
                    "wrong_shape/config.yaml", ["shape"]),
    "fixed_batch": (lambda r, a: _raw(r, "fixed_batch", {"1/model.onnx": _fixed_batch(a.lr_onnx)},
                                      None),
                    "fixed_batch/", ["batch axis"]),
    "corrupt_onnx": (lambda r, a: _raw(r, "corrupt_onnx", {"1/model.onnx": b"\x08\x07garbage"},
                                       None),
                     "corrupt_onnx/1/model.onnx", ["onnx"]),
    "truncated_onnx": (lambda r, a: _raw(r, "truncated_onnx",
                                         {"1/model.onnx": a.lr_onnx[: len(a.lr_onnx) // 2]}, None),
                       "truncated_onnx/1/model.onnx", ["onnx"]),
    "corrupt_joblib": (lambda r, a: _raw(r, "corrupt_joblib",
                                         {"1/model.joblib": b"not a pickle at all"}, None),
                       "corrupt_joblib/1/model.joblib", ["joblib"]),
    "no_versions": (lambda r, a: _raw(r, "no_versions", {}, "batching: {max_batch_size: 4}\n"),
                    "no_versions", ["version"]),
    "no_artifact": (lambda r, a: _raw(r, "no_artifact", {"1/README.txt": b"nothing here"},
                                      None),
                    "no_artifact/1", ["model file"]),
    "unknown_runtime": (lambda r, a: _raw(r, "unknown_runtime", {"1/model.onnx": a.lr_onnx},
                                          "runtime: tensorflow\n"),
                        "unknown_runtime/config.yaml", ["tensorflow"]),
    "unknown_device": (lambda r, a: _raw(r, "unknown_device", {"1/model.onnx": a.lr_onnx},
                                         "device: {type: no-such-device}\n"),
                       "unknown_device/config.yaml", ["no-such-device"]),
}


def build_repo(repo: Path, a) -> Path:
    repo.mkdir(parents=True)
    _good_onnx(repo, "good", a)
    support.write_model(repo, "goodsk", {"1": a.lr})
    for make, _file, _words in BROKEN.values():
        make(repo, a)
    return repo


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory, artifacts):
    repo = build_repo(tmp_path_factory.mktemp("broken") / "models", artifacts)
    with support.LiveServer(support.settings(repo, metering=True)) as live:
        yield live


def _assert_names_file_and_problem(message: str, file: str, words: list[str]):
    assert file in message, f"{file!r} not named in: {message}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"


def test_good_models_serve_beside_broken_ones(broken_server, artifacts):
    with broken_server.client() as c:
        assert c.get("/v2/health/ready").status_code == 200
        x = artifacts.X[:2]
        r = c.post("/v2/models/good/infer", json=support.json_body({"X": x}))
        assert r.status_code == 200, r.text
        support.assert_close(support.decode_response(r)[1]["probabilities"],
                             artifacts.onnx_predict("lr", x)["probabilities"])
        r = c.post("/v2/models/goodsk/infer", json=support.json_body({"input": x}))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_model_fails_alone_with_a_clear_error(broken_server, artifacts, name):
    _make, file, words = BROKEN[name]
    with broken_server.client() as c:
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index[name]["state"] == "FAILED", index[name]
        _assert_names_file_and_problem(index[name]["reason"], file, words)
        r = c.post(f"/v2/models/{name}/infer", json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 404, r.text
        _assert_names_file_and_problem(r.json()["error"], file, words)
        assert c.get(f"/v2/models/{name}/ready").status_code == 404
        assert c.get(f"/v2/models/{name}").status_code == 404


CRASHERS = {
    # loads, but its warm-up prediction raises
    "cannot_predict": (lambda r, a: support.write_model(r, "cannot_predict",
                                                        {"1": support.BrokenClassifier()}),
                       "cannot_predict", ["cannot predict"]),
    # a runtime option that is not a number
    "bad_threads": (lambda r, a: support.write_model(r, "bad_threads", {"1": a.lr_onnx},
                                                     {"parameters": {"threads": "many"}}),
                    "bad_threads/config.yaml", ["threads"]),
}


@pytest.mark.parametrize("name", list(CRASHERS))
def test_a_model_that_cannot_run_does_not_take_the_server_down(tmp_path, artifacts, name):
    """A model whose warm-up prediction raises, or whose runtime options are wrong, must fail
    alone like a corrupt file: the server starts, the other models serve, and the index says
    which model and why."""
    make, file, words = CRASHERS[name]
    repo = tmp_path / "models"
    repo.mkdir()
    _good_onnx(repo, "good", artifacts)
    make(repo, artifacts)
    live = support.LiveServer(support.settings(repo))
    try:
        live.start()
    except Exception as exc:  # noqa: BLE001 - the failure this test is about
        pytest.fail(f"one broken model ({name}) stopped the whole server: {exc!r}")
    with live.client() as c:
        try:
            ready = c.get("/v2/health/ready").status_code
        except httpx.TransportError as exc:
            pytest.fail(f"the server is not serving ({exc!r}): one broken model ({name}) "
                        "stopped it")
        assert ready == 200
        assert c.post("/v2/models/good/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 200
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index[name]["state"] == "FAILED"
        _assert_names_file_and_problem(index[name]["reason"], file, words)
    live.stop()


def test_a_config_declaring_some_outputs_serves_only_those(tmp_path, artifacts):
    """The artifact returns label and probabilities; config.yaml declares probabilities only:
    metadata and every answer (JSON, binary, one row or many) agree on that one output."""
    repo = tmp_path / "models"
    support.write_model(repo, "probs", {"1": artifacts.lr_onnx}, {
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]})
    with support.LiveServer(support.settings(repo)) as live, live.client() as c:
        meta = c.get("/v2/models/probs").json()
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
        for rows in (1, 3):
            r = c.post("/v2/models/probs/infer",
                       json=support.json_body({"X": artifacts.X[:rows]}))
            assert r.status_code == 200, r.text
            assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
        r = c.post("/v2/models/probs/infer",
                   json=support.json_body({"X": artifacts.X[:1]}, outputs=["label"]))
        assert r.status_code == 400 and "unknown output" in r.json()["error"]


def test_config_name_must_agree_with_the_folder(tmp_path, artifacts):
    """config.yaml says `name: other` in folder `renamed`. Either the load fails saying so, or
    the model is served under one name everywhere: URL, response, metadata and metrics."""
    repo = tmp_path / "models"
    support.write_model(repo, "renamed", {"1": artifacts.lr_onnx}, {"name": "other"})
    with support.LiveServer(support.settings(repo)) as live, live.client() as c:
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        if index["renamed"]["state"] == "FAILED":
            _assert_names_file_and_problem(index["renamed"]["reason"],
                                           "renamed/config.yaml", ["name"])
            return
        r = c.post("/v2/models/renamed/infer", json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 200, r.text
        assert c.get("/v2/models/renamed").json()["name"] == "renamed"
        assert r.json()["model_name"] == "renamed"
        labels = support.scrape(c).matching("frugalserve_requests_total")
        assert {dict(lv)["model"] for lv in labels} == {"renamed"}


def test_versions_are_numeric_folders_and_the_latest_is_the_largest(tmp_path, artifacts):
    repo = tmp_path / "models"
    support.write_model(repo, "m", {"2": artifacts.lr_onnx, "10": artifacts.mlp_onnx})
    (repo / "m" / "10_backup").mkdir()  # not a version: ignored
    (repo / "m" / "10_backup" / "model.onnx").write_bytes(b"junk")
    (repo / ".hidden").mkdir()  # not a model: ignored
    loaded = ModelRepository(repo).load("m")
    try:
        assert sorted(loaded.versions, key=int) == ["2", "10"]
        assert loaded.latest == "10"
        assert ModelRepository(repo).names() == ["m"]
    finally:
        loaded.close()


def test_repository_load_reports_the_file_and_problem(tmp_path, artifacts):
    """ModelRepository on its own (no server): the same errors, as RepositoryError."""
    repo = tmp_path / "models"
    repo.mkdir()
    for name in ("bad_yaml", "unknown_key", "corrupt_onnx", "corrupt_joblib", "no_versions"):
        make, file, words = BROKEN[name]
        make(repo, artifacts)
        with pytest.raises(RepositoryError) as info:
            ModelRepository(repo).load(name)
        _assert_names_file_and_problem(str(info.value), file, words)
    with pytest.raises(RepositoryError, match="not a directory"):
        ModelRepository(tmp_path / "nope")


# -- the repository API -----------------------------------------------------------------------


def _mixed_repo(tmp_path, artifacts, good: str, held: str, broken: str):
    """A good model, a held (gated) one and a broken one."""
    repo = tmp_path / "models"
    repo.mkdir()
    _good_onnx(repo, good, artifacts)
    support.write_model(repo, held, {"1": artifacts.gated},
                        {"batching": {"max_batch_size": 4, "max_queue_size": 64}})
    BROKEN[broken][0](repo, artifacts)
    return repo


@pytest.fixture
def api_server(tmp_path, artifacts):
    """Polling off: only the repository API changes what is served."""
    repo = _mixed_repo(tmp_path, artifacts, "alpha", "held", "bad_yaml")
    with support.LiveServer(support.settings(repo)) as live:
        live.repo = repo
        yield live


def test_api_load_a_fixed_model(api_server, artifacts):
    with api_server.client() as c:
        assert c.post("/v2/models/bad_yaml/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 404
        # still broken: loading again says why
        r = c.post("/v2/repository/models/bad_yaml/load")
        assert r.status_code >= 400 and "bad_yaml/config.yaml" in r.json()["error"]
        (api_server.repo / "bad_yaml" / "config.yaml").write_text("batching: {max_batch_size: 8}\n")
        r = c.post("/v2/repository/models/bad_yaml/load", json={})
        assert r.status_code == 200, r.text
        r = c.post("/v2/models/bad_yaml/infer", json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 200, r.text
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index["bad_yaml"]["state"] == "READY"


def test_api_load_a_new_model_and_unknown_one(api_server, artifacts):
    with api_server.client() as c:
        _good_onnx(api_server.repo, "fresh", artifacts)
        assert c.post("/v2/models/fresh/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 404
        assert c.post("/v2/repository/models/fresh/load").status_code == 200
        assert c.post("/v2/models/fresh/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 200
        r = c.post("/v2/repository/models/ghost/load")
        assert r.status_code == 404
        assert "ghost" in r.json()["error"]
        r = c.post("/v2/repository/models/ghost/unload")
        assert r.status_code == 404


def test_api_load_of_a_model_that_cannot_run_fails_cleanly(api_server, artifacts):
    """A model whose warm-up prediction raises: the load fails with a JSON error naming the
    model, and the model is FAILED (not stuck LOADING); everything else keeps serving."""
    support.write_model(api_server.repo, "cannot_predict", {"1": support.BrokenClassifier()})
    with api_server.client() as c:
        r = c.post("/v2/repository/models/cannot_predict/load")
        assert r.status_code in (400, 404, 422, 500, 503), r.text
        assert "cannot_predict" in r.json()["error"]
        assert "internal server error" not in r.json()["error"]
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index["cannot_predict"]["state"] == "FAILED", index["cannot_predict"]
        r = c.post("/v2/models/cannot_predict/infer",
                   json=support.json_body({"input": artifacts.X[:1]}))
        assert r.status_code == 404, r.text
        assert c.post("/v2/models/alpha/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 200


def test_api_failed_reload_keeps_the_running_version(api_server, artifacts):
    with api_server.client() as c:
        (api_server.repo / "alpha" / "1" / "model.onnx").write_bytes(b"corrupt")
        r = c.post("/v2/repository/models/alpha/load")
        assert r.status_code >= 400
        assert "alpha/1/model.onnx" in r.json()["error"]
        r = c.post("/v2/models/alpha/infer", json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 200, r.text
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index["alpha"]["state"] == "READY"


def _held_requests(live, artifacts, n, model="held", hold=None):
    """One request holding the model, then n queued behind it (once it is held); returns a
    joiner for all n + 1 replies, and the n inputs."""
    x = artifacts.distinct_rows(n, start=50)
    path = f"/v2/models/{model}/infer"
    first = support.in_thread(lambda: support.run_concurrently(live.url, [support.Req(
        "POST", path, json=support.json_body({"input": support.sentinel_row()}, id="s"))]))
    hold.wait_entered(1)
    rest = support.in_thread(lambda: support.run_concurrently(live.url, [
        support.Req("POST", path, json=support.json_body({"input": x[i:i + 1]}, id=f"q{i}"))
        for i in range(n)]))
    return (lambda: first() + rest()), x


def _check_held(replies, artifacts, x, version="1"):
    assert [r.status_code for r in replies] == [200] * len(replies), \
        [(r.status_code, r.text) for r in replies if r.status_code != 200]
    expected = artifacts.lr.predict_proba(x).astype(np.float32)
    for i, r in enumerate(replies[1:]):
        doc, out = support.decode_response(r)
        assert doc["id"] == f"q{i}"
        assert doc["model_version"] == version
        support.assert_close(out["probabilities"][0], expected[i])


def test_api_unload_drains_in_flight_requests(api_server, artifacts):
    n = 12
    with api_server.client() as c, support.hold_gate() as hold:
        pending, x = _held_requests(api_server, artifacts, n, hold=hold)
        support.wait_for(lambda: support.queue_depth(c, "held") == n, what="queued requests")
        with api_server.client() as c2:
            unload = support.in_thread(lambda: c2.post("/v2/repository/models/held/unload"))
            # the model stops taking new requests at once ...
            support.wait_for(lambda: c.get("/v2/models/held/ready").status_code == 404,
                             what="the model to leave service")
            r = c.post("/v2/models/held/infer",
                       json=support.json_body({"input": artifacts.X[:1]}))
            assert r.status_code in (404, 503), r.text
            # ... but the requests it had already taken are all answered
            support.release_gate()
            replies = pending()
            assert unload().status_code == 200
    _check_held(replies, artifacts, x)
    with api_server.client() as c:
        assert c.post("/v2/models/held/infer",
                      json=support.json_body({"input": artifacts.X[:1]})).status_code == 404
        assert c.post("/v2/repository/models/held/load").status_code == 200
        assert c.post("/v2/models/held/infer",
                      json=support.json_body({"input": artifacts.X[:1]})).status_code == 200


def test_api_reload_while_serving_drops_nothing(api_server, artifacts):
    n = 8
    with api_server.client() as c, support.hold_gate() as hold:
        pending, x = _held_requests(api_server, artifacts, n, hold=hold)
        support.wait_for(lambda: support.queue_depth(c, "held") == n, what="queued requests")
        with api_server.client() as c2:
            reload = support.in_thread(lambda: c2.post("/v2/repository/models/held/load"))
            # the new instance takes over (the gauge now shows its empty queue) and serves new
            # requests while the old one still holds the in-flight ones
            support.wait_for(lambda: support.queue_depth(c, "held") == 0,
                             what="the new instance to take over")
            r = c.post("/v2/models/held/infer", json=support.json_body({"input": x[:1]}))
            assert r.status_code == 200, r.text
            support.release_gate()
            replies = pending()
            assert reload().status_code == 200
    _check_held(replies, artifacts, x)


def _digits_request(artifacts, model):
    def make(i):
        x = artifacts.X[i % len(artifacts.X)][None, :]
        return support.Req("POST", f"/v2/models/{model}/infer",
                           json=support.json_body({"X": x}, id=str(i)))
    return make


def _check_hammered(results, artifacts, which_by_version):
    assert results, "no requests were sent"
    seen = set()
    for i, reply in results:
        assert not isinstance(reply, BaseException), f"request {i}: {reply!r}"
        assert reply.status_code == 200, (i, reply.text)
        doc, out = support.decode_response(reply)
        assert doc["id"] == str(i)
        seen.add(doc["model_version"])
        x = artifacts.X[i % len(artifacts.X)][None, :]
        expected = artifacts.onnx_predict(which_by_version[doc["model_version"]], x)
        support.assert_close(out["probabilities"], expected["probabilities"])
    return seen


def test_api_reload_under_concurrent_load(api_server, artifacts):
    """Reload a model over and over while requests keep coming: all answered, right."""
    with support.Hammer(api_server.url, _digits_request(artifacts, "alpha")) as hammer, \
            api_server.client() as c:
        hammer.wait_for_replies(20)
        for _ in range(4):
            assert c.post("/v2/repository/models/alpha/load").status_code == 200
            hammer.wait_for_replies(20)
    _check_hammered(hammer.results, artifacts, {"1": "lr"})


# -- polling ----------------------------------------------------------------------------------


@pytest.fixture
def poll_server(tmp_path, artifacts):
    repo = _mixed_repo(tmp_path, artifacts, "steady", "pheld", "unknown_key")
    with support.LiveServer(support.settings(repo, poll_interval_s=0.1)) as live:
        live.repo = repo
        live.staging = tmp_path / "staging"
        live.staging.mkdir()
        yield live


def _place(live, name: str, version: str | None, artifact) -> None:
    """Write a model (or one version of it) outside the repository, then move it in at once."""
    stage = live.staging / f"{name}-{version}"
    if version is None:
        support.write_model(stage, name, {"1": artifact}, DIGITS_CONFIG)
        os.rename(stage / name, live.repo / name)
    else:
        support.write_model(stage, name, {version: artifact})
        os.rename(stage / name / version, live.repo / name / version)


def _versions(c, name):
    r = c.get(f"/v2/models/{name}")
    return r.json()["versions"] if r.status_code == 200 else None


def test_poll_picks_up_a_new_model_and_a_removed_one(poll_server, artifacts):
    with poll_server.client() as c:
        assert c.get("/v2/models/newcomer/ready").status_code == 404
        _place(poll_server, "newcomer", None, artifacts.mlp_onnx)
        support.wait_for(lambda: c.get("/v2/models/newcomer/ready").status_code == 200,
                         what="the new model")
        x = artifacts.X[:3]
        r = c.post("/v2/models/newcomer/infer", json=support.json_body({"X": x}))
        assert r.status_code == 200
        support.assert_close(support.decode_response(r)[1]["probabilities"],
                             artifacts.onnx_predict("mlp", x)["probabilities"])
        shutil.rmtree(poll_server.repo / "newcomer")
        support.wait_for(lambda: c.get("/v2/models/newcomer/ready").status_code == 404,
                         what="the removed model to go")
        r = c.post("/v2/models/newcomer/infer", json=support.json_body({"X": x}))
        assert r.status_code == 404


def test_poll_loads_a_fixed_config(poll_server, artifacts):
    with poll_server.client() as c:
        assert c.get("/v2/models/unknown_key/ready").status_code == 404
        (poll_server.repo / "unknown_key" / "config.yaml").write_text(
            "batching:\n  max_batch_size: 8\n")
        support.wait_for(lambda: c.get("/v2/models/unknown_key/ready").status_code == 200,
                         what="the fixed model")
        r = c.post("/v2/models/unknown_key/infer",
                   json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 200


def test_poll_keeps_serving_when_a_file_is_corrupted(poll_server, artifacts):
    with poll_server.client() as c:
        model_file = poll_server.repo / "steady" / "1" / "model.onnx"
        model_file.write_bytes(b"corrupt")
        stamp = model_file.stat().st_mtime_ns
        time.sleep(0.5)  # five polls' worth: the watcher notices and fails to reload it
        for _ in range(5):
            r = c.post("/v2/models/steady/infer", json=support.json_body({"X": artifacts.X[:1]}))
            assert r.status_code == 200, r.text
        assert model_file.stat().st_mtime_ns == stamp
        model_file.write_bytes(artifacts.mlp_onnx)
        x = artifacts.X[7:8]
        support.wait_for(lambda: np.allclose(
            support.decode_response(c.post("/v2/models/steady/infer",
                                           json=support.json_body({"X": x})))[1]["probabilities"],
            artifacts.onnx_predict("mlp", x)["probabilities"], atol=1e-6),
            what="the repaired model to be served")


def test_poll_new_version_while_requests_are_in_flight(poll_server, artifacts):
    """Version 2 appears while requests queue on version 1: those finish on version 1, and new
    requests (no version named) are served by version 2 meanwhile."""
    n = 6
    with poll_server.client() as c, support.hold_gate() as hold:
        pending, x = _held_requests(poll_server, artifacts, n, model="pheld", hold=hold)
        support.wait_for(lambda: support.queue_depth(c, "pheld") == n, what="queued requests")
        _place(poll_server, "pheld", "2", artifacts.gated)
        support.wait_for(lambda: _versions(c, "pheld") == ["1", "2"], what="version 2")
        r = c.post("/v2/models/pheld/infer", json=support.json_body({"input": x[:1]}))
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "2"
        support.release_gate()
        replies = pending()
    _check_held(replies, artifacts, x, version="1")


def test_poll_reloads_under_concurrent_load(poll_server, artifacts):
    """Versions 2 and 3 appear while requests keep coming: every request is answered, by the
    version that was the latest when it arrived."""
    with support.Hammer(poll_server.url, _digits_request(artifacts, "steady")) as hammer, \
            poll_server.client() as c:
        hammer.wait_for_replies(20)
        _place(poll_server, "steady", "2", artifacts.mlp_onnx)
        support.wait_for(lambda: _versions(c, "steady") == ["1", "2"], what="version 2")
        hammer.wait_for_replies(20)
        _place(poll_server, "steady", "3", artifacts.lr_onnx)
        support.wait_for(lambda: _versions(c, "steady") == ["1", "2", "3"], what="version 3")
        hammer.wait_for_replies(20)
    seen = _check_hammered(hammer.results, artifacts, {"1": "lr", "2": "mlp", "3": "lr"})
    assert seen == {"1", "2", "3"}
