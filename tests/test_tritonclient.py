"""The real Triton HTTP client (tritonclient.http) against frugalserve, JSON and binary."""

from __future__ import annotations

import numpy as np
import pytest
import support
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


@pytest.fixture
def client(server):
    c = triton.InferenceServerClient(url=server.hostport, network_timeout=60.0,
                                     connection_timeout=60.0)
    yield c
    c.close()


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "frugalserve"
    model = client.get_model_metadata("digits")
    assert model["versions"] == ["1", "2"]
    assert model["inputs"][0]["name"] == "X"


def _infer(client, x, *, binary_in, binary_out, version="", **kw):
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [triton.InferRequestedOutput("label", binary_data=binary_out),
            triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    return client.infer("digits", [inp], model_version=version, outputs=outs, **kw)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_json_and_binary(client, artifacts, binary_in, binary_out):
    x = artifacts.X[200:204]
    result = _infer(client, x, binary_in=binary_in, binary_out=binary_out,
                    request_id="triton-1", parameters={"note": "hello"})
    expected = artifacts.onnx_predict("mlp", x)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    support.assert_close(result.as_numpy("probabilities"), expected["probabilities"])
    response = result.get_response()
    assert response["id"] == "triton-1"
    assert response["model_version"] == "2"
    params = response["parameters"]
    assert params["note"] == "hello"
    assert params["cost_pico_usd"] > 0
    assert {"cost_micro_usd", "queue_ms", "compute_ms"} <= set(params)


def test_infer_specific_version(client, artifacts):
    x = artifacts.X[300:302]
    result = _infer(client, x, binary_in=True, binary_out=True, version="1")
    assert result.get_response()["model_version"] == "1"
    support.assert_close(result.as_numpy("probabilities"),
                         artifacts.onnx_predict("lr", x)["probabilities"])


def test_infer_all_outputs_by_default(client, artifacts):
    # no outputs named: the client asks for every output in binary
    x = artifacts.X[400:401]
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp])
    assert result.as_numpy("label").tolist() == artifacts.onnx_predict("mlp", x)["label"].tolist()
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_sklearn_model_through_client(client, artifacts):
    x = artifacts.X[500:503]
    inp = triton.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("skdigits", [inp])
    np.testing.assert_array_equal(result.as_numpy("label"), artifacts.lr.predict(x))


def test_errors_surface_as_exceptions(client, artifacts):
    x = artifacts.X[:1]
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [inp])
    assert "nope" in info.value.message()
    assert info.value.status() == "404"
    bad = triton.InferInput("X", [1, 64], "FP64")
    bad.set_data_from_numpy(x.astype(np.float64))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [bad])
    assert info.value.status() == "400"
    assert "FP64" in info.value.message()


def test_async_infer_concurrently(server, artifacts):
    """The client's own concurrency (a gevent pool): many in flight, each answer its own."""
    client = triton.InferenceServerClient(url=server.hostport, concurrency=16)
    try:
        n = 64
        xs = [artifacts.distinct_rows(1 + i % 2, start=2000 + 2 * i) for i in range(n)]
        pending = []
        for i, x in enumerate(xs):
            inp = triton.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            pending.append(client.async_infer("digits", [inp], request_id=str(i)))
        for i, p in enumerate(pending):
            result = p.get_result()
            assert result.get_response()["id"] == str(i)
            expected = artifacts.onnx_predict("mlp", xs[i])
            np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
            support.assert_close(result.as_numpy("probabilities"), expected["probabilities"])
    finally:
        client.close()


def test_repository_index_unload_and_load(client, artifacts):
    index = client.get_model_repository_index()
    states = {(m["name"], m["version"]): m["state"] for m in index}
    assert states[("spare", "1")] == "READY"
    assert states[("digits", "2")] == "READY"
    x = artifacts.X[:1]
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    try:
        client.unload_model("spare")
        assert not client.is_model_ready("spare")
        with pytest.raises(InferenceServerException):
            client.infer("spare", [inp])
        states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert states["spare"] == "UNAVAILABLE"
    finally:
        client.load_model("spare")
    assert client.is_model_ready("spare")
    result = client.infer("spare", [inp])
    support.assert_close(result.as_numpy("probabilities"),
                         artifacts.onnx_predict("lr", x)["probabilities"])


def test_aio_client(server, artifacts):
    """tritonclient.http.aio (aiohttp) as well."""
    import asyncio

    import tritonclient.http.aio as triton_aio

    async def main():
        client = triton_aio.InferenceServerClient(url=server.hostport)
        try:
            assert await client.is_server_ready()
            xs = [artifacts.X[i:i + 1] for i in range(600, 632)]

            async def one(i, x):
                inp = triton_aio.InferInput("X", [1, 64], "FP32")
                inp.set_data_from_numpy(x)
                return await client.infer("digits", [inp], request_id=f"aio-{i}")

            results = await asyncio.gather(*(one(i, x) for i, x in enumerate(xs)))
            for i, (x, result) in enumerate(zip(xs, results, strict=True)):
                assert result.get_response()["id"] == f"aio-{i}"
                support.assert_close(result.as_numpy("probabilities"),
                                     artifacts.onnx_predict("mlp", x)["probabilities"])
        finally:
            await client.close()

    asyncio.run(main())


def test_bytes_and_fp64_outputs(client, artifacts):
    x = artifacts.X[900:903]
    inp = triton.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(x)
    for binary in (False, True):
        result = client.infer("sknamed", [inp],
                              outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == artifacts.named.predict(x).tolist()
        result = client.infer("skreg", [inp],
                              outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("label"), artifacts.reg.predict(x),
                                   rtol=1e-6)


def test_tenant_header_through_the_client(client, http, artifacts):
    tenant = "triton-tenant"
    before = sum(support.scrape(http).matching("frugalserve_cost_usd_total", model="digits",
                                               tenant=tenant).values())
    result = _infer(client, artifacts.X[:1], binary_in=True, binary_out=True,
                    headers={"X-Tenant": tenant})
    after = sum(support.scrape(http).matching("frugalserve_cost_usd_total", model="digits",
                                              tenant=tenant).values())
    pico = result.get_response()["parameters"]["cost_pico_usd"]
    assert after - before == pytest.approx(pico / 1e12, rel=1e-6)
