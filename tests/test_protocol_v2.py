"""The Open Inference Protocol (V2) over HTTP: health, metadata, JSON and binary inference."""

from __future__ import annotations

import numpy as np
import pytest
import support


def test_server_metadata(http):
    r = http.get("/v2")
    assert r.status_code == 200
    doc = r.json()
    assert doc["name"] == "frugalserve"
    assert isinstance(doc["version"], str) and doc["version"]
    assert "binary_tensor_data" in doc["extensions"]
    assert "model_repository" in doc["extensions"]


def test_health_live_and_ready(http):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200


def test_model_metadata(http):
    r = http.get("/v2/models/digits")
    assert r.status_code == 200
    doc = r.json()
    assert doc["name"] == "digits"
    assert doc["versions"] == ["1", "2"]
    assert doc["platform"] == "onnx"
    assert doc["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in doc["outputs"]} == {
        "label": ("INT64", [-1]),
        "probabilities": ("FP32", [-1, 10]),
    }


def test_model_version_metadata(http):
    r = http.get("/v2/models/digits/versions/1")
    assert r.status_code == 200
    assert r.json()["versions"] == ["1"]
    assert r.json()["name"] == "digits"


def test_sklearn_model_metadata_without_config(http):
    doc = http.get("/v2/models/skdigits").json()
    assert doc["platform"] == "sklearn"
    assert doc["versions"] == ["1"]
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in doc["outputs"]} == {"label", "probabilities"}


def test_model_and_version_ready(http):
    assert http.get("/v2/models/digits/ready").status_code == 200
    assert http.get("/v2/models/digits/versions/1/ready").status_code == 200
    assert http.get("/v2/models/digits/versions/2/ready").status_code == 200


def test_json_infer_echoes_id_passes_parameters_and_reports_cost(http, artifacts):
    x = artifacts.X[:1]
    body = support.json_body({"X": x}, id="req-42",
                             parameters={"trace": "abc", "n": 3, "nested": {"a": [1, 2]}})
    r = http.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc, outputs = support.decode_response(r)
    assert doc["id"] == "req-42"
    assert doc["model_name"] == "digits"
    assert doc["model_version"] == "2"  # the latest version serves by default
    params = doc["parameters"]
    assert params["trace"] == "abc" and params["n"] == 3 and params["nested"] == {"a": [1, 2]}
    assert isinstance(params["cost_pico_usd"], int) and params["cost_pico_usd"] > 0
    assert params["cost_micro_usd"] == pytest.approx(params["cost_pico_usd"] / 1e6)
    assert params["queue_ms"] >= 0 and params["compute_ms"] >= 0
    assert params["batch_size"] >= 1
    expected = artifacts.onnx_predict("mlp", x)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    support.assert_close(outputs["probabilities"], expected["probabilities"])


def test_infer_without_id_has_no_id(http, artifacts):
    r = http.post("/v2/models/digits/infer", json=support.json_body({"X": artifacts.X[:1]}))
    assert r.status_code == 200
    assert r.json().get("id") is None
    assert "cost_pico_usd" in r.json()["parameters"]


@pytest.mark.parametrize("version,which", [("1", "lr"), ("2", "mlp")])
def test_infer_a_chosen_version(http, artifacts, version, which):
    x = artifacts.X[10:14]
    r = http.post(f"/v2/models/digits/versions/{version}/infer",
                  json=support.json_body({"X": x}, id=f"v{version}"))
    assert r.status_code == 200, r.text
    doc, outputs = support.decode_response(r)
    assert doc["model_version"] == version
    assert doc["id"] == f"v{version}"
    expected = artifacts.onnx_predict(which, x)
    assert outputs["label"].shape == (4,)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    support.assert_close(outputs["probabilities"], expected["probabilities"])


def test_infer_requested_output_subset(http, artifacts):
    x = artifacts.X[:2]
    r = http.post("/v2/models/digits/infer",
                  json=support.json_body({"X": x}, outputs=["probabilities"]))
    assert r.status_code == 200, r.text
    doc, outputs = support.decode_response(r)
    assert list(outputs) == ["probabilities"]
    support.assert_close(outputs["probabilities"],
                         artifacts.onnx_predict("mlp", x)["probabilities"])


def test_binary_request_binary_response(http, artifacts):
    x = artifacts.X[20:23]
    body, headers = support.binary_body({"X": x}, id="bin-1", parameters={"k": "v"})
    r = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert "inference-header-content-length" in r.headers
    doc, outputs = support.decode_response(r)
    assert doc["id"] == "bin-1"
    assert doc["parameters"]["k"] == "v"
    assert "binary_data_output" not in doc["parameters"]
    assert doc["parameters"]["cost_pico_usd"] > 0
    for out in doc["outputs"]:
        assert "data" not in out
        assert out["parameters"]["binary_data_size"] > 0
    expected = artifacts.onnx_predict("mlp", x)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    support.assert_close(outputs["probabilities"], expected["probabilities"])


def test_binary_request_json_response(http, artifacts):
    x = artifacts.X[30:31]
    body, headers = support.binary_body({"X": x}, binary_outputs=False)
    r = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert "inference-header-content-length" not in r.headers
    doc, outputs = support.decode_response(r)
    assert all("data" in out for out in doc["outputs"])
    np.testing.assert_array_equal(outputs["label"], artifacts.onnx_predict("mlp", x)["label"])


