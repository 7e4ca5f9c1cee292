"""Open Inference Protocol (V2) tensors: JSON, and Triton's binary tensor data extension.

A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
tensors, in input order, each announced by `parameters.binary_data_size`. Outputs come back
binary when the request asks (`outputs[i].parameters.binary_data` or the request parameter
`binary_data_output`).
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

import numpy as np
import orjson

from ..economics.meter import pico_to_micro
from ..serving import BadInput, InferenceRequest, InferenceResponse
from ..tensors import DATATYPES, datatype_of

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_sum = np.add.reduce
# Protocol-level request parameters: they shape the encoding, so they are not passed through.
_RESERVED = frozenset({"binary_data_output", "timeout"})

BinaryOutputs = bool | frozenset[str]


def decode_request(body: bytes, header_length: int | None, model: str, version: str | None,
                   tenant: str, tier: str | None = None
                   ) -> tuple[InferenceRequest, BinaryOutputs]:
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise BadInput(f"Inference-Header-Content-Length {header_length} is outside the "
                           f"{len(body)}-byte body")
        head, blob = body[:header_length], memoryview(body)[header_length:]
    else:
        head, blob = body, None
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"malformed JSON body: {exc}") from None
    if type(doc) is not dict:
        raise BadInput("the request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise BadInput("'inputs' must be a non-empty list")
    params = doc.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise BadInput("'parameters' must be an object")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _decode_tensor(raw, blob, offset)
        if name in inputs:
            raise BadInput(f"input '{name}' is given twice")
        inputs[name] = array
        offset += used
    if blob is not None and offset != len(blob):
        raise BadInput(f"binary data has {len(blob) - offset} bytes no input claims")

    raw_outputs = doc.get("outputs")
    if raw_outputs is None and not params:
        outputs, binary, timeout_s = None, False, None
    else:
        outputs, binary = _requested_outputs(raw_outputs, params)
        timeout_s = _timeout(params)
        params = {k: v for k, v in params.items() if k not in _RESERVED}
    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        raise BadInput("'id' must be a string")
    return InferenceRequest(model, inputs, version, request_id, params, outputs, tenant,
                            timeout_s, tier=tier), binary


def _decode_tensor(raw: Any, blob: memoryview | None, offset: int) -> tuple[str, np.ndarray, int]:
    if type(raw) is not dict:
        raise BadInput("each input must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if type(name) is not str:
        raise BadInput("an input has no 'name'")
    shape = raw.get("shape")
    if type(shape) is not list or not _is_shape(shape):
        raise BadInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    datatype = raw.get("datatype")
    dtype = DATATYPES.get(datatype) if type(datatype) is str else None
    if dtype is None:
        raise BadInput(f"input '{name}': unknown datatype {datatype!r}; "
                       f"use one of {', '.join(DATATYPES)}")
    params = raw.get("parameters")
    size = params.get("binary_data_size") if type(params) is dict else None
    if size is not None:
        return name, _binary_tensor(name, shape, datatype, dtype, size, blob, offset), size
    data = raw.get("data")
    if data is None:
        raise BadInput(f"input '{name}' has neither 'data' nor binary_data_size")
    try:
        if datatype == "BYTES":
            array = np.array([_to_bytes(v) for v in _flatten(data)], dtype=object)
        else:
            array = _typed(np.asarray(data), dtype, datatype, name)
        return name, array.reshape(shape), 0
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"input '{name}': data does not fit shape {shape} as {datatype}: "
                       f"{exc}") from None


# JSON element kinds each datatype accepts: numpy would silently parse "0.5" as a float and
# truncate 1.5 to an integer; a client that sends those has a bug we should name.
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_WHAT = {"b": "booleans", "iu": "whole numbers", "iuf": "numbers"}
# A cast that overflows is answered with a 400 below; numpy's warning would only be log noise.
# Only this module's casts: a filter without `module` would silence the host program's too.
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning,
                        module=__name__)


def _typed(values: np.ndarray, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    kinds = _JSON_KINDS.get(datatype, "iu")
    if values.dtype.kind not in kinds and values.size:
        raise BadInput(f"input '{name}': {datatype} data must be {_WHAT[kinds]}")
    if values.dtype == dtype:
        return values
    if kinds == "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise BadInput(f"input '{name}': a value is out of range for {datatype}")
    array = values.astype(dtype)
    if kinds == "iuf":
        # JSON has no infinities, so one here is an overflow (1e40 as FP32); a finite sum
        # rules that out in one reduction
        if not math.isfinite(_sum(array, None)) and np.isinf(array).any():
            raise BadInput(f"input '{name}': a value is out of range for {datatype}")
    return array


def _is_shape(shape: list) -> bool:
    for d in shape:
        if type(d) is not int or d < 0:
            return False
    return True


def _binary_tensor(name: str, shape: list[int], datatype: str, dtype: np.dtype, size: Any,
                   blob: memoryview | None, offset: int) -> np.ndarray:
    if blob is None:
        raise BadInput(f"input '{name}' has binary_data_size but the request has no "
                       "Inference-Header-Content-Length header")
    if type(size) is not int or size < 0 or offset + size > len(blob):
        raise BadInput(f"input '{name}': binary_data_size {size!r} runs past the body")
    chunk = blob[offset:offset + size]
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _unpack_bytes(chunk, count, name)
    elif size != count * dtype.itemsize:
        raise BadInput(f"input '{name}': {size} bytes do not hold shape {shape} of "
                       f"{datatype} ({count * dtype.itemsize} bytes)")
    else:
        flat = np.frombuffer(chunk, dtype=dtype)
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # the element count fits; the rank is past numpy's limit
        raise BadInput(f"input '{name}': shape {shape}: {exc}") from None


def _flatten(data: Any) -> list:
    """The leaves of nested lists, in order. No recursion: the client picks the depth, and
    a thousand brackets would pass Python's recursion limit."""
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"BYTES elements must be strings, got {type(value).__name__}")


