"""ONNX models on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..tensors import TensorSpec
from .base import ModelLoadError, Runtime

# onnxruntime's element type names -> V2 datatypes
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def texts(values: np.ndarray) -> list[str]:
    """BYTES elements (bytes, as the V2 codec gives them, or str) as a flat list of str; bytes
    that are not UTF-8 read as U+FFFD."""
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in values.reshape(-1)]


def as_text(values: np.ndarray) -> np.ndarray:
    """`texts` in the array's shape: given bytes, onnxruntime would read each element's repr,
    "b'...'", as the string."""
    return np.asarray(texts(values), dtype=object).reshape(values.shape)


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or [-1]))
    return TensorSpec(arg.name, datatype, shape)


class OnnxRuntime(Runtime):
    """Options: `threads` (intra-op threads, default 1: the server holds a share of a device,
    and one thread per instance keeps that share honest), `device` ('cpu' or 'gpu')."""

    name = "onnx"
    filename = "model.onnx"

    def __init__(self, path: Path, options: dict[str, Any]):
        super().__init__(path, options)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.get("threads", 1))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        if options.get("device") == "gpu" and gpu:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types for bad files
            raise ModelLoadError(f"{path}: not a loadable ONNX model: {exc}") from exc
        self.single_threaded = (so.intra_op_num_threads == 1
                                and self.session.get_providers() == ["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._strings = [i.name for i in self.session.get_inputs() if i.type == "tensor(string)"]

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return (
            [_spec(i) for i in self.session.get_inputs()],
            [_spec(o) for o in self.session.get_outputs()],
        )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._strings:
            inputs = {**inputs, **{name: as_text(inputs[name]) for name in self._strings
                                   if name in inputs}}
        results = self.session.run(self._outputs, inputs)
        return dict(zip(self._outputs, results, strict=True))
