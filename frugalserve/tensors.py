"""The tensor vocabulary every room shares: V2 datatypes and declared tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Open Inference Protocol datatype names and their NumPy dtypes (BYTES holds Python bytes objects).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of an array; strings and bytes are BYTES."""
    name = _BY_DTYPE.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in "USO":
        return "BYTES"
    raise ValueError(f"no V2 datatype for numpy dtype {array.dtype}")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output: shape uses -1 for any size; the first axis is the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    allow_nan: bool = False

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor '{self.name}': unknown datatype {self.datatype!r}")
        if not self.shape:
            raise ValueError(f"tensor '{self.name}': shape must have a batch axis")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"tensor '{self.name}': shape {list(self.shape)} has a bad dimension")

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
