"""The naive server: FastAPI + pydantic + uvicorn (uvloop, httptools) + onnxruntime, one
request per model call, no batching: what a team writes first. The model runs on the event
loop (an `async def` route), onnxruntime with one intra-op thread like every other server."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def create_app(model_path: Path) -> FastAPI:
    session = _session(model_path)
    output_names = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: InferenceRequest) -> dict:
        feeds = {t.name: np.asarray(t.data, dtype=np.float32).reshape(t.shape)
                 for t in request.inputs}
        results = session.run(output_names, feeds)
        return {"model_name": model, "outputs": [
            {"name": name, "shape": list(r.shape), "datatype": _DATATYPES[r.dtype],
             "data": r.ravel().tolist()}
            for name, r in zip(output_names, results, strict=True)
        ]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
