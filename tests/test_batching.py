"""Dynamic batching: every output goes back to the request that sent its input, batches larger
than one really form, a full queue sheds with 503 + Retry-After."""

from __future__ import annotations

import time

import numpy as np
import support


def _expected(artifacts, which, x):
    return artifacts.onnx_predict(which, x)


def test_500_concurrent_distinct_requests_get_their_own_outputs(server, http, artifacts):
    """500 requests at once, each with distinct rows (1-3 of them), half JSON and half binary;
    every response must equal the model's direct onnxruntime output for that request's rows."""
    n = 500
    rows_per = [1 + i % 3 for i in range(n)]
    starts = np.concatenate([[0], np.cumsum(rows_per)[:-1]])
    inputs = [artifacts.distinct_rows(r, start=int(s)) for r, s in zip(rows_per, starts,
                                                                        strict=True)]
    before = support.scrape(http)

    def request(i):
        x, rid = inputs[i], f"req-{i}"
        if i % 2:
            body, headers = support.binary_body({"X": x}, id=rid)
            return support.Req("POST", "/v2/models/digits/infer", content=body, headers=headers)
        return support.Req("POST", "/v2/models/digits/infer", json=support.json_body({"X": x},
                                                                                    id=rid))

    responses = support.run_concurrently(server.url, [request(i) for i in range(n)])
    batch_sizes = []
    for i, r in enumerate(responses):
        assert r.status_code == 200, (i, r.text)
        doc, outputs = support.decode_response(r)
        assert doc["id"] == f"req-{i}"
        assert doc["model_version"] == "2"
        expected = _expected(artifacts, "mlp", inputs[i])
        assert outputs["label"].shape == (rows_per[i],)
        np.testing.assert_array_equal(outputs["label"], expected["label"], err_msg=f"req {i}")
        support.assert_close(outputs["probabilities"], expected["probabilities"])
        params = doc["parameters"]
        assert {"cost_micro_usd", "cost_pico_usd", "queue_ms", "compute_ms"} <= set(params)
        assert params["cost_pico_usd"] > 0
        assert params["batch_size"] >= rows_per[i]
        batch_sizes.append(doc["parameters"]["batch_size"])
    # batches of more than one request formed ...
    assert max(batch_sizes) > 3
    # ... and /metrics saw them: fewer batches than requests, some of them over one row
    after = support.scrape(http)
    labels = {"model": "digits", "version": "2"}
    batches = (after.get("frugalserve_batches_total", **labels)
               - before.get("frugalserve_batches_total", **labels))
    assert 0 < batches < n
    count = (after.get("frugalserve_batch_size_count", **labels)
             - before.get("frugalserve_batch_size_count", **labels))
    rows = (after.get("frugalserve_batch_size_sum", **labels)
            - before.get("frugalserve_batch_size_sum", **labels))
    assert count == batches
    assert rows == sum(rows_per)
    singles = (after.get("frugalserve_batch_size_bucket", le="1.0", **labels)
               - before.get("frugalserve_batch_size_bucket", le="1.0", **labels))
    assert singles < count


def test_requests_that_queue_behind_a_busy_model_ride_in_one_batch(server, http, artifacts):
    """Deterministic batching: hold the model on one request, queue 20 more, release; the 20
    leave together in one batch and each gets its own row's answer."""
    n = 20
    x = artifacts.distinct_rows(n, start=700)
    with support.hold_gate() as hold:
        first = support.in_thread(lambda: http.post(
            "/v2/models/gated/infer",
            json=support.json_body({"input": support.sentinel_row()}, id="first")))
        hold.wait_entered(1)

        rest = support.in_thread(lambda: support.run_concurrently(server.url, [
            support.Req("POST", "/v2/models/gated/infer",
                        json=support.json_body({"input": x[i:i + 1]}, id=f"g{i}"))
            for i in range(n)]))
        with server.client() as probe:
            support.wait_for(lambda: support.queue_depth(probe, "gated") == n,
                             what="20 queued requests")
    assert first().status_code == 200
    responses = rest()
    expected = artifacts.lr.predict_proba(x).astype(np.float32)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        doc, outputs = support.decode_response(r)
        assert doc["id"] == f"g{i}"
        assert doc["parameters"]["batch_size"] == n
        support.assert_close(outputs["probabilities"][0], expected[i])
        assert outputs["label"][0] == artifacts.lr.classes_[expected[i].argmax()]
    # every request in the batch paid a share: the shares differ by at most one pico-dollar
    costs = [r.json()["parameters"]["cost_pico_usd"] for r in responses]
    assert max(costs) - min(costs) <= 1


