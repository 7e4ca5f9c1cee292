"""Pruned variants of an ONNX MLP.

Unstructured (`magnitude_prune`): the smallest |w| fraction of each weight matrix set to zero.
The model keeps its shapes, so dense kernels (MatMul, Gemm) do exactly the same work and the
file is exactly as large (zeros are stored like any float); it buys nothing on this runtime by
itself, and is here as the first half of sparse or compressed deployment and to measure how
much accuracy the zeros cost.

Structured (`structured_prune`): whole hidden units removed. A hidden unit j of the chain
`Linear1 -> (+bias) -> activation -> Linear2` is column j of W1, entry j of the bias and row j of
W2; dropping it shrinks both matrices, so the variant has fewer parameters and FLOPs, a smaller
file, and runs faster. Units are ranked by how much signal they can carry to the next layer:
with calibration inputs, mean |activation_j| * ||W2[j, :]||, and each removed unit's mean
contribution (mean activation_j * W2[j, :]) is folded into the next layer's bias, so the layer's
output stays right on average; without data, ||W1[:, j]|| * ||W2[j, :]||. No fine-tuning
afterwards: the data-aware ranking and the bias correction are what keep the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import graph

LINEAR = ("MatMul", "Gemm")
# element-wise activations: unit j of their output depends only on unit j of their input
ACTIVATIONS = ("Relu", "LeakyRelu", "Tanh", "Sigmoid", "Elu", "Selu", "Softplus", "Gelu",
               "HardSigmoid", "HardSwish", "Mish", "Identity")


@dataclass(frozen=True)
class PruneReport:
    path: Path
    params_before: int
    params_after: int
    nonzero_after: int
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # weight -> (before, after)


def weight_names(model: onnx.ModelProto) -> list[str]:
    """Initializers that are the weight matrix of a MatMul or Gemm."""
    inits = graph.initializers(model)
    return [n.input[1] for n in model.graph.node
            if n.op_type in LINEAR and n.input[1] in inits and inits[n.input[1]].ndim == 2]


def magnitude_prune(src: Path, dst: Path, sparsity: float) -> PruneReport:
    """Zero the `sparsity` fraction of smallest-magnitude entries of every weight matrix.
    Raises ValueError for a model with no MatMul or Gemm weight matrix."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    model = graph.load(Path(src))
    if not weight_names(model):
        raise ValueError(f"{src}: no MatMul or Gemm weight matrix to prune")
    before = graph.parameter_count(model)
    inits = graph.initializers(model)
    layers = {}
    for name in dict.fromkeys(weight_names(model)):
        w = inits[name].copy()
        k = int(sparsity * w.size)
        if k:
            flat = np.abs(w).ravel()
            w.ravel()[np.argpartition(flat, k - 1)[:k]] = 0
        graph.replace_initializer(model, name, w)
        layers[name] = (inits[name].size, int(np.count_nonzero(w)))
    graph.save(model, Path(dst))
    return PruneReport(Path(dst), before, graph.parameter_count(model),
                       graph.parameter_count(model, nonzero=True), layers)


