"""Small helpers over ONNX graphs that every variant maker needs: load/save, the input name,
initializers as NumPy arrays, parameter counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def save(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def input_name(model: onnx.ModelProto) -> str:
    """The first graph input that is not an initializer (old exporters list weights as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def parameter_count(model: onnx.ModelProto | Path, nonzero: bool = False) -> int:
    """Floating-point weights of the model (biases included), or only the non-zero ones."""
    if not isinstance(model, onnx.ModelProto):
        model = load(model)
    total = 0
    for value in initializers(model).values():
        if value.dtype.kind == "f":
            total += int(np.count_nonzero(value)) if nonzero else value.size
    return total