def test_full_queue_sheds_with_503_and_retry_after(server, http, artifacts):
    """gated_tiny: one instance, max_batch_size 1, max_queue_size 1. With the model held on
    one request and one more waiting, the next is shed at once."""
    body = support.json_body({"input": artifacts.X[:1]})
    with support.hold_gate() as hold:
        running = support.in_thread(lambda: http.post(
            "/v2/models/gated_tiny/infer",
            json=support.json_body({"input": support.sentinel_row()})))
        hold.wait_entered(1)
        with server.client() as c2, server.client() as c3:
            waiting = support.in_thread(lambda: c2.post("/v2/models/gated_tiny/infer",
                                                        json=body))
            support.wait_for(lambda: support.queue_depth(c3, "gated_tiny") == 1,
                             what="one queued request")
            shed = c3.post("/v2/models/gated_tiny/infer", json=body)
            assert shed.status_code == 503, shed.text
            assert int(shed.headers["retry-after"]) >= 1
            assert set(shed.json()) == {"error"}
            assert "queue" in shed.json()["error"]
            support.release_gate()
            assert running().status_code == 200
            assert waiting().status_code == 200
    # the model is fine afterwards
    assert http.post("/v2/models/gated_tiny/infer", json=body).status_code == 200
    errors = support.scrape(http).get("frugalserve_errors_total", model="gated_tiny",
                                      version="1", status="503")
    assert errors >= 1


def test_many_concurrent_requests_against_a_queue_of_one(server, artifacts):
    """A burst against max_queue_size 1: every answer is a correct 200 or a clean 503."""
    n = 40
    x = artifacts.distinct_rows(n, start=1000)

    def request(i):
        return support.Req("POST", "/v2/models/gated_tiny/infer",
                           json=support.json_body({"input": x[i:i + 1]}))

    with support.hold_gate() as hold:
        blocker = support.in_thread(lambda: support.run_concurrently(server.url, [
            support.Req("POST", "/v2/models/gated_tiny/infer",
                        json=support.json_body({"input": support.sentinel_row()}))]))
        hold.wait_entered(1)
        burst = support.in_thread(lambda: support.run_concurrently(
            server.url, [request(i) for i in range(n)]))
        with server.client() as probe:
            # all but one are shed while the model is held; then let it go
            support.wait_for(lambda: support.scrape(probe).get(
                "frugalserve_queue_depth", model="gated_tiny", version="1") == 1,
                what="the queue to fill")
    responses = burst()
    assert blocker()[0].status_code == 200
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1
    expected = artifacts.lr.predict_proba(x).astype(np.float32)
    for i, r in enumerate(responses):
        if r.status_code == 200:
            _, outputs = support.decode_response(r)
            support.assert_close(outputs["probabilities"][0], expected[i])
        else:
            assert "retry-after" in r.headers


def test_request_timeout_in_the_queue_gives_504(server, http, artifacts):
    """A request whose own timeout (V2 `timeout` parameter, microseconds) passes while it
    waits is failed with 504 and never computed."""
    with support.hold_gate() as hold, server.client() as c2, server.client() as probe:
        running = support.in_thread(lambda: http.post(
            "/v2/models/gated_tiny/infer",
            json=support.json_body({"input": support.sentinel_row()})))
        hold.wait_entered(1)
        late = support.in_thread(lambda: c2.post(
            "/v2/models/gated_tiny/infer",
            json=support.json_body({"input": artifacts.X[:1]}, parameters={"timeout": 1000})))
        support.wait_for(lambda: support.queue_depth(probe, "gated_tiny") == 1,
                         what="the request to queue")
        time.sleep(0.05)  # well past its 1 ms timeout
        support.release_gate()
        assert running().status_code == 200
        r = late()
    assert r.status_code == 504, r.text
    assert set(r.json()) == {"error"}


def test_a_failing_prediction_is_a_500_and_the_model_keeps_serving(server, http, artifacts):
    before = support.scrape(http).get("frugalserve_errors_total", model="gated_tiny",
                                      version="1", status="500")
    r = http.post("/v2/models/gated_tiny/infer", json=support.json_body(
        {"input": support.sentinel_row(value=support.FAIL_SENTINEL)}))
    assert r.status_code == 500
    assert set(r.json()) == {"error"}
    assert "gated_tiny" in r.json()["error"] and "asked to fail" in r.json()["error"]
    ok = http.post("/v2/models/gated_tiny/infer",
                   json=support.json_body({"input": artifacts.X[:1]}))
    assert ok.status_code == 200
    after = support.scrape(http).get("frugalserve_errors_total", model="gated_tiny",
                                     version="1", status="500")
    assert after - before == 1