@dataclass
class _Hidden:
    """One hidden layer: where its units live in the initializers."""

    w1: str
    w1_units_axis: int  # axis of W1 indexing the hidden units (1 for MatMul, 0 for Gemm transB)
    bias: str | None
    w2: str
    w2_units_axis: int  # axis of W2 indexing the hidden units (0 for MatMul, 1 for Gemm transB)
    tensors: list[str]  # intermediate tensor names whose shapes change (the last: activations)
    next_bias: str | None  # the bias added after W2, where removed units' means are folded


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _hidden_layers(model: onnx.ModelProto) -> list[_Hidden]:
    inits = graph.initializers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def only(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    def weight(node: onnx.NodeProto) -> tuple[str, int, int] | None:
        """(weight name, axis of inputs, axis of outputs) of a linear node with a 2-D weight."""
        if node.op_type not in LINEAR or len(node.input) < 2 or node.input[1] not in inits:
            return None
        if inits[node.input[1]].ndim != 2 or len(consumers[node.input[1]]) != 1:
            return None
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or float(
                    next((a.f for a in node.attribute if a.name == "alpha"), 1.0)) != 1.0:
                return None
            return (node.input[1], 1, 0) if _attr(node, "transB", 0) else (node.input[1], 0, 1)
        return node.input[1], 0, 1

    def bias_of(node: onnx.NodeProto, width: int) -> tuple[str | None, list[str]]:
        """The bias initializer added to a linear node's output (Gemm's C, or a following Add),
        and the tensors up to the biased result."""
        if node.op_type == "Gemm":
            return (node.input[2] if len(node.input) > 2 and node.input[2] else None), \
                [node.output[0]]
        nxt = only(node.output[0])
        if nxt is not None and nxt.op_type == "Add":
            other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
            if other in inits and inits[other].shape[-1:] == (width,):
                return other, [node.output[0], nxt.output[0]]
        return None, [node.output[0]]

    found = []
    for node in model.graph.node:
        first = weight(node)
        if first is None:
            continue
        w1, _, w1_out = first
        hidden = inits[w1].shape[w1_out]
        bias, tensors = bias_of(node, hidden)
        nxt = only(tensors[-1])
        if bias is not None and (bias not in inits or inits[bias].size != hidden
                                 or len(consumers[bias]) != 1):
            continue
        if nxt is None or nxt.op_type not in ACTIVATIONS:
            continue
        tensors.append(nxt.output[0])
        second_node = only(nxt.output[0])
        if second_node is None or second_node.input[0] != nxt.output[0]:
            continue
        second = weight(second_node)
        if second is None or inits[second[0]].shape[second[1]] != hidden:
            continue
        width = inits[second[0]].shape[1 - second[1]]
        next_bias, _ = bias_of(second_node, width)
        if next_bias is not None and (next_bias not in inits or inits[next_bias].size != width):
            next_bias = None
        found.append(_Hidden(w1, w1_out, bias, second[0], second[1], tensors, next_bias))
    return found


def _mean_activations(model: onnx.ModelProto, layers: list[_Hidden],
                      x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mean, mean |.|) over `x` of each hidden layer's activations, from the unpruned model."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [layer.tensors[-1] for layer in layers]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {graph.input_name(model): np.ascontiguousarray(x, dtype=np.float32)}
    acts = session.run(names, feed)
    return [(a.reshape(-1, a.shape[-1]).mean(axis=0), np.abs(a.reshape(-1, a.shape[-1])).mean(
        axis=0)) for a in acts]


def structured_prune(src: Path, dst: Path, fraction: float,
                     calibration: np.ndarray | None = None) -> PruneReport:
    """Remove the weakest `fraction` of the units of every hidden layer (at least one unit is
    always kept), ranked on `calibration` inputs when given (see the module's note). Raises
    ValueError for a model with no prunable hidden layer."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    model = graph.load(Path(src))
    layers = _hidden_layers(model)
    if not layers:
        raise ValueError(f"{src}: no Linear -> activation -> Linear chain with weights to prune")
    before = graph.parameter_count(model)
    stats = None if calibration is None else _mean_activations(model, layers, calibration)
    report = {}
    for i, layer in enumerate(layers):
        inits = graph.initializers(model)  # fresh: an earlier layer may have sliced these
        w1, w2 = inits[layer.w1], inits[layer.w2]
        hidden = w1.shape[layer.w1_units_axis]
        keep_n = max(1, hidden - int(round(fraction * hidden)))
        out_norm = np.linalg.norm(w2, axis=1 - layer.w2_units_axis)
        if stats is None:
            strength = np.linalg.norm(w1, axis=1 - layer.w1_units_axis)
        else:
            strength = stats[i][1]
        keep = np.sort(np.argsort(-(strength * out_norm), kind="stable")[:keep_n])
        if stats is not None and layer.next_bias is not None:
            dropped = np.setdiff1d(np.arange(hidden), keep)
            rows = np.take(w2, dropped, axis=layer.w2_units_axis)
            if layer.w2_units_axis == 1:
                rows = rows.T
            shift = stats[i][0][dropped] @ rows  # what the dropped units added, on average
            nb = inits[layer.next_bias]
            graph.replace_initializer(model, layer.next_bias,
                                      (nb + shift.reshape(nb.shape)).astype(nb.dtype))
        graph.replace_initializer(model, layer.w1, np.take(w1, keep, axis=layer.w1_units_axis))
        graph.replace_initializer(model, layer.w2, np.take(w2, keep, axis=layer.w2_units_axis))
        if layer.bias is not None:
            b = inits[layer.bias]
            graph.replace_initializer(model, layer.bias, np.take(b, keep, axis=b.ndim - 1))
        report[layer.w1] = (hidden, keep_n)
        stale = set(layer.tensors)
        kept = [v for v in model.graph.value_info if v.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    onnx.checker.check_model(model)
    graph.save(model, Path(dst))
    return PruneReport(Path(dst), before, graph.parameter_count(model),
                       graph.parameter_count(model, nonzero=True), report)