def test_binary_response_for_one_output_only(http, artifacts):
    x = artifacts.X[40:42]
    body, headers = support.binary_body({"X": x}, outputs=["label", "probabilities"],
                                        binary_outputs=["probabilities"])
    r = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    doc, outputs = support.decode_response(r)
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert "data" in by_name["label"]
    assert "binary_data_size" in by_name["probabilities"]["parameters"]
    expected = artifacts.onnx_predict("mlp", x)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    support.assert_close(outputs["probabilities"], expected["probabilities"])


@pytest.mark.parametrize("pad", range(4))
def test_binary_tensor_at_any_alignment(http, artifacts, pad):
    # the JSON header's length decides where the FP32 data starts in the body
    x = artifacts.X[50:51]
    body, headers = support.binary_body({"X": x}, id="a" * (pad + 1))
    r = http.post("/v2/models/digits/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    _, outputs = support.decode_response(r)
    support.assert_close(outputs["probabilities"], artifacts.onnx_predict("lr", x)["probabilities"])


def test_joblib_sklearn_model_infer(http, artifacts):
    x = artifacts.X[100:105]
    r = http.post("/v2/models/skdigits/infer", json={
        "inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32",
                    "data": x.tolist()}],  # nested lists are accepted too
    })
    assert r.status_code == 200, r.text
    doc, outputs = support.decode_response(r)
    assert doc["model_version"] == "1"
    np.testing.assert_array_equal(outputs["label"], artifacts.lr.predict(x))
    support.assert_close(outputs["probabilities"],
                         artifacts.lr.predict_proba(x).astype(np.float32))


def test_tenant_header_bills_that_tenant(http, artifacts):
    # the shared servers trust X-Tenant on anonymous requests (tests/test_keys.py: keys)
    labels = {"model": "digits", "version": "2", "tenant": "acme"}
    before = support.scrape(http).get("frugalserve_cost_usd_total", **labels)
    r = http.post("/v2/models/digits/infer", json=support.json_body({"X": artifacts.X[:1]}),
                  headers={"X-Tenant": "acme"})
    assert r.status_code == 200
    after = support.scrape(http).get("frugalserve_cost_usd_total", **labels)
    assert after - before == pytest.approx(r.json()["parameters"]["cost_pico_usd"] / 1e12,
                                           rel=1e-6)


def test_keep_alive_connection_serves_many_requests(http, artifacts):
    for i in range(20):
        x = artifacts.X[i:i + 1]
        r = http.post("/v2/models/digits/versions/1/infer",
                      json=support.json_body({"X": x}, id=str(i)))
        assert r.status_code == 200
        assert r.json()["id"] == str(i)


def test_bytes_output_json_and_binary(http, artifacts):
    """A classifier with string labels answers a BYTES tensor, in JSON and in binary."""
    x = artifacts.X[700:704]
    expected = artifacts.named.predict(x).tolist()
    meta = http.get("/v2/models/sknamed").json()
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["label"] == "BYTES"
    r = http.post("/v2/models/sknamed/infer", json={"inputs": [
        {"name": "input", "shape": [4, 64], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    label = {o["name"]: o for o in r.json()["outputs"]}["label"]
    assert label["datatype"] == "BYTES" and label["shape"] == [4]
    assert label["data"] == expected
    body, headers = support.binary_body({"input": x}, outputs=["label"])
    r = http.post("/v2/models/sknamed/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    blob, items, pos = r.content[n:], [], 0
    while pos < len(blob):  # each element: 4-byte little-endian length, then the bytes
        size = int.from_bytes(blob[pos:pos + 4], "little")
        items.append(blob[pos + 4:pos + 4 + size].decode())
        pos += 4 + size
    assert items == expected


def test_fp64_output_of_a_regressor(http, artifacts):
    x = artifacts.X[800:803]
    expected = artifacts.reg.predict(x)
    meta = http.get("/v2/models/skreg").json()
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("label", "FP64")]
    for binary in (False, True):
        body, headers = support.binary_body({"input": x}, binary_outputs=binary)
        r = http.post("/v2/models/skreg/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        _, outputs = support.decode_response(r)
        np.testing.assert_allclose(outputs["label"], expected, rtol=1e-6)


def _typed_inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 3)).astype(np.float32)
    b = rng.integers(-1000, 1000, size=(n, 1)).astype(np.int64)
    return a, b


def test_typed_model_metadata(http):
    doc = http.get("/v2/models/typed").json()
    assert doc["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                             {"name": "b", "datatype": "INT64", "shape": [-1, 1]}]
    assert [(o["name"], o["datatype"]) for o in doc["outputs"]] == [
        ("sum", "FP32"), ("half", "FP16"), ("positive", "BOOL")]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_two_inputs_and_fp16_bool_outputs(http, artifacts, binary):
    a, b = _typed_inputs(4, seed=1)
    if binary:
        body, headers = support.binary_body({"a": a, "b": b})
        r = http.post("/v2/models/typed/infer", content=body, headers=headers)
    else:
        r = http.post("/v2/models/typed/infer", json=support.typed_json_body({"a": a, "b": b}))
    assert r.status_code == 200, r.text
    doc, outputs = support.decode_response(r)
    expected = artifacts.typed_expected(a, b)
    assert {o["name"]: o["datatype"] for o in doc["outputs"]} == {
        "sum": "FP32", "half": "FP16", "positive": "BOOL"}
    for name, value in expected.items():
        assert outputs[name].dtype == value.dtype, name
        np.testing.assert_array_equal(outputs[name], value, err_msg=name)
