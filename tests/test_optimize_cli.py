"""`frugalserve optimize` end to end on a small Fashion-MNIST model: variants in the repository,
a plan.yaml the repository loads, the chart, and test-set numbers that are what the stages
really do on the test split."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics.training import open_ledger, training_runs_for
from frugalserve.optimize.cascade import evaluate
from frugalserve.optimize.profile import predict_folder
from frugalserve.repository import ModelRepository
from frugalserve.repository.plan import load_plan, variant_dir
from frugalserve.workloads import fashion_mnist
from frugalserve.workloads.onnx_export import export_classifier

ROWS = 3000  # training images: enough for ~80% accuracy in seconds


@pytest.fixture(scope="module")
def data() -> fashion_mnist.FashionMNIST:
    try:
        return fashion_mnist.load()
    except fashion_mnist.DatasetMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def optimized(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize-cli")
    repo = root / "repo"
    x, y = data.train.x[:ROWS], data.train.y[:ROWS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier((32,), max_iter=30, random_state=0).fit(x, y)
        logreg = LogisticRegression(max_iter=60).fit(x, y)
    export_classifier(mlp, x, repo, "fm-mlp")
    export_classifier(logreg, x, repo, "fm-logreg")
    ledger = f"sqlite:///{root / 'ledger.db'}"
    result = CliRunner().invoke(app, [
        "optimize", "fm-mlp", "--repository", str(repo), "--data", "fashion-mnist",
        "--candidates", "fm-logreg", "--max-accuracy-drop", "0.5", "--p99-ms", "50",
        "--calls", "10", "--batch-sizes", "1,8,32", "--delays", "1,5",
        "--unlabelled-rows", "2000", "--ledger", ledger, "--chart", str(root / "chart.png")])
    return result, repo, root, ledger


def test_optimize_writes_a_plan_the_repository_serves(optimized):
    result, repo, root, _ = optimized
    assert result.exit_code == 0, result.output
    for text in ("Pareto frontier", "tiers: validation estimate vs test set",
                 "levers of the saving", "★"):
        assert text in result.output
    plan = load_plan(repo / "fm-mlp" / "plan.yaml")
    assert plan.version == "1" and set(plan.tiers) == {"premium", "standard", "economy"}
    assert [s.variant for s in plan.tiers["premium"]] == ["reference"]
    assert plan.batching is not None and plan.batching.max_batch_size in (1, 8, 32)
    est = plan.estimate
    floor = est["reference_accuracy"] - 0.005
    assert est["tiers"]["standard"]["accuracy"] >= floor - 1e-9
    assert est["tiers"]["standard"]["p99_ms"] <= 50
    costs = [est["tiers"][t]["cost_per_1m_usd"] for t in ("economy", "standard", "premium")]
    assert costs == sorted(costs) and costs[1] < est["counterfactual"]["cost_per_1m_usd"]
    assert [lv["lever"] for lv in est["levers"]] == ["batching", "variant", "cascade"]
    assert sum(lv["share"] for lv in est["levers"]) == pytest.approx(1.0, abs=1e-3)
    assert (root / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = ModelRepository(repo).load("fm-mlp")  # every variant the plan names opens
    try:
        assert set(loaded.versions["1"].variants) == set(plan.variants) - {"reference"}
    finally:
        loaded.close()


def test_variant_folders_hold_models_and_profiles(optimized):
    result, repo, _, ledger = optimized
    assert result.exit_code == 0, result.output
    vdir = repo / "fm-mlp" / "1"
    assert (vdir / "profile.json").exists()
    made = {p.name for p in (vdir / "variants").iterdir()}
    assert made == {"int8-dynamic", "int8-static", "fp16", "sparse-50", "pruned-25", "student",
                    "fm-logreg"}
    for name in made:
        assert (vdir / "variants" / name / "model.onnx").exists()
        assert (vdir / "variants" / name / "profile.json").exists()
    engine = open_ledger(ledger)
    try:
        runs = training_runs_for(engine, "fm-mlp", "1-student")
    finally:
        engine.dispose()
    assert len(runs) == 1 and runs[0].params["kind"] == "distillation"


def test_test_set_numbers_are_the_stages_run_on_the_test_split(optimized, data):
    result, repo, _, _ = optimized
    assert result.exit_code == 0, result.output
    plan = load_plan(repo / "fm-mlp" / "plan.yaml")
    vdir = repo / "fm-mlp" / "1"
    for tier, stages in plan.tiers.items():
        preds = [predict_folder(variant_dir(vdir, s.variant), data.test.x) for s in stages]
        accuracy, reach = evaluate([p.correct(data.test.y) for p in preds],
                                   [p.confidence for p in preds],
                                   [s.threshold for s in stages[:-1]])
        est = plan.estimate["tiers"][tier]
        assert est["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert est["test_escalation"] == pytest.approx(list(reach[1:]), abs=1e-6)
        if len(stages) > 1:  # an escalated row is exactly one below the threshold
            low = preds[0].confidence < stages[0].threshold
            assert reach[1] == pytest.approx(np.mean(low))


def test_bad_arguments_are_one_clear_line(optimized, tmp_path):
    _, repo, _, _ = optimized
    runner = CliRunner()
    missing = runner.invoke(app, ["optimize", "no-such-model", "--repository", str(repo),
                                  "--data", "fashion-mnist", "--calls", "5"])
    assert missing.exit_code == 1 and "no such model folder" in missing.output
    assert "Traceback" not in missing.output
    bad_data = runner.invoke(app, ["optimize", "fm-mlp", "--repository", str(repo),
                                   "--data", "imagenet"])
    assert bad_data.exit_code == 2 and "--data" in bad_data.output
    bad_drop = runner.invoke(app, ["optimize", "fm-mlp", "--repository", str(repo),
                                   "--data", "fashion-mnist", "--max-accuracy-drop", "-1"])
    assert bad_drop.exit_code == 2 and "drop" in bad_drop.output
    # batch sizes that cannot be profiled, or that leave out the counterfactual's batch 1:
    # refused before any variant is made
    for sizes, says in (("0,1,8", "whole numbers >= 1"), ("8,32", "must include 1")):
        bad = runner.invoke(app, ["optimize", "fm-mlp", "--repository", str(repo),
                                  "--data", "fashion-mnist", "--batch-sizes", sizes])
        assert bad.exit_code == 1 and says in bad.output, bad.output
        assert "Traceback" not in bad.output
    # a reference file onnxruntime cannot read
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"not onnx")
    (broken / "config.yaml").write_text((repo / "fm-mlp" / "config.yaml").read_text())
    bad = runner.invoke(app, ["optimize", "broken", "--repository", str(tmp_path / "repo"),
                              "--data", "fashion-mnist", "--calls", "5"])
    assert bad.exit_code == 1 and "broken v1 cannot be loaded" in bad.output, bad.output
    assert "Traceback" not in bad.output
    # a device the rate card does not price: refused before any variant is made
    unpriced = tmp_path / "repo" / "unpriced"
    (unpriced / "1").mkdir(parents=True)
    shutil.copy(repo / "fm-mlp" / "1" / "model.onnx", unpriced / "1" / "model.onnx")
    (unpriced / "config.yaml").write_text("device: {type: no-such-device, share: 0.5}\n")
    bad = runner.invoke(app, ["optimize", "unpriced", "--repository", str(tmp_path / "repo"),
                              "--data", "fashion-mnist", "--calls", "5"])
    assert bad.exit_code == 1 and "unknown device 'no-such-device'" in bad.output, bad.output
    assert sorted(p.name for p in (unpriced / "1").iterdir()) == ["model.onnx"]
    # a ledger the student's run cannot be recorded in, and counts that profile or distil
    # nothing sensible (-5 rows sliced all but 5): refused before any variant is made
    fresh = tmp_path / "repo" / "fresh"
    (fresh / "1").mkdir(parents=True)
    shutil.copy(repo / "fm-mlp" / "1" / "model.onnx", fresh / "1" / "model.onnx")
    for options, says in ((["--ledger", "nosuchdb://x"], "cannot open it"),
                          (["--unlabelled-rows", "-5"], "--unlabelled-rows"),
                          (["--calls", "0"], "--calls"),
                          (["--rate", "nan"], "--rate")):
        bad = runner.invoke(app, ["optimize", "fresh", "--repository", str(tmp_path / "repo"),
                                  "--data", "fashion-mnist", *options])
        assert bad.exit_code == 2 and says in bad.output, bad.output
        assert "Traceback" not in bad.output
    assert sorted(p.name for p in (fresh / "1").iterdir()) == ["model.onnx"]
