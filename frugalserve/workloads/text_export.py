"""Sentence-encoder classifiers as one ONNX graph each, served from text by the text runtime.

The graph: token ids -> encoder -> mean of the token states over the attention mask -> L2
normalisation -> the logistic head (Gemm) -> softmax `probabilities` and ArgMax `label`. That is
the sentence-transformers recipe plus the scikit-learn head, so the server needs nothing but
the tokenizer beside the graph, and quantizing the file quantizes the whole model.

Layout written: `<repo>/<name>/config.yaml`, `<repo>/<name>/<version>/model.onnx` and
`<repo>/<name>/<version>/tokenizer.json`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtimes.text import MAX_TOKENS, TextRuntime
from .onnx_export import DEFAULT_CONFIG, OPSET, write_model

PREFIX = "classifier/"  # names of the nodes and weights added after the encoder


def text_config(n_classes: int = 2, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {
        "runtime": TextRuntime.name,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_classes]}],
        **DEFAULT_CONFIG,
        "parameters": {"threads": 1, "max_tokens": max_tokens},
    }


def head_weights(head: Any) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes, dim) weights and (n_classes,) biases whose softmax is the head's
    predict_proba: a binary logistic regression's logit z becomes the pair (0, z)."""
    classes = np.asarray(head.classes_)
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(f"the head's classes must be 0..k-1 (ArgMax gives the label), "
                         f"got {classes.tolist()}")
    coef = np.asarray(head.coef_, dtype=np.float32)
    bias = np.asarray(head.intercept_, dtype=np.float32)
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        bias = np.concatenate([np.zeros_like(bias), bias])
    return coef, bias


def classifier_graph(encoder: onnx.ModelProto, hidden: str, head: Any) -> onnx.ModelProto:
    """The encoder with pooling, normalisation and the head appended; outputs `label` INT64
    [batch] and `probabilities` FP32 [batch, classes]; the encoder's other outputs are dropped."""
    inputs = {i.name for i in encoder.graph.input}
    if "attention_mask" not in inputs:
        raise ValueError(f"the encoder has no attention_mask input (inputs: {sorted(inputs)})")
    weights, bias = head_weights(head)
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    graph = model.graph
    nodes, initializers = _head_nodes(hidden, weights, bias)
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                      ["batch", weights.shape[0]]),
    ])
    _prune(graph)
    onnx.checker.check_model(model)
    return model


def _head_nodes(hidden: str, weights: np.ndarray,
                bias: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    p = PREFIX
    consts = {
        "axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64),
        # the clamps of sentence-transformers' mean pooling and of torch's F.normalize
        "min_count": np.array(1e-9, np.float32), "min_norm": np.array(1e-12, np.float32),
        "weights": weights, "bias": bias,
    }
    initializers = [numpy_helper.from_array(v, p + k) for k, v in consts.items()]
    node = helper.make_node
    nodes = [
        node("Cast", ["attention_mask"], [p + "mask"], to=TensorProto.FLOAT),
        node("Unsqueeze", [p + "mask", p + "axis2"], [p + "mask3"]),
        node("Mul", [hidden, p + "mask3"], [p + "masked"]),
        node("ReduceSum", [p + "masked", p + "axis1"], [p + "sum"], keepdims=0),
        node("ReduceSum", [p + "mask3", p + "axis1"], [p + "count"], keepdims=0),
        node("Max", [p + "count", p + "min_count"], [p + "count_clamped"]),
        node("Div", [p + "sum", p + "count_clamped"], [p + "mean"]),
        node("Mul", [p + "mean", p + "mean"], [p + "squares"]),
        node("ReduceSum", [p + "squares", p + "axis1"], [p + "sum_squares"], keepdims=1),
        node("Sqrt", [p + "sum_squares"], [p + "norm"]),
        node("Max", [p + "norm", p + "min_norm"], [p + "norm_clamped"]),
        node("Div", [p + "mean", p + "norm_clamped"], [p + "embedding"]),
        node("Gemm", [p + "embedding", p + "weights", p + "bias"], [p + "logits"], transB=1),
        node("Softmax", [p + "logits"], ["probabilities"], axis=1),
        node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    return nodes, initializers


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes, weights and inputs that no output needs any more."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_inputs_of(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for field in (graph.initializer, graph.input, graph.value_info):
        keep = [item for item in field if item.name in needed]
        del field[:]
        field.extend(keep)


def _inputs_of(node: onnx.NodeProto) -> Iterable[str]:
    """A node's inputs, with the outer names its subgraphs (If, Loop) read."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                yield from _inputs_of(inner)


def export_bert_encoder(model: Any) -> onnx.ModelProto:
    """A transformers BERT encoder as ONNX: `input_ids`, `attention_mask` int64 [batch, tokens]
    -> `last_hidden_state` float [batch, tokens, dim]. torch's TorchScript exporter
    (dynamo=False) needs no onnxscript and gives a plain opset-17 graph."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, bert: Any):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.int64)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0  # a padded row: a mask of all ones may let attention skip the mask
    axes = {0: "batch", 1: "tokens"}
    # the exporter puts the module back in the mode it found it in: eval, never training
    # (a fresh wrapper is in training mode, and would switch dropout on in `model` after it)
    wrapper = Hidden(model).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the exporter says it is deprecated in favour of dynamo=True (needs onnxscript), and
        # the tracer warns of tensors it records as constants (constants here)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (ids, mask), f"{tmp}/encoder.onnx", dynamo=False,
                          opset_version=OPSET, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "last_hidden_state": axes})
        return onnx.load(f"{tmp}/encoder.onnx")


def write_text_model(model: onnx.ModelProto, tokenizer: Path, repository: Path, name: str,
                     version: int = 1, config: dict[str, Any] | None = None) -> Path:
    """model.onnx, tokenizer.json and config.yaml into the repository; the .onnx path."""
    n_classes = model.graph.output[1].type.tensor_type.shape.dim[1].dim_value
    path = write_model(model.SerializeToString(), repository, name, version,
                       config or text_config(n_classes))
    shutil.copyfile(tokenizer, path.parent / TextRuntime.tokenizer_file)
    return path


def predict_text(path: Path, text: Sequence[str], batch: int = 64,
                 options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """`label` and `probabilities` of a served text model, through the server's runtime, in
    the order of `text` (the runtime runs them `batch` rows at a time, sorted by length)."""
    runtime = TextRuntime(Path(path), {"threads": 2, **(options or {}), "chunk_rows": batch})
    try:
        return runtime.predict({"text": np.asarray(list(text), dtype=object).reshape(-1, 1)})
    finally:
        runtime.close()