def test_concurrent_two_input_requests_are_split_back_correctly(server, artifacts):
    """Batches of a two-input model concatenate both inputs; every request still gets exactly
    its own rows of every output (FP32, FP16, BOOL)."""
    n = 300
    rng = np.random.default_rng(11)
    cases = []
    for i in range(n):
        rows = 1 + i % 4
        a = rng.normal(size=(rows, 3)).astype(np.float32)
        b = rng.integers(-10**6, 10**6, size=(rows, 1)).astype(np.int64)
        cases.append((a, b))
    reqs = []
    for i, (a, b) in enumerate(cases):
        if i % 2:
            body, headers = support.binary_body({"a": a, "b": b}, id=str(i))
            reqs.append(support.Req("POST", "/v2/models/typed/infer", content=body,
                                    headers=headers))
        else:
            reqs.append(support.Req("POST", "/v2/models/typed/infer",
                                    json=support.typed_json_body({"a": a, "b": b}, id=str(i))))
    replies = support.run_concurrently(server.url, reqs)
    sizes = []
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        doc, outputs = support.decode_response(r)
        assert doc["id"] == str(i)
        sizes.append(doc["parameters"]["batch_size"])
        for name, value in artifacts.typed_expected(*cases[i]).items():
            np.testing.assert_array_equal(outputs[name], value, err_msg=f"{i} {name}")
    assert max(sizes) > 4


def _run_one_batch(predict, thread_cpu: bool):
    """One request through a bare Batcher; the Batch it completed."""
    import asyncio

    from frugalserve.serving.batcher import Batcher, Pending

    async def main():
        done = []
        b = Batcher(predict, done.append, lambda item, status: None, max_batch_size=4,
                    max_queue_delay_s=0.001, max_queue_size=4, name="clock",
                    thread_cpu=thread_cpu)
        b.start()
        now = time.perf_counter()
        b.submit(Pending({"x": np.zeros((1, 2), np.float32)}, 1, now, now, None,
                         asyncio.get_running_loop().create_future(), None))
        while not done:
            await asyncio.sleep(0.01)
        await b.drain()
        return done[0]

    return asyncio.run(main())


def test_a_single_threaded_engine_is_billed_its_cpu_time_not_its_waits():
    """Time the worker spends not computing (here a sleep, standing for a wait on the GIL or
    the core) is in the wall time the scheduler plans with, but not in the billed compute."""
    def idle_then_busy(feeds):
        time.sleep(0.05)
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass
        return {"y": feeds["x"]}

    billed_cpu = _run_one_batch(idle_then_busy, thread_cpu=True)
    assert billed_cpu.wall_s >= 0.07
    assert 0.02 <= billed_cpu.compute_s < 0.05
    billed_wall = _run_one_batch(idle_then_busy, thread_cpu=False)
    assert billed_wall.compute_s == billed_wall.wall_s >= 0.07


def test_onnx_runtime_with_one_thread_computes_on_the_calling_thread(artifacts, tmp_path):
    """What `single_threaded` promises: the caller's CPU time covers the engine's work (with a
    pool of intra-op threads it would not, and the runtime says so)."""
    from frugalserve.runtimes.onnx import OnnxRuntime

    path = tmp_path / "model.onnx"
    path.write_bytes(artifacts.mlp_onnx)
    one = OnnxRuntime(path, {})
    assert one.single_threaded
    assert not OnnxRuntime(path, {"threads": 2}).single_threaded
    x = np.random.default_rng(0).random((256, 64), dtype=np.float32)
    one.predict({"X": x})
    p0, c0 = time.process_time(), time.thread_time()
    for _ in range(200):
        one.predict({"X": x})
    process, caller = time.process_time() - p0, time.thread_time() - c0
    assert caller > 0.5 * process


def test_the_preferred_batch_size_is_the_cheapest_per_row():
    from frugalserve.serving.batcher import ExecProfile

    profile = ExecProfile(64)
    for rows, seconds in ((1, 0.001), (16, 0.008), (32, 0.018), (64, 0.036)):
        profile.observe(rows, seconds)
    assert profile.preferred == 16  # 0.5 ms a row against 0.56 at 32 and 64
    flat = ExecProfile(64)
    for rows, seconds in ((16, 0.008), (64, 0.033)):  # 16 is only 3% cheaper a row
        flat.observe(rows, seconds)
    assert flat.preferred == 64
    assert ExecProfile(100).preferred == 100  # nothing measured yet: the largest


