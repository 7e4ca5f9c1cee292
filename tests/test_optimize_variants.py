"""Variant makers on a small real model (a scikit-learn digits MLP exported to ONNX): each keeps
accuracy within a stated bound of the original, and is smaller (or has fewer parameters) where
that is its purpose. No timings are asserted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from frugalserve.economics.training import open_ledger, training_runs_for
from frugalserve.optimize import distill, graph, prune, quantize
from frugalserve.optimize.profile import Profile, profile_model

INT8_BOUND = 0.02  # int8 keeps top-1 within 2 points
PRUNE_BOUND = 0.03  # 25% of hidden units removed (or 30% of weights zeroed): within 3 points
STUDENT_BOUND = 0.05  # a student with a quarter of the units: within 5 points


class Digits:
    def __init__(self, root: Path):
        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(y))
        train, val = order[:1300], order[1300:]
        self.x_train, self.y_train = X[train], y[train]
        self.x_val, self.y_val = X[val], y[val]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300,
                                     random_state=0).fit(self.x_train, self.y_train)
        self.root = root
        self.path = root / "mlp.onnx"
        self.path.write_bytes(to_onnx(self.mlp, X[:1], options={id(self.mlp): {"zipmap": False}},
                                      target_opset=17).SerializeToString())
        self.accuracy = self.score(self.path)

    def score(self, path: Path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(sess.run(["label"], {"X": self.x_val})[0] == self.y_val))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Digits:
    d = Digits(tmp_path_factory.mktemp("optimize"))
    assert d.accuracy > 0.93  # a sane reference to hold the variants to
    return d


def _size(path: Path) -> int:
    return Path(path).stat().st_size


def test_int8_dynamic_is_smaller_and_as_accurate(digits):
    out = quantize.quantize_int8_dynamic(digits.path, digits.root / "int8-dynamic.onnx")
    assert digits.score(out) >= digits.accuracy - INT8_BOUND
    assert _size(out) < 0.6 * _size(digits.path)  # int8 weights: a quarter of the bytes + scales
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_int8_static_is_smaller_and_as_accurate(digits, fmt):
    out = quantize.quantize_int8_static(digits.path, digits.root / f"int8-{fmt}.onnx",
                                        digits.x_train[:256], fmt=fmt)
    assert digits.score(out) >= digits.accuracy - INT8_BOUND
    assert _size(out) < 0.6 * _size(digits.path)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QuantizeLinear" in ops) if fmt == "qdq" else bool(ops & {"QLinearMatMul", "QGemm"})


def test_static_quantization_rejects_unknown_format(digits, tmp_path):
    with pytest.raises(ValueError, match="format"):
        quantize.quantize_int8_static(digits.path, tmp_path / "x.onnx", digits.x_val, fmt="int4")


def test_fp16_halves_the_weights_keeps_fp32_io(digits):
    out = quantize.convert_fp16(digits.path, digits.root / "fp16.onnx")
    assert abs(digits.score(out) - digits.accuracy) <= 0.01
    assert _size(out) < 0.8 * _size(digits.path)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if i.name.startswith("coefficient")]
    assert weights and all(w.data_type == TensorProto.FLOAT16 for w in weights)


def test_magnitude_prune_zeroes_weights_but_keeps_shapes(digits):
    report = prune.magnitude_prune(digits.path, digits.root / "sparse.onnx", 0.3)
    assert digits.score(report.path) >= digits.accuracy - PRUNE_BOUND
    weights = sum(before for before, _ in report.layers.values())
    zeroed = sum(before - after for before, after in report.layers.values())
    assert zeroed == pytest.approx(0.3 * weights, abs=len(report.layers))
    assert report.params_after == report.params_before  # dense shapes: no FLOPs saved
    assert report.nonzero_after <= report.params_before - zeroed
    assert abs(_size(report.path) - _size(digits.path)) < 64  # zeros take the same bytes


def test_structured_prune_removes_hidden_units(digits):
    report = prune.structured_prune(digits.path, digits.root / "pruned-25.onnx", 0.25,
                                    calibration=digits.x_train[:512])
    assert digits.score(report.path) >= digits.accuracy - PRUNE_BOUND
    assert report.layers == {"coefficient": (64, 48), "coefficient1": (32, 24)}
    # 64x48 + 48 + 48x24 + 24 + 24x10 + 10 against 64x64 + 64 + 64x32 + 32 + 32x10 + 10
    assert report.params_before == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert report.params_after == 64 * 48 + 48 + 48 * 24 + 24 + 24 * 10 + 10
    assert _size(report.path) < 0.75 * _size(digits.path)
    shapes = {k: v.shape for k, v in graph.initializers(onnx.load(str(report.path))).items()}
    assert shapes["coefficient"] == (64, 48) and shapes["coefficient2"] == (24, 10)


def _gemm_mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """X -> Gemm(transB) -> Relu -> Gemm(transB): the form torch exports nn.Linear in."""
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", f, ["N", 4])],
                          [helper.make_tensor_value_info("y", f, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_structured_prune_drops_exactly_the_dead_units_of_a_gemm_mlp(tmp_path):
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(8, 4)).astype(np.float32)  # 8 hidden units, (out, in)
    b1 = rng.normal(size=8).astype(np.float32)
    w2 = rng.normal(size=(3, 8)).astype(np.float32)
    w2[:, [1, 6]] = 0  # units 1 and 6 reach nothing: removing them changes no output
    b2 = rng.normal(size=3).astype(np.float32)
    src = graph.save(_gemm_mlp(w1, b1, w2, b2), tmp_path / "gemm.onnx")
    report = prune.structured_prune(src, tmp_path / "gemm-pruned.onnx", 0.25)
    assert report.layers == {"w1": (8, 6)}
    kept = graph.initializers(onnx.load(str(report.path)))
    np.testing.assert_array_equal(kept["w1"], np.delete(w1, [1, 6], axis=0))
    np.testing.assert_array_equal(kept["b1"], np.delete(b1, [1, 6]))
    x = rng.normal(size=(16, 4)).astype(np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for p in (src, report.path)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_structured_prune_refuses_a_model_without_hidden_layers(tmp_path):
    f = TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", f, ["N", 4])],
                          [helper.make_tensor_value_info("y", f, ["N", 4])])
    src = graph.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                     tmp_path / "relu.onnx")
    with pytest.raises(ValueError, match="no Linear"):
        prune.structured_prune(src, tmp_path / "out.onnx", 0.5)


def test_distilled_student_is_smaller_and_its_training_cost_is_recorded(digits, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    student = distill.distill(digits.path, digits.x_train, digits.root / "student.onnx",
                              hidden=(16,), model="digits", version="1-student",
                              ledger_url=url, max_iter=300)
    assert digits.score(student.path) >= digits.accuracy - STUDENT_BOUND
    assert student.agreement > 0.9
    assert graph.parameter_count(student.path) < graph.parameter_count(digits.path) / 3
    engine = open_ledger(url)
    try:
        runs = training_runs_for(engine, "digits", "1-student")
    finally:
        engine.dispose()
    assert [r.id for r in runs] == [student.run_id]
    assert runs[0].status == "ok" and runs[0].cost_pusd > 0 and runs[0].source == "measured"
    assert runs[0].params["kind"] == "distillation" and runs[0].params["hidden"] == [16]
    assert student.cost_usd == runs[0].cost_usd


def test_profile_has_sane_fields_and_round_trips_through_json(digits, tmp_path):
    prof = profile_model(digits.path, digits.x_val, digits.y_val, variant="fp32", calls=20,
                         budget_s=0.2)
    assert sorted(prof.latency) == [1, 8, 32, 64]
    assert prof.accuracy == pytest.approx(digits.accuracy)
    assert 0 <= prof.accuracy <= 1 and prof.validation_rows == len(digits.y_val)
    assert prof.size_bytes == _size(digits.path)
    assert prof.parameters == graph.parameter_count(digits.path) and prof.rss_bytes >= 0
    for batch, lat in prof.latency.items():
        assert lat.batch == batch and 0 < lat.p50_ms <= lat.p99_ms and lat.calls >= 10
        assert lat.throughput > 0
    again = Profile.load(prof.save(tmp_path / "fp32.json"))
    assert again == prof
    assert json.loads((tmp_path / "fp32.json").read_text())["latency"]["64"]["batch"] == 64


def test_data_that_is_not_for_the_model_is_a_clear_error(digits):
    from frugalserve.optimize.profile import input_rows
    from frugalserve.runtimes.onnx import OnnxRuntime

    runtime = OnnxRuntime(digits.path, {})
    try:
        assert input_rows(runtime, digits.x_val.astype(np.float64))[1].dtype == np.float32
        text = np.asarray([["a film"]] * 3, dtype=object)
        with pytest.raises(ValueError, match=r"takes X FP32 \[-1, 64\]; the data's rows are "
                                             r"text \[1\]: not data for this model"):
            input_rows(runtime, text)
        with pytest.raises(ValueError, match=r"rows are float32 \[8\]"):
            input_rows(runtime, digits.x_val[:, :8])
    finally:
        runtime.close()


def test_confidences_are_the_numbers_the_server_routes_on(tmp_path):
    """A model with FP64 probabilities: the calibration sees each row's maximum as the server
    computes it, not rounded to float32 (which could move it across a threshold)."""
    from frugalserve.optimize.profile import predict_rows
    from frugalserve.runtimes.onnx import OnnxRuntime

    d = TensorProto.DOUBLE
    g = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)],
        "softmax", [helper.make_tensor_value_info("x", d, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", d, ["N", 3])])
    path = graph.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                      tmp_path / "fp64.onnx")
    x = np.random.default_rng(0).normal(size=(600, 3))
    runtime = OnnxRuntime(path, {})
    try:
        served = runtime.predict({"x": x[:300]})["probabilities"].max(axis=1)
        preds = predict_rows(runtime, x)
    finally:
        runtime.close()
    np.testing.assert_array_equal(preds.confidence[:300], served)
    assert not np.array_equal(served.astype(np.float32), served)  # float32 would differ


def _put(repo: Path, name: str, onnx_bytes: bytes, files: dict[str, str] | None = None) -> Path:
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(onnx_bytes)
    for fname, text in (files or {}).items():
        (folder / fname).write_text(text)
    (repo / name / "config.yaml").write_text(yaml.safe_dump(
        {"device": {"type": "aws-c7i.large", "share": 0.5}, "parameters": {"threads": 1}}))
    return folder


def _onnx(model, x: np.ndarray) -> bytes:
    return to_onnx(model, x[:1], options={id(model): {"zipmap": False}},
                   target_opset=17).SerializeToString()


def test_build_variants_fills_the_repository_layout(digits, tmp_path):
    from frugalserve.optimize.variants import build_variants, profiles_table
    from frugalserve.repository import ModelRepository

    repo = tmp_path / "repo"
    vdir = _put(repo, "digits", digits.path.read_bytes(), {"labels.txt": "0 1 2 3 4 5 6 7 8 9"})
    logreg = LogisticRegression(max_iter=300).fit(digits.x_train, digits.y_train)
    _put(repo, "digits-logreg", _onnx(logreg, digits.x_train))
    narrow = LogisticRegression(max_iter=300).fit(digits.x_train[:, :8], digits.y_train)
    _put(repo, "digits-narrow", _onnx(narrow, digits.x_train[:, :8]))  # 8 features, not 64
    result = build_variants(repo, "digits", x_calibration=digits.x_train[:256],
                            x_val=digits.x_val, y_val=digits.y_val,
                            x_unlabelled=digits.x_train, student_hidden=(16,),
                            candidates=["digits-logreg", "digits-narrow"],
                            ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}",
                            batch_sizes=(1, 8), calls=10)
    names = [p.variant for p in result.profiles]
    assert names == ["reference", "int8-dynamic", "int8-static", "fp16", "sparse-50",
                     "pruned-25", "student", "digits-logreg"]
    assert list(result.skipped) == ["digits-narrow"]
    assert "signature differs" in result.skipped["digits-narrow"]
    assert not (vdir / "variants" / "digits-narrow").exists()
    assert Profile.load(vdir / "profile.json") == result.profiles[0]  # the reference's
    assert result.profiles[0].accuracy == pytest.approx(digits.accuracy)
    for prof in result.profiles[1:]:
        folder = vdir / "variants" / prof.variant
        assert result.folder(prof.variant) == folder
        assert Profile.load(folder / "profile.json") == prof
        assert prof.size_bytes == (folder / "model.onnx").stat().st_size
        if prof.variant != "digits-logreg":  # a candidate brings its own version's files
            assert (folder / "labels.txt").read_text() == "0 1 2 3 4 5 6 7 8 9"
    for name, preds in result.predictions.items():
        assert len(preds.labels) == len(digits.y_val) and preds.confidence is not None
        assert np.mean(preds.correct(digits.y_val)) == pytest.approx(
            result.profile(name).accuracy)
    assert result.profile("student").notes["training_run_id"] is not None
    assert profiles_table(result.profiles).row_count == 8
    # the server opens every variant folder with the model's runtime: a plan naming each loads
    tiers = {n: {"stages": [{"variant": n}]} for n in names}
    (repo / "digits" / "plan.yaml").write_text(yaml.safe_dump({"tiers": tiers}))
    loaded = ModelRepository(repo).load("digits")
    try:
        assert sorted(loaded.versions["1"].variants) == sorted(names[1:])
    finally:
        loaded.close()


def test_text_models_skip_the_makers_that_need_numbers(tmp_path):
    """A TF-IDF pipeline over `text` BYTES [-1, 1]: profiled from object arrays; no maker
    applies, each says why."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import Pipeline

    from frugalserve.optimize.variants import build_variants
    from frugalserve.workloads.sentiment import TOKEN_PATTERN, tfidf_to_onnx

    rng = np.random.default_rng(0)
    good, bad = ["great", "fine", "moving", "fun"], ["dull", "awful", "boring", "flat"]
    text = [" ".join(rng.choice(good if i % 2 else bad, 3)) + " film" for i in range(120)]
    y = np.arange(120) % 2
    model = Pipeline([("tfidf", TfidfVectorizer(token_pattern=TOKEN_PATTERN)),
                      ("lr", LogisticRegression())]).fit(text, y)
    repo = tmp_path / "repo"
    _put(repo, "words", tfidf_to_onnx(model))
    rows = np.asarray(text, dtype=object).reshape(-1, 1)
    result = build_variants(repo, "words", x_calibration=rows, x_val=rows, y_val=y,
                            x_unlabelled=rows, batch_sizes=(1, 8), calls=10)
    assert [p.variant for p in result.profiles] == ["reference"]
    assert result.profiles[0].accuracy == 1.0 and result.profiles[0].validation_rows == 120
    assert set(result.skipped) == {"int8-dynamic", "int8-static", "fp16", "sparse-50",
                                   "pruned-25", "student"}
    assert "no MatMul, Gemm or Conv" in result.skipped["int8-dynamic"]
    assert "FP32 inputs" in result.skipped["student"]
    assert "no MatMul or Gemm weight matrix" in result.skipped["sparse-50"]
    conf = result.predictions["reference"].confidence
    assert conf.shape == (120,) and np.all((conf >= 0.5) & (conf <= 1))