def _unpack_bytes(chunk: memoryview, count: int, name: str) -> np.ndarray:
    items, pos, raw = [], 0, bytes(chunk)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInput(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadInput(f"input '{name}': BYTES element runs past its data")
        items.append(raw[pos:pos + n])
        pos += n
    if len(items) != count:
        raise BadInput(f"input '{name}': {len(items)} BYTES elements for {count} in the shape")
    return np.array(items, dtype=object)


def _requested_outputs(raw: Any, params: dict) -> tuple[list[str] | None, BinaryOutputs]:
    all_binary = params.get("binary_data_output") is True
    if raw is None:
        return None, all_binary
    if type(raw) is not list:
        raise BadInput("'outputs' must be a list of objects with a 'name'")
    names, binary = [], set()
    for o in raw:
        if type(o) is not dict or type(o.get("name")) is not str:
            raise BadInput("'outputs' must be a list of objects with a 'name'")
        p = o.get("parameters")
        if p is not None and type(p) is not dict:
            raise BadInput(f"output '{o['name']}': 'parameters' must be an object")
        names.append(o["name"])
        if (p or {}).get("binary_data", all_binary) is True:
            binary.add(o["name"])
    return names, frozenset(binary)


def _timeout(params: dict) -> float | None:
    value = params.get("timeout")
    if value is None:
        return None
    if type(value) not in (int, float) or value <= 0:
        raise BadInput("parameter 'timeout' must be a positive number of microseconds")
    return value / 1e6


def encode_response(response: InferenceResponse, binary: BinaryOutputs) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    outputs, blobs = [], []
    for name, array in response.outputs.items():
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": array.shape}
        if binary is True or (binary and name in binary):
            if datatype == "BYTES":
                raw = _pack_bytes(array)
            else:
                raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_to_text(v) for v in array.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    parameters = {
        **response.parameters,
        "cost_micro_usd": pico_to_micro(response.cost_pusd),
        "cost_pico_usd": response.cost_pusd,
        "queue_ms": round(response.queue_s * 1000, 4),
        "compute_ms": round(response.compute_s * 1000, 4),
        "batch_size": response.batch_size,
        "variant": response.variant,
    }
    doc: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    doc["parameters"] = parameters
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=_DUMPS_OPTIONS)
    if not blobs:
        return head, None
    return b"".join((head, *blobs)), len(head)


def _pack_bytes(array: np.ndarray) -> bytes:
    parts = []
    for v in array.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _to_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
