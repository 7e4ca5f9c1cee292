"""The client side of the Open Inference Protocol (V2): request bodies and reading responses.

What a caller of a frugalserve (or Triton, KServe, MLServer) endpoint needs to build load:
JSON bodies from arrays, bodies from a file, or zeros shaped like a model's declared inputs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .tensors import DATATYPES, datatype_of


def infer_url(base: str, model: str, version: str | None = None) -> str:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    return base.rstrip("/") + path + "/infer"


def infer_body(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> bytes:
    """A JSON inference request; naming `outputs` keeps the response to what the caller reads."""
    doc: dict[str, Any] = {"inputs": [
        {"name": name, "shape": list(array.shape), "datatype": datatype_of(array),
         # BYTES (object arrays) travel as JSON strings, which orjson takes only from a list
         "data": array.reshape(-1).tolist() if array.dtype == object else array.reshape(-1)}
        for name, array in inputs.items()
    ]}
    if outputs is not None:
        doc["outputs"] = [{"name": name} for name in outputs]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def output_data(response: bytes, name: str) -> list:
    """The flat data of one output of a JSON response."""
    for output in orjson.loads(response)["outputs"]:
        if output["name"] == name:
            return output["data"]
    raise KeyError(f"the response has no output '{name}'")


def bodies_from_file(path: Path) -> list[bytes]:
    """A file with one V2 request object, or a JSON list of them."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    docs = doc if isinstance(doc, list) else [doc]
    if not docs or not all(isinstance(d, dict) and "inputs" in d for d in docs):
        raise ValueError(f"{path}: expected a V2 request object or a list of them "
                         '(each with "inputs")')
    return [orjson.dumps(d) for d in docs]


def fetch_metadata(base: str, model: str, timeout_s: float = 10.0) -> dict:
    url = base.rstrip("/") + f"/v2/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            doc = json.load(response)
    except urllib.error.HTTPError as exc:  # say what the server said, not just the code
        raise ValueError(f"GET {url}: {exc.code} {exc.read()[:300].decode(errors='replace')}"
                         ) from None
    except urllib.error.URLError as exc:  # refused, unknown host: the reason, not its repr
        raise ValueError(f"GET {url}: {exc.reason}") from None
    except json.JSONDecodeError:
        raise ValueError(f"GET {url}: the answer is not JSON; is this a V2 server?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ValueError(f"GET {url}: the answer is not V2 model metadata (no inputs)")
    return doc


def zeros_body(metadata: dict) -> bytes:
    """One request of zeros shaped as the model declares (any-size axes become 1)."""
    inputs = {}
    for spec in metadata["inputs"]:
        shape = [d if d > 0 else 1 for d in spec["shape"]]
        if spec["datatype"] == "BYTES":
            inputs[spec["name"]] = np.full(shape, "", dtype=object)
        else:
            inputs[spec["name"]] = np.zeros(shape, dtype=DATATYPES[spec["datatype"]])
    return infer_body(inputs)