def test_the_preferred_size_is_chosen_by_device_time_and_deadlines_plan_with_wall_time():
    """Under load a big batch's wall time holds time the core ran something else; its device
    time does not. 64 rows cost the same device time a row as 16: the largest stays
    preferred, while the estimate a deadline plans with is still the wall time."""
    from frugalserve.serving.batcher import ExecProfile

    profile = ExecProfile(64)
    profile.observe(16, 0.008, 0.008)
    profile.observe(64, 0.060, 0.032)  # 0.94 ms a row of wall time, 0.5 of device time
    assert profile.preferred == 64
    assert profile.estimate(64) == 0.060


def test_one_interrupted_batch_does_not_move_the_preferred_size_but_a_lasting_change_does():
    """Device time per row follows the lower envelope: one batch three times dearer (a cold
    cache) leaves 64 preferred, where an average would have moved to 16; a bucket that stays
    dearer is believed within a few dozen batches, and a cheaper measure at once."""
    from frugalserve.serving.batcher import ExecProfile

    profile = ExecProfile(64)
    profile.observe(16, 0.008)
    profile.observe(64, 0.032)  # 0.5 ms a row at both sizes: the largest
    profile.observe(64, 0.096)
    assert profile.preferred == 64
    for _ in range(30):
        profile.observe(64, 0.045)  # 0.7 ms a row from now on
    assert profile.preferred == 16
    profile.observe(64, 0.030)
    assert profile.preferred == 64


def test_a_single_threaded_engine_is_profiled_by_its_cpu_time():
    """Warm-up measures each size; an engine that computes on the calling thread is measured
    by that thread's CPU time. This one sleeps longer a row at 64 rows than at 16 (wall time,
    no CPU): measured by wall time 16 is preferred, by CPU time the largest."""
    from frugalserve.serving.batcher import Batcher

    def predict(feeds):
        rows = len(feeds["x"])
        time.sleep(rows * (0.0005 if rows <= 16 else 0.0006))
        return {"y": feeds["x"]}

    def example(rows):
        return {"x": np.zeros((rows, 1), np.float32)}

    preferred = {}
    for thread_cpu in (False, True):
        b = Batcher(predict, lambda batch: None, lambda item, status: None, max_batch_size=64,
                    max_queue_delay_s=0.05, max_queue_size=100, thread_cpu=thread_cpu)
        b.warm_up(example)
        preferred[thread_cpu] = b.profile.preferred
        assert b.profile.estimate(64) >= 64 * 0.0006  # deadlines still plan with wall time
    assert preferred == {False: 16, True: 64}


def test_batches_are_cut_at_the_preferred_size_and_a_larger_request_still_runs_whole():
    """40 one-row requests and one 24-row request queue behind a busy engine whose profile
    prefers 16 rows: no batch holds more than 16 rows, except the 24-row request, alone."""
    import asyncio

    from frugalserve.serving.batcher import Batcher, Pending

    async def main():
        done: list = []

        def predict(feeds):  # 0.5 ms a row up to 16 rows, 0.6 beyond
            rows = len(feeds["x"])
            time.sleep(rows * (0.0005 if rows <= 16 else 0.0006))
            return {"y": feeds["x"]}

        b = Batcher(predict, done.append, lambda item, status: None, max_batch_size=64,
                    max_queue_delay_s=0.05, max_queue_size=100, name="preferred")
        for rows in (1, 16, 64):
            b.profile.observe(rows, rows * (0.0005 if rows <= 16 else 0.0006))
        b.start()
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for i, rows in enumerate([1] * 20 + [24] + [1] * 20):
            fut = loop.create_future()
            futures.append(fut)
            b.submit(Pending({"x": np.full((rows, 1), i, np.float32)}, rows, now, now + 0.05,
                             None, fut, None))
        while sum(len(batch.items) for batch in done) < len(futures):
            await asyncio.sleep(0.005)
        await b.drain()
        return done

    batches = asyncio.run(main())
    sizes = [batch.rows for batch in batches]
    assert sizes == [16, 4, 24, 16, 4]  # the 24-row request does not fit beside the 4
    assert len(batches[2].items) == 1
    # each batch computed exactly the rows of its requests, in order
    for batch in batches:
        np.testing.assert_array_equal(
            batch.outputs["y"], np.concatenate([item.inputs["x"] for item in batch.items]))
