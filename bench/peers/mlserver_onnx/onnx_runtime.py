"""A minimal MLServer runtime for ONNX models: onnxruntime with one intra-op thread.

MLServer's adaptive batching (max_batch_size / max_batch_time in model-settings.json) merges
concurrent requests into one `predict` call and splits the answer again."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i).astype(np.float32, copy=False)
                 for i in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        outputs = [NumpyCodec.encode_output(name, r)
                   for name, r in zip(self._output_names, results, strict=True)]
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=outputs)
