"""Bad requests get {"error": "..."} with the right status, never a 500 or a stack trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import support
from conftest import SHARED_MAX_BODY


def _row(artifacts, n=1):
    return artifacts.X[:n]


def _input(data, shape=(1, 64), datatype="FP32", name="X", **extra):
    entry = {"name": name, "shape": list(shape), "datatype": datatype, "data": data}
    entry.update(extra)
    return entry


def assert_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"error"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in doc["error"]
    for word in words:
        assert word.lower() in doc["error"].lower(), (word, doc["error"])
    return doc["error"]


# -- 400: malformed bodies -------------------------------------------------------------------


def test_malformed_json(http):
    r = http.post("/v2/models/digits/infer", content=b'{"inputs": [',
                  headers={"content-type": "application/json"})
    assert_error(r, 400, "json")


def test_empty_body(http):
    assert_error(http.post("/v2/models/digits/infer", content=b""), 400)


def test_body_is_not_an_object(http):
    assert_error(http.post("/v2/models/digits/infer", json=[1, 2, 3]), 400, "object")


@pytest.mark.parametrize("doc", [{}, {"inputs": []}, {"inputs": {"X": [1]}}, {"inputs": None}])
def test_inputs_missing_or_empty(http, doc):
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, "inputs")


def _valid(artifacts):
    return _input(artifacts.X[0].tolist())


BAD_TENSORS = {
    "input not an object": (lambda a: ["X"], "input"),
    "no name": (lambda a: [{"shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}], "name"),
    "shape not a list": (lambda a: [_input(a.X[0].tolist()) | {"shape": 64}], "shape"),
    "negative dimension": (lambda a: [_input(a.X[0].tolist(), shape=(1, -1))], "shape"),
    "float dimension": (lambda a: [_input(a.X[0].tolist()) | {"shape": [1.0, 64]}], "shape"),
    "bool dimension": (lambda a: [_input(a.X[0].tolist()) | {"shape": [True, 64]}], "shape"),
    "unknown datatype": (lambda a: [_input(a.X[0].tolist(), datatype="FLOAT")], "datatype"),
    "no data": (lambda a: [{"name": "X", "shape": [1, 64], "datatype": "FP32"}], "data"),
    "data too short for shape": (lambda a: [_input(a.X[0, :63].tolist())], "shape"),
    "data too long for shape": (lambda a: [_input(a.X[0].tolist() + [0.0])], "shape"),
    "strings as FP32": (lambda a: [_input(["a"] * 64)], "X"),
    "data is a string": (lambda a: [_input("abc")], "X"),
    "objects in data": (lambda a: [_input([{"a": 1}] * 64)], "X"),
    "input given twice": (lambda a: [_valid(a), _valid(a)], "twice"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_malformed_tensor(http, artifacts, case):
    make, word = BAD_TENSORS[case]
    r = http.post("/v2/models/digits/infer", json={"inputs": make(artifacts)})
    assert_error(r, 400, word)


@pytest.mark.parametrize("doc_extra,word", [
    ({"id": 17}, "id"),
    ({"parameters": "fast"}, "parameters"),
    ({"parameters": {"timeout": -5}}, "timeout"),
    ({"parameters": {"timeout": "soon"}}, "timeout"),
    ({"outputs": "label"}, "outputs"),
    ({"outputs": [{"nom": "label"}]}, "outputs"),
    ({"outputs": [{"name": "logits"}]}, "logits"),
])
def test_malformed_request_fields(http, artifacts, doc_extra, word):
    doc = {"inputs": [_valid(artifacts)], **doc_extra}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, word)


def test_input_parameters_not_an_object_is_not_a_500(http, artifacts):
    # `inputs[i].parameters` must be an object; ignoring a stray value is tolerable (the data
    # is in `data`), failing with a 500 is not
    doc = {"inputs": [_input(artifacts.X[0].tolist(), parameters="binary")]}
    r = http.post("/v2/models/digits/infer", json=doc)
    if r.status_code != 200:
        assert_error(r, 400)


def test_output_parameters_not_an_object_is_400_not_500(http, artifacts):
    doc = {"inputs": [_valid(artifacts)], "outputs": [{"name": "label", "parameters": [1]}]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400)


# -- 400: the request does not fit the model -------------------------------------------------


def test_wrong_input_name(http, artifacts):
    doc = {"inputs": [_input(artifacts.X[0].tolist(), name="pixels")]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, "pixels", "X")


def test_extra_input(http, artifacts):
    doc = {"inputs": [_valid(artifacts), _input(artifacts.X[0].tolist(), name="Y")]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400)


@pytest.mark.parametrize("shape", [(1, 63), (1, 65), (64,), (1, 1, 64), (1, 8, 8)])
def test_wrong_shape(http, shape):
    n = int(np.prod(shape))
    doc = {"inputs": [_input([0.5] * n, shape=shape)]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, "shape")


@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT64", "INT32", "UINT8"])
def test_wrong_datatype_json(http, datatype):
    doc = {"inputs": [_input([0] * 64, datatype=datatype)]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, datatype, "FP32")


def test_wrong_datatype_binary(http, artifacts):
    body, headers = support.binary_body({"X": artifacts.X[:1].astype(np.float64)})
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "FP64")


def test_empty_batch(http):
    doc = {"inputs": [_input([], shape=(0, 64))]}
    assert_error(http.post("/v2/models/digits/infer", json=doc), 400, "empty")


def test_batch_larger_than_max_batch_size(http, artifacts):
    x = artifacts.X[:65]  # digits allows 64 rows
    body, headers = support.binary_body({"X": x})
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "max_batch_size")


def test_unknown_requested_output(http, artifacts):
    body, headers = support.binary_body({"X": artifacts.X[:1]}, outputs=["logits"])
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "logits")


# -- NaN --------------------------------------------------------------------------------------


def test_nan_rejected_where_the_model_does_not_allow_it(http, artifacts):
    x = artifacts.X[:3].copy()
    x[1, 5] = np.nan
    body, headers = support.binary_body({"X": x})
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "nan")


def test_nan_accepted_where_the_config_allows_it(http, artifacts):
    x = artifacts.X[:2].copy()
    x[0, 5] = np.nan
    body, headers = support.binary_body({"X": x})
    r = http.post("/v2/models/digits_nan/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    _, outputs = support.decode_response(r)
    expected = artifacts.onnx_predict("lr", x)
    assert outputs["probabilities"].shape == (2, 10)
    # the clean row is unaffected by its NaN neighbour in the same request
    support.assert_close(outputs["probabilities"][1], expected["probabilities"][1])


def test_infinity_is_not_nan(http, artifacts):
    x = artifacts.X[:1].copy()
    x[0, 5] = np.inf
    body, headers = support.binary_body({"X": x})
    r = http.post("/v2/models/digits/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text


# -- binary extension framing -----------------------------------------------------------------


def _raw_binary(doc: dict, blob: bytes, header_length: int | str | None = None):
    head = json.dumps(doc).encode()
    length = len(head) if header_length is None else header_length
    return head + blob, {"Inference-Header-Content-Length": str(length),
                         "Content-Type": "application/octet-stream"}


def _bin_input(size, shape=(1, 64), datatype="FP32"):
    return {"name": "X", "shape": list(shape), "datatype": datatype,
            "parameters": {"binary_data_size": size}}


def test_binary_size_does_not_match_shape(http, artifacts):
    raw = artifacts.X[:1].tobytes()
    body, headers = _raw_binary({"inputs": [_bin_input(len(raw) - 4)]}, raw[:-4])
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "bytes")


def test_binary_size_runs_past_the_body(http, artifacts):
    raw = artifacts.X[:1].tobytes()
    body, headers = _raw_binary({"inputs": [_bin_input(len(raw) + 4)]}, raw)
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400)


def test_binary_data_nobody_claims(http, artifacts):
    raw = artifacts.X[:1].tobytes()
    body, headers = _raw_binary({"inputs": [_bin_input(len(raw))]}, raw + b"\0\0\0\0")
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "bytes")


@pytest.mark.parametrize("header", ["-1", "999999", "abc"])
def test_bad_header_length(http, artifacts, header):
    raw = artifacts.X[:1].tobytes()
    body, headers = _raw_binary({"inputs": [_bin_input(len(raw))]}, raw, header_length=header)
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400)


def test_binary_data_size_without_header(http, artifacts):
    raw = artifacts.X[:1].tobytes()
    head = json.dumps({"inputs": [_bin_input(len(raw))]}).encode()
    r = http.post("/v2/models/digits/infer", content=head)
    assert_error(r, 400, "Inference-Header-Content-Length")


def test_binary_shape_of_more_dimensions_than_numpy_holds(http):
    # 100 dimensions of 1 hold the 4 bytes sent, but no array has that many axes: a 500 once
    shape = [1] * 100
    body, headers = _raw_binary({"inputs": [_bin_input(4, shape=shape)]}, b"\0" * 4)
    assert_error(http.post("/v2/models/digits/infer", content=body, headers=headers), 400,
                 "shape")


def test_bytes_data_nested_a_thousand_deep(http):
    # BYTES data is flattened however deep the client nests it; recursion hit Python's limit
    doc = '{"inputs": [{"name": "X", "shape": [1, 1], "datatype": "BYTES", "data": %s"a"%s}]}'
    body = (doc % ("[" * 1000, "]" * 1000)).encode()
    r = http.post("/v2/models/digits/infer", content=body,
                  headers={"content-type": "application/json"})
    assert_error(r, 400, "BYTES", "FP32")


# -- 404 --------------------------------------------------------------------------------------


def test_unknown_model_infer(http, artifacts):
    r = http.post("/v2/models/nope/infer", json=support.json_body({"X": artifacts.X[:1]}))
    assert_error(r, 404, "nope")


def test_unknown_version_infer(http, artifacts):
    r = http.post("/v2/models/digits/versions/7/infer",
                  json=support.json_body({"X": artifacts.X[:1]}))
    assert_error(r, 404, "7")


@pytest.mark.parametrize("path", [
    "/v2/models/nope", "/v2/models/nope/ready", "/v2/models/digits/versions/9",
    "/v2/models/digits/versions/9/ready", "/v2/nothing", "/elsewhere",
])
def test_unknown_things_are_404(http, path):
    assert_error(http.get(path), 404)


@pytest.mark.parametrize("name", ["a" * 300, "%2e%2e", ".hidden"])
def test_load_of_a_name_no_folder_can_have_is_404(http, name):
    # 300 characters made the file system's ENAMETOOLONG a 500; '..' named the repository's parent
    assert_error(http.post(f"/v2/repository/models/{name}/load"), 404, "cannot load")


@pytest.mark.parametrize("since", ["1e400d", "infd", "nand", "inf", "-1e400"])
def test_report_since_out_of_range_is_400(http, since):
    assert_error(http.get("/v2/admin/report", params={"since": since}), 400, "out of range")


# -- 413 --------------------------------------------------------------------------------------


def test_body_over_limit_with_content_length(http, artifacts):
    # valid JSON, just too big: 64 rows of 64 floats padded with a long id
    doc = support.json_body({"X": artifacts.X[:64]}, id="x" * SHARED_MAX_BODY)
    r = http.post("/v2/models/digits/infer", json=doc)
    assert_error(r, 413, "limit")


@pytest.fixture(scope="module")
def small_limit_server(shared_repo, server):
    # the same transport as the shared server this run of the module uses
    settings = support.settings(shared_repo, metering=False, max_body_bytes=2048)
    with support.LiveServer(settings, transport=server.transport) as live:
        yield live


def _request_over_2k(artifacts) -> bytes:
    body = json.dumps(support.json_body({"X": artifacts.X[:8]})).encode()
    assert len(body) > 2048
    return body


def test_small_limit_content_length(small_limit_server, artifacts):
    with small_limit_server.client() as client:
        ok = client.post("/v2/models/digits/infer",
                         json=support.json_body({"X": np.zeros((1, 64), np.float32)}))
        assert ok.status_code == 200, ok.text
        r = client.post("/v2/models/digits/infer", content=_request_over_2k(artifacts),
                        headers={"content-type": "application/json"})
        assert_error(r, 413)


def test_small_limit_chunked_body(small_limit_server, artifacts):
    # no Content-Length: the limit must hold for a chunked body too, however it arrives (here
    # all of it in one write, so the server is likely to receive it in one piece)
    body = _request_over_2k(artifacts)
    request = support.chunked_request("/v2/models/digits/infer", body)
    assert_error(support.raw_http(small_limit_server.port, request), 413)


def test_small_chunked_body_under_the_limit_is_served(small_limit_server):
    body = json.dumps(support.json_body({"X": np.zeros((1, 64), np.float32)})).encode()
    assert len(body) < 2048
    r = support.raw_http(small_limit_server.port,
                         support.chunked_request("/v2/models/digits/infer", body))
    assert r.status_code == 200, r.text


def test_small_limit_chunked_body_in_pieces(small_limit_server, artifacts):
    body = _request_over_2k(artifacts)
    pieces = [body[i:i + 500] for i in range(0, len(body), 500)]
    with small_limit_server.client() as client:
        r = client.post("/v2/models/digits/infer", content=iter(pieces),
                        headers={"content-type": "application/json"})
        assert_error(r, 413)


# -- the server keeps serving after all of the above -----------------------------------------


def test_still_serving(http, artifacts):
    r = http.post("/v2/models/digits/infer", json=support.json_body({"X": _row(artifacts)}))
    assert r.status_code == 200


# -- a model with two inputs (a FP32 [-1, 3], b INT64 [-1, 1]) ------------------------------


def _typed(a_rows=1, b_rows=1, b_type="INT64", b_data=None):
    return {"inputs": [
        {"name": "a", "shape": [a_rows, 3], "datatype": "FP32", "data": [0.5] * (3 * a_rows)},
        {"name": "b", "shape": [b_rows, 1], "datatype": b_type,
         "data": b_data if b_data is not None else [1] * b_rows},
    ]}


def test_inputs_disagree_on_batch_size(http):
    assert_error(http.post("/v2/models/typed/infer", json=_typed(a_rows=2, b_rows=3)), 400,
                 "batch")


def test_missing_second_input(http):
    doc = _typed()
    doc["inputs"] = doc["inputs"][:1]
    assert_error(http.post("/v2/models/typed/infer", json=doc), 400, "b")


def test_second_input_wrong_datatype(http):
    assert_error(http.post("/v2/models/typed/infer", json=_typed(b_type="FP32")), 400, "INT64")


def test_fractional_numbers_for_an_integer_tensor(http):
    # 1.5 is not an INT64: it must be refused, not truncated to 1
    assert_error(http.post("/v2/models/typed/infer", json=_typed(b_data=[1.5])), 400, "b")


def test_strings_for_a_number_tensor(http):
    # "0.5" is a JSON string, not a number: FP32 data must be numbers
    doc = _typed()
    doc["inputs"][0]["data"] = ["0.5", "0.5", "0.5"]
    assert_error(http.post("/v2/models/typed/infer", json=doc), 400, "a")


def test_a_number_too_large_for_fp32_is_refused_not_made_infinite(http):
    doc = _typed()
    doc["inputs"][0]["data"] = [0.5, 1e40, 0.5]
    assert_error(http.post("/v2/models/typed/infer", json=doc), 400, "out of range")


def test_an_integer_too_large_for_int64_is_refused(http):
    assert_error(http.post("/v2/models/typed/infer", json=_typed(b_data=[2**70])), 400, "b")
